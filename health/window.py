"""Rolling per-endpoint statistics for routing: load-aware cost, error rates, TTFB quantiles, uptime, throughput.

The router reads `cost()` for power-of-two-choices on every request, the ejector reads `error_rate()` after
every failure, hedging reads `ttfb_quantile(0.95)` per request and the stats API reads `snapshot()`. So the
per-request paths are O(1) with no allocation, memory is fixed whatever the traffic, and there is no I/O
and no asyncio: time comes from an injected `clock` (monotonic seconds), which makes every test exact.

Why buckets: a ring of time buckets forgets old data by zeroing one bucket per rotation, where a list of
samples would grow with traffic. Fine buckets (10 s × 30) serve the error-rate, quantile and throughput
windows; coarse buckets (5 min × 288) keep a day of outcome counts for uptime.

Why Peak-EWMA (tower `load/peak_ewma.rs`, from Finagle): an endpoint that just answered slowly is taken at
its worst at once, and forgiven gradually. The estimate also decays toward zero while no sample arrives, as
tower's does on every read: an endpoint that P2C stopped choosing looks cheaper and cheaper until real
traffic measures it again, instead of staying stuck at one old slow sample.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Hashable, Iterable
from itertools import accumulate
from operator import add
from typing import Any

from health.histogram import BINS, bin_of, value_at


class Outcome(enum.IntEnum):
    """How one upstream attempt ended. Values index the per-bucket count arrays."""

    OK = 0
    CONNECT = 1  # nothing was sent: refused, DNS, TLS
    TIMEOUT = 2  # connect, first byte, idle or total deadline
    RATE_LIMITED = 3  # 429
    SERVER_ERROR = 4  # 5xx, 408, 409, provider overload codes
    PROTOCOL = 5  # malformed response, stream cut short
    CLIENT_ERROR = 6  # the caller's fault (400, 413 …): says nothing about the upstream
    CANCELLED = 7  # client went away or a hedge lost: says nothing about the upstream


N_OUTCOMES = len(Outcome)
# `outcome.name.lower()` by value: an enum's `name` is a slow property on 3.11 (≈ 1 µs), a tuple index is not.
OUTCOME_NAMES = tuple(o.name.lower() for o in Outcome)
# Module constants: `Outcome.OK` is a slow class-attribute lookup on 3.11 (≈ 0.25 µs), `_OK` is not.
_OK, _CONNECT, _CANCELLED = Outcome.OK, Outcome.CONNECT, Outcome.CANCELLED
# Indexed by outcome, so the hot path does a tuple lookup instead of a set test.
_FAILURE = tuple(o not in (Outcome.OK, Outcome.CLIENT_ERROR, Outcome.CANCELLED) for o in Outcome)


def counts_as_failure(outcome: Outcome) -> bool:
    """True when the outcome counts against the upstream (CLIENT_ERROR and CANCELLED never do)."""
    return _FAILURE[outcome]


def outcome_for_status(status: int) -> Outcome:
    """Outcome of an upstream HTTP status (for callers that have only the status)."""
    if status < 400:
        return Outcome.OK
    if status == 429:
        return Outcome.RATE_LIMITED
    if status >= 500 or status in (408, 409):  # 408/409: the provider's own timeout or conflict, worth a retry
        return Outcome.SERVER_ERROR
    return Outcome.CLIENT_ERROR


FINE_BUCKET_S = 10.0  # a 60 s error-rate window spans 6 buckets; one rotation per 10 s costs nothing
FINE_BUCKETS = 30  # 5 minutes: the longest quantile, error-rate and throughput window
COARSE_BUCKET_S = 300.0  # 5 minutes: the shortest uptime window the stats API shows
COARSE_BUCKETS = 288  # one day
QUANTILE_REFRESH_S = 1.0  # a cached merged histogram is rebuilt at most this often (or when a bucket rotates)
MIN_STREAM_S = 0.05  # generation spans shorter than this give tokens/s dominated by timer and network jitter
_CACHED_WINDOWS = 8  # distinct quantile windows cached per kind; callers use two or three


class _Ring:
    """A ring of time buckets; flat arrays indexed by bucket × field, so a record touches no new object."""

    __slots__ = ("counts", "head", "hists", "idx", "n", "next_at", "stream_s", "tokens", "width")

    def __init__(self, width: float, n: int, detailed: bool) -> None:
        self.width = width
        self.n = n
        self.head = 0  # absolute bucket number (now // width) of the newest bucket
        self.idx = 0  # head % n
        self.next_at = width  # when the head bucket ends: one float compare per record
        self.counts = [0] * (n * N_OUTCOMES)
        # Fine ring only: TTFB and total-latency histograms, output tokens and generation seconds.
        self.hists = ([0] * (n * BINS), [0] * (n * BINS)) if detailed else ()
        self.tokens = [0] * n if detailed else []
        self.stream_s = [0.0] * n if detailed else []

    def advance(self, now: float) -> None:
        """Move the head to `now`'s bucket, zeroing the buckets skipped: at most the whole ring, once."""
        b = int(now // self.width)
        if b <= self.head:  # same bucket, or a clock that went back: keep filling the head
            return
        n = self.n
        for k in range(1, min(b - self.head, n) + 1):
            i = (self.head + k) % n
            self.counts[i * N_OUTCOMES : (i + 1) * N_OUTCOMES] = _ZERO_OUTCOMES
            if self.hists:
                for h in self.hists:
                    h[i * BINS : (i + 1) * BINS] = _ZERO_BINS
                self.tokens[i] = 0
                self.stream_s[i] = 0.0
        self.head = b
        self.idx = b % n
        self.next_at = (b + 1) * self.width

    def span(self, window_s: float) -> int:
        """Buckets covering the last `window_s`: the current partial one plus whole ones, at most the ring."""
        return max(1, min(self.n, math.ceil(window_s / self.width)))

    def sums(self, window_s: float) -> tuple[int, int]:
        """(failures, counted attempts) over the window: a read on failure paths, so summed here."""
        f = ok = 0
        counts, idx, n = self.counts, self.idx, self.n
        for j in range(self.span(window_s)):
            base = ((idx - j) % n) * N_OUTCOMES
            ok += counts[base]
            f += sum(counts[base + _FAIL_FIRST : base + _FAIL_END])
        return f, ok + f


_ZERO_OUTCOMES = [0] * N_OUTCOMES
_ZERO_BINS = [0] * BINS
# The failure outcomes are contiguous (CONNECT … PROTOCOL), so a bucket's failures are one slice sum.
_FAIL_FIRST, _FAIL_END = Outcome.CONNECT, Outcome.PROTOCOL + 1
assert all(_FAILURE[o] == (_FAIL_FIRST <= o < _FAIL_END) for o in Outcome)


class _Merged:
    """A cached cumulative histogram over one window.

    `base` sums the window's complete buckets and changes only when the head rotates (every 10 s); a
    refresh adds the head bucket to it, so refreshing every second costs one pass over BINS.
    """

    __slots__ = ("at", "base", "cum", "head")

    def __init__(self) -> None:
        self.base = [0] * BINS
        self.cum = [0] * BINS
        self.head = -1  # head bucket `base` was built for
        self.at = -math.inf  # when `cum` was built


TTFB, LATENCY = 0, 1  # histogram kinds


class RollingWindow:
    """Fixed-memory bucketed statistics of attempts. Every method takes `now` (monotonic seconds)."""

    __slots__ = ("_caches", "coarse", "fine")

    def __init__(
        self,
        fine_s: float = FINE_BUCKET_S,
        fine_buckets: int = FINE_BUCKETS,
        coarse_s: float = COARSE_BUCKET_S,
        coarse_buckets: int = COARSE_BUCKETS,
    ) -> None:
        self.fine = _Ring(fine_s, fine_buckets, detailed=True)
        self.coarse = _Ring(coarse_s, coarse_buckets, detailed=False)
        self._caches: tuple[dict[float, _Merged], dict[float, _Merged]] = ({}, {})

    def record(
        self,
        now: float,
        outcome: Outcome,
        ttfb_s: float | None = None,
        total_s: float | None = None,
        output_tokens: int = 0,
        stream_s: float = 0.0,
    ) -> None:
        """Count one attempt; durations go to the histograms when given (the caller gives them for successes)."""
        fine = self.fine
        if now >= fine.next_at:
            fine.advance(now)
        coarse = self.coarse
        if now >= coarse.next_at:
            coarse.advance(now)
        i = fine.idx
        fine.counts[i * N_OUTCOMES + outcome] += 1
        coarse.counts[coarse.idx * N_OUTCOMES + outcome] += 1
        if ttfb_s is not None:
            fine.hists[0][i * BINS + bin_of(ttfb_s)] += 1
        if total_s is not None:
            fine.hists[1][i * BINS + bin_of(total_s)] += 1
        if output_tokens and stream_s >= MIN_STREAM_S:
            fine.tokens[i] += output_tokens
            fine.stream_s[i] += stream_s

    def _ring(self, now: float, window_s: float) -> _Ring:
        """The finest ring whose span covers the window, advanced to `now`."""
        fine = self.fine
        ring = fine if window_s <= fine.width * fine.n else self.coarse
        ring.advance(now)
        return ring

    def failures(self, now: float, window_s: float) -> tuple[int, int]:
        """(failures, counted attempts) over the last window, to bucket resolution."""
        return self._ring(now, window_s).sums(window_s)

    def counts(self, now: float, window_s: float) -> list[int]:
        """Attempts per outcome over the last window (stats API; allocates)."""
        ring = self._ring(now, window_s)
        out = [0] * N_OUTCOMES
        for j in range(ring.span(window_s)):
            base = ((ring.idx - j) % ring.n) * N_OUTCOMES
            out = list(map(add, out, ring.counts[base : base + N_OUTCOMES]))
        return out

    def uptime(self, now: float, window_s: float) -> float | None:
        f, t = self.failures(now, window_s)
        return (t - f) / t if t else None

    def throughput(self, now: float, window_s: float) -> float | None:
        """Output tokens per generation second over the last window (at most the fine ring's span)."""
        fine = self.fine
        fine.advance(now)
        tokens, secs = 0, 0.0
        for j in range(fine.span(window_s)):
            i = (fine.idx - j) % fine.n
            tokens += fine.tokens[i]
            secs += fine.stream_s[i]
        return tokens / secs if secs > 0 else None

    def quantile(self, now: float, kind: int, q: float, window_s: float, min_samples: int) -> float | None:
        """q-quantile of TTFB or LATENCY over the window; None below `min_samples`. O(log BINS) when cached."""
        fine = self.fine
        if now >= fine.next_at:
            fine.advance(now)
        cache = self._caches[kind]
        m = cache.get(window_s)
        if m is None:
            if len(cache) >= _CACHED_WINDOWS:
                cache.clear()
            m = cache[window_s] = _Merged()
        if m.head != fine.head or now - m.at >= QUANTILE_REFRESH_S:
            self._refresh(m, kind, window_s, now)
        total = m.cum[-1]
        if total < min_samples or total == 0:
            return None
        rank = min(max(q * total, 1e-9), total)  # q = 0 → the lowest sample's bin, not an empty one before it
        return value_at(m.cum, rank)

    def _refresh(self, m: _Merged, kind: int, window_s: float, now: float) -> None:
        fine = self.fine
        hist, idx, n = fine.hists[kind], fine.idx, fine.n
        if m.head != fine.head:
            whole = [hist[b * BINS : (b + 1) * BINS] for b in ((idx - j) % n for j in range(1, fine.span(window_s)))]
            m.base = [sum(col) for col in zip(*whole, strict=True)] if whole else [0] * BINS
            m.head = fine.head
        m.cum[:] = accumulate(map(add, m.base, hist[idx * BINS : (idx + 1) * BINS]))
        m.at = now


class EndpointHealth:
    """Health of one endpoint (provider + upstream model): load, latency, failures. One per endpoint."""

    __slots__ = (
        "_at",
        "_born",
        "_clock",
        "_decay_s",
        "_default_rtt_s",
        "_est",
        "consecutive_failures",
        "in_flight",
        "key",
        "last_probe_at",
        "last_probe_s",
        "min_samples",
        "window",
    )

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        key: Hashable = None,
        decay_s: float = 10.0,  # tower's default decay; TTFB of one model changes on that scale
        default_rtt_s: float = 0.5,  # a typical chat TTFB: a new endpoint neither flooded nor starved
        min_samples: int = 20,  # no quantile from fewer: p95 of 19 samples is just the maximum
        window: RollingWindow | None = None,
    ) -> None:
        self.key = key
        self._clock = clock
        self._decay_s = decay_s
        self._default_rtt_s = default_rtt_s
        self.min_samples = min_samples
        self.window = window if window is not None else RollingWindow()
        self.in_flight = 0
        self.consecutive_failures = 0
        self._est = default_rtt_s  # Peak-EWMA of TTFB as of `_at`
        self._at: float | None = None  # time of the last sample; None: no sample yet, use the default
        self._born = clock()  # the default estimate decays from here
        self.last_probe_s: float | None = None
        self.last_probe_at: float | None = None

    def start(self) -> None:
        self.in_flight += 1

    def finish(self, outcome: Outcome, ttfb_s: float | None, total_s: float, output_tokens: int = 0) -> None:
        """Record a finished attempt. Call it once per `start()`, after the stream ends (load lasts that long)."""
        if self.in_flight > 0:
            self.in_flight -= 1
        now = self._clock()
        if outcome == _OK:
            self.consecutive_failures = 0
            self._sample(ttfb_s if ttfb_s is not None else total_s, now)
            stream_s = total_s - ttfb_s if ttfb_s is not None else 0.0
            self.window.record(now, outcome, ttfb_s, total_s, output_tokens, stream_s)
            return
        if _FAILURE[outcome]:
            self.consecutive_failures += 1
            # A failure can only raise the estimate: fast errors must not make an endpoint look cheap (a
            # black hole that fails in 1 ms would win every P2C draw), but a slow one is slow.
            self._peak(ttfb_s if ttfb_s is not None else total_s, now)
        elif outcome == _CANCELLED and ttfb_s is None:
            self._peak(total_s, now)  # a hedge loser with no first byte yet: its TTFB is at least this
        self.window.record(now, outcome)

    def record_probe(self, outcome: Outcome | bool, latency_s: float) -> None:
        """Count an active probe (True/False means OK/SERVER_ERROR). It is not load: in-flight is untouched.

        Probes count in the outcome counters and the consecutive-failure streak, not in the latency
        histograms: a probe is a tiny request, and its TTFB would pull the hedging percentile down.
        """
        if isinstance(outcome, bool):
            outcome = Outcome.OK if outcome else Outcome.SERVER_ERROR
        now = self._clock()
        self.last_probe_s = latency_s
        self.last_probe_at = now
        self._count(outcome, now)

    def _count(self, outcome: Outcome, now: float) -> None:
        if outcome == _OK:
            self.consecutive_failures = 0
        elif _FAILURE[outcome]:
            self.consecutive_failures += 1
        self.window.record(now, outcome)

    def _sample(self, s: float, now: float) -> None:
        """Peak-EWMA update: above the current value replaces it; below pulls it toward s by 1 − e^(−Δt/τ)."""
        if self._at is None:
            self._est, self._at = s, now
            return
        decay = math.exp((self._at - now) / self._decay_s)
        cur = self._est * decay  # the value peak_ewma() shows now
        self._est = s if s >= cur else cur * decay + s * (1.0 - decay)
        self._at = now

    def _peak(self, s: float, now: float) -> None:
        if s > self.peak_ewma(now):
            self._est, self._at = s, now

    def peak_ewma(self, now: float | None = None) -> float:
        """TTFB estimate in seconds, decaying toward zero while no sample comes. Before the first sample the
        default decays from the endpoint's creation the same way: an endpoint that never won a pick (a new
        one among fast ones) becomes cheap enough to be tried and measured, instead of being starved."""
        if now is None:
            now = self._clock()
        if self._at is None:
            return self._default_rtt_s * math.exp((self._born - now) / self._decay_s)
        return self._est * math.exp((self._at - now) / self._decay_s)

    def cost(self) -> float:
        """The P2C cost: expected wait if sent here now (tower: estimate × (pending + 1))."""
        return self.peak_ewma() * (self.in_flight + 1)

    def error_rate(self, window_s: float = 60) -> tuple[int, int]:
        """(failures, counted attempts) over the last `window_s`, to 10 s resolution."""
        return self.window.failures(self._clock(), window_s)

    def ttfb_quantile(self, q: float, window_s: float = 300) -> float | None:
        return self.window.quantile(self._clock(), TTFB, q, window_s, self.min_samples)

    def latency_quantile(self, q: float, window_s: float = 300) -> float | None:
        return self.window.quantile(self._clock(), LATENCY, q, window_s, self.min_samples)

    def uptime(self, window_s: float) -> float | None:
        """successes / (successes + upstream failures); None without data. 300, 1800 and 86400 are cheap."""
        return self.window.uptime(self._clock(), window_s)

    def throughput(self, window_s: float = 300) -> float | None:
        return self.window.throughput(self._clock(), window_s)

    def snapshot(self) -> dict[str, Any]:
        """Everything above for the stats API, JSON-ready (floats, ints, None, str keys)."""
        now = self._clock()
        f, t = self.window.failures(now, 60)
        quantiles = (("p50", 0.5), ("p90", 0.9), ("p95", 0.95), ("p99", 0.99))
        return {
            "in_flight": self.in_flight,
            "consecutive_failures": self.consecutive_failures,
            "peak_ewma_s": self.peak_ewma(now),
            "cost": self.peak_ewma(now) * (self.in_flight + 1),
            "error_rate_60s": {"failures": f, "total": t, "rate": f / t if t else None},
            "outcomes_5m": dict(zip((o.name.lower() for o in Outcome), self.window.counts(now, 300), strict=True)),
            "ttfb_s": {k: self.window.quantile(now, TTFB, q, 300, self.min_samples) for k, q in quantiles},
            "latency_s": {k: self.window.quantile(now, LATENCY, q, 300, self.min_samples) for k, q in quantiles},
            "uptime": {k: self.window.uptime(now, w) for k, w in (("5m", 300), ("30m", 1800), ("1d", 86400))},
            "throughput_tps": self.window.throughput(now, 300),
            "last_probe_s": self.last_probe_s,
            "last_probe_age_s": None if self.last_probe_at is None else now - self.last_probe_at,
        }


