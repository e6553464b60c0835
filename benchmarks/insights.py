"""The `insights` scenario: do Prometheus metrics and the access log cost a request anything visible (issue #6)?

The `overhead` scenario's machinery (its rounds, tests and medians: benchmarks/overhead.py), run against three
targets that share one zero-delay fake upstream:

- `direct`: the upstream itself, the floor "added" latency is counted from;
- `quiet`: the gateway with `server: {metrics: false, access-log: false}`;
- `observed`: the same gateway with `server: {metrics: true, access-log: true}` (the access log goes to the
  process's stdout, a file here, as it would to a container runtime's log pipe).

The gateways differ only in those two fields (accounting is on in both, on SQLite, as by default). The same
three tests as `overhead` (open-loop non-streamed latency at 200 req/s — nearly always one request in flight,
the core's c=1 figure —, open-loop stream TTFB with byte identity, closed-loop req/s at c=32), rounds rotating
the target order; added = target − direct within a round, and the observed gateway's added latency is divided
by the quiet one's of the same round (the median over rounds is the figure checked: ≤ 1.10).
Then what was observed is checked against what was sent: `/metrics` counts one request per request answered
(`hedgerow_requests_total`), and after a graceful stop the access log holds one line per request.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from benchmarks.harness import CpuPlan, Service, ServiceError, bench_engine, cpu_plan, free_ports
from benchmarks.kit import (
    GATEWAY_KEY,
    MODEL,
    UPSTREAM_MODEL,
    banner,
    check,
    exit_status,
    fmt,
    orchestrator_on,
    progress,
    start_gateway,
    start_upstream,
    startup_failed,
    table,
    verdicts,
    write_report,
)
from benchmarks.overhead import (
    CONCURRENCY,
    Runs,
    Target,
    cpu_us_per_request,
    cpu_vs_baseline,
    run_rounds,
    summarize,
    vs_baseline,
)

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

MAX_RATIO = 1.10  # acceptance (issue #6): added p50 with metrics and access log on ≤ 1.10 × with both off

RATE = 200.0
DURATION_S, QUICK_DURATION_S = 2.0, 0.4
ROUNDS, QUICK_ROUNDS = 7, 1
WARMUP_S, QUICK_WARMUP_S = 1.0, 0.2
SETTLE_S = 1.5  # > one observer batch interval, so the last requests are counted before /metrics is read

NAMES = ("direct", "quiet", "observed")
LABELS = {
    "direct": "direct",
    "quiet": "gateway (metrics, access log off)",
    "observed": "gateway (metrics, access log on)",
}
SHORT = {"direct": "direct", "quiet": "quiet", "observed": "observed"}
SERVER = {"quiet": "metrics: false, access-log: false", "observed": "metrics: true, access-log: true"}


def gateway_config(port: int, upstream_port: int, observe: str) -> str:
    """overhead's gateway (one key, one provider, one model; the same server engine) with the given switches."""
    engine = bench_engine()  # as overhead: the gateway's HTTP server engine
    return (
        f"server: {{host: 127.0.0.1, port: {port}, engine: {engine}, {observe}}}\n"
        f"keys:\n  - {{name: bench, key: {GATEWAY_KEY}}}\n"
        f'providers:\n  - {{name: fake, base-url: "http://127.0.0.1:{upstream_port}/v1"}}\n'
        f"models:\n  - name: {MODEL}\n    endpoints: [{{provider: fake, model: {UPSTREAM_MODEL}}}]\n"
    )


