"""Accounting for one gateway process: keys from the store, credits, rate limits, the ledger, and per request a
`Generation` that collects what the ledger records.

What the request path pays: `begin` (an object), `admit` and `reserve` (in-memory counters; an await on the
store only when this node's lease ran dry), and `finish` (synchronous: commit, count tokens, queue the record —
so a cancelled request is still recorded from a `finally`). Everything that talks to the store runs in the
background tasks started by `start()`: the ledger writer, settlements, token-count sync, key reloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import msgspec

from proxy.accounting.admin import ensure_orgs
from proxy.accounting.keys import KeyRing
from proxy.accounting.ledger import Ledger
from proxy.accounting.limits import Credits, RateLimits
from proxy.accounting.settings import AccountingConfig
from proxy.accounting.usage import Cost, Usage, price_usage, usage_cost_fields
from proxy.config import Price
from proxy.errors import Forbidden
from proxy.store.base import AttemptRecord, GenerationRecord, KeyRecord, Store, StoreError

log = logging.getLogger("hedgerow")

_FALLBACK_OUTPUT_CAP = 4096  # a reservation's completion tokens when neither the request nor the catalog says
_STOP_CANCEL_WAIT_S = 5.0  # how long stop() waits for its cancelled background tasks
_STOP_FLUSH_TRIES = 5  # a graceful stop retries the last ledger flush this many times (once a second)
_OBSERVE_S = 0.5  # finished generations reach the observers this often: metrics lag a scrape by at most this
_OBSERVE_SLICE = 64  # generations per observer call; the loop runs between slices, so a big batch stalls nothing


class Generation(msgspec.Struct, gc=False):
    """One client request on its way through the gateway; becomes a GenerationRecord in `finish`.

    `gc=False`: finished generations wait up to `_OBSERVE_S` for the observers' batch, so under load a few
    thousand are alive at once; tracked, each was traversed by every young collection it lived through and
    promoted towards the oldest generation, whose full collections then came often. A generation refers only
    to values (its key, usage, cost, attempts), never back to anything that holds it, so it cannot be part of
    a cycle the collector would have to find."""

    id: str
    key: KeyRecord
    model: str
    streamed: bool
    started: float  # loop clock
    created: float  # wall clock
    ended: float = 0.0  # loop clock, set by `finish`
    attempts: list[AttemptRecord] = []
    headers: dict[str, str] | None = None  # X-RateLimit-* for the response
    reserved: float | None = None  # None: no reservation to commit
    include_cost: bool = False  # splice cost into the final usage
    status: int = 0
    cancelled: bool = False
    provider: str = ""
    endpoint: str = ""
    usage: Usage | None = None
    cost: Cost | None = None
    ttft: float | None = None
    finish_reason: str | None = None
    hedge: str = ""
    traceparent: str | None = None  # server.tracing only: the client's W3C trace context header
    operation: str = ""  # server.tracing only: "chat", "completions", "embeddings" (the client's route)

    def attempt(self, provider: str, endpoint: str, outcome: str, status: int, started: float, ended: float) -> None:
        self.attempts.append(
            AttemptRecord(
                provider=provider,
                endpoint=endpoint,
                outcome=outcome,
                status=status,
                started=started - self.started,
                duration=ended - started,
            )
        )

    def served(self, provider: str, endpoint: str, usage: Usage | None, price: Price, fee: float) -> Cost | None:
        """The winning attempt's usage, priced. Returns the cost (None without usage)."""
        self.provider = provider
        self.endpoint = endpoint
        self.usage = usage
        self.cost = None if usage is None else price_usage(usage, price, fee)
        if self.attempts:
            a = self.attempts[-1]
            if a.endpoint == endpoint and usage is not None:
                a.prompt_tokens = usage.prompt_tokens
                a.completion_tokens = usage.completion_tokens
                a.cost = self.cost.upstream if self.cost else 0.0
        return self.cost

    def cost_fields(self) -> bytes | None:
        """The members to splice into the final usage, when the client (or the config) asked for them."""
        return usage_cost_fields(self.cost) if self.include_cost and self.cost is not None else None


def worst_case(body_len: int, output_cap: int | None, prices: Iterable[Price]) -> float:
    """An upper bound of a request's cost over the endpoints that may serve it: every body byte a prompt token
    (no tokenizer yields more tokens than UTF-8 bytes, give or take a few per message) and the whole output cap
    at the dearer of the output and reasoning prices."""
    out = output_cap or _FALLBACK_OUTPUT_CAP
    prompt = body_len + 64
    worst = 0.0
    for p in prices:
        per_out = max(p.output, p.reasoning if p.reasoning is not None else 0.0)
        per_in = max(p.input, p.cache_write or 0.0, p.cache_read or 0.0)
        worst = max(worst, (prompt * per_in + out * per_out) / 1e6 + p.request)
    return worst


