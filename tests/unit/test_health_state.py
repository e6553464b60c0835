"""Ejection with hysteresis: thresholds, exponential and capped ejection time, share cap, 429, probes, panic."""

from __future__ import annotations

import random
from email.utils import formatdate

import msgspec
import pytest

from health.state import EjectionConfig, Ejector, EndpointState, max_ejected, parse_retry_after
from health.window import EndpointHealth, Outcome


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def group(n: int, clock: FakeClock, **cfg: float) -> tuple[dict[str, EndpointHealth], Ejector[str]]:
    """n endpoints p0…p(n-1) of one model, with their ejector (no jitter unless asked)."""
    config = EjectionConfig(**{"jitter": 0.0, **cfg})
    health = {f"p{i}": EndpointHealth(clock, key=f"p{i}") for i in range(n)}
    return health, Ejector(health, config, random.Random(7))


def attempt(
    health: dict[str, EndpointHealth],
    ej: Ejector[str],
    key: str,
    clock: FakeClock,
    outcome: Outcome = Outcome.SERVER_ERROR,
    retry_after_s: float | None = None,
) -> bool:
    """One attempt as the request path reports it: finish on the health, then observe on the ejector."""
    h = health[key]
    h.start()
    h.finish(outcome, 0.1 if outcome == Outcome.OK else None, 0.1)
    return ej.observe(key, outcome, clock(), retry_after_s)


def test_five_consecutive_failures_eject_for_base_then_double():
    clock = FakeClock()
    health, ej = group(3, clock, base_s=5.0, max_s=30.0)
    for expected in (5.0, 10.0, 20.0, 30.0):  # doubling, capped at max-s
        assert [attempt(health, ej, "p0", clock) for _ in range(5)] == [False] * 4 + [True]
        st = ej.states["p0"]
        assert st.is_ejected(clock()) and st.ejected_until - clock() == pytest.approx(expected)
        assert ej.healthy(["p0", "p1", "p2"], clock()) == ["p1", "p2"]
        assert health["p0"].consecutive_failures == 0  # the streak that ejected it is spent
        clock.advance(expected - 0.001)
        assert ej.expire(clock()) is False
        clock.advance(0.001)
        assert ej.expire(clock()) is True
        assert ej.healthy(["p0", "p1", "p2"], clock()) == ["p0", "p1", "p2"]


def test_ejection_time_is_jittered_within_its_share():
    durations = []
    for seed in range(200):
        st = EndpointState(EjectionConfig(base_s=10.0, jitter=0.2))
        durations.append(st.eject(0.0, random.Random(seed)))
    assert 8.0 <= min(durations) < 8.5 and 11.5 < max(durations) <= 12.0
    capped = []
    for seed in range(200):
        st = EndpointState(EjectionConfig(base_s=10.0, max_s=30.0, jitter=0.2))
        st.ejections, st.ejected_until = 5, -1.0  # the 6th ejection, 1 s after the 5th ended: past the cap
        capped.append(st.eject(0.0, random.Random(seed)))
    assert 24.0 <= min(capped) < 25.0 and max(capped) == 30.0  # at the cap, still spread below it


def test_ejections_are_forgiven_after_a_quiet_max_s():
    clock = FakeClock()
    health, ej = group(3, clock, base_s=5.0, max_s=60.0)
    for _ in range(5):
        attempt(health, ej, "p0", clock)
    clock.advance(5)
    ej.expire(clock())
    clock.advance(59)
    for _ in range(5):
        attempt(health, ej, "p0", clock)
    assert ej.states["p0"].ejected_until - clock() == pytest.approx(10.0)  # within max-s: doubled
    clock.advance(10 + 60)  # back in for a whole max-s
    ej.expire(clock())
    for _ in range(5):
        attempt(health, ej, "p0", clock)
    assert ej.states["p0"].ejected_until - clock() == pytest.approx(5.0)


def test_error_rate_ejects_only_with_enough_requests():
    clock = FakeClock()
    health, ej = group(3, clock, consecutive_failures=100, error_rate=0.5, min_requests=20)
    # Alternate, so the consecutive rule never fires: 10 OK and 9 failures is below min-requests.
    for i in range(19):
        assert attempt(health, ej, "p0", clock, Outcome.SERVER_ERROR if i % 2 else Outcome.OK) is False
    assert health["p0"].error_rate(60) == (9, 19)
    assert attempt(health, ej, "p0", clock) is True  # 10 of 20
    assert ej.states["p0"].is_ejected(clock())


