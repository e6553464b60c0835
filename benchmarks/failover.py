"""The `failover` scenario: one provider of three fails half its requests; do clients notice?

Three fake upstreams with a realistic TTFT (50–100 ms, then 10 ms between stream events): `good-a`, `good-b`,
and `bad`, which answers 25 % of its requests with a 500 (OpenAI's error body) and aborts the connection of
another 25 % without answering, both at once (a fast failure). One model with an
endpoint on each, gateway defaults (P2C, retry budget, ejection, probes, hedging armed). Open loop,
non-streamed requests then streamed ones, each against a freshly started gateway, so each run shows the
ejection from its start.

Meanwhile the orchestrator samples, every 0.25 s, the upstreams' `GET /stats` and the gateway's own endpoint
snapshot (`GET /api/v1/endpoints`: is `bad` ejected?), so the bad upstream's traffic can be split into before
its first ejection, while ejected, and while back in rotation.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import CpuPlan, ServiceError, cpu_plan, free_ports, run_load_sampled
from benchmarks.kit import (
    ATTEMPTS_HEADER,
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
    start_gateway,
    start_upstream,
    startup_failed,
    stats_delta,
    table,
    verdicts,
    write_report,
)

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

MIN_SUCCESS_PCT = 99.9  # acceptance target: client requests answered 200

RATE = 100.0
DURATION_S, QUICK_DURATION_S = 20.0, 3.0
FAIL_SHARE, RESET_SHARE = 0.25, 0.25
# Not zero: at zero delay the first endpoint to answer is sampled at ~1 ms while the others keep the router's
# 0.5 s prior, so P2C would send nearly everything to one upstream and the bad one might never be tried.
TTFT_MS, TTFT_JITTER_MS, GAP_MS = 50.0, 50.0, 10.0
SAMPLE_EVERY_S = 0.25
GOOD = ("good-a", "good-b")
BAD = "bad"
TESTS = ("nonstream", "stream")


def run(opts: Options) -> int:
    plan = cpu_plan()
    rate = opts.rate or RATE
    duration = opts.duration_s or (QUICK_DURATION_S if opts.quick else DURATION_S)
    rounds = opts.rounds or 1
    settings = {
        "rate": rate,
        "duration_s": duration,
        "rounds": rounds,
        "bad": f"{FAIL_SHARE:.0%} answered 500, {RESET_SHARE:.0%} connection aborted",
        "ttft_ms": f"{TTFT_MS:g}–{TTFT_MS + TTFT_JITTER_MS:g}",
        "chunk_gap_ms": GAP_MS,
        "sample_every_s": SAMPLE_EVERY_S,
        "quick": opts.quick,
    }
    host = banner(
        "failover",
        f"{rounds} round(s) × {duration:g} s per test (non-streamed, streamed), open loop {rate:g} req/s, "
        f"fresh gateway per test\nupstreams: {', '.join(GOOD)} and {BAD}, TTFT {TTFT_MS:g}–"
        f"{TTFT_MS + TTFT_JITTER_MS:g} ms, {GAP_MS:g} ms between events; {BAD}: "
        f"{FAIL_SHARE:.0%} of requests answered 500, {RESET_SHARE:.0%} connection aborted without an answer",
        plan,
    )
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in TESTS}
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            upstreams: list[Upstream] = []
            try:
                for i, (name, port) in enumerate(zip((*GOOD, BAD), free_ports(3), strict=True)):
                    args = ["--ttft-ms", f"{TTFT_MS:g}", "--ttft-jitter-ms", f"{TTFT_JITTER_MS:g}"]
                    args += ["--chunk-gap-ms", f"{GAP_MS:g}", "--seed", str(21 + i)]
                    if name == BAD:
                        args += ["--fail-share", f"{FAIL_SHARE:g}", "--reset-share", f"{RESET_SHARE:g}"]
                    upstreams.append(start_upstream(name, port, args, plan, Path(tmp)))
                for r in range(rounds):
                    for test in TESTS:
                        result = _one(test, upstreams, plan, Path(tmp), rate, duration)
                        runs[test].append(result)
                        progress(f"round {r + 1}/{rounds} {test:<9} {_brief(result)}")
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
            "scenario": "failover",
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
    test: str, upstreams: list[Upstream], plan: CpuPlan, tmp: Path, rate: float, duration: float
) -> dict[str, Any]:
    (port,) = free_ports(1)
    gateway = start_gateway(f"gateway-{test}", port, gateway_config(port, [u.provider for u in upstreams]), plan, tmp)
    bad = next(u for u in upstreams if u.name == BAD)

    def sample() -> dict[str, Any]:
        counts = {u.name: u.stats()["requests"] for u in upstreams}
        state = next(ep for ep in endpoint_snapshot(port) if ep["provider"] == BAD)
        return {"requests": counts, "ejected": state["ejected"], "ejections": state["ejections"]}

    try:
        before = {u.name: u.stats() for u in upstreams}
        args = load_args(
            port,
            rate=rate,
            duration=duration,
            stream=test == "stream",
            count_headers=(ATTEMPTS_HEADER, PROVIDER_HEADER),
        )
        with gateway_cpu(plan, gateway) as cpu:
            result, samples = run_load_sampled(args, plan.load, duration + 60, sample, SAMPLE_EVERY_S)
        after = {u.name: u.stats() for u in upstreams}
        bad_view = next(ep for ep in endpoint_snapshot(port) if ep["provider"] == BAD)
    finally:
        gateway.stop()
    result.update(
        test=test,
        upstream={name: stats_delta(after[name], before[name]) for name in after},
        timeline=[{"t": round(t - result["t0_monotonic_s"], 3), **s} for t, s in samples],
        bad_outcomes=bad_view["outcomes_5m"],
        bad_probes=after[bad.name]["gets"] - before[bad.name]["gets"],
        gateway_cpu_pct=round(100 * (cpu["gateway_cpu_s"] or 0.0) / result["elapsed_s"], 1),
        other_load_pct=cpu["other_load_pct"],
    )
    result["ejection"] = _ejection(result["timeline"], result["elapsed_s"])
    return result


def _ejection(timeline: list[dict[str, Any]], elapsed_s: float) -> dict[str, Any]:
    """Split the bad upstream's requests by its state at both ends of each sampling interval. The gateway's
    ejection counter tells a readmission and re-ejection within one interval ("mixed") from a steady one."""
    split = {k: {"bad": 0, "all": 0, "s": 0.0} for k in ("before", "out", "in_after", "mixed")}
    first: float | None = None
    for a, b in itertools.pairwise(timeline):
        if first is None and (a["ejected"] or b["ejected"]):
            first = b["t"] if not a["ejected"] else a["t"]
        steady = a["ejections"] == b["ejections"]
        if first is None:
            part = "before"
        elif a["ejected"] and b["ejected"] and steady:
            part = "out"
        elif not a["ejected"] and not b["ejected"] and steady:
            part = "in_after"
        else:
            part = "mixed"
        bucket = split[part]
        bucket["bad"] += b["requests"][BAD] - a["requests"][BAD]
        bucket["all"] += sum(b["requests"].values()) - sum(a["requests"].values())
        bucket["s"] += max(0.0, min(b["t"], elapsed_s) - max(a["t"], 0.0))
    after = {k: sum(split[p][k] for p in ("out", "in_after", "mixed")) for k in ("bad", "all", "s")}
    return {
        "first_s": first,
        "episodes": timeline[-1]["ejections"] - timeline[0]["ejections"] if timeline else 0,
        "split": split,
        "bad_share_before_pct": pct(split["before"]["bad"], split["before"]["all"], 1),
        "bad_share_after_pct": pct(after["bad"], after["all"], 1),
        "bad_share_in_after_pct": pct(split["in_after"]["bad"], split["in_after"]["all"], 1),
        "bad_while_out": split["out"]["bad"],
        "ejected_time_after_pct": pct(split["out"]["s"], after["s"], 0),
    }


def _brief(r: dict[str, Any]) -> str:
    e = r["ejection"]
    text = (
        f"{r['ok']}/{r['count']} ok, attempts {r['headers'][ATTEMPTS_HEADER]}, first ejection at "
        f"{fmt(e['first_s'], '.2f')} s, {BAD} got {fmt(e['bad_share_after_pct'], '.1f')} % of upstream "
        f"requests after it"
    )
    if r["errors"]:
        text += f", errors {r['error_kinds']}"
    return text


def _summarize(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts summed over rounds; the ejection timeline of the last round."""
    count = sum(r["count"] for r in rs)
    ok = sum(r["ok"] for r in rs)
    attempts: dict[str, int] = {}
    providers: dict[str, int] = {}
    for r in rs:
        for v, n in r["headers"][ATTEMPTS_HEADER].items():
            attempts[v] = attempts.get(v, 0) + n
        for v, n in r["headers"][PROVIDER_HEADER].items():
            providers[v] = providers.get(v, 0) + n
    upstream = {
        name: {k: sum(r["upstream"][name][k] for r in rs) for k in rs[0]["upstream"][name]}
        for name in rs[0]["upstream"]
    }
    upstream_posts = sum(u["requests"] for u in upstream.values())
    outcomes = {k: sum(r["bad_outcomes"][k] for r in rs) for k in rs[0]["bad_outcomes"]}
    probes = sum(r["bad_probes"] for r in rs)
    gateway_attempts_on_bad = sum(outcomes.values()) - probes  # probes land in the outcome counts too
    error_kinds: dict[str, int] = {}
    for r in rs:
        for k, n in r["error_kinds"].items():
            error_kinds[k] = error_kinds.get(k, 0) + n
    last = rs[-1]
    latency_key = "ttfb" if last["stream"] else "latency"
    return {
        "requests": count,
        "ok": ok,
        "success_pct": pct(ok, count, 3),
        "errors": count - ok,
        "error_kinds": error_kinds,
        "attempts": dict(sorted(attempts.items())),
        "served_by": dict(sorted(providers.items())),
        "upstream": upstream,
        "upstream_per_client": round(upstream_posts / count, 3) if count else None,
        "bad_outcomes_gateway_view": {k: v for k, v in outcomes.items() if v},
        "bad_probes": probes,
        "bad_hidden_retries": upstream[BAD]["requests"] - gateway_attempts_on_bad,
        "latency_kind": latency_key,
        "p50": last["ttfb_p50"] if last["stream"] else last["p50"],
        "p99": last["ttfb_p99"] if last["stream"] else last["p99"],
        "mismatches": sum(r.get("mismatches", 0) for r in rs),
        "gateway_cpu_pct": last["gateway_cpu_pct"],
        "other_load_pct": last["other_load_pct"],
        "ejection": last["ejection"],
        "timeline": last["timeline"],
    }


