"""Scenario registry: `python -m benchmarks NAME` runs `SCENARIOS[NAME]`; a new scenario is one more entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import (
    accounting,
    failover,
    hedging,
    insights,
    overhead,
    routing,
    soak,
    stats,
    streams,
    throughput,
    transcoding,
)


@dataclass(frozen=True)
class Options:
    quick: bool = False  # CI smoke: one short round, only correctness decides the exit status
    rate: float | None = None  # open-loop arrival rate, requests per second; None picks the scenario's default
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
            "front of a zero-delay fake upstream; checks byte identity and the acceptance targets\n"
            "(default: 200 req/s, 5 rounds × 3 s; ~2.5 min)"
        ),
        run=overhead.run,
    ),
    "hedging": Scenario(
        summary=(
            "streamed TTFT with one of three providers slow (2 s) for 5 % of its requests: hedging\n"
            "off vs on vs a gateway with only the two healthy providers; extra upstream requests\n"
            "(default: 50 req/s, 25 s per gateway after a 10 s warm-up; ~2 min)"
        ),
        run=hedging.run,
    ),
    "failover": Scenario(
        summary=(
            "one of three providers fails half its requests (500s and connection resets): client\n"
            "success rate, attempts per request, the bad provider's traffic around its ejection\n"
            "(default: 100 req/s, 20 s non-streamed then 20 s streamed; ~1 min)"
        ),
        run=failover.run,
    ),
    "routing": Scenario(
        summary=(
            "what the full routing path costs: one-endpoint model vs three endpoints (P2C, health,\n"
            "hedging armed; and without hedging), c=1 and open loop, plus in-process timings of\n"
            "Router.plan + Monitor.record (default: 200 req/s, 7 rounds × 2 s; ~3 min)"
        ),
        run=routing.run,
    ),
    "transcoding": Scenario(
        summary=(
            "what translating provider wire formats costs: in process per transcoding adapter (events/s\n"
            "fed per event and whole, parse_response, request_body; baselines: OpenAI passthrough, the\n"
            "framing alone), then stream TTFB and req/s of anthropic and gemini gateways vs an openai\n"
            "(passthrough) gateway (default: 200 req/s, 5 rounds × 2 s; ~3 min)"
        ),
        run=transcoding.run,
    ),
    "accounting": Scenario(
        summary=(
            "what keys, credits, rate limits and the ledger cost a request: overhead's tests against\n"
            "the gateway with accounting off, on SQLite and on Redis (a redis-server of its own;\n"
            "skipped if missing); added p50 vs accounting off, one ledger record per request\n"
            "(default: 200 req/s, 7 rounds × 2 s; ~3.5 min)"
        ),
        run=accounting.run,
    ),
    "insights": Scenario(
        summary=(
            "what Prometheus metrics and the access log cost a request: overhead's tests against the\n"
            "gateway with both off and with both on; added p50 on vs off, /metrics and the log count\n"
            "every request (default: 200 req/s, 7 rounds × 2 s; ~2.5 min)"
        ),
        run=insights.run,
    ),
    "stats": Scenario(
        summary=(
            "do the stats API's TTFT and latency p50/p90/p99 (GET /api/v1/models) agree within 10 % with\n"
            "the load generator's of the same run? streamed requests, log-normal TTFT with a slow tail,\n"
            "a fresh gateway; also requests_5m vs requests sent (default: 50 req/s × 60 s; ~1.2 min)"
        ),
        run=stats.run,
    ),
    "streams": Scenario(
        summary=(
            "many long-lived streams through one gateway worker: 100, 1,000, 5,000, 10,000 concurrent\n"
            "SSE streams (one stamped event a second), worker RSS and bytes per stream, per-event lag\n"
            "vs direct (and, at 1,000, via bare aiohttp and nginx), lost/reordered events; a client that\n"
            "stops reading (backpressure); PNG charts next to --json (default: ~6.5 min; --quick: 100\n"
            "and 1,000, ~1.5 min)"
        ),
        run=streams.run,
    ),
    "soak": Scenario(
        summary=(
            "minutes of mixed streamed and non-streamed load on one gateway while three providers inject\n"
            "faults (500s, resets, slow, stalls and cuts mid-answer): RSS and fds stable, nothing hung,\n"
            "one ledger record per request, client errors as the faults predict (default: 80 req/s,\n"
            "10 min after a 15 s warm-up; --quick: 45 s, ~1 min)"
        ),
        run=soak.run,
    ),
    "throughput": Scenario(
        summary=(
            "the most requests per second: closed-loop max req/s (best of c=16/32/64) of the gateway on\n"
            "each engine vs direct, the bare aiohttp proxy and nginx / LiteLLM / Portkey when present;\n"
            "--workers 2 vs 1 (unpinned; CPU per request); the highest open-loop rate with p99 ≤ 10 ms;\n"
            "PNG chart next to --json (default: 3 rounds × 3 s runs, sweep steps of 500 req/s; ~8 min)"
        ),
        run=throughput.run,
    ),
}