def test_failures_from_before_a_readmission_do_not_eject_again():
    clock = FakeClock()
    health, ej = group(3, clock, consecutive_failures=3, error_rate=0.5, min_requests=5, base_s=5.0)
    for _ in range(3):
        attempt(health, ej, "p0", clock)
    clock.advance(5)
    assert ej.expire(clock())
    # The window still shows 3 failures of 3; two more failures and the old ones would make 5 of 5.
    assert attempt(health, ej, "p0", clock) is False
    assert attempt(health, ej, "p0", clock) is False
    assert attempt(health, ej, "p0", clock) is True  # the consecutive rule still guards the grace window
    assert ej.states["p0"].ejected_until - clock() == pytest.approx(10.0)


def test_ejection_capped_at_max_share():
    assert [max_ejected(n, 0.5) for n in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 2]
    assert max_ejected(2, 0.3) == 1 and max_ejected(10, 0.3) == 3 and max_ejected(4, 0.0) == 0
    clock = FakeClock()
    health, ej = group(3, clock, max_ejected_share=0.5, base_s=5.0)
    for _ in range(5):
        attempt(health, ej, "p0", clock)
    assert [attempt(health, ej, "p1", clock) for _ in range(6)] == [False] * 6  # one of three is the cap
    assert ej.ejected_count(clock()) == 1
    assert ej.healthy(health, clock()) == ["p1", "p2"]
    clock.advance(5)
    assert attempt(health, ej, "p1", clock) is True  # p0's time is up, so p1 may go out
    assert ej.healthy(health, clock()) == ["p0", "p2"]
    assert ej.expire(clock()) is True  # p0's return, noticed by the timer


def test_a_lone_endpoint_is_never_ejected():
    clock = FakeClock()
    health, ej = group(1, clock)
    assert not any(attempt(health, ej, "p0", clock) for _ in range(100))
    assert not any(attempt(health, ej, "p0", clock, Outcome.RATE_LIMITED, 30.0) for _ in range(3))
    assert ej.healthy(["p0"], clock()) == ["p0"]


def test_client_errors_and_cancellations_never_eject():
    clock = FakeClock()
    health, ej = group(3, clock, min_requests=1)
    for _ in range(50):
        assert attempt(health, ej, "p0", clock, Outcome.CLIENT_ERROR) is False
        assert attempt(health, ej, "p0", clock, Outcome.CANCELLED) is False
    assert ej.ejected_count(clock()) == 0


def test_429_ejects_for_retry_after_seconds_and_http_date():
    now_wall = 1_700_000_000.0
    assert parse_retry_after("120", now_wall) == 120.0
    assert parse_retry_after(" 1.5 ", now_wall) == 1.5
    assert parse_retry_after(formatdate(now_wall + 30, usegmt=True), now_wall) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now_wall + 45), now_wall) == pytest.approx(45.0)  # "-0000" zone
    clock = FakeClock()
    health, ej = group(3, clock, base_s=5.0)
    retry = parse_retry_after(formatdate(now_wall + 30, usegmt=True), now_wall)
    assert attempt(health, ej, "p0", clock, Outcome.RATE_LIMITED, retry) is True
    st = ej.states["p0"]
    assert st.ejected_until - clock() == pytest.approx(30.0)  # to the second: no jitter on a server's date
    assert st.ejections == 0  # a rate limit is a schedule, not a fault: the next fault starts at base-s
    assert ej.on_probe("p0", True, clock()) is False  # a probe does not override Retry-After
    assert attempt(health, ej, "p0", clock, Outcome.RATE_LIMITED, 60.0) is False  # in flight: extends
    assert st.ejected_until - clock() == pytest.approx(60.0)
    clock.advance(60)
    assert ej.expire(clock()) is True
    assert attempt(health, ej, "p0", clock, Outcome.RATE_LIMITED, None) is True
    assert st.ejected_until - clock() == pytest.approx(5.0)  # rate-limit-default-s
    assert attempt(health, ej, "p1", clock, Outcome.RATE_LIMITED, 0.0) is False  # "retry now": stays in


def test_parse_retry_after_clamps_and_rejects_garbage():
    now_wall = 1_700_000_000.0
    assert parse_retry_after(None, now_wall) is None
    assert parse_retry_after("", now_wall) is None
    assert parse_retry_after("soon", now_wall) is None
    assert parse_retry_after("nan", now_wall) is None
    assert parse_retry_after("inf", now_wall) is None
    assert parse_retry_after("-5", now_wall) == 0.0
    assert parse_retry_after("99999", now_wall) == 3600.0
    assert parse_retry_after(formatdate(now_wall - 100, usegmt=True), now_wall) == 0.0
    assert parse_retry_after(formatdate(now_wall + 86400, usegmt=True), now_wall) == 3600.0


