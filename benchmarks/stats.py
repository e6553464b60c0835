"""The `stats` scenario: do the stats API's percentiles agree with what the load generator measured?

Issue #6: "the stats API's percentiles agree with the benchmark load generator's measurements of the same run
within 10 %". One fake upstream with a realistic answer, one fresh gateway in front of it, one open-loop run of
streamed requests; then `GET /api/v1/models` (the gateway's own view of that endpoint over the last 5 minutes,
which on a fresh gateway is exactly this run) is compared with the load generator's figures of the same
requests.

The upstream is `fake_upstream.py`'s server with a pacing of its own, drawn per request from a seeded RNG:
TTFT log-normal (median 90 ms, σ 0.35: ~55–145 ms for 80 % of requests), and 3 % of requests from a slow
log-normal tail (median 400 ms, σ 0.4); then 32 content tokens at a token rate uniform in 50–150 tokens/s
(one HTTP chunk per SSE event: a role event, 32 content events, finish, usage, `[DONE]`). The fake upstream's
own options give a uniform TTFT and a fixed slow delay (a point mass, which no real provider has and which
would test the histogram's interpolation rather than the gateway), and one gap between events for every
request, hence the pacing here. Run alone: `python -m benchmarks.stats upstream --port N --fixtures DIR [--seed S]`.

The load generator is `load.py` itself, run as `python -m benchmarks.stats load <its arguments>`: the same
code, which also hands back its raw samples, so that p90 (which `load.py` does not print) comes from the same
nearest-rank rule as its p50 and p99, and so that the gateway's estimator (`health/histogram.py`: 72 log bins
from 1 ms to 900 s, each ~21 % wide, quantiles interpolated log-uniformly inside a bin) can be run on the
load generator's own samples: that separates what the estimator costs from what the two clocks measure.

What each side measures, per request:

- load generator: TTFB = first body byte − the request's due time (open loop), latency = last byte − due
  time. It includes the generator's send lag, loopback both ways and the gateway's own work before and after
  the upstream attempt (~1 ms here: `overhead`).
- gateway: per upstream attempt, TTFT = the stream's commit point (its first content event: the role event
  before it is held back, proxy/attempt.py) − the attempt's start; latency = the relay's end − the attempt's
  start. So both sides' TTFT end at the first content token, and the gateway's figures are smaller by its
  overhead.

Checks: for TTFT and latency, p50, p90 and p99 of the stats API within 10 % of the load generator's (ratio
0.9–1.1; performance, not enforced with `--quick`); `requests_5m` = the requests sent + the health probes
the upstream served (correctness); no failed requests, every stream byte-identical (correctness).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.fake_upstream import FIXTURES, FakeOpenAI, Faults, Routes
from benchmarks.harness import ROOT, CpuPlan, Service, ServiceError, child_env, cpu_plan, free_ports, get_json, http_ok
from benchmarks.kit import (
    GATEWAY_KEY,
    MODEL,
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
    ratio,
    start_gateway,
    startup_failed,
    table,
    verdicts,
    write_report,
)
from health.histogram import BINS, EDGES, LOG_BINS, bin_of, value_at

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

RATE = 50.0  # req/s: ~25 streams in flight at ~0.5 s each
DURATION_S, QUICK_DURATION_S = 60.0, 3.0  # 3,000 requests (p99: the 30th largest), 150 with --quick
MAX_DURATION_S = 240.0  # the stats API's window is 5 minutes (10 s buckets): the whole run must fit in it
SETTLE_S = 1.5  # after the run, before reading: the window's merged histograms are rebuilt at most once a second
CONNECTIONS = 64  # opened by the load generator before t0, so no connect lands in a measured request
AGREEMENT = (0.9, 1.1)  # stats API / load generator, per percentile
QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))

# The upstream's pacing.
TTFT_MEDIAN_MS, TTFT_SIGMA = 90.0, 0.35
TAIL_SHARE, TAIL_MEDIAN_MS, TAIL_SIGMA = 0.03, 400.0, 0.4
TOKENS = 32
TOKEN_RATE = (50.0, 150.0)  # tokens/s, uniform per request
PROMPT_TOKENS = 9
SEED = 6

UPSTREAM = "fake"
NOTE = (
    "load gen: percentiles of the load generator's samples (nearest rank, as load.py prints them), from the\n"
    "request's due time: gateway overhead, loopback and send lag included (a few ms). stats API: GET\n"
    "/api/v1/models, this endpoint's 5-minute window (upstream attempts, as the gateway times them). load\n"
    "binned: the gateway's histogram estimator run on the load generator's samples, so binned/load is what\n"
    "the estimator costs and API/binned what the two clocks differ by (API/load = their product); load's\n"
    "bin: the histogram bin (~21 % wide) the load generator's percentile falls in.\n"
)


# -- the upstream -------------------------------------------------------------------------------------------


def stream_fixture(tokens: int = TOKENS) -> bytes:
    """An OpenAI chat stream of `tokens` content events (one word each), in the shape of stream_ok.sse."""
    head = {
        "id": "chatcmpl-bench-stats",
        "object": "chat.completion.chunk",
        "created": 1741570283,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_06737a9306",
    }

    def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        doc = {**head, "choices": choices, "usage": usage}
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    def delta(d: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]

    words = [f" word{i}" for i in range(tokens)]
    events = [event(delta({"role": "assistant", "content": "", "refusal": None}))]
    events += [event(delta({"content": w})) for w in words]
    events.append(event(delta({}, "stop")))
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens, "total_tokens": PROMPT_TOKENS + tokens}
    events.append(event([], usage))
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def write_fixtures(directory: Path, tokens: int = TOKENS) -> Path:
    """The upstream's fixture set: the OpenAI fixtures, with a stream of `tokens` content events."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("chat_ok.json", "completion_ok.json", "embeddings_ok.json", "models_ok.json", "chat_500.json"):
        shutil.copyfile(FIXTURES / name, directory / name)
    (directory / "stream_ok.sse").write_bytes(stream_fixture(tokens))
    return directory