class ProviderHealth:
    """The endpoints of one provider, for signals about the provider rather than one model.

    A connect failure means the host (DNS, TCP, TLS) is unreachable, so it hurts every model served there:
    `connect_failed` counts a CONNECT failure on every *other* endpoint of the provider (the failing one
    counted it in its own `finish`), which also advances their consecutive-failure streaks, so their own
    ejectors can act before a request is lost to each model in turn. It returns the keys it touched so the
    caller can run those ejectors. Other failures (5xx, 429) stay per endpoint: one model can be overloaded
    while its neighbours are fine.
    """

    __slots__ = ("endpoints", "name")

    def __init__(self, name: str, endpoints: Iterable[EndpointHealth] = ()) -> None:
        self.name = name
        self.endpoints: dict[Hashable, EndpointHealth] = {}
        for h in endpoints:
            self.add(h)

    def add(self, health: EndpointHealth) -> None:
        self.endpoints[health.key] = health

    def connect_failed(self, origin: Hashable = None) -> tuple[Hashable, ...]:
        """Count a CONNECT failure on every endpoint but `origin`; return the keys touched (a failure path)."""
        touched = tuple(k for k in self.endpoints if k != origin)
        for k in touched:
            h = self.endpoints[k]
            h._count(_CONNECT, h._clock())
        return touched
