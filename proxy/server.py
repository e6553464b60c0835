"""Run the gateway: uvloop, N worker processes sharing the port (SO_REUSEPORT), signals, graceful drain.

Two HTTP server engines serve the same routes and lifecycle (proxy/app.py): the lean one in proxy/lean_server
(the default), which spends far less CPU per request, and aiohttp's (`server.engine: aiohttp`), kept as the
fallback: the same behaviours, checked by the same tests on both.

aiohttp has no deadline for reading a request head, so a client trickling header bytes (slowloris) could
hold a connection forever; `_HeadDeadlineHandler` closes it with a 408 after `header-timeout-s`. It also
bounds the whole head as the lean engine does (431), refuses a Transfer-Encoding other than plain `chunked`
(400, as the lean engine), and applies the connection caps (`ConnectionCaps` in proxy/edge.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy.app import GATEWAY, build_app, lifecycle, new_gateway, routes
from proxy.config import Config
from proxy.cpus import usable_cpus
from proxy.edge import REQUEST_ID, UNSUPPORTED_TE, ConnectionCaps, Edge, fresh_id, only_chunked, tls_context
from proxy.errors import BadRequest, GatewayError, HeadersTooLarge, RequestTimeout
from proxy.fds import raise_open_files_limit
from proxy.handlers import Gateway
from proxy.insights import access
from proxy.insights.metrics import multiprocess_dir, worker_exited
from proxy.lean_server.protocol import MAX_HEAD
from proxy.lean_server.server import LeanServer
from proxy.reload import reload_from

log = logging.getLogger("hedgerow")


def _answer(err: GatewayError) -> tuple[bytes, bytes]:
    """A protocol-level error written straight to the transport: its head up to the request id's value, its body."""
    body = err.body()
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n" % (
        err.status,
        HTTPStatus(err.status).phrase.encode(),
    )
    return head + b"Connection: close\r\nContent-Length: %d\r\nX-Request-Id: " % len(body), body


_HEAD_TIMEOUT = _answer(RequestTimeout("request head not received in time"))
_HEAD_TOO_LARGE = _answer(HeadersTooLarge("request head too large"))


class _BadFraming(BadHttpMessage):
    """A head aiohttp's parser accepts and the gateway refuses (see `only_chunked`)."""


class _HeadTooLarge(BadHttpMessage):
    code = 431


class _HeadDeadlineHandler(RequestHandler):
    """aiohttp's connection handler plus a deadline and a size bound on each request head, the lean engine's
    rule on Transfer-Encoding, connection caps, and OpenAI-shaped protocol errors."""

    head_timeout: float = 10.0
    caps: ConnectionCaps | None = None
    _head_timer: asyncio.TimerHandle | None = None
    _head_bytes = 0  # bytes of a head still arriving (aiohttp bounds each header, not the head: 128 × 16 KiB)
    _peer: str | None = None  # the caps' key for this connection, once admitted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        caps = self.caps
        if caps is not None:
            peer = caps.admit(transport)
            if peer is None:  # over a cap: answered 503 and ending; never served, never in the server's list
                self._force_close = True  # data_received drops what still arrives
                self._manager = None  # connection_lost has nothing to undo
                return
            self._peer = peer
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:  # heads parsed: those aiohttp accepts and we do not become errors
            self._check_heads(queued, self._head_bytes + len(data) > MAX_HEAD)
        if self._messages:  # a head was parsed: the request is under way
            self._head_bytes = 0
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
        elif data and not self._force_close and self._awaiting_head():  # a head arriving: on the clock, bounded
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self._refuse_head(_HEAD_TOO_LARGE)
            elif self._head_timer is None:
                self._head_timer = self._loop.call_later(self.head_timeout, self._head_expired)

    def _check_heads(self, start: int, measure: bool) -> None:
        """Queue an error in place of each new head that frames its body other than by plain `chunked` or a
        length (request smuggling), or that is over `MAX_HEAD` (only `measure`d when the bytes it came in
        could hold that much). The error is answered in turn, and the connection closes after it."""
        messages = self._messages
        for i in range(start, len(messages)):
            msg = messages[i][0]
            if isinstance(msg, RawRequestMessage):
                if msg.chunked and not only_chunked(msg.headers.getall("Transfer-Encoding", ())):
                    messages[i] = (_ErrInfo(400, _BadFraming(UNSUPPORTED_TE), UNSUPPORTED_TE), EMPTY_PAYLOAD)
                elif measure and len(msg.path) + sum(len(k) + len(v) for k, v in msg.raw_headers) > MAX_HEAD:
                    messages[i] = (_ErrInfo(431, _HeadTooLarge("request head too large"), ""), EMPTY_PAYLOAD)

    def _awaiting_head(self) -> bool:
        waiter = self._waiter
        return self._request_count == 0 or (waiter is not None and not waiter.done())

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport is not None and not self._messages and self._awaiting_head():
            self._refuse_head(_HEAD_TIMEOUT)

    def _refuse_head(self, answer: tuple[bytes, bytes]) -> None:
        if self.transport is not None:
            head, body = answer
            self.transport.write(b"%s%s\r\n\r\n%s" % (head, fresh_id().encode(), body))
        self.force_close()

    def no_linger(self) -> None:
        """After a 408 the client stalled: close right after the answer instead of lingering
        (up to 10 s) for body bytes; lingering would hand a slowloris client the time we just cut."""
        self._lingering_time = 0.0

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._peer is not None:
            assert self.caps is not None
            self.caps.release(self._peer)
            self._peer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        err: GatewayError
        if status == 431 or isinstance(exc, LineTooLong):  # one header over `max_field_size`, or the whole head
            err = HeadersTooLarge("request head too large")
        elif isinstance(exc, _BadFraming):
            err = BadRequest(UNSUPPORTED_TE)
        else:
            err = GatewayError("malformed HTTP request" if status == 400 else "internal error in the gateway")
            err.status = status  # type: ignore[misc]
            if status == 400:
                err.openai_type = "invalid_request_error"  # type: ignore[misc]
        resp = web.Response(status=err.status, body=err.body(), content_type="application/json")
        resp.headers[REQUEST_ID] = fresh_id()  # the request (and its own id) could not be read
        resp.headers["Connection"] = "close"  # said even in aiohttp's HTTP/1.0 answer to a head it cannot read
        resp.force_close()
        return resp