def _checks(s: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    checks = [
        check(
            f"{test}: client success rate ≥ {MIN_SUCCESS_PCT} %",
            "performance",
            None if t["success_pct"] is None else t["success_pct"] >= MIN_SUCCESS_PCT,
            f"{fmt(t['success_pct'], '.3f')} % ({t['errors']} of {t['requests']} failed"
            + (f": {t['error_kinds']})" if t["error_kinds"] else ")"),
        )
        for test, t in s.items()
    ]
    stream = s["stream"]
    checks.append(
        check(
            "every relayed stream byte-identical to the upstream's",
            "correctness",
            stream["mismatches"] == 0 and stream["ok"] > 0,
            f"{stream['mismatches']}/{stream['ok']} differ",
        )
    )
    return checks


def _table(s: dict[str, dict[str, Any]]) -> str:
    def row(label: str, get: Any, spec: str = "") -> tuple[str, list[str]]:
        return label, [fmt(get(s[t]), spec) for t in TESTS]

    def share(d: dict[str, int], key: str, total: int) -> str:
        n = d.get(key, 0)
        return f"{n} ({fmt(pct(n, total, 1), '.1f')} %)"

    attempt_values = sorted({v for t in TESTS for v in s[t]["attempts"]})
    rows = [
        row("client requests", lambda t: t["requests"], "d"),
        row("  succeeded, %", lambda t: t["success_pct"], ".3f"),
        row("  failed", lambda t: t["errors"], "d"),
        row("latency p50 / p99 (ms; streams: TTFB)", lambda t: f"{fmt(t['p50'], '.2f')} / {fmt(t['p99'], '.2f')}"),
        ("attempts per request (X-Hedgerow-Attempts)", []),
        *((f"  {v}", [share(s[t]["attempts"], v, s[t]["requests"]) for t in TESTS]) for v in attempt_values),
        ("served by (X-Hedgerow-Provider)", []),
        *((f"  {p}", [share(s[t]["served_by"], p, s[t]["requests"]) for t in TESTS]) for p in (*GOOD, BAD)),
        row("upstream requests per client request", lambda t: t["upstream_per_client"], ".3f"),
        row(f"{BAD} upstream: requests", lambda t: t["upstream"][BAD]["requests"], "d"),
        row("  answered 500 / aborted", lambda t: f"{t['upstream'][BAD]['failed']} / {t['upstream'][BAD]['reset']}"),
        row("  same-upstream retries (stale conn.)", lambda t: t["bad_hidden_retries"], "d"),
        (f"{BAD} and its ejection (sampled every {SAMPLE_EVERY_S:g} s)", []),
        row("  first ejection after (s)", lambda t: t["ejection"]["first_s"], ".2f"),
        row("  ejections during the run", lambda t: t["ejection"]["episodes"], "d"),
        row(f"  {BAD}'s share before it, %", lambda t: t["ejection"]["bad_share_before_pct"], ".1f"),
        row(f"  {BAD}'s share after it, %", lambda t: t["ejection"]["bad_share_after_pct"], ".1f"),
        row("    requests while ejected", lambda t: t["ejection"]["bad_while_out"], "d"),
        row("    share while back in rotation, %", lambda t: t["ejection"]["bad_share_in_after_pct"], ".1f"),
        row("  time ejected after the first, %", lambda t: t["ejection"]["ejected_time_after_pct"], ".0f"),
        row(f"  probes of {BAD} (GET /models)", lambda t: t["bad_probes"], "d"),
        row("stream bodies differing", lambda t: t["mismatches"] if t["latency_kind"] == "ttfb" else None, "d"),
        row("gateway CPU %", lambda t: t["gateway_cpu_pct"], ".0f"),
        row("other load on gateway's CPU %", lambda t: t["other_load_pct"], ".0f"),
    ]
    return table(TESTS, rows, label_width=44)
