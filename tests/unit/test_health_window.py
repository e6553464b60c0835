"""Rolling endpoint health: Peak-EWMA cost, bucket expiry, histogram quantiles, uptime, fixed memory."""

from __future__ import annotations

import itertools
import json
import math
import random
import time

import pytest

from health.histogram import BIN_RATIO, BINS, EDGES, HIST_MAX_S, HIST_MIN_S, bin_of
from health.window import (
    EndpointHealth,
    Outcome,
    ProviderHealth,
    RollingWindow,
    counts_as_failure,
)


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, t: float = 1000.0) -> None:  # 1000: a bucket boundary for 10 s and 5 min buckets
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def ok(h: EndpointHealth, ttfb: float, total: float | None = None, tokens: int = 0) -> None:
    h.start()
    h.finish(Outcome.OK, ttfb, ttfb if total is None else total, tokens)


def fail(h: EndpointHealth, outcome: Outcome = Outcome.SERVER_ERROR, total: float = 0.01) -> None:
    h.start()
    h.finish(outcome, None, total)


def test_peak_ewma_starts_at_the_default_rtt_which_decays_until_the_first_sample():
    clock = FakeClock()
    h = EndpointHealth(clock, default_rtt_s=0.7, decay_s=10.0)
    assert h.peak_ewma() == pytest.approx(0.7)
    clock.advance(20)
    # An endpoint never picked must not be starved forever behind fast ones: its default decays too.
    assert h.peak_ewma() == pytest.approx(0.7 * math.exp(-2.0))
    ok(h, 0.2)
    assert h.peak_ewma() == pytest.approx(0.2)


def test_peak_ewma_jumps_on_a_slow_sample_and_decays_back():
    clock = FakeClock()
    h = EndpointHealth(clock, decay_s=10.0)
    ok(h, 0.2)
    clock.advance(1)
    ok(h, 5.0)
    assert h.peak_ewma() == 5.0  # the peak is taken at once
    clock.advance(1)
    assert h.peak_ewma() == pytest.approx(5.0 * math.exp(-0.1))
    ok(h, 0.2)  # pulled toward the sample by 1 − e^(−1 s / 10 s) from the decayed value
    d = math.exp(-0.1)
    assert h.peak_ewma() == pytest.approx(5.0 * d * d + 0.2 * (1 - d))
    seen = [h.peak_ewma()]
    for _ in range(25):
        clock.advance(1)
        ok(h, 0.2)
        seen.append(h.peak_ewma())
    assert all(a >= b for a, b in itertools.pairwise(seen))
    assert seen[-1] == pytest.approx(0.2)  # back to the steady latency, not below it


def test_peak_ewma_decays_toward_zero_while_idle_so_an_unchosen_endpoint_is_tried_again():
    clock = FakeClock()
    h = EndpointHealth(clock, decay_s=10.0)
    ok(h, 30.0)
    clock.advance(10)
    assert h.peak_ewma() == pytest.approx(30.0 / math.e)
    clock.advance(40)
    assert h.peak_ewma() == pytest.approx(30.0 * math.exp(-5))


def test_cost_is_peak_ewma_times_in_flight_plus_one():
    clock = FakeClock()
    h = EndpointHealth(clock)
    ok(h, 0.4)
    for _ in range(3):
        h.start()
    assert h.in_flight == 3
    assert h.cost() == pytest.approx(0.4 * 4)


def test_failures_only_raise_the_ewma_so_fast_errors_never_look_cheap():
    clock = FakeClock()
    h = EndpointHealth(clock)
    ok(h, 1.0)
    fail(h, Outcome.SERVER_ERROR, total=0.001)
    fail(h, Outcome.CONNECT, total=0.0)
    assert h.peak_ewma() == pytest.approx(1.0)
    fail(h, Outcome.TIMEOUT, total=30.0)
    assert h.peak_ewma() == pytest.approx(30.0)


def test_a_cancelled_hedge_loser_without_first_byte_counts_as_slow_not_failed():
    clock = FakeClock()
    h = EndpointHealth(clock)
    ok(h, 0.5)
    h.start()
    h.finish(Outcome.CANCELLED, None, 4.0)
    assert h.peak_ewma() == pytest.approx(4.0)
    assert h.error_rate() == (0, 1)
    assert h.in_flight == 0


def test_client_errors_never_count_against_the_upstream():
    clock = FakeClock()
    h = EndpointHealth(clock)
    fail(h)
    fail(h)
    for _ in range(10):
        h.start()
        h.finish(Outcome.CLIENT_ERROR, 0.1, 0.1)
        fail(h, Outcome.CANCELLED)
    assert not counts_as_failure(Outcome.CLIENT_ERROR) and not counts_as_failure(Outcome.CANCELLED)
    assert h.consecutive_failures == 2  # unchanged by the 20 non-upstream outcomes
    assert h.error_rate() == (2, 2)
    assert h.uptime(300) == 0.0
    outcomes = h.snapshot()["outcomes_5m"]
    assert outcomes["client_error"] == 10 and outcomes["cancelled"] == 10 and outcomes["server_error"] == 2


