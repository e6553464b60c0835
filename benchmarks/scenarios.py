"""Scenario registry: `python -m benchmarks NAME` runs `SCENARIOS[NAME]`; a new scenario is one more entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import overhead


@dataclass(frozen=True)
class Options:
    quick: bool = False  # CI smoke: one short round, only correctness decides the exit status
    rate: float = 200.0  # open-loop arrival rate, requests per second
    duration_s: float | None = None  # per load run; None picks the scenario's default
    rounds: int | None = None  # repetitions to take medians over; None picks the scenario's default
    json_path: Path | None = None  # also write every figure here


@dataclass(frozen=True)
class Scenario:
    summary: str
    run: Callable[[Options], int]  # returns the process exit status


SCENARIOS: dict[str, Scenario] = {
    "overhead": Scenario(
        summary=(
            "latency, stream TTFB and throughput the gateway adds over a bare aiohttp proxy, both in\n"
            "front of a zero-delay fake upstream; checks byte identity and the acceptance targets"
        ),
        run=overhead.run,
    ),
}
