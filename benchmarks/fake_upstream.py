"""A fake OpenAI (or Anthropic, or Gemini) provider that is never the bottleneck.

Benchmarks measure what a proxy adds on top of its upstream, so the upstream must cost next to nothing: a bare
asyncio.Protocol with httptools (llhttp) parsing requests on uvloop, answering with bytes prebuilt at start.
It serves the very fixture files the tests use (tests/fixtures/openai/): one source of truth for what an
OpenAI response looks like, and the bytes a relayed stream is checked against.

`--format anthropic|gemini|bedrock` serves tests/fixtures/<format>/ (stream_ok.sse, chat_ok.json) at that provider's
paths instead, for gateways whose adapter transcodes: Anthropic `POST /v1/messages` (streamed when the body
says `"stream":true`), `GET /v1/models`; Gemini `POST /v1beta/models/{model}:generateContent` and
`:streamGenerateContent` (any model; the verb after the colon picks the answer), `GET /v1beta/models`. The
request body is never parsed, so any body will do. The OpenAI format (the default) is served as before.

Fault injection, for the routing scenarios: a share of the POST requests (the generation routes; GETs such as
`/v1/models`, which health probes and readiness checks use, always succeed) can be slow (`--slow-share`: the
first byte after `--slow-ms` instead of the TTFT), fail (`--fail-share`: 500 with OpenAI's error body
`chat_500.json`, at once) or be reset (`--reset-share`: the connection is aborted at once, no answer). Two
faults strike after the answer has begun, for the `soak` scenario: `--stall-share` sends the head and the first
half of the answer (a stream: half its events, the first content ones among them; a whole body: half its
bytes), then nothing more, until the peer gives up or `--stall-ms` passes (then the connection is aborted);
`--cut-share` sends the same half and then aborts the connection. One draw per request from a seeded RNG
(`--seed`), so a run is reproducible given the same arrival order. `GET /stats` answers what was served:
`{"requests", "slow", "failed", "reset", "stalled", "cut", "mid_stream", "gets"}` (requests = POSTs;
`mid_stream`: the stalls and cuts that struck a stream, after its first content event; /stats itself is not
counted).

Stamped streams, for the `streams` scenario (OpenAI format only; off unless asked): with `--stamp-events N`
a streamed POST answers N generated content events instead of the fixture (N from the body's `"max_tokens"`
when it has one, so one upstream serves streams of any length), `--chunk-gap-ms` apart on an absolute
schedule, each event's content `#<seq>@<ns>`: its sequence number and `time.perf_counter_ns()` (CLOCK_MONOTONIC,
comparable across processes) taken just before its write; then a `finish_reason` event and `[DONE]`. With
`--push-bytes B` a streamed POST instead pushes ~B bytes of such events (padded to ~16 KiB each) as fast as
the connection takes them, waiting whenever the transport asks it to (`pause_writing`), so what it could not
send stays unsent instead of in this process's memory. `/stats` then also has `stamped_events` and `push_bytes`
(bytes handed to the transport), `push_events` and `push_done`.

Run: python -m benchmarks.fake_upstream --port 18001 [--format openai] [--ttft-ms 0] [--ttft-jitter-ms 0]
     [--chunk-gap-ms 0] [--slow-share 0 --slow-ms 2000] [--fail-share 0] [--reset-share 0]
     [--stall-share 0 --stall-ms 60000] [--cut-share 0] [--seed 1] [--stamp-events N | --push-bytes B]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import sys
import time
from pathlib import Path
from typing import cast

import httptools
import uvloop

FIXTURES_ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
FIXTURES = FIXTURES_ROOT / "openai"
FORMATS = ("openai", "anthropic", "gemini", "bedrock")
CHAT_PATH = b"/v1/chat/completions"
ANTHROPIC_PATH = b"/v1/messages"
GEMINI_PREFIX = b"/v1beta/models/"
STATS_PATH = b"/stats"
_OK, _SLOW, _FAIL, _RESET, _STALL, _CUT = 0, 1, 2, 3, 4, 5
_CUT_AFTER_S = 0.05  # a cut waits this long after its half answer, so the peer has read it before the reset


_EVENT = re.compile(rb".*?(?:\r\n\r\n|\n\n)", re.DOTALL)


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into its events, each keeping its blank-line terminator (`\\n\\n`, or `\\r\\n\\r\\n` as
    Gemini sends)."""
    events = _EVENT.findall(raw)
    if b"".join(events) != raw:
        raise ValueError("SSE fixture must be events each ending in a blank line")
    return events


