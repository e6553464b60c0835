"""Serve one client request: plan the endpoints, run attempts (failover, hedge), relay the winner.

- Failover: connect errors, timeouts, 408/409/429/5xx and errors before a stream's first token move to the
  next candidate while the retry budget allows; an upstream's client-fault 4xx is relayed at once.
- Hedging: when the first attempt has produced no first token after the hedge delay, one more attempt starts
  on a different provider; the first to commit wins and the other is cancelled at once (its connection
  closed). Hedges are capped by a per-model budget.
- Nothing is retried or hedged after a byte of the answer reached the client.
- Another client API (`front`, proxy/attempt.py `Front`; /v1/messages) rides on all of this: its requests are
  planned, cached, hedged and failed over like chat's; only the bytes each attempt sends and what the client
  receives (bodies, stream, error events) are the front's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping

import orjson
from aiohttp import web

from health.monitor import Monitor
from health.window import OUTCOME_NAMES, Outcome
from proxy.accounting.accountant import Accountant, Generation, worst_case
from proxy.accounting.usage import (
    Usage,
    price_usage,
    splice_usage,
    usage_cost_fields,
    usage_from_body,
    usage_from_messages_body,
    usage_from_messages_stream,
    usage_from_stream,
)
from proxy.affinity import PrefixAffinity, prefix_key
from proxy.attempt import Committed, Front, Relay, run_attempt
from proxy.budget import Budget
from proxy.cache import BYPASS, CACHE_HEADER, HIT, MISS, ResponseCache, cache_control, cache_key, replay_chunks
from proxy.config import RoutingConfig
from proxy.deadline import call_at
from proxy.errors import (
    BadRequest,
    GatewayError,
    Unavailable,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from proxy.preferences import fallback_models, provider_prefs
from proxy.router import Endpoint, ModelRoute, Router
from proxy.schema import _View
from proxy.stream import KEEPALIVE, SSE_HEADERS, answer, pipe, prepare, whole_events
from proxy.upstream import UpstreamClient

_FINISH_KEYS = (b'"finish_reason"', b'"stop_reason"')  # OpenAI's, Anthropic's
_FINISH_VALUE = re.compile(rb'\s*:\s*"([a-z_]+)"')
GENERATION_HEADER = "X-Hedgerow-Generation-Id"
PROVIDER_HEADER = "X-Hedgerow-Provider"
ENDPOINT_HEADER = "X-Hedgerow-Endpoint"
ATTEMPTS_HEADER = "X-Hedgerow-Attempts"
HEDGED_HEADER = "X-Hedgerow-Hedged"  # "won": a hedge attempt served; "lost": the first attempt won a race
HEDGE_REQUEST_HEADER = "X-Hedgerow-Hedge"  # per request: "off", or a fixed delay in seconds
CACHE_REQUEST_HEADER = "X-Hedgerow-Cache"  # per request: "on" or "off", over the model's `cache` setting
UPSTREAM_TTFB_HEADER = "X-Hedgerow-Upstream-TTFB-Ms"  # the serving attempt: sent to committed (streams: first token)


class Attempts:
    """How the attempts went: the winner, how many were made, whether a hedge raced and who won."""

    __slots__ = ("attempts", "candidates", "committed", "down", "hedge")

    def __init__(self) -> None:
        self.committed: Committed | None = None
        self.attempts = 0
        self.candidates = 0  # endpoints that could have served: all of the model's unless preferences narrowed
        self.hedge = ""  # "", "won" or "lost"
        self.down: web.StreamResponse | None = None  # the client stream, if keep-alives already opened it


class Forwarder:
    """Per-process forwarding state: router, monitor, pooled client, budgets."""

    __slots__ = (
        "_hedge_budgets",
        "accountant",
        "affinity",
        "cache",
        "cache_all",
        "client",
        "clock",
        "config",
        "max_response_bytes",
        "monitor",
        "retries",
        "router",
    )

    def __init__(
        self,
        router: Router,
        monitor: Monitor,
        client: UpstreamClient,
        config: RoutingConfig,
        max_response_bytes: int,
        clock: Callable[[], float],
        cache: ResponseCache | None = None,
        cache_all: bool = False,
        accountant: Accountant | None = None,
    ) -> None:
        self.router = router
        self.accountant = accountant  # None: no credits to reserve (tests of routing alone)
        self.cache = cache  # None: no model caches and the backend was never built
        self.cache_all = cache_all  # cache every model, not only those with `cache: true`
        self.affinity = PrefixAffinity(config.affinity, clock) if config.affinity.enabled else None
        self.monitor = monitor
        self.client = client
        self.config = config
        self.max_response_bytes = max_response_bytes
        self.clock = clock
        self.retries = Budget(config.retry_budget, floor_per_s=config.retry_floor_per_s, clock=clock)
        self._hedge_budgets: dict[str, Budget] = {}

    @property
    def table(self):
        return self.router.table

    async def forward(
        self,
        request: web.Request,
        kind: str,
        view: _View,
        body: bytes,
        gen: Generation,
        front: Front | None = None,
    ) -> web.StreamResponse:
        route, plan = self.router.plan(view.model, provider_prefs(view.provider), fallback_models(view.models), body)
        plan = [ep for ep in plan if ep.adapter.target(kind, ep.model, view.stream) is not None]
        if not plan:
            raise BadRequest(f"model `{view.model}` does not support this endpoint", param="model")
        headers = {GENERATION_HEADER: gen.id}
        if gen.headers:
            headers.update(gen.headers)
        store_key = None
        if self.cache is not None and self._wants_cache(route, request.headers):
            lookup, store = cache_control(request.headers.get("Cache-Control"))
            ckey = cache_key(kind if front is None else front.kind, route.name, body, view.stream, scope=gen.key.id)
            headers[CACHE_HEADER] = BYPASS if ckey is None or not (lookup or store) else MISS
            if ckey is not None and lookup:
                hit = await self.cache.get(ckey)
                if hit is not None:
                    gen.endpoint, gen.status = "cache", 200  # no upstream, no cost
                    return await _replay(request, hit, view.stream, headers)
            if ckey is not None and store:
                store_key = ckey
        acct = self.accountant
        if acct is not None:
            if acct.metered(gen):
                cap = view.output_cap() or route.max_output or route.context_length
                await acct.reserve(gen, worst_case(len(body), cap, [ep.price for ep in plan]))
            else:
                acct.unmetered(gen)
        affinity_key = None
        if self.affinity is not None and kind == "chat" and len(plan) > 1:
            affinity_key = prefix_key(body, self.config.affinity.prefix_bytes)
            if affinity_key is not None:
                _stick(plan, self.affinity.get(route.name, affinity_key))
        self.retries.deposit()
        hedge_delay = self._hedge_delay(route, plan, request.headers, view.stream)
        if hedge_delay is not None:
            self._hedge_budget(route).deposit()  # the budget is a share of the requests that could hedge
        run = Attempts()
        run.candidates = len(plan) if view.provider or view.models else max(len(plan), len(route.endpoints))
        try:
            if hedge_delay is None:
                await self._sequential(run, request, kind, view, body, plan, headers, gen, front)
            else:
                await self._race(run, request, kind, view, body, route, plan, hedge_delay, headers, gen, front)
        except Relay as r:
            c = r.committed
            headers[PROVIDER_HEADER] = c.ep.provider
            gen.provider, gen.endpoint, gen.status = c.ep.provider, c.ep.key, c.status
            _timing(headers, c.ttfb, c.started + c.ttfb - gen.started)
            return _relay(request, c, headers)
        except GatewayError as e:
            if run.down is not None:  # keep-alives already opened the stream: end it with the error
                gen.status = 200
                await run.down.write(e.sse_event() if front is None else front.sse_error(e))
                return run.down
            raise
        finally:
            gen.hedge = run.hedge
        c = run.committed
        assert c is not None
        if affinity_key is not None and self.affinity is not None:
            self.affinity.put(route.name, affinity_key, c.ep.key)
        headers[PROVIDER_HEADER] = c.ep.provider
        headers[ENDPOINT_HEADER] = c.ep.key
        headers[ATTEMPTS_HEADER] = str(run.attempts)
        if run.hedge:
            headers[HEDGED_HEADER] = run.hedge
        gen.status = c.status
        gen.ttft = c.started + c.ttfb - gen.started
        _timing(headers, c.ttfb, gen.ttft)
        if c.body is not None:
            body_out = c.body
            if c.usage_read:  # read by the attempt, with its check that the body is a JSON object
                usage = c.usage
            else:
                usage = usage_from_body(body_out) if front is None else usage_from_messages_body(body_out)
            self._served(gen, c, usage, Outcome.OK, c.ttfb, self.clock() - c.started, body_out)
            fields = gen.cost_fields() if front is None else None
            if fields is not None:
                body_out = splice_usage(body_out, fields) or body_out
            headers["Content-Type"] = c.ctype
            if store_key is not None and c.status == 200 and not view.stream:
                self._store(store_key, c.body)
            if run.down is not None:  # stream requested, upstream answered JSON, keep-alives already sent
                await run.down.write(body_out)
                return run.down
            return answer(request, c.status, headers, body_out)
        return await self._relay_stream(request, run, c, headers, store_key, gen, front)

    def _served(
        self, gen: Generation, c: Committed, usage: Usage | None, outcome: Outcome, ttfb: float, took: float, end: bytes
    ) -> None:
        """The winning attempt ended: its health sample, its ledger entry, its cost. `end`: the body, or the
        stream's tail, where the finish reason is."""
        tokens = usage.completion_tokens if usage is not None else 0
        reason = _last_finish(end)
        if reason is not None:
            gen.finish_reason = reason
        # The health sample after the answer is written (see Gateway.serve): the next request's routing sees it.
        asyncio.get_running_loop().call_soon(self.monitor.record, c.ep, outcome, ttfb, took, tokens)
        gen.attempt(c.ep.provider, c.ep.key, OUTCOME_NAMES[outcome], c.status, c.started, c.started + took)
        fee = self.accountant.cfg.fee if self.accountant is not None else 0.0
        gen.served(c.ep.provider, c.ep.key, usage, c.ep.price, fee)

    def _wants_cache(self, route: ModelRoute, headers: Mapping[str, str]) -> bool:
        asked = headers.get(CACHE_REQUEST_HEADER)
        if asked is not None:
            return asked.lower() == "on"
        return route.cache or self.cache_all

    def _store(self, key: str, value: bytes) -> None:
        """Store off the request path: the response is not held up by the cache backend."""
        assert self.cache is not None
        asyncio.get_running_loop().create_task(self.cache.put(key, value))

    async def _relay_stream(
        self,
        request: web.Request,
        run: Attempts,
        c: Committed,
        headers: dict[str, str],
        store_key: str | None,
        gen: Generation,
        front: Front | None,
    ) -> web.StreamResponse:
        assert c.chunks is not None
        outcome, tail = Outcome.CANCELLED, b""
        target = c.ep.adapter.target("chat", c.ep.model, True)
        deadline = c.started + (target.timeouts.total_s if target else 900.0)
        collect: list[bytes] | None = [] if store_key is not None else None
        prefix, chunks = c.prefix, c.chunks
        if front is None and gen.include_cost:
            prefix, chunks = b"", whole_events(prefix, chunks, self._cost_splicer(c))
        try:
            down = run.down
            if down is None:
                headers.update(SSE_HEADERS)
                down = await prepare(request, c.status, headers)
            if front is None:
                outcome, tail = await pipe(down, prefix, chunks, deadline, collect)
            else:
                outcome, tail = await pipe(down, prefix, chunks, deadline, collect, front.sse_error)
            if collect is not None and store_key is not None and outcome == Outcome.OK:
                self._store(store_key, b"".join(collect))
            return down
        finally:
            c.resp.release()  # no-op after a clean end; closes the upstream connection otherwise
            usage = None
            if tail:
                usage = usage_from_stream(tail) if front is None else usage_from_messages_stream(c.prefix, tail)
            self._served(gen, c, usage, outcome, c.ttfb, self.clock() - c.started, tail)

    def _cost_splicer(self, c: Committed) -> Callable[[bytes], bytes]:
        """Prices the usage event as it passes and adds `cost` to it (the client asked for it)."""
        fee = self.accountant.cfg.fee if self.accountant is not None else 0.0

        def splice(events: bytes) -> bytes:
            usage = usage_from_stream(events)
            if usage is None:
                return events
            return splice_usage(events, usage_cost_fields(price_usage(usage, c.ep.price, fee))) or events

        return splice

    def _hedge_delay(
        self, route: ModelRoute, plan: list[Endpoint], headers: Mapping[str, str], stream: bool
    ) -> float | None:
        """Seconds to wait for a first token before hedging, or None for no hedge."""
        h = route.hedge
        if len(plan) < 2 or not h.enabled:
            return None
        asked = headers.get(HEDGE_REQUEST_HEADER)
        if asked is None and not stream and not h.non_streamed:
            return None  # arming a hedge costs a task per request; by default only streams pay it
        if len({ep.provider for ep in plan}) < 2:
            return None
        if asked is not None:
            if asked.lower() == "off":
                return None
            try:
                return min(max(float(asked), 0.0), h.max_s)
            except ValueError:
                raise BadRequest(f"{HEDGE_REQUEST_HEADER} must be `off` or seconds", param=None) from None
        if h.delay_s is not None:
            return h.delay_s
        q = plan[0].health.ttfb_quantile(h.quantile)
        return h.max_s if q is None else min(max(q, h.min_s), h.max_s)

    def _hedge_budget(self, route: ModelRoute) -> Budget:
        b = self._hedge_budgets.get(route.name)
        if b is None:
            b = self._hedge_budgets[route.name] = Budget(route.hedge.budget, clock=self.clock)
        return b

    async def _sequential(
        self,
        run: Attempts,
        request: web.Request,
        kind: str,
        view: _View,
        body: bytes,
        plan: list[Endpoint],
        headers: dict[str, str],
        gen: Generation,
        front: Front | None,
    ) -> None:
        """Failover without hedging: one attempt at a time, inline (no task per request). A stream's client
        gets SSE keep-alives while it waits for a first token, from a task started only if that takes
        `stream_keepalive_s` (`_KeepAlive`)."""
        strip = view.has_gateway_fields()
        keep = _KeepAlive(run, request, headers, self.config.stream_keepalive_s) if view.stream else None
        last: UpstreamError | None = None
        try:
            for i, ep in enumerate(plan):
                if i and not self.retries.withdraw():
                    break
                run.attempts += 1
                try:
                    run.committed = await run_attempt(
                        self.client, self.monitor, ep, kind, body, view.model, strip, view.stream,
                        self._deadline(ep, kind), self.max_response_bytes, front, gen,
                    )  # fmt: skip
                    return
                except UpstreamError as e:
                    last = e
        finally:
            if keep is not None:
                await keep.stop()
        raise _final_error(last, run.attempts >= len(plan), run.candidates)

    async def _race(
        self,
        run: Attempts,
        request: web.Request,
        kind: str,
        view: _View,
        body: bytes,
        route: ModelRoute,
        plan: list[Endpoint],
        hedge_delay: float | None,
        headers: dict[str, str],
        gen: Generation,
        front: Front | None,
    ) -> None:
        """Attempts as tasks: failover on errors, one hedge after the delay, SSE keep-alives while waiting."""
        loop = asyncio.get_running_loop()
        strip = view.has_gateway_fields()
        tasks: dict[asyncio.Task[Committed], Endpoint] = {}
        hedge_task: asyncio.Task[Committed] | None = None
        queue = list(plan)
        last: UpstreamError | None = None
        start = loop.time()
        hedge_at = start + hedge_delay if hedge_delay is not None else None
        keepalive_s = self.config.stream_keepalive_s
        keepalive_at = start + keepalive_s if view.stream else None

        def launch(ep: Endpoint) -> asyncio.Task[Committed]:
            run.attempts += 1
            t = loop.create_task(
                run_attempt(
                    self.client, self.monitor, ep, kind, body, view.model, strip, view.stream,
                    self._deadline(ep, kind), self.max_response_bytes, front, gen,
                )
            )  # fmt: skip
            tasks[t] = ep
            return t

        launch(queue.pop(0))
        try:
            while tasks:
                wake = min((t for t in (hedge_at, keepalive_at) if t is not None), default=None)
                timeout = None if wake is None else max(0.0, wake - loop.time())
                done, _ = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                now = loop.time()
                for t in done:
                    tasks.pop(t)
                    err = t.exception()
                    if err is None:
                        run.committed = t.result()
                        if hedge_task is not None:
                            run.hedge = "won" if t is hedge_task else "lost"
                        return
                    if isinstance(err, Relay):
                        raise err
                    if not isinstance(err, UpstreamError):
                        raise err
                    last = err
                if done and not tasks and queue:
                    if not self.retries.withdraw():
                        break
                    launch(queue.pop(0))
                if hedge_at is not None and now >= hedge_at:
                    hedge_at = None  # one hedge per request
                    busy = {ep.provider for ep in tasks.values()}
                    other = next((ep for ep in queue if ep.provider not in busy), None)
                    if other is not None and tasks and self._hedge_budget(route).withdraw():
                        queue.remove(other)
                        hedge_task = launch(other)
                if keepalive_at is not None and now >= keepalive_at and tasks:
                    await _keep_alive(run, request, headers)
                    keepalive_at = now + keepalive_s
        finally:
            for t in tasks:
                t.cancel()  # the loser (or everything, if the client left): its connection closes now
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        raise _final_error(last, run.attempts >= len(plan), run.candidates)

    def _deadline(self, ep: Endpoint, kind: str) -> float:
        target = ep.adapter.target(kind, ep.model, False)
        assert target is not None
        return self.clock() + target.timeouts.total_s