class Pacing(Faults):
    """No faults: a TTFT and an event gap drawn per POST (log-normal TTFT with a slow tail, uniform token rate).
    `counts["slow"]` counts the requests drawn from the tail."""

    def __init__(self, seed: int = SEED) -> None:
        super().__init__(seed=seed)
        self.active = True  # draw for every POST
        self.gap_s = 0.0  # the last draw's gap between stream events

    def draw(self) -> tuple[int, float]:
        rng = self._rng
        if rng.random() < TAIL_SHARE:
            self.counts["slow"] += 1
            ttft_ms = rng.lognormvariate(math.log(TAIL_MEDIAN_MS), TAIL_SIGMA)
        else:
            ttft_ms = rng.lognormvariate(math.log(TTFT_MEDIAN_MS), TTFT_SIGMA)
        self.gap_s = 1.0 / rng.uniform(*TOKEN_RATE)
        return 0, ttft_ms / 1000  # fake_upstream's "no fault"


class PacedUpstream(FakeOpenAI):
    """fake_upstream's protocol with the stream paced by the draw of its own request."""

    def __init__(self, routes: Routes, pacing: Pacing) -> None:
        super().__init__(routes, pacing, 0.0)
        self._pacing = pacing

    def _send(self, parts: list[bytes], keep_alive: bool, ttft_s: float) -> None:
        if len(parts) == 1 and not ttft_s and self._tail is None:
            super()._send(parts, keep_alive, 0.0)  # a GET (probe, /stats): at once
            return
        gap_s = self._pacing.gap_s if len(parts) > 1 else 0.0  # drawn for this request, just before
        self._tail = asyncio.ensure_future(self._paced(self._tail, parts, keep_alive, ttft_s, gap_s))

    async def _paced(
        self, previous: asyncio.Task[None] | None, parts: list[bytes], keep_alive: bool, ttft_s: float, gap_s: float
    ) -> None:
        if previous is not None:
            await previous
        transport = self._transport
        assert transport is not None
        head, *chunks = parts
        if ttft_s:
            await asyncio.sleep(ttft_s)
        transport.write(head + chunks[0] if chunks else head)  # the head goes with the first event
        for chunk in chunks[1:-1]:
            await asyncio.sleep(gap_s)
            transport.write(chunk)
        if len(chunks) > 1:
            transport.write(chunks[-1])
        if not keep_alive:
            transport.close()
        if self._tail is asyncio.current_task():
            self._tail = None


