"""Response bytes for the lean engine: heads built from the handlers' own objects, and SSE streams.

Handlers return aiohttp `web.Response` objects (status, reason, headers, body); the engine serialises them
itself — one `transport.write` of head and body — without aiohttp's StreamWriter, payload and signal
machinery. Status lines and the Date line are prebuilt (the Date line once a second).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

from aiohttp import web

from proxy.errors import GatewayError

if TYPE_CHECKING:
    from proxy.lean_server.protocol import Connection

_REASONS = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES = {code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in _REASONS.items()}
# Framing is ours to write: a handler's header of these names would contradict the bytes we send.
_OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "date"})
_DEFAULT_TYPE = "application/octet-stream"  # what aiohttp sends for a body without a Content-Type
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED_END = b"0\r\n\r\n"
# Bodies up to this size are copied behind the head (one write, usually one packet); larger ones are
# written separately so a multi-megabyte answer is not copied just to prepend a few hundred bytes.
JOIN_MAX = 64 * 1024


class _DateLine:
    """`Date: …\\r\\n`, formatted at most once a second (HTTP/1.1 origin servers send Date)."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = 0
        self._line = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


DATE = _DateLine()


def head(status: int, reason: str | None, headers: Mapping[str, str], framing: bytes) -> bytes:
    """Status line, the handler's headers, Date, then `framing` (length or chunked, Connection, blank line)."""
    line = _STATUS_LINES.get(status) if reason is None or reason == _REASONS.get(status) else None
    if line is None:
        if reason is not None and ("\r" in reason or "\n" in reason):
            raise ValueError("CR or LF in a response reason")
        line = f"HTTP/1.1 {status} {reason or ''}\r\n".encode()
    items: Iterable[tuple[str, str]] = headers.items()
    sendable = _SENDABLE
    for name in headers:
        ok = sendable.get(name)
        if ok is None:
            ok = _sendable(name)
        if not ok:  # rare: a handler set a framing header; drop those (ours follow)
            items = [(n, v) for n, v in headers.items() if _sendable(n)]
            break
    try:
        lines = list(map(": ".join, items))
    except TypeError:  # a value that is not a str (aiohttp's headers hold only str; a plain dict may not)
        lines = [f"{n}: {v}" for n, v in items]
    if "Content-Type" not in headers:
        lines.append(_DEFAULT_TYPE_LINE)
    text = "\r\n".join(lines)
    # Lines are joined by exactly one CRLF each; more CRs or LFs mean a value would split the response.
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise ValueError("CR or LF in a response header")
    return b"".join((line, text.encode(), b"\r\n", DATE.get(), framing))


# Header name (as handlers spell it) → True unless it is one of ours (_OWN_HEADERS): one dict lookup per header
# instead of a lower() and a set test. Handlers use a few dozen names; the bound keeps odd ones from piling up.
_SENDABLE: dict[str, bool] = {}
_SENDABLE_MAX = 256
_DEFAULT_TYPE_LINE = f"Content-Type: {_DEFAULT_TYPE}"


def _sendable(name: str) -> bool:
    ok = name.lower() not in _OWN_HEADERS
    if len(_SENDABLE) < _SENDABLE_MAX:
        _SENDABLE[name] = ok
    return ok


def framing(length: int | None, keep_alive: bool, http10: bool) -> bytes:
    """The tail of a head: Connection (only when it differs from the version's default), the length or
    chunked transfer coding (None: a stream; HTTP/1.0 has no chunks, so its end is the connection's)."""
    if http10:
        conn = b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n"
    else:
        conn = b"" if keep_alive else b"Connection: close\r\n"
    if length is not None:
        return conn + b"Content-Length: %d\r\n\r\n" % length
    return conn + (b"\r\n" if http10 else b"Transfer-Encoding: chunked\r\n\r\n")


def body_bytes(resp: web.Response) -> bytes | bytearray:
    """A handler's `web.Response` body (the lean engine sends bytes bodies only)."""
    body = resp.body
    if body is None:
        return b""
    if not isinstance(body, bytes | bytearray):
        raise TypeError("the lean engine sends bytes bodies only")
    return body


def whole(
    status: int,
    reason: str | None,
    headers: Mapping[str, str],
    body: bytes | bytearray,
    keep_alive: bool,
    http10: bool,
    head_only: bool,
) -> tuple[bytes, ...]:
    """A whole answer as the bytes to write: one piece, or head and body apart when the body is big."""
    data = head(status, reason, headers, framing(len(body), keep_alive, http10))
    if head_only or not body:
        return (data,)
    if len(body) <= JOIN_MAX:
        return (data + body,)
    return data, bytes(body)


class PlainAnswer:
    """A whole answer built for the lean engine (`proxy.stream.answer`): status, the handler's own header dict and
    the body, serialised as they are. What a `web.Response` would carry, without building one (its
    case-insensitive header copy, status and body setters: ≈ 3.5 µs a request) only to read it back."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def error_bytes(err: GatewayError, *, close: bool = True) -> bytes:
    """A complete JSON error response written by the engine itself (bad HTTP, head deadline), with a fresh
    request id (no request was read to take one from)."""
    from proxy.edge import REQUEST_ID, fresh_id  # late: proxy.edge imports proxy.forward, which imports this

    body = err.body()
    headers = {"Content-Type": "application/json", REQUEST_ID: fresh_id()}
    return head(err.status, None, headers, framing(len(body), not close, False)) + body


class LeanStream:
    """What `proxy.stream.prepare()` returns on the lean engine: each `write()` sends one chunk at once and
    waits while the client's socket buffer is full (backpressure). The head goes out with the first chunk
    (or the end): one segment, so a stream's first byte costs the client one read, not two."""

    __slots__ = ("_chunked", "_conn", "_head", "ended")

    prepared = True

    def __init__(self, conn: Connection, chunked: bool, head: bytes) -> None:
        self._conn = conn
        self._chunked = chunked
        self._head = head
        self.ended = False

    async def prepare(self, request: object) -> None:
        """aiohttp's StreamResponse API; the lean stream is prepared when it is made."""

    async def write(self, data: bytes) -> None:
        if not data:
            return  # an empty chunk would end a chunked body
        conn = self._conn
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            data = self._head + data
            self._head = b""
        conn.send(data)
        if conn.write_paused:
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if data:
            await self.write(data)
        self.finish()

    def finish(self) -> None:
        """End the body (the last chunk); the engine calls it when the handler returns the stream."""
        if not self.ended:
            self.ended = True
            end = CHUNKED_END if self._chunked else b""
            if self._head or end:
                self._conn.send(self._head + end)
                self._head = b""