def _response(body: bytes, content_type: bytes = b"application/json", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (status, content_type, len(body), body)


# What the non-OpenAI formats answer where they have no fixture: a model list (health probes GET it) and the
# provider's own shape of a 500 (for --fail-share).
_MODELS = {
    "anthropic": b'{"data":[{"type":"model","id":"claude-sonnet-4-20250514","display_name":"Claude Sonnet 4",'
    b'"created_at":"2025-05-22T00:00:00Z"}],"has_more":false,"first_id":"claude-sonnet-4-20250514",'
    b'"last_id":"claude-sonnet-4-20250514"}',
    "gemini": b'{"models":[{"name":"models/gemini-2.5-flash","displayName":"Gemini 2.5 Flash",'
    b'"supportedGenerationMethods":["generateContent","countTokens"]}]}',
    "bedrock": b'{"modelSummaries":[{"modelId":"anthropic.claude-sonnet-4-20250514-v1:0"}]}',
}
_SERVER_ERROR = {
    "anthropic": b'{"type":"error","error":{"type":"api_error","message":"Internal server error"}}',
    "gemini": b'{"error":{"code":500,"message":"An internal error has occurred.","status":"INTERNAL"}}',
    "bedrock": b'{"message":"An internal server error occurred. Retry your request."}',
}
BEDROCK_PREFIX = b"/model/"  # /model/{modelId}/converse and /converse-stream


def _aws_frames(data: bytes) -> list[bytes]:
    """An AWS event stream cut into its frames (each starts with its own total length, big-endian)."""
    out, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        out.append(data[i : i + n])
        i += n
    return out


class Routes:
    """Every response as wire bytes, built once, so serving one is a dict lookup and a write.

    `stream_path`: POSTs to it stream (OpenAI, Anthropic: only when the body asks, `stream_by_body`).
    `path_tail` (Gemini, Bedrock): the model is in the path, so a POST is looked up by its last part alone."""

    def __init__(self, fixtures: Path = FIXTURES, fmt: str = "openai") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
        if fixtures == FIXTURES and fmt != "openai":
            fixtures = FIXTURES_ROOT / fmt

        def fixture(name: str) -> bytes:
            return _response((fixtures / name).read_bytes())

        self.format = fmt
        self.stream_by_body = fmt in ("openai", "anthropic")
        # The model is in the path: a POST's path is looked up by its last part (Gemini `:verb`, Bedrock `/verb`).
        self.path_tail = {"gemini": (GEMINI_PREFIX, b":"), "bedrock": (BEDROCK_PREFIX, b"/")}.get(fmt)
        if fmt == "openai":
            self.stream_path = CHAT_PATH
            self.fixed: dict[tuple[bytes, bytes], bytes] = {
                (b"POST", CHAT_PATH): fixture("chat_ok.json"),
                (b"POST", b"/v1/completions"): fixture("completion_ok.json"),
                (b"POST", b"/v1/embeddings"): fixture("embeddings_ok.json"),
                (b"GET", b"/v1/models"): fixture("models_ok.json"),
            }
            server_error = (fixtures / "chat_500.json").read_bytes()
        elif fmt == "anthropic":
            self.stream_path = ANTHROPIC_PATH
            self.fixed = {
                (b"POST", ANTHROPIC_PATH): fixture("chat_ok.json"),
                (b"GET", b"/v1/models"): _response(_MODELS[fmt]),
            }
            server_error = _SERVER_ERROR[fmt]
        elif fmt == "bedrock":
            self.stream_path = b"/converse-stream"
            self.fixed = {
                (b"POST", b"/converse"): fixture("chat_ok.json"),
                (b"GET", b"/foundation-models"): _response(_MODELS[fmt]),
            }
            server_error = _SERVER_ERROR[fmt]
        else:
            self.stream_path = b":streamGenerateContent"
            self.fixed = {
                (b"POST", b":generateContent"): fixture("chat_ok.json"),
                (b"GET", GEMINI_PREFIX.rstrip(b"/")): _response(_MODELS[fmt]),
            }
            server_error = _SERVER_ERROR[fmt]
        self.server_error = _response(server_error, status=b"500 Internal Server Error")
        self.not_found = _response(
            b'{"error":{"message":"no such route","type":"invalid_request_error"}}', status=b"404 Not Found"
        )
        ctype = b"application/vnd.amazon.eventstream" if fmt == "bedrock" else b"text/event-stream"
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % ctype
        )
        if fmt == "bedrock":
            events = _aws_frames((fixtures / "stream_ok.eventstream").read_bytes())
        else:
            events = sse_events((fixtures / "stream_ok.sse").read_bytes())
        # One HTTP chunk per SSE event, as a provider flushes each token; then the terminating chunk.
        self.stream_chunks = [b"%x\r\n%s\r\n" % (len(event), event) for event in events] + [b"0\r\n\r\n"]


