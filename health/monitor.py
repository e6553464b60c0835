"""The per-process health monitor: every attempt's result in, an immutable healthy-set snapshot out.

It owns one `EndpointHealth` per endpoint, one `Ejector` per model, one `ProviderHealth` per provider, and
publishes `healthy`: model name → tuple of endpoints currently in rotation. The dict is replaced, never
mutated, whenever membership changes, so the router reads it without a lock and never sees it half-built.
Health is local to this process: each node (and worker) judges the network it sees.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from health.state import EjectionConfig, Ejector, EndpointState, parse_retry_after
from health.window import EndpointHealth, Outcome, ProviderHealth, counts_as_failure


class MonitoredEndpoint(Protocol):
    key: str
    provider: str
    health: EndpointHealth
    state: EndpointState


class Monitor:
    __slots__ = ("_clock", "_ejectors", "_groups", "_providers", "_rng", "healthy", "on_change")

    def __init__(
        self,
        groups: Mapping[str, tuple[MonitoredEndpoint, ...]],
        config: EjectionConfig,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._groups = dict(groups)
        self._providers: dict[str, ProviderHealth] = {}
        self._ejectors: dict[str, Ejector[str]] = {}
        self.on_change: Callable[[], None] | None = None
        states: dict[str, EndpointState] = {}
        for model, eps in self._groups.items():
            for ep in eps:
                states[ep.key] = ep.state
                self._providers.setdefault(ep.provider, ProviderHealth(ep.provider))
                if ep.key not in self._providers[ep.provider].endpoints:
                    self._providers[ep.provider].add(ep.health)
            self._ejectors[model] = Ejector({ep.key: ep.health for ep in eps}, config, self._rng, states)
        self.healthy: dict[str, tuple[MonitoredEndpoint, ...]] = {}
        self._publish()

    def _publish(self) -> None:
        now = self._clock()
        self.healthy = {
            model: tuple(ep for ep in eps if not ep.state.is_ejected(now)) for model, eps in self._groups.items()
        }
        if self.on_change is not None:
            self.on_change()

    def _models_of(self, key: str) -> Iterable[str]:
        return (m for m, eps in self._groups.items() if any(ep.key == key for ep in eps))

    def record(
        self,
        ep: MonitoredEndpoint,
        outcome: Outcome,
        ttfb_s: float | None,
        total_s: float,
        output_tokens: int = 0,
        retry_after: str | None = None,
    ) -> None:
        """One attempt finished: into the window, then the ejectors (only failures can change membership)."""
        ep.health.finish(outcome, ttfb_s, total_s, output_tokens)
        if not counts_as_failure(outcome) and not ep.state.out:
            return  # the common case: nothing to judge
        now = self._clock()
        retry_s = parse_retry_after(retry_after, time.time()) if retry_after else None
        changed = False
        for model in self._models_of(ep.key):
            changed |= self._ejectors[model].observe(ep.key, outcome, now, retry_s)
        if outcome == Outcome.CONNECT:  # the host is unreachable: every model served there suffers
            for key in self._providers[ep.provider].connect_failed(ep.health.key):
                for model in self._models_of(str(key)):
                    changed |= self._ejectors[model].observe(str(key), Outcome.CONNECT, now)
        if changed:
            self._publish()

    def probe(self, ep: MonitoredEndpoint, outcome: Outcome, latency_s: float) -> None:
        ep.health.record_probe(outcome, latency_s)
        now = self._clock()
        changed = False
        for model in self._models_of(ep.key):
            changed |= self._ejectors[model].on_probe(ep.key, outcome == Outcome.OK, now)
        if changed:
            self._publish()

    def expire(self) -> None:
        """Readmit endpoints whose ejection ran out (called on a timer)."""
        now = self._clock()
        if any(ej.expire(now) for ej in list(self._ejectors.values())):
            self._publish()

    def least_bad(self, model: str) -> MonitoredEndpoint | None:
        """Panic mode: when every endpoint is ejected, the one to try anyway."""
        eps = self._groups.get(model, ())
        key = self._ejectors[model].least_bad([ep.key for ep in eps], self._clock()) if eps else None
        return next((ep for ep in eps if ep.key == key), None)

    def any_ejected(self, provider: str) -> bool:
        now = self._clock()
        return any(ep.state.is_ejected(now) for eps in self._groups.values() for ep in eps if ep.provider == provider)

    def snapshot(self) -> list[dict[str, Any]]:
        now = self._clock()
        seen: dict[str, dict[str, Any]] = {}
        for model, eps in self._groups.items():
            for ep in eps:
                if ep.key in seen:
                    seen[ep.key]["models"].append(model)
                    continue
                seen[ep.key] = {
                    "endpoint": ep.key,
                    "provider": ep.provider,
                    "models": [model],
                    **ep.state.snapshot(now),
                    **ep.health.snapshot(),
                }
        return list(seen.values())
