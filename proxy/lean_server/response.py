"""Response bytes for the lean engine: heads built from the handlers' own objects, and SSE streams.

Handlers return aiohttp `web.Response` objects (status, reason, headers, body); the engine serialises them
itself — one `transport.write` of head and body — without aiohttp's StreamWriter, payload and signal
machinery. Status lines and the Date line are prebuilt (the Date line once a second).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
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
    parts = [f"{name}: {value}\r\n" for name, value in headers.items() if name.lower() not in _OWN_HEADERS]
    if "Content-Type" not in headers:
        parts.append(f"Content-Type: {_DEFAULT_TYPE}\r\n")
    text = "".join(parts)
    # Each line ends in exactly one CRLF; more CRs or LFs mean a value would split the response.
    if text.count("\n") != len(parts) or text.count("\r") != len(parts):
        raise ValueError("CR or LF in a response header")
    return b"".join((line, text.encode(), DATE.get(), framing))


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


def plain_response(resp: web.Response, keep_alive: bool, http10: bool, head_only: bool) -> tuple[bytes, ...]:
    """A handler's `web.Response` as the bytes to write: one piece, or head and body apart when it is big."""
    body = resp.body
    if body is None:
        body = b""
    elif not isinstance(body, bytes | bytearray):
        raise TypeError("the lean engine sends bytes bodies only")
    data = head(resp.status, resp.reason, resp.headers, framing(len(body), keep_alive, http10))
    if head_only or not body:
        return (data,)
    if len(body) <= JOIN_MAX:
        return (data + body,)
    return data, bytes(body)


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