class Faults:
    """What this upstream has served, and the fault drawn for each POST: one uniform draw per request,
    [0, fail) fails, [fail, fail + reset) resets, [fail + reset, fail + reset + slow) is slow, then the next
    `stall` share stalls and the next `cut` share is cut (both after a half answer)."""

    def __init__(
        self,
        ttft_s: float = 0.0,
        jitter_s: float = 0.0,
        slow_share: float = 0.0,
        slow_s: float = 2.0,
        fail_share: float = 0.0,
        reset_share: float = 0.0,
        seed: int = 1,
        stall_share: float = 0.0,
        stall_s: float = 60.0,
        cut_share: float = 0.0,
    ) -> None:
        shares = (slow_share, fail_share, reset_share, stall_share, cut_share)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError("fault shares must be ≥ 0 and add up to at most 1")
        self.ttft_s = ttft_s
        self.jitter_s = jitter_s
        self.slow_s = slow_s
        self.stall_s = stall_s
        self._fail = fail_share
        self._reset = fail_share + reset_share
        self._slow = fail_share + reset_share + slow_share
        # Stalls and cuts come after the older faults, so a seed draws what it always did for those.
        self._stall = self._slow + stall_share
        self._cut = self._stall + cut_share
        self.active = self._cut > 0 or jitter_s > 0  # else: no draw at all (the zero-fault path stays cheap)
        self._rng = random.Random(seed)
        self.counts = {"requests": 0, "slow": 0, "failed": 0, "reset": 0, "gets": 0}
        self.counts.update(stalled=0, cut=0, mid_stream=0)

    def draw(self) -> tuple[int, float]:
        """(fault, seconds before the first byte) for one POST."""
        rng = self._rng
        u = rng.random()
        if u < self._fail:
            self.counts["failed"] += 1
            return _FAIL, 0.0
        if u < self._reset:
            self.counts["reset"] += 1
            return _RESET, 0.0
        if u < self._slow:
            self.counts["slow"] += 1
            return _SLOW, self.slow_s
        ttft_s = self.ttft_s + (rng.random() * self.jitter_s if self.jitter_s else 0.0)
        if u < self._stall:
            self.counts["stalled"] += 1
            return _STALL, ttft_s
        if u < self._cut:
            self.counts["cut"] += 1
            return _CUT, ttft_s
        return _OK, ttft_s

    def stats(self) -> bytes:
        return _response(json.dumps(self.counts).encode())


_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')
_STAMP_CAP = 100_000  # events per stamped stream, whatever a body asks
_PUSH_PAD = 16_000  # bytes of padding per pushed event