def test_consecutive_failures_count_every_upstream_failure_and_reset_on_success():
    h = EndpointHealth(FakeClock())
    for o in (Outcome.CONNECT, Outcome.TIMEOUT, Outcome.RATE_LIMITED, Outcome.SERVER_ERROR, Outcome.PROTOCOL):
        fail(h, o)
    assert h.consecutive_failures == 5
    ok(h, 0.1)
    assert h.consecutive_failures == 0


def test_old_buckets_expire_after_the_window():
    clock = FakeClock()
    h = EndpointHealth(clock)
    for _ in range(4):
        fail(h)
    ok(h, 0.1)
    assert h.error_rate(60) == (4, 5)
    clock.advance(50)  # 10 s buckets: a 60 s window is the current bucket and the 5 before it
    assert h.error_rate(60) == (4, 5)
    clock.advance(10)
    assert h.error_rate(60) == (0, 0)
    assert h.error_rate(300) == (4, 5)
    clock.advance(250)
    assert h.error_rate(300) == (0, 0)
    assert h.uptime(300) is None
    assert h.uptime(1800) == pytest.approx(0.2)  # the coarse ring remembers for a day
    clock.advance(86400)
    assert h.uptime(86400) is None


def test_a_huge_clock_jump_clears_the_ring_once_instead_of_looping():
    clock = FakeClock()
    h = EndpointHealth(clock)
    fail(h)
    clock.advance(1e15)  # 1e14 buckets: an uncapped loop would never finish
    started = time.perf_counter()
    assert h.error_rate(300) == (0, 0)
    assert h.uptime(86400) is None
    fail(h)
    assert h.error_rate() == (1, 1)
    assert time.perf_counter() - started < 0.5


def test_a_clock_that_goes_back_keeps_filling_the_newest_bucket():
    clock = FakeClock()
    h = EndpointHealth(clock)
    fail(h)
    clock.advance(-100)
    fail(h)
    assert h.error_rate() == (2, 2)


def test_bins_are_log_spaced_from_one_millisecond_with_under_and_overflow():
    assert bin_of(0.0) == 0 and bin_of(HIST_MIN_S * 0.99) == 0
    assert bin_of(HIST_MIN_S) == 1
    assert bin_of(HIST_MAX_S) == BINS - 1 and bin_of(1e9) == BINS - 1
    for i in (1, 10, 40, len(EDGES) - 2):
        assert bin_of(EDGES[i] * 1.0001) == i + 1
        assert bin_of(EDGES[i] * 0.9999) == i
    assert BIN_RATIO < 1.22


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.95, 0.99, 1.0])
def test_quantiles_from_histogram_within_one_bin(q: float):
    clock = FakeClock()
    h = EndpointHealth(clock)
    rng = random.Random(42)
    ttfbs, totals = [], []
    for _ in range(5000):
        ttfb = rng.lognormvariate(math.log(0.8), 0.9)  # median 0.8 s, a long tail like real TTFB
        total = ttfb + rng.uniform(0.5, 40.0)
        ttfbs.append(ttfb)
        totals.append(total)
        ok(h, ttfb, total)
        clock.advance(0.05)  # 250 s in all: inside the 300 s window
    for got, samples in ((h.ttfb_quantile(q), ttfbs), (h.latency_quantile(q), totals)):
        samples.sort()
        true = samples[min(len(samples) - 1, max(0, math.ceil(q * len(samples)) - 1))]
        assert got is not None
        assert abs(bin_of(got) - bin_of(true)) <= 1
        assert true / BIN_RATIO <= got <= true * BIN_RATIO


def test_quantiles_need_min_samples():
    clock = FakeClock()
    h = EndpointHealth(clock, min_samples=20)
    for _ in range(19):
        ok(h, 1.0)
    assert h.ttfb_quantile(0.95) is None
    ok(h, 1.0)
    clock.advance(1.0)  # the merged histogram is cached for up to a second
    assert h.ttfb_quantile(0.95) == pytest.approx(1.0, rel=BIN_RATIO - 1)


def test_quantiles_are_cached_for_a_second_then_refreshed():
    clock = FakeClock()
    h = EndpointHealth(clock)
    for _ in range(20):
        ok(h, 1.0)
    assert h.ttfb_quantile(0.9) == pytest.approx(1.0, rel=BIN_RATIO - 1)
    for _ in range(200):
        ok(h, 10.0)
    assert h.ttfb_quantile(0.9) == pytest.approx(1.0, rel=BIN_RATIO - 1)  # cached: the same bucket, < 1 s
    clock.advance(1.0)
    assert h.ttfb_quantile(0.9) == pytest.approx(10.0, rel=BIN_RATIO - 1)


