"""The `hedging` scenario: does hedging cut the TTFT tail that one occasionally slow provider causes?

Three fake upstreams with a realistic TTFT (50–100 ms, uniform, then 10 ms between stream events): `fast-a`,
`fast-b`, and `slow`, whose first byte comes after 2 s for 5 % of its requests. One model, streamed requests,
open loop. Three gateways, each measured on its own (started fresh, warmed up, loaded, stopped):

- `healthy-only`: only fast-a and fast-b: the reference, "the healthy providers' p99";
- `off`: all three, `hedge: {enabled: false}`: P2C and ejection alone;
- `on`: all three, hedging at its defaults (delay = the endpoint's rolling p95 TTFT clamped to [0.25, 10] s,
  budget 5 % of requests).

TTFT is time to the first body byte at the load generator, counted from each request's due time (open loop).
Extra upstream requests = POSTs the upstreams served (their `GET /stats`) over client requests, minus one.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import CpuPlan, ServiceError, cpu_plan, free_ports, run_load
from benchmarks.kit import (
    ATTEMPTS_HEADER,
    HEDGED_HEADER,
    PROVIDER_HEADER,
    Upstream,
    banner,
    check,
    endpoint_snapshot,
    exit_status,
    fmt,
    gateway_config,
    gateway_cpu,
    load_args,
    orchestrator_on,
    pct,
    progress,
    ratio,
    start_gateway,
    start_upstream,
    startup_failed,
    stats_delta,
    table,
    verdicts,
    write_report,
)
from proxy.config import HedgeConfig

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

# Acceptance targets.
MAX_P99_VS_HEALTHY = 1.5  # hedging on: p99 TTFT at most this × the healthy providers' p99
MAX_EXTRA_SHARE = 0.06  # hedging on: extra upstream requests at most this share of client requests

RATE = 50.0
DURATION_S, QUICK_DURATION_S = 25.0, 4.0
# Warm-up: at least WARMUP_MIN_S (a gateway in service has seen much traffic), then in steps until every
# endpoint has a p95 (≥ 20 samples; hedging waits max-s = 10 s without one), at most WARMUP_MAX_S.
WARMUP_MIN_S, WARMUP_STEP_S, WARMUP_MAX_S = 10.0, 2.0, 30.0
QUICK_WARMUP_MIN_S, QUICK_WARMUP_STEP_S, QUICK_WARMUP_MAX_S = 2.0, 1.0, 6.0
OVER_MS = (250.0, 1000.0)  # count TTFTs at or above: the minimum hedge delay, and "clearly slow"
TTFT_MS, TTFT_JITTER_MS, GAP_MS = 50.0, 50.0, 10.0
SLOW_SHARE, SLOW_MS = 0.05, 2000.0
HEALTHY = ("fast-a", "fast-b")
SLOW = "slow"
TARGETS = ("healthy-only", "off", "on")
HEDGE = {"healthy-only": None, "off": "{enabled: false}", "on": None}
HEADERS = (HEDGED_HEADER, PROVIDER_HEADER, ATTEMPTS_HEADER)
_DEFAULT_HEDGE = HedgeConfig()


def run(opts: Options) -> int:
    plan = cpu_plan()
    rate = opts.rate or RATE
    duration = opts.duration_s or (QUICK_DURATION_S if opts.quick else DURATION_S)
    rounds = opts.rounds or 1
    warm = (
        (QUICK_WARMUP_MIN_S, QUICK_WARMUP_STEP_S, QUICK_WARMUP_MAX_S)
        if opts.quick
        else (WARMUP_MIN_S, WARMUP_STEP_S, WARMUP_MAX_S)
    )
    settings = {
        "rate": rate,
        "duration_s": duration,
        "rounds": rounds,
        "warmup_min_step_max_s": warm,
        "ttft_ms": f"{TTFT_MS:g}–{TTFT_MS + TTFT_JITTER_MS:g}",
        "chunk_gap_ms": GAP_MS,
        "slow": f"{SLOW}: {SLOW_SHARE:.0%} of requests first byte after {SLOW_MS:g} ms",
        "quick": opts.quick,
    }
    host = banner(
        "hedging",
        f"{rounds} round(s) × {duration:g} s of streamed requests, open loop {rate:g} req/s, per gateway\n"
        f"upstreams: {', '.join(HEALTHY)} and {SLOW}: TTFT {settings['ttft_ms']} ms, {GAP_MS:g} ms between "
        f"events; {SLOW}: {SLOW_SHARE:.0%} of requests wait {SLOW_MS:g} ms for their first byte",
        plan,
    )
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TARGETS}
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            upstreams: list[Upstream] = []
            try:
                ports = free_ports(3)
                for i, (name, port) in enumerate(zip((*HEALTHY, SLOW), ports, strict=True)):
                    args = ["--ttft-ms", f"{TTFT_MS:g}", "--ttft-jitter-ms", f"{TTFT_JITTER_MS:g}"]
                    args += ["--chunk-gap-ms", f"{GAP_MS:g}", "--seed", str(11 + i)]
                    if name == SLOW:
                        args += ["--slow-share", f"{SLOW_SHARE:g}", "--slow-ms", f"{SLOW_MS:g}"]
                    upstreams.append(start_upstream(name, port, args, plan, Path(tmp)))
                for r in range(rounds):
                    order = TARGETS[r % len(TARGETS) :] + TARGETS[: r % len(TARGETS)]
                    for target in order:
                        result = _one(target, upstreams, plan, Path(tmp), rate, duration, warm)
                        runs[target].append(result)
                        progress(f"round {r + 1}/{rounds} {target:<12} {_brief(result)}")
            finally:
                for u in upstreams:
                    u.service.stop()
    except ServiceError as e:
        return startup_failed(e)

    summary = {t: _summarize(rs) for t, rs in runs.items()}
    checks = _checks(summary)
    print(_table(summary))
    print(verdicts(checks, opts.quick))
    write_report(
        opts,
        {
            "scenario": "hedging",
            "settings": settings,
            "machine": host,
            "pinning": plan.describe(),
            "summary": summary,
            "checks": checks,
            "runs": runs,
        },
    )
    return exit_status(checks, opts.quick)


def _one(
    target: str,
    upstreams: list[Upstream],
    plan: CpuPlan,
    tmp: Path,
    rate: float,
    duration: float,
    warm: tuple[float, float, float],
) -> dict[str, Any]:
    """Start this target's gateway, warm it up until hedging has its p95s, measure, stop it."""
    (port,) = free_ports(1)
    ups = [u for u in upstreams if u.name in HEALTHY] if target == "healthy-only" else upstreams
    gateway = start_gateway(
        f"gateway-{target}", port, gateway_config(port, [u.provider for u in ups], HEDGE[target]), plan, tmp
    )
    try:
        warm_min, step, warm_max = warm
        run_load(load_args(port, rate=rate, duration=warm_min, stream=True), plan.load, timeout_s=warm_min + 60)
        warm_s, delays_before = warm_min, _hedge_delays(port)
        while warm_s < warm_max and any(d["p95_ms"] is None for d in delays_before.values()):
            run_load(load_args(port, rate=rate, duration=step, stream=True), plan.load, timeout_s=step + 60)
            warm_s += step
            delays_before = _hedge_delays(port)
        before = {u.name: u.stats() for u in upstreams}
        args = load_args(port, rate=rate, duration=duration, stream=True, count_headers=HEADERS, over_ms=OVER_MS)
        with gateway_cpu(plan, gateway) as cpu:
            result = run_load(args, plan.load, timeout_s=duration + 60)
        after = {u.name: u.stats() for u in upstreams}
        delays_after = _hedge_delays(port)
    finally:
        gateway.stop()
    served = {name: stats_delta(after[name], before[name]) for name in after}
    result.update(
        target=target,
        warmup_s=warm_s,
        hedge_delays_before=delays_before,
        hedge_delays_after=delays_after,
        upstream=served,
        gateway_cpu_pct=round(100 * (cpu["gateway_cpu_s"] or 0.0) / result["elapsed_s"], 1),
        other_load_pct=cpu["other_load_pct"],
    )
    return result


