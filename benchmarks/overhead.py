"""The `overhead` scenario: what Hedgerow adds to a request, next to a bare aiohttp proxy and the upstream alone.

Three targets share one zero-delay fake upstream: `direct` (the upstream alone: the floor), `bare` (the least an
aiohttp pass-through costs, benchmarks/bare_proxy.py) and `gateway` (Hedgerow); and `nginx` when it is on PATH
(what a compiled proxy adds on the same machine). Three tests run against each:
open-loop non-stream latency, open-loop stream TTFB with a byte-identity check, closed-loop throughput.
A round runs every test against every target back to back, in an order that rotates each round; "added" is
target minus direct within the same round, and figures are medians over rounds, so the drift of a noisy
machine mostly cancels out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.fake_upstream import FIXTURES
from benchmarks.harness import (
    CLK_TCK,
    NGINX_MISSING,
    CpuPlan,
    Service,
    ServiceError,
    bench_engine,
    cpu_plan,
    cpu_ticks,
    free_ports,
    http_ok,
    machine,
    nginx_service,
    run_load,
)

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

# Acceptance targets.
MAX_ADDED_P50_MS = 0.6
MAX_ADDED_VS_BARE = 1.2
MAX_TTFB_ADDED_P50_MS = 0.6
MIN_RPS_VS_BARE = 0.8

RATE = 200.0  # default open-loop arrival rate, req/s

CONCURRENCY = 32
GATEWAY_KEY = "sk-bench-0123456789"
GATEWAY_MODEL = "fake/gpt-4o-mini"
UPSTREAM_MODEL = "gpt-4o-mini"
TESTS = ("nonstream", "stream", "closed")
STREAM_FIXTURE = FIXTURES / "stream_ok.sse"

GATEWAY_CONFIG = """\
server: {{host: 127.0.0.1, port: {port}, engine: {engine}}}
keys:
  - {{name: bench, key: {key}}}
providers:
  - {{name: fake, base-url: "http://127.0.0.1:{upstream_port}/v1"}}
models:
  - name: {model}
    endpoints: [{{provider: fake, model: {upstream_model}}}]