async def _serve_upstream(port: int, fixtures: Path, seed: int) -> None:
    loop = asyncio.get_running_loop()
    routes = Routes(fixtures=fixtures)
    pacing = Pacing(seed)
    server = await loop.create_server(
        lambda: PacedUpstream(routes, pacing), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"paced fake upstream on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


# -- the load generator, with its raw samples ---------------------------------------------------------------


def _load_main(argv: list[str]) -> None:
    """`python -m benchmarks.load ARGS`, whose JSON also carries every sample (ns, in arrival order)."""
    from benchmarks import load

    recorders: list[Any] = []
    base_recorder, base_run = load._Recorder, load.run

    class KeptRecorder(base_recorder):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            recorders.append(self)

    async def run_keeping(spec: Any) -> dict[str, Any]:
        result = await base_run(spec)
        rec = recorders[-1]
        result["ttfb_ns"], result["latency_ns"] = rec.ttfb_ns, rec.latency_ns  # paired: one append each
        return result

    load._Recorder, load.run = KeptRecorder, run_keeping  # type: ignore[misc]
    load.main(argv)


def run_load_raw(args: list[str], cpus: frozenset[int] | None, timeout_s: float) -> dict[str, Any]:
    """harness.run_load, through `_load_main`."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.stats", "load", *args],
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            timeout=timeout_s,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ServiceError(f"load generator still running after {timeout_s:g}s; killed") from None
    if out.returncode != 0:
        raise ServiceError(f"load generator failed ({out.returncode}): {out.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(out.stdout)


# -- percentiles --------------------------------------------------------------------------------------------


def nearest_rank_ms(sorted_ns: list[int], q: float) -> float | None:
    """load.py's rule (`_pct`): the nearest-rank percentile, in ms."""
    if not sorted_ns:
        return None
    return round(sorted_ns[max(0, math.ceil(q * len(sorted_ns)) - 1)] / 1e6, 4)


def binned_ms(samples_ns: list[int], q: float) -> float | None:
    """The gateway's estimator (health/window.py `RollingWindow.quantile`) run on these samples, in ms."""
    if not samples_ns:
        return None
    hist = [0] * BINS
    for ns in samples_ns:
        hist[bin_of(ns / 1e9)] += 1
    cum = list(accumulate(hist))
    total = cum[-1]
    return round(value_at(cum, min(max(q * total, 1e-9), total)) * 1000, 4)


def bin_edges_ms(ms: float | None) -> tuple[float, float] | None:
    """The histogram bin a duration falls in, as [low, high) ms (None: the underflow or overflow bin)."""
    if ms is None:
        return None
    i = bin_of(ms / 1000)
    if not 1 <= i <= LOG_BINS:
        return None
    return round(EDGES[i - 1] * 1000, 1), round(EDGES[i] * 1000, 1)


# -- the scenario -------------------------------------------------------------------------------------------


def run(opts: Options) -> int:
    plan = cpu_plan()
    rate = opts.rate or RATE
    duration = opts.duration_s or (QUICK_DURATION_S if opts.quick else DURATION_S)
    rounds = opts.rounds or 1
    if duration > MAX_DURATION_S:
        print(f"error: --duration must be ≤ {MAX_DURATION_S:g} s: the stats API's window is 5 minutes", file=sys.stderr)
        return 2
    settings = {
        "rate": rate,
        "duration_s": duration,
        "rounds": rounds,
        "connections": CONNECTIONS,
        "ttft": f"log-normal, median {TTFT_MEDIAN_MS:g} ms, sigma {TTFT_SIGMA:g}",
        "tail": f"{TAIL_SHARE:.0%} of requests: log-normal, median {TAIL_MEDIAN_MS:g} ms, sigma {TAIL_SIGMA:g}",
        "tokens": TOKENS,
        "token_rate_tps": TOKEN_RATE,
        "quick": opts.quick,
    }
    host = banner(
        "stats",
        f"{rounds} run(s) × {duration:g} s of streamed requests, open loop {rate:g} req/s, a fresh gateway each\n"
        f"upstream: TTFT log-normal (median {TTFT_MEDIAN_MS:g} ms, σ {TTFT_SIGMA:g}), {TAIL_SHARE:.0%} from a tail "
        f"(median {TAIL_MEDIAN_MS:g} ms, σ {TAIL_SIGMA:g}); {TOKENS} tokens at {TOKEN_RATE[0]:g}–{TOKEN_RATE[1]:g} "
        f"tokens/s\n(one HTTP chunk per SSE event, {TOKENS + 4} events)",
        plan,
    )
    runs: list[dict[str, Any]] = []
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            fixtures = write_fixtures(Path(tmp) / "fixtures")
            for r in range(rounds):
                result = _one(plan, Path(tmp), fixtures, rate, duration, SEED + r)
                runs.append(result)
                progress(f"run {r + 1}/{rounds}: {_brief(result)}")
    except ServiceError as e:
        return startup_failed(e)

    checks: list[dict[str, Any]] = []
    for i, result in enumerate(runs):
        if len(runs) > 1:
            print(f"run {i + 1} of {len(runs)}")
        print(_table(result))
        checks += _checks(result, f"run {i + 1}: " if len(runs) > 1 else "")
    print(NOTE, end="")
    print(verdicts(checks, opts.quick))
    for result in runs:  # the raw samples stay out of the report
        result["load"].pop("ttfb_ns", None)
        result["load"].pop("latency_ns", None)
    write_report(
        opts,
        {
            "scenario": "stats",
            "settings": settings,
            "machine": host,
            "pinning": plan.describe(),
            "checks": checks,
            "runs": runs,
        },
    )
    return exit_status(checks, opts.quick)


def _start_upstream(port: int, fixtures: Path, seed: int, plan: CpuPlan, log_dir: Path) -> Upstream:
    args = ["-m", "benchmarks.stats", "upstream", "--port", str(port), "--fixtures", str(fixtures)]
    service = Service(UPSTREAM, [*args, "--seed", str(seed)], plan.load, log_dir)
    try:
        service.wait_ready(http_ok(port, "/stats"))
    except ServiceError:
        service.stop()
        raise
    return Upstream(UPSTREAM, port, service)


def _endpoint(port: int) -> dict[str, Any]:
    """The model's one endpoint, as `GET /api/v1/models` shows it."""
    models = get_json(port, "/api/v1/models", key=GATEWAY_KEY)["data"]
    found = [ep for m in models if m["id"] == MODEL for ep in m["endpoints"]]
    if len(found) != 1:
        raise ServiceError(f"GET /api/v1/models: expected one endpoint of {MODEL}, got {len(found)}")
    return found[0]


def _one(plan: CpuPlan, tmp: Path, fixtures: Path, rate: float, duration: float, seed: int) -> dict[str, Any]:
    """A fresh upstream and gateway, one load run, the stats API read right after it, both stopped."""
    up_port, gw_port = free_ports(2)
    upstream = _start_upstream(up_port, fixtures, seed, plan, tmp)
    try:
        started = time.monotonic()
        gateway = start_gateway(f"gateway-{seed}", gw_port, gateway_config(gw_port, [upstream.provider]), plan, tmp)
        try:
            args = load_args(gw_port, rate=rate, duration=duration)
            args += ["--stream", "--expect", str(fixtures / "stream_ok.sse"), "--connections", str(CONNECTIONS)]
            with gateway_cpu(plan, gateway) as cpu:
                result = run_load_raw(args, plan.load, timeout_s=duration + 60)
            time.sleep(SETTLE_S)
            up_before = upstream.stats()
            endpoint = _endpoint(gw_port)
            up_after = upstream.stats()
            window_s = time.monotonic() - started
        finally:
            gateway.stop()
    finally:
        upstream.service.stop()
    return {
        "seed": seed,
        "load": result,
        "stats_api": endpoint,
        "upstream_before_read": up_before,
        "upstream_after_read": up_after,
        "gateway_age_at_read_s": round(window_s, 1),
        "gateway_cpu_pct": round(100 * (cpu["gateway_cpu_s"] or 0.0) / result["elapsed_s"], 1),
        "other_load_pct": cpu["other_load_pct"],
        **_compare(result, endpoint),
    }


def _compare(load: dict[str, Any], ep: dict[str, Any]) -> dict[str, Any]:
    ttfb_ns, latency_ns = load["ttfb_ns"], load["latency_ns"]
    out: dict[str, Any] = {}
    for kind, samples, api in (("ttft", ttfb_ns, ep["ttft_ms"]), ("latency", latency_ns, ep["latency_ms"])):
        ordered = sorted(samples)
        rows = {}
        for name, q in QUANTILES:
            client = nearest_rank_ms(ordered, q)
            gateway = api[name]
            binned = binned_ms(samples, q)
            rows[name] = {
                "load": client,
                "api": gateway,
                "ratio": ratio(gateway, client),
                "diff_ms": None if gateway is None or client is None else round(gateway - client, 3),
                "load_binned": binned,
                "binned_ratio": ratio(binned, client),
                "bin_ms": bin_edges_ms(client),
            }
        out[kind] = rows
    # The generator's own p50/p99 (load.py's JSON) must equal the ones computed here from its samples.
    out["load_self_consistent"] = (
        out["latency"]["p50"]["load"] == load["p50"]
        and out["latency"]["p99"]["load"] == load["p99"]
        and out["ttft"]["p50"]["load"] == load["ttfb_p50"]
        and out["ttft"]["p99"]["load"] == load["ttfb_p99"]
    )
    gen_s = sum(lat - ttfb for lat, ttfb in zip(latency_ns, ttfb_ns, strict=True)) / 1e9
    out["load_tps"] = round(TOKENS * len(latency_ns) / gen_s, 1) if gen_s > 0 else None  # first token to last
    return out


def _probes(r: dict[str, Any]) -> tuple[int, int]:
    """Health probes the upstream served (GETs) before and after the stats API was read: the range of what
    the window may hold besides the run's requests."""
    return r["upstream_before_read"]["gets"], r["upstream_after_read"]["gets"]


def _brief(r: dict[str, Any]) -> str:
    t, lat, ep = r["ttft"], r["latency"], r["stats_api"]
    return (
        f"{r['load']['count']} requests ({r['load']['errors']} failed), requests_5m {ep['requests_5m']}; "
        f"TTFT p50/p90/p99 ratio {'/'.join(fmt(t[q]['ratio'], '.3f') for q, _ in QUANTILES)}, "
        f"latency {'/'.join(fmt(lat[q]['ratio'], '.3f') for q, _ in QUANTILES)}"
    )


def _table(r: dict[str, Any]) -> str:
    columns = ("load gen", "stats API", "API/load", "load binned", "binned/load", "API/binned", "load's bin")
    rows: list[tuple[str, list[str]]] = []
    for kind, label in (("ttft", "TTFT"), ("latency", "latency")):
        for q, _ in QUANTILES:
            c = r[kind][q]
            bin_ms = c["bin_ms"]
            rows.append(
                (
                    f"{label} {q} (ms)",
                    [
                        fmt(c["load"], ".2f"),
                        fmt(c["api"], ".2f"),
                        fmt(c["ratio"], ".3f"),
                        fmt(c["load_binned"], ".2f"),
                        fmt(c["binned_ratio"], ".3f"),
                        fmt(ratio(c["api"], c["load_binned"]), ".3f"),
                        "—" if bin_ms is None else f"{bin_ms[0]:g}–{bin_ms[1]:g}",
                    ],
                )
            )
    ep, load = r["stats_api"], r["load"]
    lo, hi = _probes(r)
    probes = f"{lo}" if lo == hi else f"{lo}–{hi}"

    def one(label: str, value: Any, spec: str = "") -> tuple[str, list[str]]:
        return label, [fmt(value, spec)]

    counts = [
        one("requests sent (load generator)", load["count"], "d"),
        one("  answered 200", load["ok"], "d"),
        one("  failed", load["errors"], "d"),
        one("  stream bodies differing", load.get("mismatches"), "d"),
        one("upstream POSTs served", r["upstream_before_read"]["requests"], "d"),
        one("  from the slow tail", r["upstream_before_read"]["slow"], "d"),
        one("health probes served (upstream GETs)", probes),
        one("stats API requests_5m", ep["requests_5m"], "d"),
        one("  − requests sent", ep["requests_5m"] - load["count"], "+d"),
        one("stats API errors_5m", ep["errors_5m"], "d"),
        one("stats API throughput_tps", ep["throughput_tps"], ".1f"),
        one("load gen tokens/s, first to last byte", r["load_tps"], ".1f"),
        one("  API/load", ratio(ep["throughput_tps"], r["load_tps"]), ".3f"),
        one("gateway age when read (s)", r["gateway_age_at_read_s"], ".1f"),
        one("open-loop send lag p99 (ms)", load["sched_lag"]["p99"], ".3f"),
        one("gateway CPU %", r["gateway_cpu_pct"], ".0f"),
        one("other load on gateway's CPU %", r["other_load_pct"], ".0f"),
    ]
    return table(columns, rows, label_width=20) + "\n\n" + table(("",), counts) + "\n"


def _checks(r: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    lo_ok, hi_ok = AGREEMENT
    out = []
    for kind, label in (("ttft", "TTFT"), ("latency", "latency")):
        for q, _ in QUANTILES:
            c = r[kind][q]
            x = c["ratio"]
            out.append(
                check(
                    f"{prefix}stats API {label} {q} within 10 % of the load generator's",
                    "performance",
                    None if x is None else lo_ok <= x <= hi_ok,
                    f"{fmt(c['api'], '.2f')} vs {fmt(c['load'], '.2f')} ms = {fmt(x, '.3f')} "
                    f"(the estimator alone, on the load generator's samples: {fmt(c['binned_ratio'], '.3f')})",
                )
            )
    ep, load = r["stats_api"], r["load"]
    lo, hi = _probes(r)
    extra = ep["requests_5m"] - load["count"]
    out += [
        check(
            f"{prefix}stats API requests_5m = requests sent + health probes",
            "correctness",
            lo <= extra <= hi,
            f"{ep['requests_5m']} = {load['count']} sent + {extra} (probes served: {lo if lo == hi else f'{lo}–{hi}'})",
        ),
        check(
            f"{prefix}load generator's p50/p99 as printed = as computed from its samples",
            "correctness",
            r["load_self_consistent"],
            "same" if r["load_self_consistent"] else "differ",
        ),
        check(f"{prefix}no failed requests", "correctness", load["errors"] == 0, f"{load['errors']} failed"),
        check(
            f"{prefix}every relayed stream byte-identical to the upstream's",
            "correctness",
            load.get("mismatches") == 0,
            f"{load.get('mismatches')}/{load['ok']} differ",
        ),
    ]
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:
        _load_main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stats upstream", description="the paced fake upstream")
    parser.add_argument("role", choices=("upstream",))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fixtures", type=Path, required=True, help="a directory from write_fixtures()")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_serve_upstream(args.port, args.fixtures, args.seed))


if __name__ == "__main__":
    main()
