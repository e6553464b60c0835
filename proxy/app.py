"""The gateway's routes, shared state, and what starts and stops with it — for both server engines.

`routes()` and `lifecycle()` are engine-neutral; `build_app()` wraps them in an aiohttp `web.Application`
(the lean engine, proxy/lean_server, serves the same table and runs the same lifecycle itself).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from proxy.accounting.accountant import Accountant
from proxy.accounting.admin import AdminAPI
from proxy.accounting.keys import KeyRing
from proxy.cache import ResponseCache
from proxy.config import Config
from proxy.edge import Edge
from proxy.handlers import Gateway, error_middleware
from proxy.insights.access import AccessLog
from proxy.insights.dashboard import dashboard
from proxy.insights.metrics import Metrics
from proxy.insights.stats import StatsAPI
from proxy.messages import messages_handler
from proxy.openapi import openapi_handler
from proxy.reload import Runtime
from proxy.store import open_store
from proxy.upstream import new_client

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


Route = tuple[str, str, Callable[..., Awaitable[web.StreamResponse]]]  # method, path, handler


def build_app(cfg: Config) -> web.Application:
    edge = Edge(cfg.server.cors)
    app = web.Application(
        client_max_size=cfg.server.max_body_bytes,
        middlewares=[*edge.middlewares(), error_middleware],  # CORS preflights (when on) before the routes
        handler_args={"max_field_size": 16 * 1024},  # long bearer tokens and cookies fit; more is abuse
    )
    gw = new_gateway(cfg)
    app[GATEWAY] = gw
    app.on_response_prepare.append(edge.on_prepare)  # X-Request-Id (and CORS) on every answer, streams too
    for method, path, handler in routes(gw):
        app.router.add_route(method, path, handler)
        if method == "GET":
            app.router.add_route("HEAD", path, handler)  # as add_get does

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with lifecycle(cfg, gw):
            yield

    app.cleanup_ctx.append(ctx)
    return app


def new_gateway(cfg: Config) -> Gateway:
    """Built before the loop runs (the store is opened by `lifecycle`, in each worker after the fork)."""
    keys = KeyRing(cfg.keys)
    accountant = Accountant(cfg.accounting, open_store(cfg.accounting.store), keys)
    gw = Gateway(keys, accountant, cfg.server.max_body_bytes, cfg.server.body_timeout_s)
    if cfg.server.metrics:
        accountant.observers.append(Metrics(accountant, gw))
    if cfg.server.access_log:
        accountant.observers.append(AccessLog())
    if cfg.server.tracing.enabled:  # imported only then: no opentelemetry import with tracing off
        from proxy.insights.tracing import Tracing

        accountant.observers.append(Tracing(cfg.server.tracing))
    return gw


def admin_api(gw: Gateway) -> AdminAPI:
    acct = gw.accountant
    return AdminAPI(
        acct.store, gw.keys.check, gw.keys.is_admin, acct.reload_keys, acct.credits.unsettled, acct.ledger.pending
    )


@contextlib.asynccontextmanager
async def lifecycle(cfg: Config, gw: Gateway) -> AsyncIterator[None]:
    """What runs while the gateway serves: accounting, the upstream client, the response cache, and the routing
    runtime (demo upstream, router, monitor, probes), which a reload rebuilds (proxy/reload.py)."""
    client = new_client(cfg.server.upstream_client)
    cache = ResponseCache(cfg.cache)  # memory: cheap until used; per-request opt-in needs it anyway
    acct = gw.accountant
    await acct.start()
    runtime = Runtime(gw, client, cache, time.monotonic)
    await runtime.apply(cfg)
    gw.runtime = runtime
    try:
        yield
    finally:
        await runtime.close()
        await acct.stop()  # after the drain: the last requests' records are in the queue
        await client.close()
        await cache.close()


def routes(gw: Gateway) -> list[Route]:
    """The one route table; a GET route also answers HEAD on both engines."""
    table: list[Route] = [
        ("POST", "/v1/chat/completions", gw.chat_completions),
        ("POST", "/v1/completions", gw.completions),
        ("POST", "/v1/embeddings", gw.embeddings),
        ("POST", "/v1/messages", messages_handler(gw)),  # Anthropic's Messages API
        ("GET", "/v1/models", gw.models),
        *StatsAPI.for_gateway(gw).routes(),  # /api/v1/models (live endpoint stats), rankings, activity
        *(admin_api(gw).routes() if gw.accountant.cfg.enabled else ()),
        ("GET", "/api/v1/providers", gw.providers),
        ("GET", "/api/v1/endpoints", gw.providers),
        ("GET", "/livez", gw.livez),
        ("GET", "/readyz", gw.readyz),
        ("GET", "/dashboard", dashboard),  # the page holds no data and needs no key; it calls the APIs with one
        *(("GET", "/metrics", m.serve) for m in gw.accountant.observers if isinstance(m, Metrics)),  # no key
    ]
    return [*table, ("GET", "/openapi.json", openapi_handler(table))]  # the spec of exactly these routes; no key