class Accountant:
    __slots__ = (
        "_finished",
        "_tasks",
        "cfg",
        "credits",
        "in_flight",
        "keys",
        "ledger",
        "loop_clock",
        "observers",
        "rates",
        "store",
        "store_ok",
        "usage_cost",
    )

    def __init__(
        self,
        cfg: AccountingConfig,
        store: Store,
        keys: KeyRing,
        loop_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.keys = keys
        self.loop_clock = loop_clock
        self.credits = Credits(store, cfg)
        self.rates = RateLimits(store, cfg)
        self.ledger = Ledger(store, cfg.flush_interval_s, cfg.queue_max)
        self.usage_cost = cfg.usage_cost
        self.store_ok = True  # the last look at the store (every keys-sync-s) found it answering
        self._tasks: list[asyncio.Task[None]] = []
        self.in_flight = 0  # requests between `begin` and `finish`
        # Called with each batch of finished generations, off the request path (proxy/insights: metrics, the
        # access log): `finish` only appends to `_finished`; `_observe_loop` hands the list over.
        self.observers: list[Callable[[Sequence[Generation]], None]] = []
        self._finished: list[Generation] = []

    def configure(self, cfg: AccountingConfig) -> None:
        """A reloaded config's fee, limits behaviour and intervals (the store stays: see proxy/reload.py)."""
        self.cfg = cfg
        self.usage_cost = cfg.usage_cost
        self.credits.cfg = cfg
        self.rates.cfg = cfg
        self.ledger.flush_interval_s = cfg.flush_interval_s
        self.ledger.queue_max = cfg.queue_max

    # -- lifecycle --

    async def start(self, extra_tasks: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
        """Open the store, create the configured orgs, load keys, start the background tasks. An unreachable
        store does not stop the gateway: config keys work, records queue, and the sync loops keep trying."""
        if self.observers:  # metrics and the access log work with accounting off too
            self._tasks.append(asyncio.create_task(self._observe_loop()))
        if not self.cfg.enabled:
            return
        try:
            await self.store.open()
            await ensure_orgs(self.store, self.cfg.orgs, time.time())
            await self.reload_keys()
        except StoreError as e:
            self.store_ok = False
            log.error("accounting store unreachable at startup (records will queue): %s", e)
        loops = [self.ledger.run, self._settle_loop, self._keys_loop, *extra_tasks]
        self._tasks += [asyncio.create_task(f()) for f in loops]

    async def stop(self) -> None:
        """Settle and write everything (a graceful stop loses no record), then close the store."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:  # bounded: a store client that swallows a cancellation must not hang the stop
            _, stuck = await asyncio.wait(self._tasks, timeout=_STOP_CANCEL_WAIT_S)
            for t in stuck:
                log.error("accounting task %s did not stop when cancelled; stopping without it", t.get_name())
        self._tasks = []
        await self.notify_observers()  # the last requests' generations
        if not self.cfg.enabled:
            return
        await self.rates.sync()
        await self.credits.settle(final=True)
        failed = 0
        while self.ledger:  # a flush writes what was queued when it began: go on until nothing is left
            if await self.ledger.flush():
                continue
            failed += 1
            if failed >= _STOP_FLUSH_TRIES:
                log.error("ledger store unreachable at stop: %d records not written", len(self.ledger))
                break
            await asyncio.sleep(1.0)
        with contextlib.suppress(StoreError):
            await self.store.close()

    async def reload_keys(self) -> None:
        self.keys.load(await self.store.list_keys())
        self.credits.orgs = {o.id: o for o in await self.store.list_orgs()}

    async def _keys_loop(self) -> None:
        """Reload keys (and org balances) when the store's keys version moves; Redis also pushes changes."""
        seen = -1
        push = getattr(self.store, "subscribe_keys", None)
        pusher = asyncio.create_task(self._follow(push)) if push is not None else None
        try:
            while True:
                try:
                    version = await self.store.keys_version()
                    if version != seen:
                        await self.reload_keys()
                        seen = version
                    else:
                        self.credits.orgs = {o.id: o for o in await self.store.list_orgs()}
                    self.store_ok = True
                except StoreError:
                    self.store_ok = False  # keep serving with the keys we have (see /readyz)
                await asyncio.sleep(self.cfg.keys_sync_s)
        finally:
            if pusher is not None:
                pusher.cancel()

    async def _follow(self, subscribe: Callable[[], object]) -> None:
        while True:
            try:
                async for _ in subscribe():  # type: ignore[attr-defined]
                    await self.reload_keys()
            except StoreError:
                await asyncio.sleep(self.cfg.keys_sync_s)

    async def _observe_loop(self) -> None:
        while True:
            await asyncio.sleep(_OBSERVE_S)
            await self.notify_observers()

    async def notify_observers(self) -> None:
        """Hand the generations finished since the last call to every observer, a slice at a time (each observer
        is called at least once, with an empty slice if need be: metrics sample their gauges then)."""
        gens, self._finished = self._finished, []
        done = 0
        try:
            while True:
                part = gens[done : done + _OBSERVE_SLICE]
                done += len(part)
                for observe in self.observers:
                    try:
                        observe(part)
                    except Exception:
                        log.exception("an observer of finished generations failed")
                if done >= len(gens):
                    return
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._finished[:0] = gens[done:]  # the rest goes to the next call (the one in `stop`, at the latest)
            raise

    async def _settle_loop(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self.cfg.flush_interval_s)
            await self.rates.sync()
            await self.credits.settle()
            # heartbeat a few times per lease TTL; look for crashed processes' leases about twice per TTL
            beat = max(1, int(self.cfg.lease_ttl_s / self.cfg.flush_interval_s / 4))
            if rounds % beat == 0:
                await self.credits.heartbeat(reap=rounds % (2 * beat) == 0)
            rounds += 1

    # -- per request --

    def begin(self, gen_id: str, key: KeyRecord, model: str, streamed: bool, include_cost: bool) -> Generation:
        now = self.loop_clock()
        gen = Generation(gen_id, key, model, streamed, now, time.time(), now)
        self.in_flight += 1
        gen.include_cost = self.usage_cost == "always" or (self.usage_cost == "request" and include_cost)
        return gen

    def allowed(self, gen: Generation) -> None:
        """The key's model list: before anything is planned or sent."""
        models = gen.key.allowed_models
        if models is not None and gen.model not in models:
            raise Forbidden(f"this API key may not use model `{gen.model}`")

    def limited(self, gen: Generation) -> bool:
        """Does this request go through `admit`? Most keys have no rate limit: they skip the await."""
        key = gen.key
        return (key.rpm is not None or key.tpm is not None) and self.cfg.enabled

    async def admit(self, gen: Generation) -> None:
        """The key's rate limits (when `limited`): before anything is planned or sent."""
        gen.headers = await self.rates.admit(gen.key)

    def metered(self, gen: Generation) -> bool:
        """Must this request reserve credit? If not, `unmetered` stands in for `reserve`, without an await."""
        return self.cfg.enabled and self.credits.metered(gen.key)

    async def reserve(self, gen: Generation, amount: float) -> None:
        gen.reserved = await self.credits.reserve(gen.key, amount)

    def unmetered(self, gen: Generation) -> None:
        if self.cfg.enabled:
            gen.reserved = self.credits.reserve_free(gen.key)

    def finish(self, gen: Generation) -> None:
        """Synchronous on purpose: runs in the request's `finally`, cancelled or not."""
        gen.ended = self.loop_clock()
        self.in_flight -= 1
        if gen.hedge and not gen.cancelled:
            for a in gen.attempts:
                if a.outcome == "cancelled":
                    a.outcome = "hedge_lost"
        if self.observers:
            self._finished.append(gen)  # the observers' batch: the only cost of metrics and the access log here
        if not self.cfg.enabled:
            return
        cost = gen.cost
        total = cost.total if cost is not None else 0.0
        key = gen.key
        if gen.reserved is not None:  # every attempt runs after a reservation, so a cost always has one
            self.credits.commit(key, gen.reserved, total)
        u = gen.usage
        if u is not None:
            self.rates.add_tokens(key, u.prompt_tokens + u.completion_tokens)
        self.ledger.append(
            GenerationRecord(
                id=gen.id,
                key_id=key.id,
                org=key.org,
                model=gen.model,
                provider=gen.provider,
                endpoint=gen.endpoint,
                status=gen.status,
                streamed=gen.streamed,
                cancelled=gen.cancelled,
                finish_reason=gen.finish_reason,
                prompt_tokens=u.prompt_tokens if u else 0,
                completion_tokens=u.completion_tokens if u else 0,
                cached_tokens=u.cached_tokens if u else 0,
                cache_write_tokens=u.cache_write_tokens if u else 0,
                reasoning_tokens=u.reasoning_tokens if u else 0,
                cost=cost.upstream if cost else 0.0,
                fee=cost.fee if cost else 0.0,
                ttft=gen.ttft,
                latency=gen.ended - gen.started,
                created=gen.created,
                attempts=gen.attempts,
            )
        )
