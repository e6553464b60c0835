"""The stats API, in OpenRouter's spirit: the models with each endpoint's live health, a public leaderboard of
the models, and a key's own usage per day.

- `GET /api/v1/models` (any key): the model list of `/v1/models`, each with `endpoints`: price, state and the
  monitor's live stats (health/monitor.py) of every endpoint serving it — OpenRouter's
  `/api/v1/models/:author/:slug/endpoints` for every model at once. Built per request from the snapshot: the
  stats move, and this is no hot route (`/v1/models` stays the body built once).
- `GET /api/v1/rankings?period=day|week|month` (any key): tokens per model over the period and the one before
  it, with the trend. No key or organisation appears in it.
- `GET /api/v1/activity?days=30` (any key): the caller's usage per UTC day and model; an admin key may ask
  for one key's (`key=`), one organisation's (`org=`) or everyone's.

Rankings and activity read the store's day counters (`Store.usage_by_day`), so they count whole UTC days: a
period of N days is the N days ending with today (today so far included), and the period before it the N days
before those. Records still queued in a node's ledger are not counted yet: they lag by at most the flush
interval (`accounting.flush-interval-s`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from health.window import Outcome, counts_as_failure
from proxy.accounting.admin import Route, _json, _ms, _query, _store_errors_unavailable, iso
from proxy.accounting.catalog import model_entry, pricing_fields
from proxy.errors import BadRequest, Forbidden
from proxy.store.base import DAY_S, DayUsage, KeyRecord, Store, day_bounds

if TYPE_CHECKING:
    from health.monitor import Monitor
    from proxy.handlers import Gateway
    from proxy.router import Endpoint, ModelRoute, RouteTable

PERIODS = {"day": 1, "week": 7, "month": 30}  # days
MAX_DAYS = 400  # activity: about what the Redis day counters keep (proxy/store/redis.py, AGG_TTL_S)
_QUANTILES = ("p50", "p90", "p99")
_FAILURES = {o.name.lower() for o in Outcome if counts_as_failure(o)}


def endpoint_stats(route: ModelRoute, ep: Endpoint, live: dict[str, Any]) -> dict[str, Any]:
    """One endpoint of a model: its price and limits, and the monitor's `snapshot()` entry in the stats shape.
    Quantiles are None below the window's minimum of samples; uptime is a fraction (None without traffic)."""
    outcomes: dict[str, int] = live["outcomes_5m"]
    return {
        "provider": ep.provider,
        "endpoint": ep.key,
        "pricing": pricing_fields(ep.price),
        "context_length": route.context_length,
        "status": "ejected" if live["ejected"] else "healthy",
        "uptime": live["uptime"],
        "ttft_ms": {q: _ms(live["ttfb_s"][q]) for q in _QUANTILES},
        "latency_ms": {q: _ms(live["latency_s"][q]) for q in _QUANTILES},
        "throughput_tps": live["throughput_tps"],
        "requests_5m": sum(outcomes.values()),  # upstream attempts (hedges, failovers and health probes count each)
        "errors_5m": sum(n for name, n in outcomes.items() if name in _FAILURES),
    }


def rank(current: list[DayUsage], previous: list[DayUsage], shown: Callable[[str, int], bool]) -> list[dict[str, Any]]:
    """Per model: the current period's totals, the previous period's, and the trend; most tokens first.
    `shown(model, total_tokens)` keeps a model out of the board (names a client made up)."""
    now: dict[str, dict[str, Any]] = {}
    for u in current:
        row = now.setdefault(u.model, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0})
        row["requests"] += u.requests
        row["prompt_tokens"] += u.prompt_tokens
        row["completion_tokens"] += u.completion_tokens
        row["cost"] += u.cost
    before: dict[str, list[int]] = {}
    for u in previous:
        acc = before.setdefault(u.model, [0, 0])
        acc[0] += u.requests
        acc[1] += u.prompt_tokens + u.completion_tokens
    data = []
    for model, row in now.items():
        total = row["prompt_tokens"] + row["completion_tokens"]
        if not shown(model, total):
            continue
        prev_requests, prev_total = before.get(model, [0, 0])
        data.append(
            {
                "model": model,
                **row,
                "total_tokens": total,
                "previous": {"requests": prev_requests, "total_tokens": prev_total},
                "trend": total / prev_total - 1.0 if prev_total else None,
            }
        )
    everything = sum(r["total_tokens"] for r in data)
    for r in data:
        r["share"] = r["total_tokens"] / everything if everything else 0.0
    data.sort(key=lambda r: (-r["total_tokens"], -r["requests"], r["model"]))
    return data


