"""The web.Application: routes, shared state, and what starts and stops with it (cleanup_ctx)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator

from aiohttp import web

from health.monitor import Monitor
from health.probes import expire_loop, probe_provider
from proxy.accounting.keys import KeyRing
from proxy.cache import ResponseCache
from proxy.config import BUILTIN_DEMO, Config
from proxy.demo import start_demo
from proxy.forward import Forwarder
from proxy.handlers import Gateway, error_middleware
from proxy.router import Router, build_table
from proxy.upstream import new_client

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


def build_app(cfg: Config) -> web.Application:
    app = web.Application(
        client_max_size=cfg.server.max_body_bytes,
        middlewares=[error_middleware],
        handler_args={"max_field_size": 16 * 1024},  # long bearer tokens and cookies fit; more is abuse
    )
    gw = Gateway(KeyRing(cfg.keys), cfg.server.max_body_bytes, cfg.server.body_timeout_s)
    app[GATEWAY] = gw
    _add_routes(app, gw)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
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
        gw.attach(
            Forwarder(
                router, monitor, client, cfg.routing, cfg.server.max_response_bytes, clock, cache, cfg.cache.enabled
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
            await client.close()
            await cache.close()
            if demo_runner is not None:
                await demo_runner.cleanup()

    app.cleanup_ctx.append(lifecycle)
    return app


def _add_routes(app: web.Application, gw: Gateway) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", gw.chat_completions)
    r.add_post("/v1/completions", gw.completions)
    r.add_post("/v1/embeddings", gw.embeddings)
    r.add_get("/v1/models", gw.models)
    r.add_get("/api/v1/providers", gw.providers)
    r.add_get("/api/v1/endpoints", gw.providers)
    r.add_get("/livez", gw.livez)
    r.add_get("/readyz", gw.readyz)
