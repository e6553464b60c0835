"""Prometheus metrics: each worker counts the generations it finished; `/metrics` answers for every worker.

Why batches: a request pays one list append (`Accountant.finish`); every half second the accountant hands the
finished generations to `Metrics` (an accountant observer), which sums the counters per label set, observes the
histograms and samples the gauges — on the event loop, but never inside a request.

Why multi-process mode: `--workers N` forks N processes behind one port, and a scrape lands on any one of them.
Each worker writes its values to files in `PROMETHEUS_MULTIPROC_DIR`, a directory the supervisor makes before
the fork (`multiprocess_dir`, called by proxy/server.py); the worker that is scraped reads them all
(prometheus_client's MultiProcessCollector). One process without that variable keeps its values in memory.

Names follow the OpenTelemetry GenAI semantic conventions where they exist (`gen_ai_*`: their names, bucket
boundaries and attribute names as labels); the rest are `hedgerow_*`. Labels stay low-cardinality: public
model names from the route table (a name a client made up counts as "other"), provider and endpoint names
from the config, outcomes and status classes. Never key ids, never prompt text.
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import math
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

from proxy.preferences import split_suffix

if TYPE_CHECKING:
    from proxy.accounting.accountant import Accountant, Generation
    from proxy.handlers import Gateway
    from proxy.router import Endpoint, RouteTable
    from proxy.store.base import AttemptRecord

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format every Prometheus version reads

# The bucket boundaries the OpenTelemetry GenAI conventions advise for each of their histograms.
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
# What the gateway adds is a fraction of a millisecond when all is well; tens of milliseconds is a problem.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

_OTHER = "other"  # the model label of a name the route table does not know: clients must not mint label values
_MAX_NAMES = 4096  # remembered model name → label lookups; forgotten past this (a client cycling made-up names)
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class Metrics:
    """One worker's metrics. An accountant observer (called with each batch of finished generations) and the
    `/metrics` handler."""

    __slots__ = (
        "_acct",
        "_children",
        "_clock",
        "_endpoints",
        "_gw",
        "_last_tick",
        "_names",
        "_seen",
        "_served",
        "_table",
        "_until",
        "attempts",
        "cost",
        "duration",
        "ejections",
        "healthy",
        "hedges",
        "in_flight",
        "ledger_dropped",
        "ledger_queue",
        "multiprocess",
        "overhead",
        "registry",
        "requests",
        "store_errors",
        "tokens",
        "tpot",
        "ttft",
        "worker_requests",
    )

    def __init__(self, accountant: Accountant, gw: Gateway, clock: Callable[[], float] = time.monotonic) -> None:
        self._acct = accountant
        self._gw = gw  # its forwarder's route table names the models and endpoints (replaced on a reload)
        self._clock = clock  # the health state's clock (proxy/reload.py builds routing on time.monotonic)
        self.multiprocess = _select_value_class()
        disable_created_metrics()  # a `_created` series per counter doubles the scrape and no dashboard reads it
        # Multi-process: the values live in files, so the metrics join no registry; the collector reads the files.
        reg = None if self.multiprocess else CollectorRegistry()
        model, provider = "gen_ai_request_model", "gen_ai_provider_name"
        self.duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "Client requests: arrival to the last byte (OTel gen_ai.client.operation.duration)",
            (model, provider, "error_type"),
            buckets=_DURATION_BUCKETS,
            registry=reg,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streamed requests: arrival to the first content event (OTel gen_ai.server.time_to_first_token)",
            (model, provider),
            buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Streamed requests: time per output token after the first (OTel gen_ai.server.time_per_output_token)",
            (model, provider),
            buckets=_TPOT_BUCKETS,
            registry=reg,
        )
        self.tokens = Counter(
            "gen_ai_client_token_usage",
            "Tokens the upstreams reported, by type (OTel gen_ai.client.token.usage, summed: cached is part of "
            "input, reasoning part of output)",
            (model, provider, "gen_ai_token_type"),
            registry=reg,
        )
        self.requests = Counter(
            "hedgerow_requests_total", "Client requests by status class", ("model", "status_class"), registry=reg
        )
        self.attempts = Counter(
            "hedgerow_attempts_total", "Upstream attempts by outcome", ("provider", "outcome"), registry=reg
        )
        self.hedges = Counter("hedgerow_hedges_total", "Hedged requests: did the hedge win", ("result",), registry=reg)
        self.cost = Counter(
            "hedgerow_cost_usd_total", "Upstream cost, USD (the ledger's `cost`)", ("model", "provider"), registry=reg
        )
        self.overhead = Histogram(
            "hedgerow_gateway_overhead_seconds",
            "Request time not spent in upstream attempts (requests with attempts, not cancelled)",
            buckets=_OVERHEAD_BUCKETS,
            registry=reg,
        )
        self.in_flight = Gauge(
            "hedgerow_in_flight_requests", "Client requests in flight", multiprocess_mode="livesum", registry=reg
        )
        self.ejections = Counter(
            "hedgerow_endpoint_ejections_total", "Endpoints taken out of rotation", ("provider",), registry=reg
        )
        self.healthy = Gauge(
            "hedgerow_endpoint_healthy",
            "1 while an endpoint is in rotation (with several workers: in at least one of them)",
            ("endpoint",),
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.ledger_queue = Gauge(
            "hedgerow_ledger_queue", "Records waiting for the store", multiprocess_mode="livesum", registry=reg
        )
        self.ledger_dropped = Counter(
            "hedgerow_ledger_dropped_total", "Records dropped: queue full, store away", registry=reg
        )
        self.store_errors = Counter(
            "hedgerow_store_errors_total", "Accounting store operations that failed", ("part",), registry=reg
        )
        self.worker_requests = Gauge(
            "hedgerow_worker_requests",
            "Requests this worker finished since it started (a series per worker: how evenly they share the port)",
            multiprocess_mode="liveall",
            registry=reg,
        )
        if reg is None:
            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
        self.registry = reg
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._names: dict[str, str] = {}
        self._table: RouteTable | None = None
        self._endpoints: tuple[Endpoint, ...] = ()
        self._until: dict[str, float] = {}  # endpoint → its ejection end at the last look
        self._last_tick = clock()
        self._seen: dict[str, int] = {}  # the accountant's failure counters at the last look
        self._served = 0

    # -- the batch --

    def __call__(self, gens: Sequence[Generation]) -> None:
        self._refresh_table()
        # First by what the generations share (model asked for, provider, status, cancelled): one dict lookup
        # each; then each group's label values once, its sums and observations added to their series.
        groups: dict[tuple[str, str, int, bool], _Group] = {}
        attempts: dict[tuple[str, str], int] = {}
        hedges: dict[str, int] = {}
        overheads: list[float] = []
        for g in gens:
            key = (g.model, g.provider, g.status, g.cancelled)
            grp = groups.get(key)
            if grp is None:
                grp = groups[key] = _Group()
            latency = g.ended - g.started
            grp.latencies.append(latency)
            u, ttft = g.usage, g.ttft
            if u is not None:
                grp.tokens[0] += u.prompt_tokens
                grp.tokens[1] += u.completion_tokens
                grp.tokens[2] += u.cached_tokens
                grp.tokens[3] += u.reasoning_tokens
            if g.cost is not None:
                grp.cost += g.cost.upstream
            if g.streamed and ttft is not None and not g.cancelled and g.status < 400:
                grp.ttfts.append(ttft)
                if u is not None and u.completion_tokens > 1:
                    grp.tpots.append((latency - ttft) / (u.completion_tokens - 1))
            for a in g.attempts:
                ak = (a.provider, a.outcome)
                attempts[ak] = attempts.get(ak, 0) + 1
            if g.hedge:
                hedges[g.hedge] = hedges.get(g.hedge, 0) + 1
            if g.attempts and not g.cancelled:
                overheads.append(max(0.0, latency - _upstream_time(g.attempts)))
        requests: dict[tuple[str, str], int] = {}
        tokens: dict[tuple[str, str, str], int] = {}
        cost: dict[tuple[str, str], float] = {}
        durations: dict[tuple[str, ...], list[float]] = {}
        ttfts: dict[tuple[str, ...], list[float]] = {}
        tpots: dict[tuple[str, ...], list[float]] = {}
        for (name, prov, status, cancelled), grp in groups.items():
            model = self._model_label(name)
            key = (model, _STATUS_CLASS.get(status // 100, _OTHER))
            requests[key] = requests.get(key, 0) + len(grp.latencies)
            error = "cancelled" if cancelled else (str(status) if status >= 400 else "")
            durations.setdefault((model, prov, error), []).extend(grp.latencies)
            if grp.ttfts:
                ttfts.setdefault((model, prov), []).extend(grp.ttfts)
            if grp.tpots:
                tpots.setdefault((model, prov), []).extend(grp.tpots)
            for kind, n in zip(_TOKEN_TYPES, grp.tokens, strict=True):
                if n:
                    tk = (model, prov, kind)
                    tokens[tk] = tokens.get(tk, 0) + n
            if grp.cost:
                ck = (model, prov)
                cost[ck] = cost.get(ck, 0.0) + grp.cost
        child = self._child
        for metric, series in ((self.duration, durations), (self.ttft, ttfts), (self.tpot, tpots)):
            for labels, observed in series.items():
                _observe_all(child(metric, labels), observed)
        if overheads:
            _observe_all(self.overhead, overheads)
        for metric, sums in (
            (self.requests, requests),
            (self.tokens, tokens),
            (self.attempts, attempts),
            (self.cost, cost),
        ):
            for labels, amount in sums.items():
                child(metric, labels).inc(amount)
        for result, n in hedges.items():
            child(self.hedges, (result,)).inc(n)
        self._served += len(gens)
        self._sample()

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """`metric.labels(*labels)`, remembered: prometheus_client checks and locks on every `labels` call."""
        key = (metric, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def _model_label(self, model: str) -> str:
        label = self._names.get(model)
        if label is None:
            table = self._table
            route = table.models.get(split_suffix(model)[0]) if table is not None else None
            label = route.name if route is not None else _OTHER
            if len(self._names) >= _MAX_NAMES:
                self._names.clear()
            self._names[model] = label
        return label

    def _refresh_table(self) -> None:
        """Follow the route table (a reload replaces it): its endpoints are the health gauges' series."""
        forwarder = getattr(self._gw, "forwarder", None)  # set once the lifecycle has built routing
        if forwarder is None or forwarder.table is self._table:
            return
        self._table = table = forwarder.table
        self._names.clear()
        endpoints = {ep.key: ep for route in table.models.values() for ep in route.endpoints}
        for ep in self._endpoints:
            if ep.key not in endpoints and self._children.pop((self.healthy, (ep.key,)), None) is not None:
                self.healthy.remove(ep.key)  # gone from the config (multi-process: its file keeps the last value)
        self._endpoints = tuple(endpoints.values())

    # -- gauges and the accountant's own counters, sampled once a batch --

    def _sample(self) -> None:
        acct = self._acct
        self.in_flight.set(acct.in_flight)
        self.worker_requests.set(self._served)
        ledger = acct.ledger
        self.ledger_queue.set(len(ledger))
        self._delta(self.ledger_dropped, "dropped", ledger.dropped)
        self._delta(self._child(self.store_errors, ("ledger",)), "ledger", ledger.failures)
        self._delta(self._child(self.store_errors, ("credits",)), "credits", acct.credits.unreachable)
        self._delta(self._child(self.store_errors, ("rates",)), "rates", acct.rates.unreachable)
        self._health()

    def _delta(self, counter: Any, name: str, value: int) -> None:
        seen = self._seen.get(name, 0)
        if value > seen:
            counter.inc(value - seen)
        self._seen[name] = value

    def _health(self) -> None:
        """Each endpoint's rotation state, and the ejections since the last look: an endpoint that was in
        rotation then and has an ejection end after then was ejected in between (a 429 extending an ejection,
        or an early readmission, is not a new one). Two ejections within one half second count as one."""
        now = self._clock()
        last_tick = self._last_tick
        for ep in self._endpoints:
            until = ep.state.ejected_until
            before = self._until.get(ep.key, -math.inf)  # a new endpoint was never out
            if until != before and before <= last_tick < until:
                self._child(self.ejections, (ep.provider,)).inc()
            self._until[ep.key] = until
            self._child(self.healthy, (ep.key,)).set(0.0 if until > now else 1.0)
        self._last_tick = now

    # -- /metrics --

    async def serve(self, request: web.Request) -> web.Response:
        """Every worker's metrics (multi-process mode) or this process's. No key: scrapers don't send one, so
        this route must not be reachable from outside (README: Metrics)."""
        await self._acct.notify_observers()  # this worker's last half second too
        body = await asyncio.to_thread(generate_latest, self.registry)  # reads the workers' files: off the loop
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