def run(opts: Options) -> int:
    plan = cpu_plan()
    rate = opts.rate or RATE
    duration = opts.duration_s or (QUICK_DURATION_S if opts.quick else DURATION_S)
    rounds = opts.rounds or (QUICK_ROUNDS if opts.quick else ROUNDS)
    warmup = QUICK_WARMUP_S if opts.quick else WARMUP_S
    settings = {
        "rounds": rounds,
        "duration_s": duration,
        "warmup_s": warmup,
        "rate": rate,
        "concurrency": CONCURRENCY,
        "quick": opts.quick,
    }
    host = banner(
        "insights",
        f"{rounds} round(s) × {duration:g} s per run; open loop {rate:g} req/s, closed loop c={CONCURRENCY}\n"
        f"targets: {', '.join(LABELS[n] for n in NAMES)}",
        plan,
    )
    warmups: dict[str, list[dict[str, Any]]] = {}
    observed: dict[str, dict[str, Any]] = {}
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            services: list[Service] = []
            try:
                targets = _start(Path(tmp), plan, services)
                runs = run_rounds(targets, plan, rounds, rate, duration, warmup, warmups)
                time.sleep(SETTLE_S)
                progress("reading /metrics, then stopping the gateways (SIGTERM) and counting access-log lines")
                for t in targets[1:]:
                    observed[t.name] = {"metrics_requests": _metrics_requests(t.port)}
                    t.service.stop()
                    observed[t.name]["exit_status"] = t.service.proc.returncode
                    observed[t.name]["access_lines"] = _access_lines(Path(tmp) / f"{t.name}.log")
            finally:
                for service in reversed(services):
                    service.stop()
    except ServiceError as e:
        return startup_failed(e)

    summary = _summarize(runs, warmups, observed)
    checks = _checks(summary)
    print(_table(summary))
    print(verdicts(checks, opts.quick))
    write_report(
        opts,
        {
            "scenario": "insights",
            "settings": settings,
            "machine": host,
            "pinning": plan.describe(),
            "summary": summary,
            "checks": checks,
            "runs": runs,
            "warmups": warmups,
        },
    )
    return exit_status(checks, opts.quick)


def _start(tmp: Path, plan: CpuPlan, services: list[Service]) -> list[Target]:
    up_port, *ports = free_ports(3)
    upstream = start_upstream("upstream", up_port, [], plan, tmp)
    services.append(upstream.service)
    targets = [Target("direct", up_port, UPSTREAM_MODEL, None, upstream.service)]
    for name, port in zip(NAMES[1:], ports, strict=True):
        service = start_gateway(name, port, gateway_config(port, up_port, SERVER[name]), plan, tmp)
        services.append(service)
        targets.append(Target(name, port, MODEL, GATEWAY_KEY, service))
    return targets


def _metrics_requests(port: int) -> int | None:
    """Σ hedgerow_requests_total over its labels; None when /metrics does not answer 200 (metrics off)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("hedgerow_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return round(total)


def _access_lines(log: Path) -> int:
    """Access-log lines (JSON objects with a generation id) in a gateway's output."""
    count = 0
    for line in log.read_bytes().splitlines():
        if line.startswith(b"{"):
            try:
                if "id" in orjson.loads(line):
                    count += 1
            except orjson.JSONDecodeError:
                continue
    return count