async def _keep_alive(run: Attempts, request: web.Request, headers: dict[str, str]) -> None:
    """One SSE comment to a client still waiting for a first token; the first one opens the stream (200)."""
    if run.down is None:
        headers.update(SSE_HEADERS)
        run.down = await prepare(request, 200, headers)
    await run.down.write(KEEPALIVE)


class _KeepAlive:
    """Keep-alives for a stream whose attempts run inline (`Forwarder._sequential`): a timer, which costs no
    loop timer while it is seconds away (`proxy.deadline.call_at`), starts a task that writes one every
    `every_s` once the first token is that late; most streams never start it. `stop()` ends the task between
    two writes, never in one: a stream head half-opened by a cancelled write would be opened again by the relay."""

    __slots__ = ("_timer", "busy", "every_s", "halt", "headers", "request", "run", "task")

    def __init__(self, run: Attempts, request: web.Request, headers: dict[str, str], every_s: float) -> None:
        self.run, self.request, self.headers, self.every_s = run, request, headers, every_s
        self.task: asyncio.Task[None] | None = None
        self.busy = False  # a write in progress
        self.halt = False
        loop = asyncio.get_running_loop()
        self._timer = call_at(loop, loop.time() + every_s, _KeepAlive._start, self)

    def _start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while True:  # a `stop()` before the first write cancels the task before it runs
            self.busy = True
            try:
                await _keep_alive(self.run, self.request, self.headers)
            except Exception:
                return  # the client is gone: its request is being cancelled, the attempt with it
            finally:
                self.busy = False
            if self.halt:
                return
            await asyncio.sleep(self.every_s)

    async def stop(self) -> None:
        self._timer.cancel()
        task = self.task
        if task is None:
            return
        self.halt = True
        if not self.busy:
            task.cancel()  # sleeping, or not started yet: nothing half-written
        await asyncio.wait((task,))


