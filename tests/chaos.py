"""A chaos OpenAI-compatible provider: a raw asyncio HTTP/1.1 server on loopback that misbehaves on request.

aiohttp's server is too well behaved to lie about a Content-Length, speak something that is not HTTP, reset a
connection in the middle of a chunk or hand the socket one byte at a time, so this one writes the bytes
itself. Well-formed answers keep the connection alive (the gateway pools connections); a fault closes it.

A request with `"stream": true` gets an SSE stream (with a usage chunk before `[DONE]` when it asked with
`stream_options.include_usage`), others a chat.completion. What else it gets is chosen by the words of its
last message, as in tests/billing.py. Each word is a directive, `name` or `name=value`; `name@upstream`
applies only on the upstream of that name (the same request goes to every provider a gateway tries, so this
is how one provider fails while the next one serves):

  latency=S        wait S seconds before the response head; jitter=S adds up to S more (seeded)
  stall-head       never send a response head (until the gateway hangs up)
  stall-mid-head   send half of the response head, then nothing
  interim          a `103 Early Hints` head before the real one
  stall-body       send the head, then nothing (until the gateway hangs up)
  reset-after=K    send K stream events (non-streamed: K body bytes), then reset the connection (RST)
  close-after=N    send N body bytes of a response framed for more (Content-Length, or chunked), then close
  short-length     a Content-Length 16 bytes short of the body (the rest is garbage on the connection)
  slice            every body byte its own write, flushed (SSE streams: every byte its own HTTP chunk)
  trickle=BPS      the body at BPS bytes per second, in 8-byte writes
  gap=S            streams: S seconds between events
  crlf             streams: events framed with CRLF line ends (`\\r\\n\\r\\n` ends an event), as the SSE spec allows
  garbage          200, application/json, a body that is not JSON
  truncated        200, application/json, a body that is the first half of the JSON answer
  not-http         a reply that is not HTTP at all
  html             200 text/html: a proxy's error page instead of the provider's answer
  ctype=TYPE       the usual answer, with this Content-Type
  oversize=N       a valid JSON answer padded to N bytes
  status=CODE      that status with an OpenAI-shaped error body
  429=S            429 with `Retry-After: S` (seconds); 429-date=S: the same as an HTTP-date S seconds ahead
  storm=N          503 for the first N requests carrying this word (per upstream), then normal answers

A usage (tests/billing.py `usage_for` of the text) is in every successful answer and counted in `reported`
once its bytes were written, so tests compare the gateway's ledger with what the provider really reported.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

import orjson

from tests.billing import Reported, openai_usage, usage_for

HANG_S = 30.0  # a stall lasts until the gateway hangs up, or this long


@dataclass
class Seen:
    """One request as the chaos upstream received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, object] | None
    text: str = ""
    sent: bytes = b""  # the response body bytes written (before any framing)
    hung_up: bool = False  # the gateway closed the connection while this request was being answered


@dataclass
class Directives:
    words: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.words

    def get(self, name: str) -> str | None:
        return self.words.get(name)

    def num(self, name: str, default: float = 0.0) -> float:
        value = self.words.get(name)
        return default if value is None else float(value)


def directives(text: str, upstream: str) -> Directives:
    """The words of `text` that apply on `upstream` (`name@other` words apply only on `other`)."""
    out: dict[str, str] = {}
    for word in text.split():
        word, _, only = word.partition("@")
        if only and only != upstream:
            continue
        name, _, value = word.partition("=")
        out[name] = value
    return Directives(out)


