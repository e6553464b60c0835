"""Ejection with hysteresis: take a failing endpoint out of rotation for a while, and let it back carefully.

Why eject at all when P2C already avoids slow endpoints: an endpoint that fails fast looks cheap to P2C,
and every request sent there costs a failover. Ejection (Envoy outlier detection, Helicone `ErrorRatio`)
removes it for `base-s × 2^(n-1)` (capped, jittered) after N consecutive failures or an error-rate outlier.

Hysteresis, so that an endpoint does not flap in and out:
- An ejection ends by itself when its time passes (Envoy); `readmit-successes` successful probes end it
  earlier, except a 429's: a server-given Retry-After is respected to the second.
- After readmission the error-rate rule waits one whole `window-s`, because the window still holds the
  failures that caused the ejection; the consecutive rule (its streak reset at ejection) covers that time.
- A repeat ejection doubles; an endpoint that stayed in for `max-s` since its last readmission starts again
  from `base-s`.
- Never more than `max-ejected-share` of a group at once, so a bad minute cannot empty the pool; a lone
  endpoint is never ejected, since panic routing would send traffic to it anyway.

The ejector never touches the router: its methods return True when membership changed, and the caller
publishes a new immutable route snapshot (Helicone sends `Change::Remove`; Pingora swaps an ArcSwap).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, Generic, TypeVar

import msgspec

from health.window import EndpointHealth, Outcome, counts_as_failure
from proxy.structs import Base, PositiveFloat  # not proxy.config: it imports this module

K = TypeVar("K", bound=Hashable)
_RATE_LIMITED = Outcome.RATE_LIMITED  # enum class attributes are slow to look up on 3.11; observe() is hot

MAX_RETRY_AFTER_S = 3600.0  # a longer Retry-After is a quota reset; an hour, then a probe, is plenty
_MAX_DOUBLINGS = 30  # 2^30 × base already exceeds any sane max-s; avoids float overflow on the exponent


class EjectionConfig(Base):
    consecutive_failures: Annotated[int, msgspec.Meta(ge=1)] = 5  # failures in a row that eject
    error_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5  # failed share over window-s that ejects
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 20  # no error-rate verdict on fewer attempts
    window_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 60.0  # error-rate window; ≤ the 5 min fine ring
    base_s: PositiveFloat = 5.0  # first ejection; each repeat doubles it
    max_s: PositiveFloat = 300.0  # cap on one ejection; also the quiet time that forgives past ejections
    jitter: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.2  # ± share, so ejected endpoints return apart
    max_ejected_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5  # of a group; 0 disables ejection
    rate_limit_default_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0  # 429 without a usable Retry-After
    readmit_successes: Annotated[int, msgspec.Meta(ge=1)] = 1  # successful probes that end an ejection early

    def __post_init__(self) -> None:
        if self.base_s > self.max_s:
            raise ValueError(f"base-s ({self.base_s}) must not exceed max-s ({self.max_s})")


def max_ejected(n: int, share: float) -> int:
    """How many of a group of n may be ejected at once: ⌊n × share⌋, but at least 1 of 2 or more.

    3 endpoints at 0.5 → 1; 2 at 0.3 → 1 (otherwise a pair could never shed a dead member); 1 → 0 (a lone
    endpoint gets the traffic in panic mode anyway); share 0 → 0 (ejection off).
    """
    if n < 2 or share <= 0:
        return 0
    return max(1, int(n * share + 1e-9))  # + 1e-9: 10 × 0.3 is 2.9999999999999996 in floats


class EndpointState:
    """Ejection state of one endpoint. `is_ejected(now)` is the truth for routing."""

    __slots__ = ("config", "ejected_until", "ejections", "explicit", "out", "probe_successes")

    def __init__(self, config: EjectionConfig | None = None) -> None:
        self.config = config if config is not None else EjectionConfig()
        self.ejected_until = -math.inf  # also the readmission time once it has passed
        self.ejections = 0  # the exponent of the next ejection; forgiven after a quiet max-s
        self.out = False  # ejected in the published membership (may outlive ejected_until until noticed)
        self.explicit = False  # ejected for a server-given time (429): probes do not shorten it
        self.probe_successes = 0

    def is_ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def eject(self, now: float, rng: random.Random, duration_s: float | None = None) -> float:
        """Eject from `now`; returns the duration. None: base × 2^(n-1) ± jitter, capped at max-s.

        An explicit duration (a 429's Retry-After) is used as given, without jitter, and does not count as
        a repeat: a rate limit is the provider's schedule, not a fault to back off from exponentially.
        """
        cfg = self.config
        if duration_s is None:
            if self.ejections and now - self.ejected_until >= cfg.max_s:
                self.ejections = 0
            self.ejections += 1
            d = min(cfg.base_s * 2.0 ** min(self.ejections - 1, _MAX_DOUBLINGS), cfg.max_s)
            # Capped before the jitter too, so endpoints at the cap still return apart (within [1 - j, 1] × max).
            d = min(d * (1.0 + rng.uniform(-cfg.jitter, cfg.jitter)), cfg.max_s)
        else:
            d = max(duration_s, 0.0)
        end = now + d
        if self.is_ejected(now) and end <= self.ejected_until:
            return d  # already out for longer
        self.explicit = duration_s is not None
        self.ejected_until = end
        self.out = True
        self.probe_successes = 0
        return d

    def readmit(self, now: float | None = None) -> None:
        """End the ejection, at `now` if given (early, by probes) or at its scheduled end."""
        if now is not None and now < self.ejected_until:
            self.ejected_until = now
        self.out = False
        self.explicit = False
        self.probe_successes = 0

    def snapshot(self, now: float) -> dict[str, Any]:
        ejected = self.is_ejected(now)
        return {
            "ejected": ejected,
            "ejected_for_s": self.ejected_until - now if ejected else None,
            "ejections": self.ejections,
        }


class Ejector(Generic[K]):
    """Ejection decisions for one group (the endpoints of one model), keyed like the route table.

    Call `observe` after every `EndpointHealth.finish`, `on_probe` after every `record_probe`, and `expire`
    on a timer (the probe loop), so that ejections that ran out are republished promptly. `healthy` and
    `least_bad` answer the router. States may be shared with other groups that serve the same endpoint.
    """

    __slots__ = ("_rng", "config", "health", "states")

    def __init__(
        self,
        health: Mapping[K, EndpointHealth],
        config: EjectionConfig | None = None,
        rng: random.Random | None = None,
        states: Mapping[K, EndpointState] | None = None,
    ) -> None:
        self.config = config if config is not None else EjectionConfig()
        self.health = dict(health)
        self.states: dict[K, EndpointState] = {
            k: states[k] if states is not None and k in states else EndpointState(self.config) for k in self.health
        }
        self._rng = rng if rng is not None else random.Random()

    def observe(self, key: K, outcome: Outcome, now: float, retry_after_s: float | None = None) -> bool:
        """Judge a finished attempt; True when the membership changed (ejected, or found readmitted)."""
        st = self.states[key]
        changed = False
        if st.out:
            if st.is_ejected(now):
                if outcome == _RATE_LIMITED:  # an in-flight 429 may push the end further out
                    st.eject(now, self._rng, self._rate_limit_s(retry_after_s))
                return False
            st.readmit()  # its time passed and no one called expire(): readmitted since ejected_until
            changed = True
        if not counts_as_failure(outcome):
            return changed
        if outcome == _RATE_LIMITED:
            return self._eject(key, now, self._rate_limit_s(retry_after_s)) or changed
        return self._judge(key, st, now) or changed

    def on_probe(self, key: K, ok: bool, now: float) -> bool:
        """Judge an active probe; True when the membership changed."""
        st = self.states[key]
        if st.out:
            if not st.is_ejected(now):
                self._readmit(key, now)
                return True
            if not ok:
                st.probe_successes = 0
                return False
            st.probe_successes += 1
            if st.explicit or st.probe_successes < self.config.readmit_successes:
                return False
            self._readmit(key, now)
            return True
        return False if ok else self._judge(key, st, now)  # an idle endpoint failing its probes goes out

    def expire(self, now: float) -> bool:
        """Readmit every endpoint whose ejection time has passed; True when any was."""
        changed = False
        for key, st in self.states.items():
            if st.out and not st.is_ejected(now):
                self._readmit(key, now)
                changed = True
        return changed

    def healthy(self, keys: Iterable[K], now: float) -> list[K]:
        """The keys not ejected, in the order given."""
        states = self.states
        return [k for k in keys if not states[k].is_ejected(now)]

    def least_bad(self, keys: Iterable[K], now: float) -> K | None:
        """Panic mode: the endpoint whose ejection ends first, then the lowest error rate (None: no keys)."""
        best: K | None = None
        best_rank = (math.inf, math.inf)
        window_s = self.config.window_s
        for k in keys:
            f, t = self.health[k].error_rate(window_s)
            rank = (max(self.states[k].ejected_until, now), f / t if t else 0.0)
            if rank < best_rank:
                best, best_rank = k, rank
        return best

    def ejected_count(self, now: float) -> int:
        return sum(1 for st in self.states.values() if st.is_ejected(now))

    def _judge(self, key: K, st: EndpointState, now: float) -> bool:
        cfg = self.config
        h = self.health[key]
        if h.consecutive_failures >= cfg.consecutive_failures:
            return self._eject(key, now, None)
        if now - st.ejected_until < cfg.window_s:  # readmitted within the window: its failures are old news
            return False
        f, t = h.error_rate(cfg.window_s)
        if t >= cfg.min_requests and f >= cfg.error_rate * t:
            return self._eject(key, now, None)
        return False

    def _eject(self, key: K, now: float, duration_s: float | None) -> bool:
        if duration_s is not None and duration_s <= 0:
            return False
        if self.ejected_count(now) >= max_ejected(len(self.states), self.config.max_ejected_share):
            return False  # capped: it stays in; the next failure asks again
        self.states[key].eject(now, self._rng, duration_s)
        self.health[key].consecutive_failures = 0  # the streak that ejected it is spent
        return True

    def _readmit(self, key: K, now: float) -> None:
        self.states[key].readmit(now)
        self.health[key].consecutive_failures = 0  # failures of requests in flight during the ejection

    def _rate_limit_s(self, retry_after_s: float | None) -> float:
        return self.config.rate_limit_default_s if retry_after_s is None else retry_after_s


def parse_retry_after(value: str | None, now_wall: float) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP-date; clamped to [0, 3600].

    `now_wall` is wall-clock time (time.time()), since an HTTP-date is. None when absent or unparseable.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" means UTC with no claim about the local zone (RFC 5322)
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - now_wall
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