def _hedge_delays(port: int) -> dict[str, dict[str, float | None]]:
    """Per endpoint: its p95 TTFT as the gateway sees it, and the hedge delay that gives (forward.py)."""
    out: dict[str, dict[str, float | None]] = {}
    h = _DEFAULT_HEDGE
    for ep in endpoint_snapshot(port):
        p95 = ep["ttfb_s"]["p95"]
        delay = h.max_s if p95 is None else min(max(p95, h.min_s), h.max_s)
        out[ep["provider"]] = {
            "p95_ms": None if p95 is None else round(p95 * 1000, 1),
            "delay_ms": round(delay * 1000, 1),
        }
    return out


def _brief(r: dict[str, Any]) -> str:
    hedged = r["headers"][HEDGED_HEADER]
    text = (
        f"TTFT p50 {fmt(r['ttfb_p50'], '.1f')} p99 {fmt(r['ttfb_p99'], '.1f')} ms, {r['count']} requests, "
        f"hedges won {hedged.get('won', 0)} lost {hedged.get('lost', 0)}, warm-up {r['warmup_s']:g} s"
    )
    if r["errors"]:
        text += f", {r['errors']} errors {r['error_kinds']}"
    return text


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def _summarize(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Percentiles: median over rounds; counts: summed over rounds."""
    client = sum(r["count"] for r in rs)
    upstream_total = sum(sum(u["requests"] for u in r["upstream"].values()) for r in rs)
    slow_requests = sum(r["upstream"][SLOW]["requests"] for r in rs)
    won = sum(r["headers"][HEDGED_HEADER].get("won", 0) for r in rs)
    lost = sum(r["headers"][HEDGED_HEADER].get("lost", 0) for r in rs)
    providers: dict[str, int] = {}
    for r in rs:
        for name, n in r["headers"][PROVIDER_HEADER].items():
            providers[name] = providers.get(name, 0) + n
    last = rs[-1]
    return {
        "requests": client,
        "errors": sum(r["errors"] for r in rs),
        "error_kinds": [r["error_kinds"] for r in rs],
        "mismatches": sum(r["mismatches"] for r in rs),
        "ttfb_p50": _median([r["ttfb_p50"] for r in rs]),
        "ttfb_p99": _median([r["ttfb_p99"] for r in rs]),
        "ttfb_p999": _median([r["ttfb_p999"] for r in rs]),
        "ttfb_max": _median([r["ttfb_max"] for r in rs]),
        **{f"over_{ms:g}": sum(r["over_ms"][f"{ms:g}"]["ttfb"] for r in rs) for ms in OVER_MS},
        "upstream_requests": upstream_total,
        "extra_share_pct": pct(upstream_total - client, client),
        "slow_upstream_share_pct": pct(slow_requests, upstream_total, 1),
        "slow_served": sum(r["upstream"][SLOW]["slow"] for r in rs),
        "hedges_won": won,
        "hedges_lost": lost,
        "hedged_pct": pct(won + lost, client),
        "served_by": providers,
        "warmup_s": _median([r["warmup_s"] for r in rs]),
        "hedge_delays_before": last["hedge_delays_before"],
        "hedge_delays_after": last["hedge_delays_after"],
        "sched_lag_p99": _median([r["sched_lag"]["p99"] for r in rs]),
        "gateway_cpu_pct": _median([r["gateway_cpu_pct"] for r in rs]),
        "other_load_pct": _median([r["other_load_pct"] for r in rs]),
    }


def _checks(s: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    on, healthy = s["on"], s["healthy-only"]
    p99_ratio = ratio(on["ttfb_p99"], healthy["ttfb_p99"])
    extra = on["extra_share_pct"]
    return [
        check(
            f"hedging on: p99 TTFT ≤ {MAX_P99_VS_HEALTHY}× the healthy providers' p99",
            "performance",
            None if p99_ratio is None else p99_ratio <= MAX_P99_VS_HEALTHY,
            f"{fmt(on['ttfb_p99'], '.1f')} vs {fmt(healthy['ttfb_p99'], '.1f')} ms = {fmt(p99_ratio, '.2f')}×",
        ),
        check(
            f"hedging on: extra upstream requests ≤ {MAX_EXTRA_SHARE:.0%} of client requests",
            "performance",
            None if extra is None else extra <= 100 * MAX_EXTRA_SHARE,
            f"{fmt(extra, '.2f')} % ({on['upstream_requests'] - on['requests']} of {on['requests']})",
        ),
        check(
            "no failed requests",
            "correctness",
            all(t["errors"] == 0 for t in s.values()),
            ", ".join(f"{name}: {t['errors']}" for name, t in s.items()),
        ),
        check(
            "every relayed stream byte-identical to the upstream's",
            "correctness",
            all(t["mismatches"] == 0 for t in s.values()),
            ", ".join(f"{name}: {t['mismatches']}/{t['requests'] - t['errors']} differ" for name, t in s.items()),
        ),
    ]


def _table(s: dict[str, dict[str, Any]]) -> str:
    def row(label: str, key: str, spec: str) -> tuple[str, list[str]]:
        return label, [fmt(s[t][key], spec) for t in TARGETS]

    def delay(name: str, when: str) -> tuple[str, list[str]]:
        cells = []
        for t in TARGETS:
            d = s[t][f"hedge_delays_{when}"].get(name)
            if d is None:
                cells.append("—")
            elif t == "off":
                cells.append(f"({fmt(d['p95_ms'], '.0f')})")  # the p95 it would use; hedging is off
            else:
                cells.append(f"{fmt(d['p95_ms'], '.0f')}→{d['delay_ms']:.0f}")
        return f"  {name}, {when} the run", cells

    rows = [
        row("client requests (streamed)", "requests", "d"),
        row("TTFT p50 (ms)", "ttfb_p50", ".1f"),
        row("TTFT p99 (ms)", "ttfb_p99", ".1f"),
        row("TTFT p99.9 (ms)", "ttfb_p999", ".1f"),
        row("TTFT max (ms)", "ttfb_max", ".1f"),
        *(row(f"requests with TTFT ≥ {ms:g} ms", f"over_{ms:g}", "d") for ms in OVER_MS),
        (
            "TTFT p99 vs healthy-only",
            [fmt(ratio(s[t]["ttfb_p99"], s["healthy-only"]["ttfb_p99"]), ".2f") + "×" for t in TARGETS],
        ),
        row("hedges won (hedge answered first)", "hedges_won", "d"),
        row("hedges lost (first attempt won)", "hedges_lost", "d"),
        row("  hedged, % of client requests", "hedged_pct", ".2f"),
        row("upstream requests (POSTs)", "upstream_requests", "d"),
        row("  extra upstream requests, %", "extra_share_pct", ".2f"),
        row(f"{SLOW}'s share of upstream requests, %", "slow_upstream_share_pct", ".1f"),
        row(f"{SLOW} requests that were slow (2 s)", "slow_served", "d"),
        ("p95 TTFT → hedge delay (ms)", []),
        *(delay(name, when) for name in (*HEALTHY, SLOW) for when in ("before", "after")),
        row("warm-up before the run (s)", "warmup_s", "g"),
        row("failed requests", "errors", "d"),
        row("stream bodies differing", "mismatches", "d"),
        row("open-loop send lag p99 (ms)", "sched_lag_p99", ".3f"),
        row("gateway CPU %", "gateway_cpu_pct", ".0f"),
        row("other load on gateway's CPU %", "other_load_pct", ".0f"),
    ]
    return table(TARGETS, rows)
