"""The gateway's routes, shared state, and what starts and stops with it — for both server engines.

`routes()` and `lifecycle()` are engine-neutral; `build_app()` wraps them in an aiohttp `web.Application`
(the lean engine, proxy/lean_server, serves the same table and runs the same lifecycle itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from health.monitor import Monitor
from health.probes import expire_loop, probe_provider
from proxy.accounting.accountant import Accountant
from proxy.accounting.admin import AdminAPI
from proxy.accounting.keys import KeyRing
from proxy.cache import ResponseCache
from proxy.config import BUILTIN_DEMO, Config
from proxy.demo import start_demo
from proxy.forward import Forwarder
from proxy.handlers import Gateway, error_middleware
from proxy.messages import messages_handler
from proxy.router import Router, build_table
from proxy.store import open_store
from proxy.upstream import new_client

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


Route = tuple[str, str, Callable[..., Awaitable[web.StreamResponse]]]  # method, path, handler


def build_app(cfg: Config) -> web.Application:
    app = web.Application(
        client_max_size=cfg.server.max_body_bytes,
        middlewares=[error_middleware],
        handler_args={"max_field_size": 16 * 1024},  # long bearer tokens and cookies fit; more is abuse
    )
    gw = new_gateway(cfg)
    app[GATEWAY] = gw
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
    return Gateway(keys, accountant, cfg.server.max_body_bytes, cfg.server.body_timeout_s)


def admin_api(gw: Gateway) -> AdminAPI:
    acct = gw.accountant
    return AdminAPI(
        acct.store, gw.keys.check, gw.keys.is_admin, acct.reload_keys, acct.credits.unsettled, acct.ledger.pending
    )


@contextlib.asynccontextmanager
async def lifecycle(cfg: Config, gw: Gateway) -> AsyncIterator[None]:
    """What runs while the gateway serves: demo upstream, upstream client, router, monitor, probes."""
    demo_runner, builtin = None, {}
    if any(p.base_url == BUILTIN_DEMO for p in cfg.providers):
        demo_runner, builtin[BUILTIN_DEMO] = await start_demo()
    clock = time.monotonic
    client = new_client(cfg.server.upstream_client)
    table = build_table(cfg, builtin, clock)
    groups = {m.name: table.models[m.name].endpoints for m in cfg.models}
    monitor = Monitor(groups, cfg.routing.ejection, clock)
    rng = random.Random()
    router = Router(table, monitor, rng)
    cache = ResponseCache(cfg.cache)  # memory: cheap until used; per-request opt-in needs it anyway
    acct = gw.accountant
    await acct.start()
    gw.attach(
        Forwarder(
            router, monitor, client, cfg.routing, cfg.server.max_response_bytes, clock, cache, cfg.cache.enabled, acct
        )
    )
    background = [asyncio.create_task(expire_loop(monitor))]
    for p in cfg.providers:
        eps = sorted(
            {ep.key: ep for eps in groups.values() for ep in eps if ep.provider == p.name}.values(),
            key=lambda e: e.key,
        )
        if p.probe.enabled and eps:
            background.append(asyncio.create_task(probe_provider(p, eps, client, monitor, rng)))
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        for task in background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await acct.stop()  # after the drain: the last requests' records are in the queue
        await client.close()
        await cache.close()
        if demo_runner is not None:
            await demo_runner.cleanup()


def routes(gw: Gateway) -> list[Route]:
    """The one route table; a GET route also answers HEAD on both engines."""
    return [
        ("POST", "/v1/chat/completions", gw.chat_completions),
        ("POST", "/v1/completions", gw.completions),
        ("POST", "/v1/embeddings", gw.embeddings),
        ("POST", "/v1/messages", messages_handler(gw)),  # Anthropic's Messages API
        ("GET", "/v1/models", gw.models),
        ("GET", "/api/v1/models", gw.models),
        *(admin_api(gw).routes() if gw.accountant.cfg.enabled else ()),
        ("GET", "/api/v1/providers", gw.providers),
        ("GET", "/api/v1/endpoints", gw.providers),
        ("GET", "/livez", gw.livez),
        ("GET", "/readyz", gw.readyz),
    ]