"""

Runs = dict[str, dict[str, list[dict[str, Any]]]]  # target → test → one load result per round


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    model: str
    key: str | None
    service: Service  # the process answering this target (for direct, the upstream itself)


def run(opts: Options) -> int:
    opts = dataclasses.replace(opts, rate=opts.rate or RATE)
    plan = cpu_plan()
    rounds = opts.rounds or (1 if opts.quick else 5)
    duration = opts.duration_s or (0.4 if opts.quick else 3.0)
    warmup = 0.2 if opts.quick else 1.0
    settings = {
        "rounds": rounds,
        "duration_s": duration,
        "warmup_s": warmup,
        "rate": opts.rate,
        "concurrency": CONCURRENCY,
        "quick": opts.quick,
    }
    host = machine()
    print(
        f"overhead: {rounds} round(s) × {duration:g} s per run; open loop {opts.rate:g} req/s, "
        f"closed loop c={CONCURRENCY}\nmachine: {host['nproc']} CPUs ({host['cpu_model']}), "
        f"Linux {host['kernel']}, Python {host['python']}\npinning: {plan.describe()}\n",
        flush=True,
    )
    own_cpus = os.sched_getaffinity(0)
    services: list[Service] = []
    raw: dict[str, list[int]] | None = {} if opts.json_path is not None else None  # non-stream latencies, ns
    try:
        if plan.load is not None:
            os.sched_setaffinity(0, plan.load)  # keep the orchestrator off the proxy's core too
        with tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            try:
                targets, gateway_error = _start(Path(tmp), plan, services)
                runs = run_rounds(targets, plan, rounds, opts.rate, duration, warmup, raw=raw)
            finally:
                for service in reversed(services):
                    service.stop()
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        os.sched_setaffinity(0, own_cpus)

    summary = summarize(runs)
    checks = _checks(summary)
    print(_table(summary, [t.name for t in targets]))
    print(_verdicts(checks, opts.quick))
    if gateway_error is not None:
        print(f"\ngateway did not start, so it was not measured:\n{gateway_error}")
    if opts.json_path is not None:
        report = {
            "scenario": "overhead",
            "settings": settings,
            "machine": host,
            "pinning": plan.describe(),
            "gateway_error": gateway_error,
            "summary": summary,
            "checks": checks,
            "runs": runs,
        }
        report["charts"] = _latency_cdf(opts.json_path, report, raw or {})
        opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    # --quick is a smoke run, too short for stable timings: only correctness decides its exit status.
    enforced = [c for c in checks if not opts.quick or c["kind"] == "correctness"]
    return 0 if gateway_error is None and all(c["ok"] for c in enforced) else 1


def _start(tmp: Path, plan: CpuPlan, services: list[Service]) -> tuple[list[Target], str | None]:
    """Upstream and bare proxy must start; the gateway may not (yet): its error is returned instead."""
    up_port, bare_port, gw_port, nginx_port = free_ports(4)
    upstream = Service("upstream", ["-m", "benchmarks.fake_upstream", "--port", str(up_port)], plan.load, tmp)
    services.append(upstream)
    upstream.wait_ready(http_ok(up_port, "/v1/models"))
    bare_args = ["-m", "benchmarks.bare_proxy", "--port", str(bare_port), "--upstream", f"http://127.0.0.1:{up_port}"]
    bare = Service("bare", bare_args, plan.proxy, tmp)
    services.append(bare)
    bare.wait_ready(http_ok(bare_port, "/v1/models"))
    targets = [
        Target("direct", up_port, UPSTREAM_MODEL, None, upstream),
        Target("bare", bare_port, UPSTREAM_MODEL, None, bare),
    ]
    # nginx, when installed: what a compiled proxy adds on this machine (its loopback hops and wake-ups).
    nginx = nginx_service(tmp, plan.proxy, up_port, nginx_port)
    if nginx is None:
        print(NGINX_MISSING, flush=True)
    else:
        services.append(nginx)
        nginx.wait_ready(http_ok(nginx_port, "/v1/models"))
        targets.append(Target("nginx", nginx_port, UPSTREAM_MODEL, None, nginx))

    config = tmp / "gateway.yaml"
    config.write_text(
        GATEWAY_CONFIG.format(
            port=gw_port,
            key=GATEWAY_KEY,
            upstream_port=up_port,
            model=GATEWAY_MODEL,
            upstream_model=UPSTREAM_MODEL,
            engine=bench_engine(),  # the gateway's HTTP server engine
        )
    )
    gateway = Service("gateway", ["-m", "proxy", "serve", "--config", str(config), "--workers", "1"], plan.proxy, tmp)
    services.append(gateway)
    try:
        gateway.wait_ready(http_ok(gw_port, "/readyz"), timeout_s=30)
    except ServiceError as e:
        gateway.stop()
        services.remove(gateway)
        return targets, str(e)
    targets.append(Target("gateway", gw_port, GATEWAY_MODEL, GATEWAY_KEY, gateway))
    return targets, None


def _load_args(test: str, target: Target, rate: float, duration: float) -> list[str]:
    url = f"http://127.0.0.1:{target.port}/v1/chat/completions"
    args = ["--url", url, "--model", target.model, "--duration", f"{duration:g}"]
    if target.key:
        args += ["--key", target.key]
    if test == "closed":
        return [*args, "--mode", "closed", "--concurrency", str(CONCURRENCY)]
    args += ["--mode", "open", "--rate", f"{rate:g}"]
    if test == "stream":
        args += ["--stream", "--expect", str(STREAM_FIXTURE)]
    return args


def _measure(
    test: str,
    target: Target,
    upstream: Service,
    plan: CpuPlan,
    rate: float,
    duration: float,
    raw: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    is_proxy = target.service is not upstream
    before = (target.service.cpu_seconds(), upstream.cpu_seconds())
    core_before = cpu_ticks(plan.proxy) if plan.proxy is not None else None
    args = _load_args(test, target, rate, duration)
    if raw is not None and test == "nonstream":
        # The same load.py run, through benchmarks.stats, which also hands back every sample (for the CDF).
        from benchmarks.stats import run_load_raw

        result = run_load_raw(args, plan.load, timeout_s=duration + 60)
        raw.setdefault(target.name, []).extend(result.pop("latency_ns"))
        del result["ttfb_ns"]
    else:
        result = run_load(args, plan.load, timeout_s=duration + 60)
    proxy_cpu_s = target.service.cpu_seconds() - before[0] if is_proxy else 0.0
    if core_before is not None:
        # The machine is shared: whatever else ran on the proxy's core meanwhile is noise in these figures.
        busy, total = (now - then for now, then in zip(cpu_ticks(plan.proxy), core_before, strict=True))
        other = busy - proxy_cpu_s * CLK_TCK
        result["other_load_on_proxy_cpu_pct"] = round(100 * max(0.0, other) / total, 1) if total else None
    if test == "closed":
        # Who saturated? ~100% on the proxy's core means the proxy, not the generator, set the rate.
        elapsed = result["elapsed_s"]
        result["upstream_cpu_pct"] = round(100 * (upstream.cpu_seconds() - before[1]) / elapsed, 1)
        if is_proxy:
            result["proxy_cpu_pct"] = round(100 * proxy_cpu_s / elapsed, 1)
    return result


def run_rounds(
    targets: list[Target],
    plan: CpuPlan,
    rounds: int,
    rate: float,
    duration: float,
    warmup: float,
    warmups: dict[str, list[dict[str, Any]]] | None = None,
    raw: dict[str, list[int]] | None = None,
) -> Runs:
    """Every test against every target, `rounds` times, the order rotating; targets[0] is the upstream
    (`direct`). The warm-up runs are not in the result; pass `warmups` to get them (target → results), and
    `raw` to get every non-stream latency sample (target → ns, all rounds)."""
    upstream = targets[0].service
    for target in targets:  # warm connection pools and first-call paths; not recorded
        for test in ("closed", "stream"):
            result = run_load(_load_args(test, target, rate, warmup), plan.load, timeout_s=warmup + 60)
            if warmups is not None:
                warmups.setdefault(target.name, []).append(result)
    runs: Runs = {t.name: {test: [] for test in TESTS} for t in targets}
    for r in range(rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        for test in TESTS:
            for target in order:
                result = _measure(test, target, upstream, plan, rate, duration, raw)
                runs[target.name][test].append(result)
                print(
                    f"  round {r + 1}/{rounds} {test:<9} {target.name:<7} {_brief(result)}", file=sys.stderr, flush=True
                )
    return runs


def vs_baseline(runs: Runs, name: str, baseline: str, test: str, field: str, added: bool) -> list[float]:
    """Per round: the target's figure over the baseline target's (each minus direct's first, when `added`)."""
    out = []
    for i, (x, base) in enumerate(zip(runs[name][test], runs[baseline][test], strict=True)):
        floor = runs["direct"][test][i][field] if added else 0.0
        if None in (x[field], base[field], floor) or base[field] - floor <= 0:
            continue
        out.append((x[field] - floor) / (base[field] - floor))
    return out


def _latency_cdf(json_path: Path, report: dict[str, Any], raw: dict[str, list[int]]) -> dict[str, str]:
    """Into the report, the non-stream latency CDF of each target (`cdf_ms`: quantile, ms points of its raw
    samples, every round); its PNG beside the JSON report (`python -m benchmarks.charts REPORT.json` draws
    it again)."""
    from benchmarks import charts

    report["cdf_ms"] = {name: charts.quantile_points([ns / 1e6 for ns in ns_list]) for name, ns_list in raw.items()}
    if not charts.available():
        print("charts: skipped, matplotlib is not installed (pip install -e '.[bench]')")
        return {}
    paths = charts.overhead_charts(json_path, report)
    for name, path in paths.items():
        print(f"chart ({name}): {path}")
    return {name: str(path) for name, path in paths.items()}


def cpu_us_per_request(r: dict[str, Any]) -> float | None:
    """The proxy's CPU time per request in a closed-loop run (None for the upstream or an empty run)."""
    pct, n = r.get("proxy_cpu_pct"), r["count"]
    return None if pct is None or not n else 1e6 * pct / 100 * r["elapsed_s"] / n


def cpu_vs_baseline(runs: Runs, name: str, baseline: str) -> list[float]:
    """Per closed-loop round: the target's CPU time per request over the baseline target's."""
    pairs = zip(runs[name]["closed"], runs[baseline]["closed"], strict=True)
    return [a / b for x, base in pairs if (a := cpu_us_per_request(x)) is not None and (b := cpu_us_per_request(base))]


def _brief(result: dict[str, Any]) -> str:
    text = f"p50 {_ms(result['p50'])} p99 {_ms(result['p99'])} ms, {result['rps']:,.0f} req/s"
    if result["errors"]:
        text += f", {result['errors']} errors {result['error_kinds']}"
    return text


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def _diffs(runs: list[dict[str, Any]], base: list[dict[str, Any]], field: str) -> list[float]:
    """Per round, target minus direct in that same round."""
    return [r[field] - b[field] for r, b in zip(runs, base, strict=True) if None not in (r[field], b[field])]


def summarize(runs: Runs) -> dict[str, dict[str, Any]]:
    direct = runs["direct"]
    summary: dict[str, dict[str, Any]] = {}
    for name, tests in runs.items():
        plain, stream, closed = tests["nonstream"], tests["stream"], tests["closed"]
        s: dict[str, Any] = {
            "p50": _median(r["p50"] for r in plain),
            "p99": _median(r["p99"] for r in plain),
            "ttfb_p50": _median(r["ttfb_p50"] for r in stream),
            "ttfb_p99": _median(r["ttfb_p99"] for r in stream),
            "rps": _median(r["rps"] for r in closed),
            "errors": sum(r["errors"] for results in tests.values() for r in results),
            "streams_checked": sum(r["ok"] for r in stream),
            "mismatches": sum(r["mismatches"] for r in stream),
            "proxy_cpu_pct": _median(r.get("proxy_cpu_pct") for r in closed),
            "upstream_cpu_pct": _median(r["upstream_cpu_pct"] for r in closed),
            "generator_cpu_pct": _median(r["generator_cpu_pct"] for r in closed),
            "sched_lag_p99": _median(r["sched_lag"]["p99"] for r in plain + stream),
            "other_load_pct": _median(r.get("other_load_on_proxy_cpu_pct") for rs in tests.values() for r in rs),
        }
        if name != "direct":
            added_p50 = _diffs(plain, direct["nonstream"], "p50")
            s["added_p50"] = _median(added_p50)
            s["added_p50_range"] = f"{min(added_p50):.2f}–{max(added_p50):.2f}" if added_p50 else None
            s["added_p99"] = _median(_diffs(plain, direct["nonstream"], "p99"))
            s["added_ttfb_p50"] = _median(_diffs(stream, direct["stream"], "ttfb_p50"))
            s["added_ttfb_p99"] = _median(_diffs(stream, direct["stream"], "ttfb_p99"))
        summary[name] = s
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b is not None and b > 0 else None


def _checks(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """ok is None when a figure is missing (the gateway did not run)."""
    gw = summary.get("gateway", {})
    bare = summary["bare"]
    added, bare_added = gw.get("added_p50"), bare["added_p50"]
    ttfb_added = gw.get("added_ttfb_p50")
    rps_ratio = _ratio(gw.get("rps"), bare["rps"])
    proxies = [summary[n] for n in ("bare", "nginx", "gateway") if n in summary]

    def check(name: str, kind: str, ok: bool | None, detail: str) -> dict[str, Any]:
        return {"name": name, "kind": kind, "ok": ok, "detail": detail}

    return [
        check(
            f"gateway added p50 ≤ {MAX_ADDED_P50_MS} ms",
            "performance",
            None if added is None else added <= MAX_ADDED_P50_MS,
            f"{_ms(added)} ms",
        ),
        check(
            f"gateway added p50 ≤ {MAX_ADDED_VS_BARE}× bare's",
            "performance",
            None if added is None or bare_added is None else added <= MAX_ADDED_VS_BARE * bare_added,
            f"{_ms(added)} vs {_ms(bare_added)} ms",
        ),
        check(
            f"gateway added stream TTFB p50 ≤ {MAX_TTFB_ADDED_P50_MS} ms",
            "performance",
            None if ttfb_added is None else ttfb_added <= MAX_TTFB_ADDED_P50_MS,
            f"{_ms(ttfb_added)} ms",
        ),
        check(
            "every relayed stream byte-identical to the upstream's",
            "correctness",
            None
            if "gateway" not in summary
            else all(p["mismatches"] == 0 and p["streams_checked"] > 0 for p in proxies),
            ", ".join(
                f"{n}: {summary[n]['mismatches']}/{summary[n]['streams_checked']} differ"
                for n in summary
                if n != "direct"
            ),
        ),
        check(
            f"gateway closed-loop req/s ≥ {MIN_RPS_VS_BARE}× bare's",
            "performance",
            None if rps_ratio is None else rps_ratio >= MIN_RPS_VS_BARE,
            f"{_fmt(rps_ratio, '.2f')}×",
        ),
        check(
            "no failed requests",
            "correctness",
            all(s["errors"] == 0 for s in summary.values()),
            ", ".join(f"{n}: {s['errors']}" for n, s in summary.items()),
        ),
    ]


def _fmt(value: float | str | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _ms(value: float | None) -> str:
    return _fmt(value, ".3f")


# (label, summary key, format, show gateway/bare ratio)
_ROWS = [
    ("non-stream latency p50 (ms)", "p50", ".3f", False),
    ("non-stream latency p99 (ms)", "p99", ".3f", False),
    ("  added p50 (ms)", "added_p50", ".3f", True),
    ("  added p50, range over rounds", "added_p50_range", "", False),
    ("  added p99 (ms)", "added_p99", ".3f", False),
    ("stream TTFB p50 (ms)", "ttfb_p50", ".3f", False),
    ("stream TTFB p99 (ms)", "ttfb_p99", ".3f", False),
    ("  added TTFB p50 (ms)", "added_ttfb_p50", ".3f", True),
    ("  added TTFB p99 (ms)", "added_ttfb_p99", ".3f", False),
    ("stream bodies differing", "mismatches", "d", False),
    ("stream bodies checked", "streams_checked", "d", False),
    ("failed requests", "errors", "d", False),
    (f"closed-loop req/s (c={CONCURRENCY})", "rps", ",.0f", True),
    ("  proxy CPU %", "proxy_cpu_pct", ".0f", False),
    ("  upstream CPU %", "upstream_cpu_pct", ".0f", False),
    ("  load generator CPU %", "generator_cpu_pct", ".0f", False),
    ("open-loop send lag p99 (ms)", "sched_lag_p99", ".3f", False),
    ("other load on proxy's CPU %", "other_load_pct", ".0f", False),
]


def _table(summary: dict[str, dict[str, Any]], names: list[str]) -> str:
    ratio_col = "gateway" in summary
    head = f"{'':<32}" + "".join(f"{n:>10}" for n in names) + (f"{'gw/bare':>10}" if ratio_col else "")
    lines = [head, "-" * len(head)]
    for label, key, spec, with_ratio in _ROWS:
        line = f"{label:<32}" + "".join(f"{_fmt(summary[n].get(key), spec):>10}" for n in names)
        if ratio_col and with_ratio:
            line += f"{_fmt(_ratio(summary['gateway'].get(key), summary['bare'].get(key)), '.2f'):>10}"
        lines.append(line)
    return "\n".join(lines)


def _verdicts(checks: list[dict[str, Any]], quick: bool) -> str:
    lines = ["", "acceptance:"]
    for c in checks:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[c["ok"]]
        note = " (not enforced with --quick)" if quick and c["kind"] == "performance" else ""
        lines.append(f"  {verdict}  {c['name']}: {c['detail']}{note}")
    return "\n".join(lines)