class StatsAPI:
    """The `/api/v1/models`, `/rankings` and `/activity` handlers, for either server engine. Without a store
    (accounting disabled) only the model list is served."""

    def __init__(
        self,
        store: Store | None,
        authenticate: Callable[[str | None], KeyRecord],
        is_admin: Callable[[KeyRecord], bool],
        routing: Callable[[], tuple[RouteTable, Monitor]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._authenticate = authenticate  # Authorization header -> the caller's key, or Unauthorized
        self._is_admin = is_admin
        self._routing = routing  # the current route table and monitor (a reload replaces both)
        self._clock = clock  # wall clock: the ledger's `created` times are Unix seconds

    @classmethod
    def for_gateway(cls, gw: Gateway) -> StatsAPI:
        acct = gw.accountant
        return cls(
            acct.store if acct.cfg.enabled else None,
            gw.keys.check,
            gw.keys.is_admin,
            lambda: (gw.forwarder.table, gw.forwarder.monitor),
        )

    def routes(self) -> list[Route]:
        table: list[Route] = [("GET", "/api/v1/models", self.models)]
        if self._store is not None:
            table.append(("GET", "/api/v1/rankings", _store_errors_unavailable(self.rankings)))
            table.append(("GET", "/api/v1/activity", _store_errors_unavailable(self.activity)))
        return table

    def _caller(self, request: web.Request) -> KeyRecord:
        return self._authenticate(request.headers.get("Authorization"))

    async def _usage(
        self, start: float, end: float, key_id: str | None = None, org: str | None = None
    ) -> list[DayUsage]:
        assert self._store is not None  # the routes that read usage exist only with a store
        return await self._store.usage_by_day(start, end, key_id=key_id, org=org)

    async def models(self, request: web.Request) -> web.Response:
        self._caller(request)
        table, monitor = self._routing()
        live = {s["endpoint"]: s for s in monitor.snapshot()}
        data = []
        for name in table.public:
            route = table.models[name]
            entry = model_entry(route)
            entry["endpoints"] = [endpoint_stats(route, ep, live[ep.key]) for ep in route.endpoints]
            data.append(entry)
        return _json({"object": "list", "data": data})

    async def rankings(self, request: web.Request) -> web.Response:
        self._caller(request)
        period = _query(request, "period") or "day"
        if period not in PERIODS:
            raise BadRequest(f"period must be one of {', '.join(PERIODS)}", param="period")
        now, span = self._clock(), PERIODS[period] * DAY_S
        current, previous = await asyncio.gather(self._usage(now - span, now), self._usage(now - 2 * span, now - span))
        served = self._routing()[0].models
        start, end = day_bounds(now - span, now)
        return _json(
            {
                "period": period,
                "start": iso(start),
                "end": iso(end),
                # a model this gateway serves, or one that produced tokens: never a name a client made up
                "data": rank(current, previous, lambda model, tokens: tokens > 0 or model in served),
            }
        )

    async def activity(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        raw = _query(request, "days")
        try:
            days = 30 if raw is None else int(raw)
        except ValueError:
            days = 0
        if not 1 <= days <= MAX_DAYS:
            raise BadRequest(f"days must be a whole number from 1 to {MAX_DAYS}", param="days")
        key_id, org = _query(request, "key"), _query(request, "org")
        if self._is_admin(caller):
            if key_id is not None and org is not None:
                raise BadRequest("give `key` or `org`, not both", param="org")
        else:  # its own usage only; naming itself is allowed
            if key_id is not None and key_id != caller.id:
                raise Forbidden("only an admin key may read another key's activity", param="key")
            if org is not None and org != caller.org:
                raise Forbidden("only an admin key may read another organisation's activity", param="org")
            key_id, org = caller.id, None
        now = self._clock()
        rows = await self._usage(now - days * DAY_S, now, key_id, org)
        start, end = day_bounds(now - days * DAY_S, now)
        return _json({"start": iso(start), "end": iso(end), "data": msgspec.to_builtins(rows)})