def _summarize(
    runs: Runs, warmups: dict[str, list[dict[str, Any]]], observed: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    summary = summarize(runs)
    for name, s in summary.items():
        s["label"] = LABELS[name]
        every = [r for results in runs[name].values() for r in results] + warmups.get(name, [])
        s["requests"] = sum(r["count"] for r in every)
        s["errors"] = sum(r["errors"] for r in every)
        s.update(observed.get(name, {}))
        cpu = [c for r in runs[name]["closed"] if (c := cpu_us_per_request(r)) is not None]
        s["cpu_us"] = round(statistics.median(cpu), 1) if cpu else None
    s = summary["observed"]
    vs: dict[str, Any] = {}
    for key, test, field, added in (
        ("added_p50", "nonstream", "p50", True),
        ("added_p99", "nonstream", "p99", True),
        ("added_ttfb_p50", "stream", "ttfb_p50", True),
        ("rps", "closed", "rps", False),
    ):
        per_round = vs_baseline(runs, "observed", "quiet", test, field, added)
        vs[key] = round(statistics.median(per_round), 4) if per_round else None
        vs[key + "_range"] = f"{min(per_round):.2f}–{max(per_round):.2f}" if per_round else None
    cpu_vs = cpu_vs_baseline(runs, "observed", "quiet")
    vs["cpu_us"] = round(statistics.median(cpu_vs), 4) if cpu_vs else None
    s["vs_quiet"] = vs
    return summary


def _checks(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    quiet, obs = summary["quiet"], summary["observed"]
    r = obs["vs_quiet"]["added_p50"]
    gateways = NAMES[1:]
    return [
        check(
            f"metrics and access log on: added p50 ≤ {MAX_RATIO:.2f} × with both off",
            "performance",
            None if r is None else r <= MAX_RATIO,
            f"{fmt(r, '.2f')}× ({fmt(obs.get('added_p50'), '.3f')} vs {fmt(quiet.get('added_p50'), '.3f')} ms; "
            f"per round {obs['vs_quiet']['added_p50_range']})",
        ),
        check(
            "/metrics counts every request answered (hedgerow_requests_total), and answers only when on",
            "correctness",
            obs.get("metrics_requests") == obs["requests"] and quiet.get("metrics_requests") is None,
            f"observed: {fmt(obs.get('metrics_requests'), ',')} counted, {obs['requests']:,} answered; "
            f"quiet: {'no /metrics' if quiet.get('metrics_requests') is None else 'served /metrics'}",
        ),
        check(
            "one access-log line per request answered (after a graceful stop), none when off",
            "correctness",
            obs.get("access_lines") == obs["requests"]
            and quiet.get("access_lines") == 0
            and all(summary[n].get("exit_status") == 0 for n in gateways),
            f"observed: {fmt(obs.get('access_lines'), ',')} lines, {obs['requests']:,} answered; "
            f"quiet: {fmt(quiet.get('access_lines'), ',')} lines; exit status "
            + ", ".join(f"{n} {summary[n].get('exit_status')}" for n in gateways),
        ),
        check(
            "every relayed stream byte-identical to the upstream's",
            "correctness",
            all(summary[n]["mismatches"] == 0 and summary[n]["streams_checked"] > 0 for n in gateways),
            ", ".join(f"{n}: {summary[n]['mismatches']}/{summary[n]['streams_checked']} differ" for n in gateways),
        ),
        check(
            "no failed requests",
            "correctness",
            all(summary[n]["errors"] == 0 for n in NAMES),
            ", ".join(f"{n}: {summary[n]['errors']}" for n in NAMES),
        ),
    ]


# (label, summary key, format, vs-quiet key or None)
_ROWS: list[tuple[str, str, str, str | None]] = [
    ("non-stream latency p50 (ms)", "p50", ".3f", None),
    ("non-stream latency p99 (ms)", "p99", ".3f", None),
    ("  added p50 (ms)", "added_p50", ".3f", "added_p50"),
    ("  added p50, range over rounds", "added_p50_range", "", "added_p50_range"),
    ("  added p99 (ms)", "added_p99", ".3f", "added_p99"),
    ("stream TTFB p50 (ms)", "ttfb_p50", ".3f", None),
    ("  added TTFB p50 (ms)", "added_ttfb_p50", ".3f", "added_ttfb_p50"),
    ("stream bodies differing", "mismatches", "d", None),
    ("stream bodies checked", "streams_checked", "d", None),
    (f"closed-loop req/s (c={CONCURRENCY})", "rps", ",.0f", "rps"),
    ("  gateway CPU µs per request", "cpu_us", ".0f", "cpu_us"),
    ("  proxy CPU %", "proxy_cpu_pct", ".0f", None),
    ("open-loop send lag p99 (ms)", "sched_lag_p99", ".3f", None),
    ("other load on proxy's CPU %", "other_load_pct", ".0f", None),
    ("requests answered (all runs)", "requests", ",", None),
    ("failed requests", "errors", "d", None),
    ("requests counted by /metrics", "metrics_requests", ",", None),
    ("access-log lines", "access_lines", ",", None),
]


def _table(summary: dict[str, dict[str, Any]]) -> str:
    columns = [SHORT[n] for n in NAMES] + ["observed/quiet"]
    rows = []
    for label, key, spec, vs_key in _ROWS:
        cells = [fmt(summary[n].get(key), spec) for n in NAMES]
        vs = None if vs_key is None else summary["observed"]["vs_quiet"][vs_key]
        cells.append("" if vs_key is None else fmt(vs, "" if "range" in vs_key else ".2f"))
        rows.append((label, cells))
    note = (
        "quiet: the gateway with metrics and the access log off; observed: both on.\n"
        "observed/quiet: per round, observed's figure (added latency: minus direct's) over quiet's in the same\n"
        "round; the median over rounds (or their range)\n"
    )
    return note + table(columns, rows, label_width=34)
