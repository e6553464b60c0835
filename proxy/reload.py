"""Live reconfiguration: what a config's providers, models, routing, keys and prices build, rebuilt on SIGHUP.

Why a new Forwarder per config rather than patching the live one: a request already in flight keeps the
Forwarder (router, monitor, endpoints, prices) it started with and ends on it, while new requests take the new
one — no request ever sees half a config. Health is not lost: an endpoint that still exists (same provider,
upstream model, adapter and base URL) carries its health window and ejection state into the new table.

What a reload cannot change in a running process (listen address, workers, engine, the accounting store) is
kept as it was, with a log line saying a restart is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

import msgspec

from health.monitor import Monitor
from health.probes import expire_loop, probe_provider
from proxy.accounting.admin import ensure_orgs
from proxy.cache import ResponseCache
from proxy.config import BUILTIN_DEMO, Config
from proxy.demo import start_demo
from proxy.forward import Forwarder
from proxy.handlers import Gateway
from proxy.router import Endpoint, Router, RouteTable, build_table
from proxy.store.base import StoreError
from proxy.upstream import UpstreamClient

log = logging.getLogger("hedgerow")


class Runtime:
    """The routing half of a running gateway (one per worker), built from a config and rebuilt on reload."""

    __slots__ = ("_demo", "background", "builtin", "cache", "cfg", "client", "clock", "gw", "rng")

    def __init__(self, gw: Gateway, client: UpstreamClient, cache: ResponseCache, clock: Callable[[], float]) -> None:
        self.gw = gw
        self.client = client
        self.cache = cache
        self.clock = clock
        self.rng = random.Random()
        self.builtin: dict[str, str] = {}
        self._demo = None
        self.background: list[asyncio.Task[None]] = []
        self.cfg: Config | None = None

    async def apply(self, cfg: Config) -> None:
        """Build (or rebuild) routing from `cfg` and switch new requests to it."""
        if self.cfg is not None:
            cfg = self._keep_what_needs_a_restart(cfg)
        if self._demo is None and any(p.base_url == BUILTIN_DEMO for p in cfg.providers):
            self._demo, self.builtin[BUILTIN_DEMO] = await start_demo()
        table = build_table(cfg, self.builtin, self.clock)
        if self.cfg is not None:
            _carry_health(self.gw.forwarder.table, table)
        groups = {m.name: table.models[m.name].endpoints for m in cfg.models}
        monitor = Monitor(groups, cfg.routing.ejection, self.clock)
        router = Router(table, monitor, self.rng)
        acct = self.gw.accountant
        acct.configure(cfg.accounting)
        self.gw.keys.configure(cfg.keys)
        if self.cfg is not None and acct.cfg.enabled:
            try:  # organisations new in this config; the store may be away, which must not fail the reload
                await ensure_orgs(acct.store, cfg.accounting.orgs, time.time())
            except StoreError as e:
                log.warning("config reload: new organisations not created yet (store unreachable): %s", e)
        forwarder = Forwarder(
            router,
            monitor,
            self.client,
            cfg.routing,
            cfg.server.max_response_bytes,
            self.clock,
            self.cache,
            cfg.cache.enabled,
            acct,
        )
        old = self.background
        self.background = [asyncio.create_task(expire_loop(monitor))]
        for p in cfg.providers:
            eps = sorted(
                {ep.key: ep for eps in groups.values() for ep in eps if ep.provider == p.name}.values(),
                key=lambda e: e.key,
            )
            if p.probe.enabled and eps:
                self.background.append(asyncio.create_task(probe_provider(p, eps, self.client, monitor, self.rng)))
        self.gw.attach(forwarder)  # from here on, new requests route by the new config
        self.cfg = cfg
        await _cancel(old)

    def _keep_what_needs_a_restart(self, cfg: Config) -> Config:
        assert self.cfg is not None
        old = self.cfg
        if cfg.server != old.server:
            log.warning("config reload: `server` changes take effect at the next restart")
            cfg = msgspec.structs.replace(cfg, server=old.server)
        if cfg.accounting.store != old.accounting.store or cfg.accounting.enabled != old.accounting.enabled:
            log.warning("config reload: `accounting.store` / `enabled` changes take effect at the next restart")
            acct = msgspec.structs.replace(cfg.accounting, store=old.accounting.store, enabled=old.accounting.enabled)
            cfg = msgspec.structs.replace(cfg, accounting=acct)
        return cfg

    async def close(self) -> None:
        await _cancel(self.background)
        if self._demo is not None:
            await self._demo.cleanup()


async def reload_from(runtime: Runtime, load: Callable[[], Config]) -> bool:
    """SIGHUP: load the config again and apply it; a config that does not load changes nothing."""
    from proxy.config import ConfigError  # the errors a bad file gives

    try:
        cfg = load()
    except ConfigError as e:
        log.error("config reload rejected, still serving the previous config: %s", "; ".join(e.problems))
        return False
    try:
        await runtime.apply(cfg)
    except Exception:
        log.exception("config reload failed, still serving the previous config")
        return False
    log.info("config reloaded: %d providers, %d models, %d keys", len(cfg.providers), len(cfg.models), len(cfg.keys))
    return True


def _carry_health(old: RouteTable, new: RouteTable) -> None:
    """Give each endpoint of the new table that existed before its health and ejection state."""
    before: dict[tuple[str, str, str, str], Endpoint] = {}
    for route in old.models.values():
        for ep in route.endpoints:
            before[_identity(ep)] = ep
    for route in new.models.values():
        for ep in route.endpoints:
            prev = before.get(_identity(ep))
            if prev is not None:
                ep.health, ep.state = prev.health, prev.state


def _identity(ep: Endpoint) -> tuple[str, str, str, str]:
    """Same provider name, upstream model, wire format and address: the same upstream, whose health holds."""
    target = ep.adapter.target("chat", ep.model, False) or ep.adapter.target("embeddings", ep.model, False)
    url = target.url if target is not None else ""
    return (ep.provider, ep.model, ep.adapter.name, url)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
