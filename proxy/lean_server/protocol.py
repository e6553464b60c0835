"""One client connection: llhttp parses, one handler task per request, responses written in order.

Why not aiohttp's server: on a 2-core VM it spent 100–140 µs of CPU per request more than this engine does
(gateway CPU per request, measured: `/livez` ≈110 → ≈55 µs; a relayed chat completion ≈330 → ≈200 µs) on
generic machinery — a `BaseRequest` with its URL and payload objects, the router and middleware chain,
StreamResponse and StreamWriter — while the gateway needs a method, a path, headers and a body. Here
llhttp's callbacks fill a `LeanRequest` (≈8 µs with parsing), the handler runs in one task, and its
`web.Response` is serialised (≈5 µs) and written with one `transport.write`.

The behaviours are aiohttp's, as the gateway configures it:
- connection caps (`max-connections`, `max-connections-per-ip`): one over a cap is answered 503 at once and
  ended; nothing it sends is parsed (`ConnectionCaps` in proxy/edge.py);
- keep-alive with an idle timeout; pipelined requests are queued and answered one at a time, in order;
- a deadline on each request head (slowloris: 408 and close), a bounded head size (431), malformed HTTP
  (including Content-Length with Transfer-Encoding, or a Transfer-Encoding other than plain `chunked`:
  request smuggling) → 400 JSON and close;
- a client that disconnects cancels its handler at once (`handler_cancellation`), which cancels the
  request's upstream attempts;
- a body left unread when the answer goes out (413, 401, …) is read and dropped for a while ("lingering"),
  so a client still writing reads the answer instead of a connection reset; not after a 408 (`no_linger`);
- `Expect: 100-continue` is answered when the handler first reads the body (a 401 or 413 goes out without it).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from aiohttp import web
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.edge import UNSUPPORTED_TE, only_chunked
from proxy.errors import BadRequest, GatewayError, HeadersTooLarge, RequestTimeout
from proxy.handlers import error_response, unexpected_error
from proxy.lean_server.request import LeanRequest
from proxy.lean_server.response import (
    CONTINUE,
    LeanStream,
    PlainAnswer,
    body_bytes,
    error_bytes,
    framing,
    head,
    whole,
)

if TYPE_CHECKING:
    from proxy.lean_server.server import LeanServer

Handler = Callable[[LeanRequest], Awaitable[web.StreamResponse]]

log = logging.getLogger("hedgerow")

MAX_HEAD = 64 * 1024  # request line and headers together
MAX_FIELD = 16 * 1024  # one header (aiohttp's max_field_size as the gateway sets it): long tokens fit
MAX_QUEUED = 16  # pipelined requests waiting for their turn before we stop reading the socket
LINGER_S = 10.0  # aiohttp's lingering_time: how long an unread body is read and dropped after the answer
LINGER_BYTES = 64 << 20  # …and how much of it, at most
_SLACK = 0.001  # timer handles may run up to the loop's clock resolution early
_METHODS = {m.encode(): m for m in ("GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH")}

_BAD_HTTP = BadRequest("malformed HTTP request")  # answered by `error_bytes`, each with a fresh request id
_HEAD_TIMEOUT = RequestTimeout("request head not received in time")
_HEAD_TOO_LARGE = HeadersTooLarge("request head too large")
_BAD_TE = BadRequest(UNSUPPORTED_TE)


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; `Connection._reject_with` says what to answer."""