def _timing(headers: dict[str, str], upstream: float, total: float) -> None:
    """W3C Server-Timing, in ms, at the commit (a stream's head goes out then): `upstream` is the serving attempt
    from its send to its commit, `gateway` the rest of the time until then (parsing, routing, failed attempts)."""
    up = f"{upstream * 1000.0:.2f}"
    headers[UPSTREAM_TTFB_HEADER] = up
    # at least 0: under uvloop the attempt's clock (loop.time()) counts whole milliseconds, the request's does not
    gateway = total - upstream if total > upstream else 0.0
    headers["Server-Timing"] = f"gateway;dur={gateway * 1000.0:.2f}, upstream;dur={up}"


def _last_finish(data: bytes) -> str | None:
    """The last `"finish_reason": "…"` (or Anthropic's `"stop_reason"`) with a string value in `data`. Searched
    from the end, where a body's or a stream tail's is: a regex over the whole answer costs ≈ 2.5 µs per KiB."""
    finish, stop = _FINISH_KEYS
    end = len(data)
    while True:
        at_finish, at_stop = data.rfind(finish, 0, end), data.rfind(stop, 0, end)
        pos, key = (at_finish, finish) if at_finish >= at_stop else (at_stop, stop)
        if pos < 0:
            return None
        m = _FINISH_VALUE.match(data, pos + len(key))
        if m is not None:
            return m.group(1).decode()
        end = pos + len(key) - 1  # this one's value is not a string (`null`): an earlier one