class Stamped:
    """Stamped streams (`--stamp-events`, `--push-bytes`): each event carries its sequence number and its send
    time, so a client can count lost or reordered events and measure each event's lag. Counted in `counts`
    (the upstream's /stats)."""

    def __init__(self, events: int = 0, push_bytes: int = 0, counts: dict[str, int] | None = None) -> None:
        self.events = events
        self.push_bytes = push_bytes
        self.counts = counts if counts is not None else {}
        self.counts.update(stamped_events=0, push_bytes=0, push_events=0, push_done=0)
        head = b'data: {"id":"chatcmpl-stamped","object":"chat.completion.chunk","created":1700000000,'
        head += b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"'
        self._head = head
        self._rest = b'"},"finish_reason":null}]}\n\n'
        finish = head[: head.index(b'"delta"')] + b'"delta":{},"finish_reason":"stop"}]}\n\n'
        self.tail = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in (finish, b"data: [DONE]\n\n")) + b"0\r\n\r\n"

    def events_for(self, body: bytes) -> int:
        m = _MAX_TOKENS.search(body)
        return min(int(m[1]), _STAMP_CAP) if m else self.events

    def event(self, seq: int, pad: bytes = b"") -> bytes:
        """One HTTP chunk holding one SSE event, stamped now."""
        payload = b"%s#%d@%d%s%s" % (self._head, seq, time.perf_counter_ns(), pad, self._rest)
        return b"%x\r\n%s\r\n" % (len(payload), payload)