class _GatewayRunner(web.AppRunner):
    def __init__(self, app: web.Application, head_timeout: float, caps: ConnectionCaps, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout = head_timeout
        self._caps = caps

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp offers no hook for the connection handler class; retarget the Server it built (the protocol
        # factory the site passes to loop.create_server).
        server.__class__ = _DeadlineServer
        server.head_timeout = self._head_timeout  # type: ignore[attr-defined]
        server.caps = self._caps  # type: ignore[attr-defined]
        return server


class _DeadlineServer(web.Server):
    head_timeout: float = 10.0
    caps: ConnectionCaps | None = None

    def __call__(self) -> RequestHandler:
        handler = _HeadDeadlineHandler(self, loop=self._loop, **self._kwargs)
        handler.head_timeout = self.head_timeout
        handler.caps = self.caps
        return handler


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep running without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(
    cfg: Config,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    reload: Callable[[], Config] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then drain: stop accepting, let in-flight requests
    end within the grace period, return. With `reload` (the config file, loaded again), SIGHUP applies it
    live (proxy/reload.py); a config that does not load is logged and changes nothing."""
    start = _start_lean if cfg.server.engine == "lean" else _start_aiohttp
    gw, port, finish = await start(cfg, reuse_port)
    s = cfg.server
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[bool]] = set()
    if reload is not None and gw.runtime is not None:
        runtime = gw.runtime

        def on_hup() -> None:
            gc.unfreeze()  # the routing this replaces may be frozen (_freeze_startup_heap): let it be collected
            task = loop.create_task(reload_from(runtime, reload))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
    scheme = "https" if s.tls is not None else "http"
    log.info("hedgerow listening on %s://%s:%d (pid %d, %s engine)", scheme, s.host, port, os.getpid(), s.engine)
    if on_ready is not None:
        on_ready(port)
    await stop.wait()
    if reload is not None:
        loop.remove_signal_handler(signal.SIGHUP)
    gw.draining = True
    log.info("draining (up to %gs for in-flight requests)", s.drain_grace_s)
    await finish()
    log.info("stopped")


_Started = tuple[Gateway, int, Callable[[], Awaitable[None]]]  # the gateway, the bound port, the drain


async def _start_aiohttp(cfg: Config, reuse_port: bool) -> _Started:
    app = build_app(cfg)
    s = cfg.server
    runner = _GatewayRunner(
        app,
        s.header_timeout_s,
        ConnectionCaps.of(s),
        handle_signals=False,
        access_log=None,  # the access log is written off the hot path by accounting, not per line here
        handler_cancellation=True,  # a client that disconnects cancels its handler → its upstream attempt
        keepalive_timeout=s.keepalive_timeout_s,
        shutdown_timeout=s.drain_grace_s,
    )
    tls = tls_context(s.tls) if s.tls is not None else None  # before setup: a file gone since the check fails here
    await runner.setup()
    site = web.TCPSite(runner, s.host, s.port, reuse_port=reuse_port or None, backlog=2048, ssl_context=tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # runner.cleanup closes the listener, waits for handlers up to shutdown_timeout, then cancels them.
    return app[GATEWAY], port, runner.cleanup


async def _start_lean(cfg: Config, reuse_port: bool) -> _Started:
    s = cfg.server
    gw = new_gateway(cfg)
    stack = contextlib.AsyncExitStack()
    await stack.enter_async_context(lifecycle(cfg, gw))
    server = LeanServer(
        routes(gw),
        max_body=s.max_body_bytes,
        header_timeout=s.header_timeout_s,
        keepalive_timeout=s.keepalive_timeout_s,
        edge=Edge(s.cors),
        caps=ConnectionCaps.of(s),
    )
    try:
        tls = tls_context(s.tls) if s.tls is not None else None
        port = await server.start(s.host, s.port, reuse_port=reuse_port, ssl=tls)
    except BaseException:
        await stack.aclose()
        raise

    async def finish() -> None:
        try:
            await server.shutdown(s.drain_grace_s)
        finally:
            await stack.aclose()

    return gw, port, finish


def _worker(cfg: Config, reuse_port: bool, reload: Callable[[], Config] | None, supervisor: int | None = None) -> None:
    # Until serve() installs the loop's handlers there is nothing to drain: a SIGTERM that early (a fast
    # restart) is a clean exit, not a death by signal. A SIGHUP that early is ignored (there is nothing to
    # reload yet), not a death either.
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, _exit_now)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if supervisor is not None:  # a forked worker
        _drain_when_orphaned(supervisor)
    install_uvloop()
    asyncio.run(serve(cfg, reuse_port=reuse_port, reload=reload, on_ready=_freeze_startup_heap))


def _freeze_startup_heap(_port: int) -> None:
    """Once serving: collect, then move what start-up left (modules, config, routing, the catalog: ~50,000
    objects) out of the collector's sight. A full collection traverses every tracked object, so each one
    paused every stream for ~20 ms more; frozen objects live on (freed by reference count) but are never
    traversed again. A reload unfreezes them (`serve`), so a replaced route table can still be collected.
    Then full collections come at most every `_YOUNG_PER_FULL` young ones (see there)."""
    gc.collect()
    gc.freeze()
    threshold0, threshold1, _ = gc.get_threshold()
    gc.set_threshold(threshold0, threshold1, _YOUNG_PER_FULL)


# CPython runs a full collection after 10 collections of the middle generation (and once the old generation
# grew by a quarter). Every open stream holds ~60 tracked objects (its two connections, parsers, the handler's
# coroutines), so while thousands of streams are being opened each full pass traverses them all and stalls
# every stream: at 5,000 streams opened at 250/s, passes of 50, 99 and 150 ms. With 100, none ran during that
# ramp. What waits longer for a full pass is cyclic garbage that reached the old generation; the request path
# makes none, and a closed connection breaks its parser cycle (lean_server/protocol.py: connection_lost).
_YOUNG_PER_FULL = 100


def _drain_when_orphaned(supervisor: int) -> None:
    """Linux: SIGTERM this worker (a drain) when its supervisor dies, even by SIGKILL, so no worker goes on
    serving the port unsupervised. The supervisor may have died before this was set: then stop at once."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: a supervisor killed hard leaves its workers serving
        return
    if os.getppid() != supervisor:
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _exit_now(_signum: int, _frame: Any) -> None:
    sys.exit(0)


def run(cfg: Config, reload: Callable[[], Config] | None = None) -> int:
    """Run in this process (one worker) or supervise N forked workers sharing the port. `reload`: how to load
    the config again on SIGHUP (each worker reloads by itself; the supervisor passes the signal on)."""
    workers = usable_cpus() if cfg.server.workers == "auto" else cfg.server.workers
    raise_open_files_limit(cfg.server.max_connections)  # before any fork: the workers inherit it
    if workers == 1:
        _worker(cfg, False, reload)
        return 0
    if not hasattr(socket, "SO_REUSEPORT"):
        log.error("--workers > 1 needs SO_REUSEPORT, which this platform lacks")
        return 2
    # Port 0 must mean one port for all: bind it here first (SO_REUSEPORT, not listening, so it takes no
    # connections) and give every worker the number the kernel chose.
    family = socket.AF_INET6 if ":" in cfg.server.host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((cfg.server.host, cfg.server.port))
    cfg = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, port=holder.getsockname()[1]))
    if cfg.server.metrics:
        multiprocess_dir()  # before the fork: where every worker writes its metrics, so one scrape sees all
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_worker, args=(cfg, True, reload, os.getpid()), name=f"hedgerow-worker-{i}")
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    holder.close()

    def forward(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    codes = []
    for p in procs:
        p.join()
        worker_exited(p.pid)
        codes.append(p.exitcode or 0)
        if p.exitcode:
            log.error("%s (pid %s) exited with %s", p.name, p.pid, p.exitcode)
    return 0 if all(c == 0 for c in codes) else 1


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"
    )
    access.configure()  # the access log (when `server.access-log` is on): bare JSON lines on stdout