def test_probes_readmit_an_ejected_endpoint():
    clock = FakeClock()
    health, ej = group(3, clock, base_s=60.0, readmit_successes=2)
    for _ in range(5):
        attempt(health, ej, "p0", clock)
    assert ej.states["p0"].is_ejected(clock())
    h = health["p0"]

    def probe(ok: bool) -> bool:
        h.record_probe(ok, 0.1)
        return ej.on_probe("p0", ok, clock())

    assert probe(True) is False
    assert probe(False) is False  # a failure restarts the count
    assert probe(True) is False
    assert probe(True) is True
    st = ej.states["p0"]
    assert not st.is_ejected(clock()) and not st.out
    assert h.consecutive_failures == 0
    assert st.ejected_until == clock()  # readmitted now, so the error-rate grace window starts now
    assert probe(True) is False  # already in


def test_failing_probes_eject_an_idle_endpoint():
    clock = FakeClock()
    health, ej = group(2, clock)
    h = health["p1"]
    results = []
    for _ in range(5):
        h.record_probe(Outcome.CONNECT, 0.0)
        results.append(ej.on_probe("p1", False, clock()))
        clock.advance(1)
    assert results == [False] * 4 + [True]


def test_an_ejection_ends_by_itself_when_its_time_passes():
    clock = FakeClock()
    health, ej = group(3, clock, base_s=5.0)
    for _ in range(5):
        attempt(health, ej, "p0", clock)
    clock.advance(5)
    assert ej.healthy(["p0", "p1"], clock()) == ["p0", "p1"]  # routing sees it at once
    assert attempt(health, ej, "p0", clock, Outcome.OK) is True  # the caller learns to republish
    assert attempt(health, ej, "p0", clock, Outcome.OK) is False
    assert ej.expire(clock()) is False


def test_panic_mode_picks_least_bad():
    clock = FakeClock()
    health, ej = group(3, clock, max_ejected_share=1.0, base_s=5.0)
    keys = ["p0", "p1", "p2"]
    for _ in range(5):
        attempt(health, ej, "p1", clock)  # out for 5 s from t
    clock.advance(1)
    for _ in range(5):
        attempt(health, ej, "p0", clock)  # out for 5 s from t + 1
    attempt(health, ej, "p2", clock, Outcome.RATE_LIMITED, 60.0)
    assert ej.healthy(keys, clock()) == []
    assert ej.least_bad(keys, clock()) == "p1"  # its ejection ends first
    # Equal ends: the lower error rate wins.
    clock2 = FakeClock()
    health2, ej2 = group(2, clock2, max_ejected_share=1.0)
    for _ in range(3):
        attempt(health2, ej2, "p0", clock2, Outcome.OK)
    attempt(health2, ej2, "p0", clock2, Outcome.RATE_LIMITED, 30.0)
    attempt(health2, ej2, "p1", clock2, Outcome.RATE_LIMITED, 30.0)
    assert ej2.healthy(["p0", "p1"], clock2()) == []
    assert ej2.least_bad(["p0", "p1"], clock2()) == "p0"
    assert ej2.least_bad([], clock2()) is None


def test_config_is_strict_kebab_case_and_checked():
    cfg = msgspec.json.decode(
        b'{"consecutive-failures": 3, "base-s": 1, "max-ejected-share": 0.3}', type=EjectionConfig
    )
    assert cfg.consecutive_failures == 3 and cfg.base_s == 1.0 and cfg.max_s == 300.0
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(b'{"base_s": 1}', type=EjectionConfig)
    with pytest.raises(msgspec.ValidationError, match="must not exceed"):
        msgspec.json.decode(b'{"base-s": 600}', type=EjectionConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"error-rate": 0}', type=EjectionConfig)


def test_states_are_shared_between_groups_serving_one_endpoint():
    clock = FakeClock()
    shared = EndpointHealth(clock, key="a")
    other = {"b": EndpointHealth(clock, key="b"), "c": EndpointHealth(clock, key="c")}
    config = EjectionConfig(jitter=0.0)
    first = Ejector({"a": shared, "b": other["b"]}, config, random.Random(1))
    second = Ejector({"a": shared, "c": other["c"]}, config, random.Random(1), states=first.states)
    assert second.states["a"] is first.states["a"]
    for _ in range(5):
        shared.start()
        shared.finish(Outcome.TIMEOUT, None, 30.0)
    assert first.observe("a", Outcome.TIMEOUT, clock()) is True
    assert second.healthy(["a", "c"], clock()) == ["c"]
