"""The lean engine's listener: routes, open connections, start and graceful drain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from ssl import SSLContext

from aiohttp import web

from proxy.config import CorsConfig
from proxy.edge import ConnectionCaps, Edge
from proxy.errors import MethodNotAllowed, NotFound
from proxy.lean_server.protocol import Connection, Handler
from proxy.lean_server.request import LeanRequest

log = logging.getLogger("hedgerow")

_CANCEL_WAIT_S = 5.0  # after the grace period: how long cancelled handlers get to unwind (release upstreams)


async def _not_found(request: LeanRequest) -> web.StreamResponse:
    raise NotFound(f"no route for {request.method} {request.path}")


def _method_not_allowed(allow: Iterable[str]) -> Handler:
    async def method_not_allowed(request: LeanRequest) -> web.StreamResponse:
        raise MethodNotAllowed(f"method {request.method} not allowed on {request.path}", allow)

    return method_not_allowed


class LeanServer:
    """Serves the gateway's route table on `Connection`s; `shutdown()` drains like aiohttp's runner."""

    __slots__ = (
        "_not_allowed",
        "_routes",
        "_server",
        "caps",
        "connections",
        "draining",
        "edge",
        "header_timeout",
        "keepalive_timeout",
        "loop",
        "max_body",
    )

    def __init__(
        self,
        routes: Iterable[tuple[str, str, Handler]],
        *,
        max_body: int,
        header_timeout: float,
        keepalive_timeout: float,
        edge: Edge | None = None,
        caps: ConnectionCaps | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.edge = edge or Edge(CorsConfig())  # request ids (and CORS) on every answer
        self.caps = caps  # None: no connection caps
        self.max_body = max_body
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.connections: set[Connection] = set()
        self.draining = False
        self._server: asyncio.Server | None = None
        # path → method → handler: two dict lookups, no tuple per request, and 404 vs 405 falls out.
        self._routes: dict[str, dict[str, Handler]] = {}
        for method, path, handler in routes:
            by_method = self._routes.setdefault(path, {})
            by_method[method] = handler
            if method == "GET":
                by_method.setdefault("HEAD", handler)  # as aiohttp's add_get: HEAD answers without the body
        self._not_allowed = {path: _method_not_allowed(methods) for path, methods in self._routes.items()}

    def route(self, req: LeanRequest) -> Handler:
        path = req.path
        methods = self._routes.get(path)
        if methods is None:
            # One trailing `{id}` segment (the admin API's /api/v1/keys/{id}), as aiohttp's router matches it;
            # tried only after the exact lookup missed, so the hot routes never pay for it.
            head, _, tail = path.rpartition("/")
            path = head + "/{id}"
            methods = self._routes.get(path) if tail else None
            if methods is None:
                return self.edge.preflight_handler(req.method, req.headers) or _not_found
            req.match_info = {"id": tail}
        handler = methods.get(req.method)
        if handler is None:  # OPTIONS is a CORS preflight, or (like any other method not routed) a 405
            return self.edge.preflight_handler(req.method, req.headers) or self._not_allowed[path]
        return handler

    async def start(self, host: str, port: int, *, reuse_port: bool = False, ssl: SSLContext | None = None) -> int:
        """Listen (HTTPS with `ssl`); returns the bound port (useful for port 0)."""
        self._server = await self.loop.create_server(
            lambda: Connection(self),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=2048,
            ssl=ssl,
            ssl_handshake_timeout=self.header_timeout if ssl is not None else None,  # the head's deadline
        )
        return self._server.sockets[0].getsockname()[1]

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; close idle connections; give handlers in flight `grace` seconds, then cancel
        them (a cancelled handler closes its connection and its upstream attempt)."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        tasks = {t for conn in self.connections if (t := conn.task) is not None}
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=_CANCEL_WAIT_S)
        for conn in list(self.connections):
            conn.close()  # lingering over an unread body, or a handler that would not end
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run
