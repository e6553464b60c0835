"""The `routing` scenario: what the full routing path costs a request, next to the core path.

Gateways on the same core, three zero-delay fake upstreams:

- `A` (core path): model `fake/gpt-4o-mini` with one endpoint (on `up-1`): no choice to make, no hedge
  possible (non-streamed requests take the inline sequential path);
- `B` (full routing path): the same model with three endpoints (`up-1`, `up-2`, `up-3`): power-of-two-choices
  on Peak-EWMA cost, health recording, hedging armed (every request computes its hedge delay from the p95
  TTFT and runs as a race of tasks) but never firing, since every upstream answers in well under the
  0.25 s minimum hedge delay;
- `C` (diagnostic): B with `hedge: {enabled: false}`, so non-streamed requests take the inline sequential
  path as in A: C − A is P2C + health + affinity lookup; B − C is what arming the hedge costs.

Four tests, the same load for each: closed loop with one connection (`c1-*`, back to back, the cleanest view
of per-request cost), and open loop at the given rate (`open-*`), each non-streamed and streamed (for
streams: time to first body byte). A round runs every test against every gateway back to back (order
rotating); B − A and C − A are taken within a round, then the median over rounds. Also the gateway's CPU time per
request (from /proc, over each run), and, in process, `Router.plan` + `Monitor.record` timed with timeit
for one and three endpoints (built from a config with `proxy.config.parse` and `proxy.router.build_table`,
as proxy/app.py does).
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from benchmarks.harness import CpuPlan, Service, ServiceError, cpu_plan, free_ports, run_load
from benchmarks.kit import (
    MODEL,
    PROVIDER_HEADER,
    UPSTREAM_MODEL,
    Upstream,
    banner,
    check,
    exit_status,
    fmt,
    gateway_config,
    gateway_cpu,
    load_args,
    orchestrator_on,
    progress,
    start_gateway,
    start_upstream,
    startup_failed,
    table,
    verdicts,
    write_report,
)
from benchmarks.load import chat_body

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

MAX_ADDED_P50_US = 50.0  # acceptance target: B − A, p50, per test

RATE = 200.0
DURATION_S, QUICK_DURATION_S = 2.0, 0.4
ROUNDS, QUICK_ROUNDS = 7, 1
WARMUP_S, QUICK_WARMUP_S = 1.0, 0.2
UPSTREAMS = ("up-1", "up-2", "up-3")
TARGETS = ("A", "B", "C")  # C: a diagnostic, B without hedging (non-streamed requests take the inline path)
HEDGE = {"A": None, "B": None, "C": "{enabled: false}"}
TESTS = ("c1-nonstream", "c1-stream", "open-nonstream", "open-stream")
# Many short repeats, best taken: on a shared core a long repeat is almost surely preempted somewhere.
MICRO_NUMBER, MICRO_REPEAT = 2_000, 50
RACE_NUMBER = 2_000


def run(opts: Options) -> int:
    plan = cpu_plan()
    rate = opts.rate or RATE
    duration = opts.duration_s or (QUICK_DURATION_S if opts.quick else DURATION_S)
    rounds = opts.rounds or (QUICK_ROUNDS if opts.quick else ROUNDS)
    warmup = QUICK_WARMUP_S if opts.quick else WARMUP_S
    number = MICRO_NUMBER // 10 if opts.quick else MICRO_NUMBER
    repeat = MICRO_REPEAT // 5 if opts.quick else MICRO_REPEAT
    settings = {"rate": rate, "duration_s": duration, "rounds": rounds, "warmup_s": warmup, "quick": opts.quick}
    host = banner(
        "routing",
        f"{rounds} round(s) × {duration:g} s per run; closed loop c=1 and open loop {rate:g} req/s, "
        "non-streamed and streamed\ngateway A: 1 endpoint; B: 3 endpoints (P2C, health, hedging armed); "
        "C: B without hedging; zero-delay upstreams",
        plan,
    )
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {t: {test: [] for test in TESTS} for t in TARGETS}
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            services: list[Service] = []
            try:
                upstreams: list[Upstream] = []
                for name, port in zip(UPSTREAMS, free_ports(len(UPSTREAMS)), strict=True):
                    upstreams.append(start_upstream(name, port, [], plan, Path(tmp)))
                    services.append(upstreams[-1].service)
                gateways: dict[str, tuple[int, Service]] = {}
                for target in TARGETS:
                    ups = upstreams[:1] if target == "A" else upstreams
                    (port,) = free_ports(1)
                    config = gateway_config(port, [u.provider for u in ups], HEDGE[target])
                    gateways[target] = port, start_gateway(f"gateway-{target}", port, config, plan, Path(tmp))
                    services.append(gateways[target][1])
                split = _rounds(gateways, plan, rounds, rate, duration, warmup, runs)
            finally:
                for service in reversed(services):
                    service.stop()
    except ServiceError as e:
        return startup_failed(e)
    progress("micro-benchmark: Router.plan + Monitor.record, in process")
    micro = _micro(plan, number, repeat)

    summary = _summarize(runs)
    checks = _checks(summary, runs)
    print(_table(summary))
    print(
        f"\nB's requests by upstream (X-Hedgerow-Provider): warm-up {split['B']}, "
        f"1 s at {rate:g} req/s after the rounds {split['B after the rounds']}\n"
    )
    print(_micro_table(micro, number, repeat))
    print(verdicts(checks, opts.quick))
    write_report(
        opts,
        {
            "scenario": "routing",
            "settings": settings,
            "machine": host,
            "pinning": plan.describe(),
            "summary": summary,
            "micro_us": micro,
            "served_by": split,
            "checks": checks,
            "runs": runs,
        },
    )
    return exit_status(checks, opts.quick)


def _args(test: str, port: int, rate: float, duration: float) -> list[str]:
    stream = test.endswith("-stream")
    if test.startswith("c1-"):
        return load_args(port, mode="closed", concurrency=1, duration=duration, stream=stream)
    return load_args(port, rate=rate, duration=duration, stream=stream)


def _rounds(
    gateways: dict[str, tuple[int, Service]],
    plan: CpuPlan,
    rounds: int,
    rate: float,
    duration: float,
    warmup: float,
    runs: dict[str, dict[str, list[dict[str, Any]]]],
) -> dict[str, dict[str, int]]:
    """Runs every test against both gateways, `rounds` times; returns who served the warm-up requests."""
    split: dict[str, dict[str, int]] = {}
    for target, (port, _) in gateways.items():  # warm pools, first-call paths, health windows; not recorded
        for test in ("c1-nonstream", "c1-stream", "open-nonstream"):
            args = [*_args(test, port, rate, warmup), "--count-header", PROVIDER_HEADER]
            counts = run_load(args, plan.load, timeout_s=warmup + 60)["headers"][PROVIDER_HEADER]
            for name, n in counts.items():
                split.setdefault(target, {})[name] = split.get(target, {}).get(name, 0) + n
    for r in range(rounds):
        order = TARGETS[r % len(TARGETS) :] + TARGETS[: r % len(TARGETS)]
        for test in TESTS:
            for target in order:
                port, service = gateways[target]
                with gateway_cpu(plan, service) as cpu:
                    result = run_load(_args(test, port, rate, duration), plan.load, timeout_s=duration + 60)
                cpu_s = cpu["gateway_cpu_s"] or 0.0
                result["other_load_on_proxy_cpu_pct"] = cpu["other_load_pct"]
                n = result["count"]
                result["gateway_cpu_us_per_request"] = round(1e6 * cpu_s / n, 1) if n else None
                user_s = cpu["gateway_user_s"] or 0.0
                result["gateway_user_us_per_request"] = round(1e6 * user_s / n, 1) if n else None
                result["gateway_sys_us_per_request"] = round(1e6 * (cpu_s - user_s) / n, 1) if n else None
                runs[target][test].append(result)
                progress(f"round {r + 1}/{rounds} {test:<14} {target} {_brief(test, result)}")
    # Who serves B's requests once its health windows are full (the measured runs count no header).
    args = [*_args("open-nonstream", gateways["B"][0], rate, 1.0), "--count-header", PROVIDER_HEADER]
    split["B after the rounds"] = run_load(args, plan.load, timeout_s=61)["headers"][PROVIDER_HEADER]
    return split


def _key(test: str, q: str) -> str:
    return f"ttfb_{q}" if test.endswith("-stream") else q


def _brief(test: str, r: dict[str, Any]) -> str:
    text = (
        f"p50 {fmt(r[_key(test, 'p50')], '.3f')} p99 {fmt(r[_key(test, 'p99')], '.3f')} ms, "
        f"{r['rps']:,.0f} req/s, gateway CPU {fmt(r['gateway_cpu_us_per_request'], '.0f')} µs/req"
    )
    if r["errors"]:
        text += f", {r['errors']} errors {r['error_kinds']}"
    return text


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def _summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per test: medians over rounds per gateway, and X − A within each round (then the median) for B, C."""
    out: dict[str, Any] = {}
    for test in TESTS:
        s: dict[str, Any] = {}
        for target in TARGETS:
            rs = runs[target][test]
            s[target] = {
                "p50": _median([r[_key(test, "p50")] for r in rs]),
                "p99": _median([r[_key(test, "p99")] for r in rs]),
                "rps": _median([r["rps"] for r in rs]),
                "cpu_us": _median([r["gateway_cpu_us_per_request"] for r in rs]),
                "user_us": _median([r["gateway_user_us_per_request"] for r in rs]),
                "sys_us": _median([r["gateway_sys_us_per_request"] for r in rs]),
                "requests": sum(r["count"] for r in rs),
                "errors": sum(r["errors"] for r in rs),
                "mismatches": sum(r.get("mismatches", 0) for r in rs),
            }
        for target in TARGETS[1:]:

            def diffs(
                field: str, scale: float, a: list[Any] = runs["A"][test], x: list[Any] = runs[target][test]
            ) -> list[float]:
                return [
                    scale * (rx[field] - ra[field])
                    for ra, rx in zip(a, x, strict=True)
                    if ra[field] is not None and rx[field] is not None
                ]

            p50 = diffs(_key(test, "p50"), 1000)
            s[f"{target}-A"] = {
                "p50_us": _median(p50),
                "p50_us_range": f"{min(p50):.0f}…{max(p50):.0f}" if p50 else None,
                "p99_us": _median(diffs(_key(test, "p99"), 1000)),
                "cpu_us": _median(diffs("gateway_cpu_us_per_request", 1)),
                "user_us": _median(diffs("gateway_user_us_per_request", 1)),
            }
        s["other_load_pct"] = _median([r.get("other_load_on_proxy_cpu_pct") for t in TARGETS for r in runs[t][test]])
        out[test] = s
    return out