class Connection(asyncio.Protocol):
    """HTTP/1.1 server side of one TCP connection (see the module docstring for the behaviours)."""

    __slots__ = (
        "_active",
        "_bad",
        "_broken",
        "_closing",
        "_drain_waiter",
        "_dropped",
        "_fields",
        "_head_bytes",
        "_head_timer",
        "_idle_since",
        "_idle_timer",
        "_in_head",
        "_linger",
        "_linger_timer",
        "_lingering",
        "_max_body",
        "_parser",
        "_peer",
        "_queue",
        "_read_paused",
        "_reject_with",
        "_req",
        "_server",
        "_task",
        "_url",
        "loop",
        "transport",
        "write_paused",
    )

    def __init__(self, server: LeanServer) -> None:
        self._server = server
        self.loop = server.loop
        self._max_body = server.max_body
        self.transport: asyncio.Transport | None = None
        self._parser: HttpRequestParser | None = HttpRequestParser(self)
        self._req: LeanRequest | None = None  # the request being parsed (its head or its body)
        self._in_head = False  # a head has begun and is not complete
        self._url = b""
        self._fields: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._active: LeanRequest | None = None  # the request being answered
        self._task: asyncio.Task[None] | None = None  # …and its handler
        self._queue: deque[LeanRequest] = deque()  # pipelined requests waiting for their turn
        self._closing = False  # close once the active request is answered
        self._bad: bytes | None = None  # an error to answer once the queue is served, then close
        self._broken = False  # the byte stream is no longer HTTP we can follow: parse nothing more
        self._reject_with: GatewayError = _BAD_HTTP
        self._linger = True
        self._lingering: LeanRequest | None = None  # answered; its unread body is being dropped
        self._dropped = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._read_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._peer: str | None = None  # the connection caps' key, once admitted

    # -- transport callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        caps = self._server.caps
        if caps is not None:
            self._peer = caps.admit(transport)
            if self._peer is None:  # over a cap: answered 503 and ending; what still arrives is dropped
                self._broken = True
                return
        self._server.connections.add(self)
        self._became_idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        # The parser holds this protocol's bound callbacks: without it the connection is freed by reference
        # counting when it closes, not left as a cycle for the collector's next full pass (see proxy/server.py).
        self._parser = None
        self._server.connections.discard(self)
        if self._peer is not None:
            self._server.caps.release(self._peer)  # type: ignore[union-attr]
            self._peer = None
        for timer in (self._head_timer, self._idle_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._linger_timer = None
        if self._task is not None:
            self._task.cancel()  # the client left: its handler, and so its upstream attempts, end now
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client connection closed"))
            waiter.exception()  # retrieved: nobody may be waiting any more

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        parser = self._parser
        assert parser is not None  # data comes before connection_lost, never after
        was_in_head = self._in_head
        try:
            parser.feed_data(data)
        except HttpParserUpgrade:
            self._upgraded()
        except HttpParserCallbackError as e:
            if not isinstance(e.__context__, _Stop):
                log.error("lean server: parser callback failed", exc_info=e.__context__)
            self._reject(self._reject_with)
        except HttpParserError:
            self._reject(_BAD_HTTP)
        if self._in_head and not self._broken:  # a head is still arriving: it is on the clock
            if was_in_head:
                self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._reject(_HEAD_TOO_LARGE)
            elif self._head_timer is None:
                self._head_timer = self.loop.call_later(self._server.header_timeout, self._head_expired)

    # -- parser callbacks (httptools) --

    def on_message_begin(self) -> None:
        self._req = LeanRequest(self)
        self._in_head = True
        self._url = b""
        self._head_bytes = 0
        self._dropped = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        self._head_bytes += size  # after the head: the trailer of a chunked body, bounded the same way
        if size > MAX_FIELD or self._head_bytes > MAX_HEAD:
            self._reject_with = _HEAD_TOO_LARGE
            raise _Stop
        if self._in_head:  # trailer fields are nothing the gateway reads
            self._fields.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        p = self._parser
        assert p is not None  # called from feed_data
        req.headers = headers = CIMultiDictProxy(CIMultiDict(self._fields))
        self._fields.clear()
        length = headers.get("Content-Length")
        chunked = "Transfer-Encoding" in headers  # llhttp accepts only a chunked last coding in requests
        if chunked and not only_chunked(headers.getall("Transfer-Encoding")):
            self._reject_with = _BAD_TE  # llhttp takes `gzip, chunked`; we implement no coding but chunked
            raise _Stop
        upgrade = p.should_upgrade()
        if upgrade and (length is not None or chunked):
            raise _Stop  # llhttp stops at an upgrade and would not parse this body: refuse the request
        self._in_head = False
        self._head_bytes = 0  # from here on it counts the trailer, if any
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        method = p.get_method()
        req.method = _METHODS.get(method) or method.decode("latin-1")
        req.set_target(self._url)
        req.http10 = p.get_http_version() == "1.0"
        req.keep_alive = p.should_keep_alive() and not upgrade  # no other protocol spoken: close after
        if length is not None:
            req.content_length = int(length)  # llhttp accepted it: digits only, one value
        if req.content_length is not None and req.content_length > self._max_body:
            req.refuse(self._max_body)  # 413 on the declared length; no byte of it is kept
        if not req.http10 and (length is not None or chunked):
            expect = headers.get("Expect")
            req.expect = expect is not None and expect.lower() == "100-continue"
        if self._closing:
            return  # draining or closing: the request is not served
        if self._active is None:
            self._start(req)
        else:
            self._queue.append(req)
            if len(self._queue) >= MAX_QUEUED and not self._read_paused and self.transport is not None:
                self._read_paused = True
                self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self._req
        assert req is not None
        if req.dropping or not req.feed(body, self._max_body):
            self._dropped += len(body)
            if self._dropped > LINGER_BYTES:
                self._close()

    def on_message_complete(self) -> None:
        req = self._req
        assert req is not None
        self._req = None
        req.complete()
        if req is self._lingering:  # the client finished sending a body we had already answered
            self._lingering = None
            if self._linger_timer is not None:
                self._linger_timer.cancel()
                self._linger_timer = None
            if self._closing:
                self._close()
            else:
                self._next()

    # -- requests --

    def _start(self, req: LeanRequest) -> None:
        self._active = req
        self._task = self.loop.create_task(self._run(req, self._server.route(req)))

    async def _run(self, req: LeanRequest, handler: Handler) -> None:
        try:
            resp = await handler(req)
        except GatewayError as e:
            resp = error_response(req, e)  # type: ignore[arg-type]
        except ConnectionResetError:  # written to a client that left
            self._close()
            return
        except asyncio.CancelledError:
            self._close()  # the client left, or the drain ran out of time: the answer is incomplete
            raise
        except Exception:
            resp = unexpected_error(req)  # type: ignore[arg-type]
        try:
            self._respond(req, resp)
        except ConnectionResetError:
            self._close()
            return
        except Exception:
            log.exception("lean server: cannot answer %s %s", req.method, req.path)
            self._close()
            return
        self._finished(req)

    def _respond(self, req: LeanRequest, resp: object) -> None:
        stream = req.stream
        if stream is not None:
            if resp is not stream:
                raise RuntimeError("a handler returned a response after starting a stream")
            stream.finish()
            return
        if type(resp) is PlainAnswer:
            status, reason, headers, body, may_keep = resp.status, None, resp.headers, resp.body, True
        elif isinstance(resp, web.Response):
            status, reason, headers, body = resp.status, resp.reason, resp.headers, body_bytes(resp)
            may_keep = resp.keep_alive is not False
        else:
            raise TypeError(f"handler returned {type(resp).__name__}, not web.Response")
        keep = req.keep_alive and may_keep and not self._closing
        if not keep:
            self._closing = True
        self._server.edge.stamp(req.headers, headers)
        for data in whole(status, reason, headers, body, keep, req.http10, req.method == "HEAD"):
            self.send(data)

    def start_stream(self, req: LeanRequest, status: int, headers: dict[str, str]) -> LeanStream:
        """Write a streamed response's head (chunked; HTTP/1.0: to the end of the connection)."""
        keep = req.keep_alive and not self._closing and not req.http10
        if not keep:
            self._closing = True
        self._server.edge.stamp(req.headers, headers)
        req.stream = stream = LeanStream(
            self, not req.http10, head(status, None, headers, framing(None, keep, req.http10))
        )
        return stream

    def _finished(self, req: LeanRequest) -> None:
        """The answer is out: on to the next request, or linger over an unread body, or close."""
        self._active = None
        self._task = None
        if self.transport is None:
            return
        if self._broken:  # nothing more is read: answer what was queued (and the error), then close
            if self._closing:
                self._close()
            else:
                self._next()
            return
        if not req.body_done:
            # Answered before the whole body arrived (413, 401, 404, …). A client that waits for a 100
            # may never send it, and after a 408 the client is too slow to wait for: close now.
            if not self._linger or (req.expect and not req.continued):
                self._close()
                return
            req.dropping = True
            req.fail(BadRequest("body left unread"))  # frees what was buffered
            self._lingering = req
            self._linger_timer = self.loop.call_later(LINGER_S, self._close)
            return
        if self._closing:
            self._close()
            return
        self._next()

    def _next(self) -> None:
        if self._queue:
            req = self._queue.popleft()
            if self._read_paused and self.transport is not None:
                self._read_paused = False
                self.transport.resume_reading()
            self._start(req)
        elif self._bad is not None:
            self._send_and_close(self._bad)
        elif self._server.draining or self._broken:
            self._close()
        else:
            self._became_idle()

    def _became_idle(self) -> None:
        self._idle_since = self.loop.time()
        if self._idle_timer is None:  # one timer per idle period at most, re-armed only when it fires
            self._idle_timer = self.loop.call_later(self._server.keepalive_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if not self.idle:
            return
        left = self._idle_since + self._server.keepalive_timeout - self.loop.time()
        if left > _SLACK:
            self._idle_timer = self.loop.call_later(left, self._idle_check)
        else:
            self._close()

    @property
    def idle(self) -> bool:
        """No request in progress, none queued, no head arriving: closing loses nothing."""
        return self._active is None and self._req is None and not self._queue and self._lingering is None

    # -- errors --

    def _reject(self, error: GatewayError) -> None:
        """The byte stream broke (or a head was too slow or too large): answer `error` once the requests
        before it are answered, then close. A body broken mid-way fails that request's `read()` instead."""
        self._broken = True
        answer = error_bytes(error)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self.transport is not None and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        in_head, self._in_head = self._in_head, False
        req, self._req = self._req, None
        if req is not None and not in_head:  # its head was taken: the body broke (bad chunking)
            req.keep_alive = False
            req.fail(BadRequest("malformed request body"))
            if req is not self._active and req not in self._queue:  # answered already, or not to be
                self._close()
            return
        if self._active is None:
            self._send_and_close(answer)
        else:
            self._bad = answer

    def _upgraded(self) -> None:
        # llhttp stops at an Upgrade; the request was answered like any other and we close after it.
        self._broken = True
        if self.transport is not None and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._in_head and not self._broken:
            self._linger = False
            self._reject(_HEAD_TIMEOUT)

    # -- used by requests, streams and the server --

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client connection closed")
        transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's buffer went below its low-water mark (pause/resume_writing)."""
        if self.transport is None:
            raise ConnectionResetError("client connection closed")
        waiter = self._drain_waiter
        if waiter is None or waiter.done():
            waiter = self._drain_waiter = self.loop.create_future()
        await waiter

    def send_continue(self, req: LeanRequest) -> None:
        req.continued = True
        if req.size == 0 and self.transport is not None and not self.transport.is_closing():
            self.transport.write(CONTINUE)

    def no_linger(self) -> None:
        """After a 408 the client stalled: close right after the answer instead of lingering for its body."""
        self._linger = False

    def shutdown(self) -> None:
        """Drain: close now if idle, else after the answer in progress (queued requests are not served)."""
        self._closing = True
        if self._active is None:
            self._close()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The handler in progress, if any (the drain waits for it)."""
        return self._task

    def close(self) -> None:
        self._close()

    def _send_and_close(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            transport.close()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