def _stick(plan: list[Endpoint], key: str | None) -> None:
    """Move the endpoint that served this prompt prefix last to the front, so its prompt cache keeps
    hitting (a cached prefix is cheaper and faster to first token than any load-balancing win) — unless it
    is far busier than the load balancer's choice: a popular prefix must not pile onto one endpoint."""
    if key is None or plan[0].key == key:
        return
    for i, ep in enumerate(plan):
        if ep.key == key:
            if ep.health.in_flight <= _AFFINITY_MAX_LOAD * (plan[0].health.in_flight + 1):
                plan.insert(0, plan.pop(i))
            return


_AFFINITY_MAX_LOAD = 4  # in-flight ratio beyond which queueing costs more than the prompt cache saves


async def _replay(request: web.Request, stored: bytes, stream: bool, headers: dict[str, str]) -> web.StreamResponse:
    """A cache hit: the stored bytes, as JSON or replayed event by event as SSE. No upstream, no cost."""
    headers[CACHE_HEADER] = HIT
    if not stream:
        headers["Content-Type"] = "application/json"
        return answer(request, 200, headers, stored)
    headers.update(SSE_HEADERS)
    down = await prepare(request, 200, headers)
    for event in replay_chunks(stored):
        await down.write(event)
    return down


def _relay(request: web.Request, c: Committed, headers: dict[str, str]) -> web.Response:
    """An upstream's client-fault answer, relayed as received (with Retry-After if it gave one)."""
    headers["Content-Type"] = c.ctype
    retry_after = c.resp.headers.get("Retry-After")
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return answer(request, c.status, headers, c.body or b"")