class FakeOpenAI(asyncio.Protocol):
    """One keep-alive connection. Responses with no delay are written inline from the parser callback;
    delayed ones run in a task chained to the previous one, so pipelined requests still answer in order."""

    def __init__(self, routes: Routes, faults: Faults, gap_s: float, stamped: Stamped | None = None) -> None:
        self._routes = routes
        self._faults = faults
        self._gap_s = gap_s
        self._stamped = stamped
        self._writable: asyncio.Future[None] | None = None  # set while the transport asks us to stop writing
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._tail: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tail is not None:
            self._tail.cancel()

    # Flow control: only stamped streams wait on it; every other answer is small and written at once.
    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()

    # httptools parser callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        path = self._url.split(b"?", 1)[0]
        method = self._parser.get_method()
        keep_alive = self._parser.should_keep_alive()
        faults = self._faults
        transport = self._transport
        assert transport is not None
        ttft_s = faults.ttft_s
        if method == b"POST":
            faults.counts["requests"] += 1
            if faults.active:
                fault, ttft_s = faults.draw()
                if fault == _RESET:
                    if self._tail is not None:
                        self._tail.cancel()
                    transport.abort()  # no answer at all: the peer sees the connection reset or closed
                    return
                if fault == _FAIL:
                    self._send([self._routes.server_error], keep_alive, 0.0)
                    return
                if fault >= _STALL:
                    parts = self._post_parts(path)
                    self._tail = asyncio.ensure_future(self._write_partial(self._tail, parts, ttft_s, fault))
                    return
        elif method == b"GET" and path == STATS_PATH:
            self._send([faults.stats()], keep_alive, 0.0)
            return
        else:
            faults.counts["gets"] += 1
        routes = self._routes
        if routes.path_tail is not None and method == b"POST" and path.startswith(routes.path_tail[0]):
            cut = path.rfind(routes.path_tail[1])
            if cut > len(routes.path_tail[0]):
                path = path[cut:]  # …{model}:verb → :verb, …{model}/verb → /verb; no verb: a 404
        if (
            method == b"POST"
            and path == routes.stream_path
            and (not routes.stream_by_body or _wants_stream(b"".join(self._body)))
        ):
            if self._stamped is not None:
                body = b"".join(self._body)
                self._tail = asyncio.ensure_future(self._write_stamped(self._tail, body, keep_alive, ttft_s))
                return
            parts = [routes.stream_head, *routes.stream_chunks]
        else:
            parts = [routes.fixed.get((method, path), routes.not_found)]
        self._send(parts, keep_alive, ttft_s)

    def _post_parts(self, path: bytes) -> list[bytes]:
        """The answer to a POST, as on_message_complete builds it (repeated here to keep the faults out of that
        hot path): a stream's head and chunks, or one whole response."""
        routes = self._routes
        if routes.path_tail is not None and path.startswith(routes.path_tail[0]):
            cut = path.rfind(routes.path_tail[1])
            if cut > len(routes.path_tail[0]):
                path = path[cut:]
        if path == routes.stream_path and (not routes.stream_by_body or _wants_stream(b"".join(self._body))):
            return [routes.stream_head, *routes.stream_chunks]
        return [routes.fixed.get((b"POST", path), routes.not_found)]

    async def _write_partial(
        self, previous: asyncio.Task[None] | None, parts: list[bytes], ttft_s: float, fault: int
    ) -> None:
        """Half an answer, then a stall (nothing more until the peer leaves, or `--stall-ms`) or a cut; either
        way the connection ends aborted. A stream gets its first half of events, `--chunk-gap-ms` apart."""
        if previous is not None:
            await previous
        transport = self._transport
        assert transport is not None
        if ttft_s:
            await asyncio.sleep(ttft_s)
        head, *chunks = parts
        if chunks:
            half = chunks[: max(1, (len(chunks) - 1) // 2)]  # of the events; the terminating chunk is never sent
            transport.write(head + half[0])
            for chunk in half[1:]:
                await asyncio.sleep(self._gap_s)
                transport.write(chunk)
            self._faults.counts["mid_stream"] += 1
        else:
            body_at = head.find(b"\r\n\r\n") + 4
            transport.write(head[: body_at + (len(head) - body_at) // 2])
        await asyncio.sleep(self._faults.stall_s if fault == _STALL else _CUT_AFTER_S)
        transport.abort()

    def _send(self, parts: list[bytes], keep_alive: bool, ttft_s: float) -> None:
        if ttft_s or self._gap_s or self._tail is not None:
            self._tail = asyncio.ensure_future(self._write_delayed(self._tail, parts, keep_alive, ttft_s))
            return
        transport = self._transport
        assert transport is not None
        for part in parts:
            transport.write(part)
        if not keep_alive:
            transport.close()

    async def _write_delayed(
        self, previous: asyncio.Task[None] | None, parts: list[bytes], keep_alive: bool, ttft_s: float
    ) -> None:
        if previous is not None:
            await previous
        transport = self._transport
        assert transport is not None
        head, *chunks = parts  # for a stream: one chunk per event, then the terminating chunk
        if ttft_s:
            await asyncio.sleep(ttft_s)
        # The head goes out with the first event: a provider answers once its first token exists.
        transport.write(head + chunks[0] if chunks else head)
        for chunk in chunks[1:-1]:
            await asyncio.sleep(self._gap_s)
            transport.write(chunk)
        if len(chunks) > 1:
            transport.write(chunks[-1])  # the stream ends right after its last event
        if not keep_alive:
            transport.close()
        if self._tail is asyncio.current_task():
            self._tail = None

    async def _write_stamped(
        self, previous: asyncio.Task[None] | None, body: bytes, keep_alive: bool, ttft_s: float
    ) -> None:
        """A stamped stream: N events `--chunk-gap-ms` apart (on an absolute schedule, so the gaps do not
        drift), or with `--push-bytes` padded events as fast as the transport takes them."""
        if previous is not None:
            await previous
        transport = self._transport
        stamped = self._stamped
        assert transport is not None and stamped is not None
        counts = stamped.counts
        if ttft_s:
            await asyncio.sleep(ttft_s)
        if stamped.push_bytes:
            pad = b" " + b"x" * _PUSH_PAD
            sent, seq = 0, 0
            transport.write(self._routes.stream_head)
            while sent < stamped.push_bytes:
                if self._writable is not None:
                    await self._writable
                elif seq % 64 == 63:
                    await asyncio.sleep(0)  # let /stats through while the peer takes everything at once
                if transport.is_closing():
                    return
                chunk = stamped.event(seq, pad)
                transport.write(chunk)
                sent += len(chunk)
                seq += 1
                counts["push_bytes"] += len(chunk)
                counts["push_events"] += 1
            counts["push_done"] += 1
        else:
            events = stamped.events_for(body)
            start = time.monotonic()
            for seq in range(events):
                if seq:
                    await asyncio.sleep(max(0.0, start + seq * self._gap_s - time.monotonic()))
                if self._writable is not None:
                    await self._writable
                if transport.is_closing():
                    return
                chunk = stamped.event(seq)
                transport.write(self._routes.stream_head + chunk if seq == 0 else chunk)
                counts["stamped_events"] += 1
            if not events:
                transport.write(self._routes.stream_head)
        transport.write(stamped.tail)
        if not keep_alive:
            transport.close()
        if self._tail is asyncio.current_task():
            self._tail = None


def _wants_stream(body: bytes) -> bool:
    return b'"stream":true' in body or b'"stream": true' in body


async def serve(
    host: str, port: int, faults: Faults, gap_ms: float, fmt: str = "openai", stamped: Stamped | None = None
) -> None:
    loop = asyncio.get_running_loop()
    routes = Routes(fmt=fmt)
    server = await loop.create_server(
        lambda: FakeOpenAI(routes, faults, gap_ms / 1000, stamped), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake {fmt} upstream on http://{host}:{bound}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fake_upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port (printed on stderr)")
    parser.add_argument(
        "--format", choices=FORMATS, default="openai", help="wire format served: tests/fixtures/<format>/ at its paths"
    )
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the response head and first event")
    parser.add_argument("--ttft-jitter-ms", type=float, default=0.0, help="plus a uniform 0..this, per request")
    parser.add_argument("--chunk-gap-ms", type=float, default=0.0, help="delay between stream events")
    parser.add_argument("--slow-share", type=float, default=0.0, help="share of POSTs whose first byte is slow")
    parser.add_argument("--slow-ms", type=float, default=2000.0, help="first-byte delay of a slow POST")
    parser.add_argument("--fail-share", type=float, default=0.0, help="share of POSTs answered 500 at once")
    parser.add_argument("--reset-share", type=float, default=0.0, help="share of POSTs whose connection is aborted")
    parser.add_argument(
        "--stall-share", type=float, default=0.0, help="share of POSTs answered halfway, then nothing (a stall)"
    )
    parser.add_argument(
        "--stall-ms", type=float, default=60000.0, help="a stall aborts the connection after this, if the peer has not"
    )
    parser.add_argument(
        "--cut-share", type=float, default=0.0, help="share of POSTs answered halfway, then the connection aborted"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the fault draws")
    parser.add_argument(
        "--stamp-events",
        type=int,
        default=0,
        metavar="N",
        help="openai: a streamed POST answers N stamped events (#seq@perf_counter_ns; N from the body's max_tokens "
        "if it has one), --chunk-gap-ms apart, instead of the fixture",
    )
    parser.add_argument(
        "--push-bytes",
        type=int,
        default=0,
        metavar="B",
        help="openai: a streamed POST pushes ~B bytes of stamped ~16 KiB events as fast as the connection takes them",
    )
    args = parser.parse_args(argv)
    stamping = args.stamp_events or args.push_bytes
    if args.stamp_events < 0 or args.push_bytes < 0 or (stamping and args.format != "openai"):
        parser.error("--stamp-events and --push-bytes must be ≥ 0, and serve the openai format only")
    if stamping and (args.stall_share or args.cut_share):
        parser.error("--stall-share and --cut-share answer the fixtures, not stamped streams")
    try:
        faults = Faults(
            ttft_s=args.ttft_ms / 1000,
            jitter_s=args.ttft_jitter_ms / 1000,
            slow_share=args.slow_share,
            slow_s=args.slow_ms / 1000,
            fail_share=args.fail_share,
            reset_share=args.reset_share,
            seed=args.seed,
            stall_share=args.stall_share,
            stall_s=args.stall_ms / 1000,
            cut_share=args.cut_share,
        )
    except ValueError as e:
        parser.error(str(e))
    stamped = Stamped(args.stamp_events, args.push_bytes, faults.counts) if stamping else None
    uvloop.run(serve(args.host, args.port, faults, args.chunk_gap_ms, args.format, stamped))


if __name__ == "__main__":
    main()