def _chunk(n: int, model: str, delta: dict[str, object], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    doc = {"id": f"chatcmpl-chaos-{n}", "object": "chat.completion.chunk", "created": 1, "model": model}
    return b"data: " + orjson.dumps({**doc, "choices": [choice]}) + b"\n\n"


def stream_events(n: int, model: str, usage: dict[str, int] | None) -> list[bytes]:
    """A complete OpenAI chat stream: role, two content chunks, finish, the usage chunk if asked, [DONE]."""
    events = [
        _chunk(n, model, {"role": "assistant", "content": ""}),
        _chunk(n, model, {"content": "Hello"}),
        _chunk(n, model, {"content": " world"}),
        _chunk(n, model, {}, "stop"),
    ]
    if usage is not None:
        tail = {"id": f"chatcmpl-chaos-{n}", "object": "chat.completion.chunk", "created": 1, "model": model}
        events.append(b"data: " + orjson.dumps({**tail, "choices": [], "usage": openai_usage(usage)}) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def completion(n: int, model: str, usage: dict[str, int]) -> bytes:
    message = {"role": "assistant", "content": f"answer {n}"}
    return orjson.dumps(
        {
            "id": f"chatcmpl-chaos-{n}",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": openai_usage(usage),
        }
    )


def error_body(message: str, kind: str = "server_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})


class _HungUp(Exception):
    """The gateway closed the connection while we were answering."""


class ChaosUpstream:
    """`await ChaosUpstream("a").start()`; `base_url` is then `http://127.0.0.1:PORT/v1`. `close()` at the end."""

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name = name
        self.rng = random.Random(seed)
        self.reported = Reported()  # usages whose bytes were written in full
        self.requests: list[Seen] = []
        self.storms: Counter[str] = Counter()  # storm word → requests it already failed
        self.hung_up = 0  # answers cut short because the gateway closed the connection
        self.connections = 0
        self.base_url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._hangup = asyncio.Event()

    # -- lifecycle --

    async def start(self) -> ChaosUpstream:
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self._server.wait_closed()
            self._server = None

    @property
    def posts(self) -> list[Seen]:
        return [r for r in self.requests if r.method == "POST"]

    async def wait_hung_up(self, n: int = 1, within: float = 5.0) -> None:
        """Wait until `n` answers were cut short by the gateway closing the connection."""
        async with asyncio.timeout(within):
            while self.hung_up < n:
                self._hangup.clear()
                await self._hangup.wait()

    # -- the connection: requests in turn, while answers are well formed --

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write its own segment
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                seen = Seen(method, path, headers, orjson.loads(raw) if raw else None)
                self.requests.append(seen)
                try:
                    keep = await self._answer(seen, reader, writer)
                except (_HungUp, ConnectionError):
                    seen.hung_up = True
                    self.hung_up += 1
                    self._hangup.set()
                    return
                if not keep:
                    return
        except asyncio.CancelledError:
            return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.transport.is_closing():
            raise _HungUp
        writer.write(data)
        await writer.drain()

    async def _hang(self, reader: asyncio.StreamReader) -> None:
        """Send nothing until the gateway hangs up (or HANG_S passes)."""
        try:
            async with asyncio.timeout(HANG_S):
                while await reader.read(65536):
                    pass
        except TimeoutError:
            return
        raise _HungUp

    async def _answer(self, seen: Seen, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True if the connection may serve another."""
        if seen.method == "GET" and seen.path.endswith("/models"):
            body = orjson.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
            await self._write(writer, _head(200, "application/json", len(body)) + body)
            return True
        req = seen.body or {}
        messages = req.get("messages") or [{"content": ""}]
        text = str(messages[-1].get("content", ""))  # type: ignore[index, union-attr]
        seen.text = text
        d = directives(text, self.name)
        model = str(req.get("model", "m"))
        n = len(self.posts)
        delay = d.num("latency") + (self.rng.uniform(0, d.num("jitter")) if "jitter" in d else 0.0)
        if delay:
            await asyncio.sleep(delay)
        if "stall-head" in d:
            await self._hang(reader)
            return False
        if "stall-mid-head" in d:
            head = _head(200, "application/json", 10)
            await self._write(writer, head[: len(head) // 2])
            await self._hang(reader)
            return False
        if "interim" in d:
            await self._write(writer, b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        if "not-http" in d:
            await self._write(writer, b"SSH-2.0-OpenSSH_9.6\r\n\x00\xff garbage, not HTTP\r\n\r\n")
            return False
        if "storm" in d and self.storms[text] < int(d.num("storm")):
            self.storms[text] += 1
            return await self._error(writer, 503, "storm: the provider is overloaded")
        for word in ("429", "429-date"):
            if word in d:
                s = d.num(word)
                retry = str(int(s)) if word == "429" else email.utils.formatdate(time.time() + s, usegmt=True)
                return await self._error(writer, 429, "rate limited", {"Retry-After": retry}, "rate_limit_error")
        if "status" in d:
            return await self._error(writer, int(d.num("status")), f"status {d.get('status')}")
        usage = usage_for(text)
        options = req.get("stream_options")
        if req.get("stream") is True:
            with_usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._stream(seen, d, reader, writer, stream_events(n, model, usage if with_usage else None),
                                      usage if with_usage else None)  # fmt: skip
        ctype = "application/json"
        if "garbage" in d:
            body = b"\x00\xff<<this is not JSON>>"
        elif "truncated" in d:
            whole = completion(n, model, usage)
            body = whole[: len(whole) // 2]
        elif "html" in d:
            body, ctype = b"<html><body><h1>502 Bad Gateway</h1>nginx</body></html>", "text/html"
        elif "oversize" in d:
            pad = max(0, int(d.num("oversize")) - len(completion(n, model, usage)) - 16)
            doc = orjson.loads(completion(n, model, usage))
            doc["padding"] = "x" * pad
            body = orjson.dumps(doc)
        else:
            body = completion(n, model, usage)
        ctype = d.get("ctype") or ctype
        ok = await self._body(seen, d, reader, writer, ctype, body)
        if ok and body.endswith(b"}") and b'"usage"' in body and "short-length" not in d:
            self.reported.add(usage)
        return ok

    async def _error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        kind: str = "server_error",
    ) -> bool:
        body = error_body(message, kind)
        await self._write(writer, _head(status, "application/json", len(body), headers) + body)
        return True

    async def _body(
        self,
        seen: Seen,
        d: Directives,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ctype: str,
        body: bytes,
    ) -> bool:
        """A Content-Length body, written as the directives say; True if the connection stays usable."""
        length = len(body) - 16 if "short-length" in d else len(body)
        await self._write(writer, _head(200, ctype, length))
        if "stall-body" in d:
            await self._hang(reader)
            return False
        cut = d.get("close-after") or d.get("reset-after")
        if cut is not None:
            body = body[: int(cut)]
        await self._pieces(seen, d, writer, body)
        if "reset-after" in d:
            _reset(writer)
            return False
        return cut is None and "short-length" not in d

    async def _stream(
        self,
        seen: Seen,
        d: Directives,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        events: list[bytes],
        usage: dict[str, int] | None,
    ) -> bool:
        """An SSE stream, chunked; True if it ended well (the connection stays usable)."""
        ctype = d.get("ctype") or "text/event-stream"
        await self._write(writer, _head(200, ctype, None))
        if "stall-body" in d:
            await self._hang(reader)
            return False
        if "reset-after" in d:
            events = events[: int(d.num("reset-after"))]
        if "crlf" in d:
            events = [e.replace(b"\n", b"\r\n") for e in events]
        if "gap" in d:
            for i, event in enumerate(events):
                if i:
                    await asyncio.sleep(d.num("gap"))
                await self._pieces(seen, d, writer, event, chunked=True)
        else:
            data = b"".join(events)
            if "close-after" in d:
                data = data[: int(d.num("close-after"))]
            await self._pieces(seen, d, writer, data, chunked=True)
        if "reset-after" in d:
            _reset(writer)
            return False
        if "close-after" in d:
            return False  # a clean close, framed for more: the last chunk never came
        await self._write(writer, b"0\r\n\r\n")
        if usage is not None:
            self.reported.add(usage)
        return True

    async def _pieces(
        self, seen: Seen, d: Directives, writer: asyncio.StreamWriter, data: bytes, chunked: bool = False
    ) -> None:
        """Write `data` as the directives cut it: whole, byte by byte, or trickled; each piece flushed."""
        if "slice" in d:
            size, gap = 1, 0.0
        elif "trickle" in d:
            size = 8
            gap = size / d.num("trickle")
        else:
            size, gap = max(len(data), 1), 0.0
        for i in range(0, len(data), size):
            piece = data[i : i + size]
            await self._write(writer, b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
            seen.sent += piece
            await asyncio.sleep(gap)  # 0: still yields, so the reader sees the pieces apart


def _head(status: int, ctype: str, length: int | None, extra: dict[str, str] | None = None) -> bytes:
    reason = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
              503: "Service Unavailable", 504: "Gateway Timeout"}.get(status, "Status")  # fmt: skip
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {ctype}", "Server: chaos"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN: the peer sees ECONNRESET."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