def test_uptime_over_five_minutes_half_an_hour_and_a_day():
    clock = FakeClock()
    h = EndpointHealth(clock)
    for _ in range(3):
        ok(h, 0.1)
    fail(h, Outcome.RATE_LIMITED)
    assert h.uptime(300) == pytest.approx(0.75)
    clock.advance(400)
    ok(h, 0.1)
    assert h.uptime(300) == 1.0
    assert h.uptime(1800) == pytest.approx(4 / 5)
    clock.advance(3600)
    assert h.uptime(1800) is None
    assert h.uptime(86400) == pytest.approx(4 / 5)


def test_throughput_is_output_tokens_per_generation_second():
    h = EndpointHealth(FakeClock())
    assert h.throughput() is None
    ok(h, 0.5, total=2.5, tokens=100)  # 100 tokens in 2 s after the first byte
    assert h.throughput() == pytest.approx(50.0)
    ok(h, 1.0, total=5.0, tokens=400)
    assert h.throughput() == pytest.approx(500 / 6)
    ok(h, 1.0, total=1.0, tokens=50)  # not streamed: no generation time to divide by
    assert h.throughput() == pytest.approx(500 / 6)


def test_probes_count_in_the_window_but_not_in_flight():
    clock = FakeClock()
    h = EndpointHealth(clock)
    h.start()
    h.record_probe(True, 0.05)
    h.record_probe(Outcome.CONNECT, 0.0)
    h.record_probe(False, 1.0)
    assert h.in_flight == 1
    assert h.consecutive_failures == 2
    assert h.error_rate() == (2, 3)
    assert h.snapshot()["outcomes_5m"]["server_error"] == 1
    assert h.peak_ewma() == 0.5  # probes are tiny requests: they are not TTFB samples
    assert h.window.fine.hists[0] == [0] * len(h.window.fine.hists[0])


def test_a_connect_failure_hurts_every_endpoint_of_the_provider():
    clock = FakeClock()
    a, b, c = (EndpointHealth(clock, key=("p", m)) for m in ("m1", "m2", "m3"))
    provider = ProviderHealth("p", [a, b, c])
    fail(a, Outcome.CONNECT)
    touched = provider.connect_failed(origin=a.key)
    assert touched == (("p", "m2"), ("p", "m3"))
    for h in (a, b, c):
        assert h.consecutive_failures == 1
        assert h.error_rate() == (1, 1)
        assert h.in_flight == 0


def test_memory_is_fixed_whatever_the_request_count():
    clock = FakeClock()
    h = EndpointHealth(clock)
    w = h.window

    def sizes() -> list[int]:
        rings = (w.fine, w.coarse)
        arrays = [a for r in rings for a in (r.counts, r.tokens, r.stream_s, *r.hists)]
        return [len(a) for a in arrays]

    before = sizes()
    rng = random.Random(1)
    outcomes = list(Outcome)
    n = 100_000
    for _ in range(n):
        clock.advance(86400 / n)  # one simulated day
        o = rng.choice(outcomes)
        h.start()
        if o == Outcome.OK:
            h.finish(o, rng.uniform(0.05, 3.0), rng.uniform(3.0, 60.0), rng.randrange(1000))
        else:
            h.finish(o, None, rng.uniform(0.0, 5.0))
        h.cost()
        h.ttfb_quantile(0.95)
    assert sizes() == before
    assert len(w._caches[0]) == 1
    day = w.counts(clock(), 86400)
    assert 0.99 * n <= sum(day) <= n  # the coarse ring drops at most the oldest partial bucket
    five_min = sum(w.counts(clock(), 300))
    assert abs(five_min - n * 300 / 86400) <= n * 10 / 86400 + 1  # ± one 10 s bucket
    assert h.in_flight == 0


def test_snapshot_is_json_ready():
    clock = FakeClock()
    h = EndpointHealth(clock)
    for i in range(30):
        ok(h, 0.1 * (i + 1), 2.0 + i, tokens=50)
    fail(h)
    h.record_probe(True, 0.2)
    clock.advance(2)
    snap = h.snapshot()
    json.dumps(snap, allow_nan=False)
    assert snap["error_rate_60s"] == {"failures": 1, "total": 32, "rate": 1 / 32}
    assert snap["uptime"]["5m"] == pytest.approx(31 / 32) and snap["uptime"]["1d"] == pytest.approx(31 / 32)
    assert snap["ttfb_s"]["p50"] == pytest.approx(1.5, rel=BIN_RATIO - 1)
    assert snap["latency_s"]["p99"] == pytest.approx(31.0, rel=BIN_RATIO - 1)
    assert snap["throughput_tps"] is not None and snap["last_probe_age_s"] == 2


def test_window_alone_takes_explicit_times():
    w = RollingWindow()
    w.record(5.0, Outcome.OK, 0.3, 1.0)
    w.record(6.0, Outcome.TIMEOUT)
    assert w.failures(7.0, 60) == (1, 2)
    assert w.failures(100.0, 60) == (0, 0)