_TOKEN_TYPES = ("input", "output", "cached", "reasoning")  # gen_ai_token_type, in `_Group.tokens` order


class _Group:
    """The generations of one batch that share model, provider, status and cancellation: what their series get."""

    __slots__ = ("cost", "latencies", "tokens", "tpots", "ttfts")

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.tpots: list[float] = []
        self.tokens = [0, 0, 0, 0]  # prompt (input), completion (output), cached, reasoning
        self.cost = 0.0


def _observe_all(histogram: Any, values: list[float]) -> None:
    """`histogram.observe(v)` for every v, counted first: each bucket and the sum then take one `inc` for the batch
    instead of one per value (each `inc` takes a lock and, with several workers, writes the value's file). What
    `observe` does, batched: a value counts in the first bucket whose upper bound is at least the value."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:  # not the prometheus_client internals we know
        for v in values:
            histogram.observe(v)
        return
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect_left(bounds, v)] += 1  # the last bound is +Inf
    total.inc(sum(values))
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)


def _upstream_time(attempts: Sequence[AttemptRecord]) -> float:
    """Seconds during which at least one attempt was running (a hedge overlaps its rival)."""
    if len(attempts) == 1:
        return attempts[0].duration
    total, end = 0.0, float("-inf")
    for start, stop in sorted((a.started, a.started + a.duration) for a in attempts):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _select_value_class() -> bool:
    """True in multi-process mode. prometheus_client chooses where values live (memory or files) when it is
    first imported, from PROMETHEUS_MULTIPROC_DIR; the supervisor sets that variable later (just before the
    fork), so choose again here, in the worker, before this worker's first metric exists."""
    multi = bool(os.environ.get(MULTIPROC_ENV))
    if multi != getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.get_value_class()
    return multi


def multiprocess_dir() -> str:
    """For the supervisor, before it forks the workers: the directory their metric files go to. The operator's
    PROMETHEUS_MULTIPROC_DIR if set (a previous run's files are removed: their counts are not ours), else a new
    temporary directory, removed when the supervisor exits."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for f in glob.glob(os.path.join(path, "*.db")):
            os.remove(f)
        return path
    path = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="hedgerow-metrics-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not in a forked worker that happens to run exit handlers
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


def worker_exited(pid: int | None) -> None:
    """A worker is gone: its live gauges (in flight, queue, health) stop counting; its counters stay."""
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