class RelayedStatus(GatewayError):
    """The last upstream's own error, relayed with its status (429 keeps Retry-After), once failover ran out."""

    kind = "status"

    def __init__(self, err: UpstreamStatus) -> None:
        super().__init__(err.message, upstream=err.upstream)
        self._err = err
        self.status = err.upstream_status  # type: ignore[misc]
        self.openai_type = "rate_limit_error" if err.upstream_status == 429 else "upstream_error"  # type: ignore[misc]

    def body(self) -> bytes:
        body = self._err.upstream_body
        try:
            if isinstance(orjson.loads(body).get("error"), dict):
                return body  # already OpenAI-shaped
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return super().body()

    def headers(self) -> dict[str, str]:
        return {"Retry-After": self._err.upstream_headers.get("Retry-After", "1")}


def _final_error(last: UpstreamError | None, tried_all: bool, candidates: int) -> GatewayError:
    """What the client gets when no attempt succeeded."""
    if last is None:
        return Unavailable("no endpoint could take the request (retry budget exhausted)")
    if isinstance(last, UpstreamStatus):
        status = last.upstream_status
        if status in (408, 409, 429):
            return RelayedStatus(last)
        if status == 504:
            last = UpstreamTimeout(f"upstream {last.upstream} timed out (504)", upstream=last.upstream)
        else:
            last = UpstreamError(f"upstream {last.upstream} failed with status {status}", upstream=last.upstream)
    if candidates > 1 and tried_all:  # ejected endpoints count as failed: they were out for failing
        return Unavailable(f"all {candidates} endpoints failed; the last: {last.message}")
    return last