def _checks(summary: dict[str, Any], runs: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    checks = []
    for test in TESTS:
        added = summary[test]["B-A"]["p50_us"]
        checks.append(
            check(
                f"{test}: B − A latency p50 ≤ {MAX_ADDED_P50_US:g} µs",
                "performance",
                None if added is None else added <= MAX_ADDED_P50_US,
                f"{fmt(added, '.0f')} µs (rounds: {summary[test]['B-A']['p50_us_range']})",
            )
        )
    errors = {t: sum(r["errors"] for rs in runs[t].values() for r in rs) for t in TARGETS}
    checks.append(
        check(
            "no failed requests",
            "correctness",
            not any(errors.values()),
            ", ".join(f"{t}: {n}" for t, n in errors.items()),
        )
    )
    streams = {
        t: (sum(r["mismatches"] for test in TESTS if test.endswith("-stream") for r in runs[t][test]),
            sum(r["ok"] for test in TESTS if test.endswith("-stream") for r in runs[t][test]))
        for t in TARGETS
    }  # fmt: skip
    checks.append(
        check(
            "every relayed stream byte-identical to the upstream's",
            "correctness",
            all(m == 0 and n > 0 for m, n in streams.values()),
            ", ".join(f"{t}: {m}/{n} differ" for t, (m, n) in streams.items()),
        )
    )
    return checks


def _table(s: dict[str, Any]) -> str:
    def us(v: float | None) -> str:
        return fmt(None if v is None else 1000 * v, ".0f")

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> tuple[str, list[str]]:
        return label, [get(s[test]) for test in TESTS]

    rows = [
        row("A (1 endpoint) p50", lambda t: us(t["A"]["p50"])),
        row("B (3 endpoints) p50", lambda t: us(t["B"]["p50"])),
        row("  B − A p50", lambda t: fmt(t["B-A"]["p50_us"], "+.0f")),
        row("  B − A p50, range over rounds", lambda t: fmt(t["B-A"]["p50_us_range"])),
        row("C (3 endpoints, no hedging) p50", lambda t: us(t["C"]["p50"])),
        row("  C − A p50", lambda t: fmt(t["C-A"]["p50_us"], "+.0f")),
        row("  C − A p50, range over rounds", lambda t: fmt(t["C-A"]["p50_us_range"])),
        row("A p99", lambda t: us(t["A"]["p99"])),
        row("B p99", lambda t: us(t["B"]["p99"])),
        row("  B − A p99", lambda t: fmt(t["B-A"]["p99_us"], "+.0f")),
        row("gateway user CPU per request, A", lambda t: fmt(t["A"]["user_us"], ".0f")),
        row("gateway user CPU per request, B", lambda t: fmt(t["B"]["user_us"], ".0f")),
        row("gateway user CPU per request, C", lambda t: fmt(t["C"]["user_us"], ".0f")),
        row("  B − A user CPU per request", lambda t: fmt(t["B-A"]["user_us"], "+.0f")),
        row("  C − A user CPU per request", lambda t: fmt(t["C-A"]["user_us"], "+.0f")),
        row("gateway sys CPU per request, A/B/C", lambda t: " / ".join(fmt(t[x]["sys_us"], ".0f") for x in TARGETS)),
        row("req/s, A / B / C", lambda t: " / ".join(fmt(t[x]["rps"], ",.0f") for x in TARGETS)),
        row("other load on gateway's CPU %", lambda t: fmt(t["other_load_pct"], ".0f")),
    ]
    return "all times in µs; streams: time to first body byte\n" + table(TESTS, rows, label_width=34)


def _micro(plan: CpuPlan, number: int, repeat: int) -> dict[str, dict[str, float]]:
    """Per-call cost in µs (best of `repeat`), in this process, on the gateway's core (idle by now)."""
    own = os.sched_getaffinity(0)
    if plan.proxy is not None:
        os.sched_setaffinity(0, plan.proxy)
    try:
        out = {str(n): _micro_one(n, number, repeat) for n in (1, 3)}
        inline, raced = uvloop.run(_race_cost(number, repeat))
        out["race"] = {"inline": inline, "raced": raced}
        return out
    finally:
        os.sched_setaffinity(0, own)


async def _race_cost(number: int, repeat: int) -> tuple[float, float]:
    """What arming a hedge costs a non-streamed request besides the hedge delay: forward.py runs the attempt
    as a task and waits on it with asyncio.wait (FIRST_COMPLETED, a timeout for the hedge) instead of
    awaiting it inline. The attempt here yields to the loop once, as one awaiting a response does."""
    loop = asyncio.get_running_loop()

    async def attempt() -> int:
        await asyncio.sleep(0)
        return 1

    async def inline() -> None:
        await attempt()

    async def raced() -> None:
        tasks = {loop.create_task(attempt()): None}
        done, _ = await asyncio.wait(tasks, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            t.result()

    best = {}
    for name, fn in (("inline", inline), ("raced", raced)):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(number):
                await fn()
            times.append(time.perf_counter() - t0)
        best[name] = round(1e6 * min(times) / number, 3)
    return best["inline"], best["raced"]


def _micro_one(n: int, number: int, repeat: int) -> dict[str, float]:
    from health.monitor import Monitor
    from health.window import Outcome
    from proxy.affinity import prefix_key
    from proxy.config import parse
    from proxy.router import Router, build_table

    ok = Outcome.OK
    # As proxy/app.py builds them. The port is never connected to: build_table makes adapters, no connections.
    cfg = parse(gateway_config(0, [(f"up-{i + 1}", 9) for i in range(n)]), "yaml", env={})
    clock = time.monotonic
    table_ = build_table(cfg, {}, clock)
    groups = {m.name: table_.models[m.name].endpoints for m in cfg.models}
    monitor = Monitor(groups, cfg.routing.ejection, clock, random.Random(1))
    router = Router(table_, monitor, random.Random(1))
    quantile = table_.models[MODEL].hedge.quantile
    first = table_.models[MODEL].endpoints[0]
    prefix_bytes = cfg.routing.affinity.prefix_bytes

    def plan_only() -> None:
        router.plan(MODEL)

    def record_only() -> None:
        first.health.start()
        monitor.record(first, ok, 0.0004, 0.0008)

    def both() -> None:
        _, eps = router.plan(MODEL)
        ep = eps[0]
        ep.health.start()
        monitor.record(ep, ok, 0.0004, 0.0008)

    def hedge_delay() -> None:
        first.health.ttfb_quantile(quantile)

    body = chat_body(UPSTREAM_MODEL, False)  # what the load generator sends

    def affinity_key() -> None:
        prefix_key(body, prefix_bytes)

    for _ in range(5000):  # fill the health windows, so quantiles have data as in a warm gateway
        both()
    fns: dict[str, Callable[[], None]] = {
        "Router.plan": plan_only,
        "start + Monitor.record": record_only,
        "plan + start + record": both,
    }
    if n > 1:  # with one endpoint, forward.py computes neither
        fns["hedge delay (p95 TTFT)"] = hedge_delay
        fns["affinity prefix_key"] = affinity_key
    return {
        name: round(1e6 * min(timeit.repeat(fn, number=number, repeat=repeat)) / number, 3) for name, fn in fns.items()
    }


def _micro_table(micro: dict[str, dict[str, float]], number: int, repeat: int) -> str:
    one, three, race = micro["1"], micro["3"], micro["race"]
    rows = [
        (name, [fmt(one.get(name), ".2f"), fmt(three[name], ".2f"), fmt(three[name] - one.get(name, 0.0), "+.2f")])
        for name in three
    ]
    rows.append(
        (
            "attempt: inline / task+wait",
            [fmt(race["inline"], ".2f"), fmt(race["raced"], ".2f"), fmt(race["raced"] - race["inline"], "+.2f")],
        )
    )
    common = sum(three[k] - one.get(k, 0.0) for k in three if k not in ("Router.plan", "start + Monitor.record"))
    rows.append(("≈ B − A, streamed request", ["", "", fmt(common, "+.2f")]))
    rows.append(("≈ B − A, non-streamed request", ["", "", fmt(common + race["raced"] - race["inline"], "+.2f")]))
    title = (
        f"in process, µs per call (best of {repeat} × {number:,}), on the gateway's core; the last two rows add up "
        "what B runs and A does not\n(plan + start + record, hedge delay, prefix key; non-streamed: the attempt as "
        "a task awaited with asyncio.wait instead of inline):"
    )
    return title + "\n" + table(["A: 1 endpoint", "B: 3 endpoints", "B − A"], rows, label_width=32)
