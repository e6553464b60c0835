"""The `throughput` scenario: the most requests per second Hedgerow serves, next to the references, and how
that scales with `--workers`.

Issue #7 asks for "closed-loop max requests/s ≥ 1.5× the bare aiohttp pass-through's; with `--workers 2` on
2 cores, ≥ 1.6× one worker", and for throughput as "the highest rate whose p99 stays under a bound". Every
figure is put next to a baseline of the same run: the machine is shared, so absolute figures drift.

1. **Closed loop, pinned** as in `overhead` (the proxy under test alone on the last CPU; the load generator,
   the fake upstream and this orchestrator on the other(s)): every target at a few concurrencies (16, 32,
   64), the best of them; rounds in a rotating order, the median over rounds. Targets: `direct` (the
   upstream alone), `bare` (benchmarks/bare_proxy.py), `nginx` (when on PATH), LiteLLM's proxy and Portkey's
   gateway (when running or on PATH: benchmarks/README.md), the gateway with one worker on each server
   engine. Also each proxy's CPU time per request, which other tenants disturb far less than req/s.
2. **Workers, unpinned**: the gateway with `--workers 1` and `--workers 2`, each engine, in front of a fake
   upstream of its own, with nothing pinned. On 2 CPUs the generator and the upstream need CPU too, so two
   workers cannot have two CPUs' worth; the table gives the ceiling the measured CPU per request allows,
   and requests per gateway-CPU-second for 1 vs 2 workers (do workers cost anything per request?).
3. **Open-loop sweep, pinned**: the arrival rate steps up (500, 1,000, 1,500 … req/s, a few seconds each)
   for direct, bare, the references and both engines, interleaved (every target at one rate, then the
   next); a target's throughput is the highest rate whose p99 stays ≤ the bound (`P99_BOUND_MS`, or
   `HEDGEROW_BENCH_P99_BOUND_MS`), and its sweep stops at its first failing step. A failing step is run once
   more before it counts: one stall of a shared machine should not end a sweep.

Run alone as a load generator that also sends request headers (Portkey routes by them):
`python -m benchmarks.throughput load --header "Name: value" … <benchmarks.load arguments>`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from benchmarks.harness import (
    CLK_TCK,
    NGINX_MISSING,
    CpuPlan,
    Service,
    ServiceError,
    cpu_plan,
    cpu_ticks,
    free_ports,
    http_ok,
    listeners,
    nginx_service,
    run_load,
)
from benchmarks.kit import (
    CHAT_PATH,
    GATEWAY_KEY,
    MODEL,
    UPSTREAM_MODEL,
    GatewayDown,
    banner,
    check,
    exit_status,
    fmt,
    orchestrator_on,
    progress,
    startup_failed,
    table,
    verdicts,
)

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

# Acceptance targets (issue #7).
MIN_VS_BARE = 1.5  # gateway closed-loop max req/s over the bare proxy's
MIN_SCALING = 1.6  # --workers 2 over --workers 1, on 2 cores
MAX_CPU_GROWTH = 1.1  # gateway CPU per request, 2 workers over 1: workers must not cost per request

P99_BOUND_MS = 10.0  # open-loop sweep: the highest rate whose p99 stays at or under this
CONCURRENCIES, QUICK_CONCURRENCIES = (16, 32, 64), (32,)
DURATION_S, QUICK_DURATION_S = 3.0, 0.5  # per load run
ROUNDS, QUICK_ROUNDS = 3, 1  # closed-loop rounds
WARMUP_S, QUICK_WARMUP_S = 1.0, 0.3
RATE_STEP, MAX_RATE, QUICK_STEPS = 500.0, 10_000.0, 2  # the sweep: step, step, … up to MAX_RATE
ENGINES = ("aiohttp", "lean")
WORKERS = 2
MIN_WORKER_SHARE = 0.2  # with 2 workers, each must have done at least this share of the gateway's work
FIXED_RATE = 1000.0  # workers part: also an open-loop run at this rate, CPU per request at equal load

BOUND_ENV = "HEDGEROW_BENCH_P99_BOUND_MS"
UPSTREAM_PORT_ENV = "HEDGEROW_BENCH_UPSTREAM_PORT"  # a fixed port for the pinned fake upstream (for peers)
LITELLM_ENV = "HEDGEROW_BENCH_LITELLM_URL"  # an already-running LiteLLM proxy, e.g. http://127.0.0.1:4000
PORTKEY_ENV = "HEDGEROW_BENCH_PORTKEY_URL"  # an already-running Portkey gateway, e.g. http://127.0.0.1:8787
FAKE_KEY = "sk-bench-upstream"  # what peers send the fake upstream (which checks nothing)


LITELLM_CONF = """\
model_list:
  - model_name: {model}
    litellm_params: {{model: "openai/{model}", api_base: "http://127.0.0.1:{upstream}/v1", api_key: {key}}}
"""


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    service: Service | None  # None: a peer someone else started (not pinned; its CPU is not counted)
    model: str = UPSTREAM_MODEL
    key: str | None = None
    headers: tuple[str, ...] = ()  # "Name: value", sent with every request (Portkey routes by them)
    workers: int = 1

    def load_args(self, mode: str, duration: float, concurrency: int = 32, rate: float = 0.0) -> list[str]:
        args = ["--url", f"http://127.0.0.1:{self.port}{CHAT_PATH}", "--model", self.model]
        args += ["--mode", mode, "--duration", f"{duration:g}"]
        args += ["--concurrency", str(concurrency)] if mode == "closed" else ["--rate", f"{rate:g}"]
        if self.key:
            args += ["--key", self.key]
        for header in self.headers:
            args += ["--header", header]
        return args

    @property
    def module(self) -> str:
        return "benchmarks.throughput load" if self.headers else "benchmarks.load"


@dataclass
class Setup:
    upstream: Service  # pinned, on the load generator's core(s)
    free_upstream: Service  # unpinned, for the workers part
    pinned: list[Target]  # direct first, then bare, the references, the gateways
    scaling: list[Target]  # per engine: 1 worker, then WORKERS
    notes: list[str]


def run(opts: Options) -> int:
    plan = cpu_plan()
    all_cpus = frozenset(os.sched_getaffinity(0))
    bound = float(os.environ.get(BOUND_ENV) or P99_BOUND_MS)
    rounds = opts.rounds or (QUICK_ROUNDS if opts.quick else ROUNDS)
    duration = opts.duration_s or (QUICK_DURATION_S if opts.quick else DURATION_S)
    warmup = QUICK_WARMUP_S if opts.quick else WARMUP_S
    concurrencies = QUICK_CONCURRENCIES if opts.quick else CONCURRENCIES
    step = opts.rate or RATE_STEP
    steps = QUICK_STEPS if opts.quick else int(MAX_RATE // step)
    rates = [step * (i + 1) for i in range(max(1, steps))]
    settings = {
        "rounds": rounds,
        "duration_s": duration,
        "warmup_s": warmup,
        "concurrencies": list(concurrencies),
        "rates": rates,
        "p99_bound_ms": bound,
        "workers": WORKERS,
        "engines": list(ENGINES),
        "quick": opts.quick,
    }
    host = banner(
        "throughput",
        f"closed loop c={'/'.join(map(str, concurrencies))} (best of), {rounds} round(s) × {duration:g} s per run; "
        f"gateway: 1 worker per engine ({', '.join(ENGINES)}), and 1 vs {WORKERS} workers unpinned\n"
        f"open-loop sweep: {rates[0]:,.0f} … {rates[-1]:,.0f} req/s in steps of {step:,.0f}, {duration:g} s each, "
        f"highest rate with p99 ≤ {bound:g} ms",
        plan,
    )
    services: list[Service] = []
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            try:
                setup = _start(Path(tmp), plan, services)
                for note in setup.notes:
                    print(f"note: {note}", flush=True)
                closed, fixed = _closed_rounds(setup, plan, all_cpus, rounds, concurrencies, duration, warmup)
                sweep = _sweep(setup.pinned, plan, rates, duration, bound, retry=not opts.quick)
            finally:
                for service in reversed(services):
                    service.stop()
    except ServiceError as e:
        return startup_failed(e)

    pinned = [t.name for t in setup.pinned]
    scaling = [t.name for t in setup.scaling]
    summary = {name: _summarize(closed[name], fixed.get(name, [])) for name in (*pinned, *scaling)}
    ratios = _ratios(closed, fixed, pinned, len(all_cpus))
    checks = _checks(summary, ratios, closed)
    print()
    print(_closed_table(summary, ratios, pinned, concurrencies, rounds, plan))
    print()
    print(_scaling_table(summary, ratios, scaling, len(all_cpus)))
    print()
    print(_sweep_table(sweep, pinned, rates, bound, duration))
    print(verdicts(checks, opts.quick))
    report: dict[str, Any] = {
        "scenario": "throughput",
        "settings": settings,
        "machine": host,
        "pinning": plan.describe(),
        "notes": setup.notes,
        "summary": summary,
        "ratios": ratios,
        "sweep": sweep,
        "checks": checks,
        "closed": closed,
        "fixed_rate": fixed,
    }
    if opts.json_path is not None:
        report["charts"] = _charts(opts.json_path, report)
        opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    else:
        print("charts: pass --json FILE to get PNG charts next to it")
    return exit_status(checks, opts.quick)


# -- the processes -------------------------------------------------------------------------------------------


def _start(tmp: Path, plan: CpuPlan, services: list[Service]) -> Setup:
    def started(service: Service, probe: Callable[[], bool], timeout_s: float = 20.0) -> Service:
        services.append(service)
        service.wait_ready(probe, timeout_s)
        return service

    ports = iter(free_ports(16))  # chosen at once, so none repeats (a server not yet bound holds none)
    fixed = os.environ.get(UPSTREAM_PORT_ENV)
    up_port, free_up_port, bare_port = int(fixed) if fixed else next(ports), next(ports), next(ports)
    upstream_args = ["-m", "benchmarks.fake_upstream", "--port"]
    upstream = started(Service("upstream", [*upstream_args, str(up_port)], plan.load, tmp), http_ok(up_port, "/stats"))
    free_up = started(
        Service("upstream-unpinned", [*upstream_args, str(free_up_port)], None, tmp), http_ok(free_up_port, "/stats")
    )
    bare_args = ["-m", "benchmarks.bare_proxy", "--port", str(bare_port), "--upstream", f"http://127.0.0.1:{up_port}"]
    bare = started(Service("bare", bare_args, plan.proxy, tmp), http_ok(bare_port, "/v1/models"))
    pinned = [Target("direct", up_port, upstream), Target("bare", bare_port, bare)]
    notes: list[str] = []
    pinned += _references(tmp, plan, up_port, fixed is not None, started, notes, ports)

    # Every gateway starts at once (their start-ups overlap), then each is waited for.
    gateways: list[tuple[Target, list[Target], int]] = []
    for engine in ENGINES:
        port = next(ports)
        service = _gateway(f"gateway-{engine}", port, up_port, engine, 1, plan.proxy, tmp)
        services.append(service)
        gateways.append((Target(f"gw {engine}", port, service, MODEL, GATEWAY_KEY), pinned, 1))
    scaling: list[Target] = []
    for engine in ENGINES:
        for workers in (1, WORKERS):
            port = next(ports)
            service = _gateway(f"gateway-{engine}-{workers}w", port, free_up_port, engine, workers, None, tmp)
            services.append(service)
            target = Target(f"{engine} {workers}w", port, service, MODEL, GATEWAY_KEY, workers=workers)
            gateways.append((target, scaling, workers))
    for target, group, workers in gateways:
        assert target.service is not None
        try:
            target.service.wait_ready(_all_listening(target.port, workers), timeout_s=30)
        except ServiceError as e:
            raise GatewayDown(str(e)) from None
        group.append(target)
    return Setup(upstream, free_up, pinned, scaling, notes)


def _gateway(
    name: str, port: int, upstream_port: int, engine: str, workers: int, cpus: frozenset[int] | None, log_dir: Path
) -> Service:
    """overhead's gateway (one key, one provider, one model) on this engine, its ledger with the run's logs."""
    path = log_dir / f"{name}.yaml"
    path.write_text(
        f"server: {{host: 127.0.0.1, port: {port}, engine: {engine}}}\n"
        f"keys:\n  - {{name: bench, key: {GATEWAY_KEY}}}\n"
        f'providers:\n  - {{name: fake, base-url: "http://127.0.0.1:{upstream_port}/v1"}}\n'
        f"models:\n  - name: {MODEL}\n    endpoints: [{{provider: fake, model: {UPSTREAM_MODEL}}}]\n"
        f'accounting: {{store: {{path: "{log_dir / (name + ".db")}"}}}}\n'
    )
    args = ["-m", "proxy", "serve", "--config", str(path), "--workers", str(workers)]
    return Service(name, args, cpus, log_dir)


def _all_listening(port: int, workers: int) -> Callable[[], bool]:
    """Ready, and every worker listening (SO_REUSEPORT: a worker not yet listening would get no connections)."""
    ready = http_ok(port, "/readyz")
    return lambda: listeners(port) >= workers and ready()


def _references(
    tmp: Path,
    plan: CpuPlan,
    up_port: int,
    fixed_port: bool,
    started: Callable[..., Service],
    notes: list[str],
    ports: Iterator[int],
) -> list[Target]:
    """nginx and the peers that are there; a note for each that is not. Nothing is ever downloaded."""
    out: list[Target] = []
    port = next(ports)
    nginx = nginx_service(tmp, plan.proxy, up_port, port)
    if nginx is None:
        notes.append(NGINX_MISSING)
    else:
        out.append(Target("nginx", port, started(nginx, http_ok(port, "/v1/models"))))

    litellm_url, litellm = os.environ.get(LITELLM_ENV), shutil.which("litellm")
    if litellm_url and not fixed_port:
        notes.append(f"litellm: {LITELLM_ENV} is set but {UPSTREAM_PORT_ENV} is not (the upstream it calls), skipped")
    elif litellm_url:
        out.append(Target("litellm", _port(litellm_url), None, key=os.environ.get("HEDGEROW_BENCH_LITELLM_KEY")))
    elif litellm is not None:
        port = next(ports)
        conf = tmp / "litellm.yaml"
        conf.write_text(LITELLM_CONF.format(model=UPSTREAM_MODEL, upstream=up_port, key=FAKE_KEY))
        args = ["--config", str(conf), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
        service = Service("litellm", args, plan.proxy, tmp, exe=litellm)
        out.append(Target("litellm", port, started(service, http_ok(port, "/health/liveliness"), 120)))
    else:
        notes.append(f"litellm: not on PATH and {LITELLM_ENV} not set, skipped (benchmarks/README.md: install)")

    portkey_url, portkey = os.environ.get(PORTKEY_ENV), _portkey_bin()
    headers = ("x-portkey-provider: openai", f"x-portkey-custom-host: http://127.0.0.1:{up_port}/v1")
    if portkey_url:
        out.append(Target("portkey", _port(portkey_url), None, key=FAKE_KEY, headers=headers))
    elif portkey is not None:
        port = next(ports)
        service = Service("portkey", [f"--port={port}", "--headless"], plan.proxy, tmp, exe=portkey)
        out.append(Target("portkey", port, started(service, http_ok(port, "/"), 60), key=FAKE_KEY, headers=headers))
    else:
        notes.append(f"portkey: no @portkey-ai/gateway on PATH and {PORTKEY_ENV} not set, skipped")
    return out


def _portkey_bin() -> str | None:
    """`npm install -g @portkey-ai/gateway` puts its server on PATH as `gateway`: that one, not any other."""
    path = shutil.which("gateway")
    return path if path and "@portkey-ai/gateway" in os.path.realpath(path) else None


def _port(url: str) -> int:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost") or parts.port is None:
        raise ServiceError(f"{url!r}: give a peer as http://127.0.0.1:PORT (loopback only)")
    return parts.port


# -- closed loop ---------------------------------------------------------------------------------------------


def _closed_rounds(
    setup: Setup,
    plan: CpuPlan,
    all_cpus: frozenset[int],
    rounds: int,
    concurrencies: Sequence[int],
    duration: float,
    warmup: float,
) -> tuple[dict[str, list[list[dict[str, Any]]]], dict[str, list[dict[str, Any]]]]:
    """Closed loop: target → round → one result per concurrency, pinned targets first, then the unpinned ones;
    and for the unpinned ones, target → one open-loop run at FIXED_RATE per round (equal load, so CPU per
    request compares without the batching a saturated worker gets)."""
    groups = [(setup.pinned, setup.upstream, plan.load, plan.proxy), (setup.scaling, setup.free_upstream, None, None)]
    for targets, _, load_cpus, _ in groups:  # warm pools and first-call paths; not recorded
        for t in targets:
            run_load(t.load_args("closed", warmup), load_cpus, warmup + 60, t.module)
    out: dict[str, list[list[dict[str, Any]]]] = {t.name: [] for g in groups for t in g[0]}
    fixed: dict[str, list[dict[str, Any]]] = {t.name: [] for t in setup.scaling}
    for r in range(rounds):
        for targets, upstream, load_cpus, proxy_cpus in groups:
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            watch, pinned = (proxy_cpus, True) if proxy_cpus is not None else (all_cpus, False)
            for t in order:
                results = []
                for c in concurrencies:
                    args = t.load_args("closed", duration, concurrency=c)
                    results.append(_measure(t, upstream, args, load_cpus, watch, pinned))
                    progress(f"round {r + 1}/{rounds} {t.name:<11} c={c:<3} {_brief(results[-1])}")
                out[t.name].append(results)
                if t.name in fixed:
                    args = t.load_args("open", duration, rate=FIXED_RATE)
                    fixed[t.name].append(_measure(t, upstream, args, load_cpus, watch, pinned))
                    progress(f"round {r + 1}/{rounds} {t.name:<11} {FIXED_RATE:,.0f}/s {_brief(fixed[t.name][-1])}")
    return out, fixed


def _measure(
    t: Target,
    upstream: Service,
    args: list[str],
    load_cpus: frozenset[int] | None,
    watch: frozenset[int],
    pinned: bool,
) -> dict[str, Any]:
    """One load run, with the CPU each side used. `watch`: the CPUs the proxy may run on (`pinned`: its
    own core, where the upstream and the generator do not run), whose busy time not spent by our processes
    is "other load" (other tenants, kernel work charged to no process)."""
    proxy = t.service if t.service is not None and t.service is not upstream else None
    proxy_before = proxy.cpu_by_pid() if proxy else {}
    up_before = upstream.cpu_seconds()
    ticks_before = cpu_ticks(watch)
    result = run_load(args, load_cpus, float(args[args.index("--duration") + 1]) + 60, t.module)
    busy, total = (now - then for now, then in zip(cpu_ticks(watch), ticks_before, strict=True))
    result["upstream_cpu_s"] = round(upstream.cpu_seconds() - up_before, 3)
    result["generator_cpu_s"] = round((result["generator_cpu_pct"] or 0) * result["elapsed_s"] / 100, 3)
    ours = 0.0 if pinned else result["upstream_cpu_s"] + result["generator_cpu_s"]
    if proxy is not None:
        per_pid = {pid: s - proxy_before.get(pid, 0.0) for pid, s in proxy.cpu_by_pid().items()}
        result["proxy_cpu_s"] = round(sum(per_pid.values()), 3)
        result["worker_cpu_s"] = sorted((round(s, 3) for s in per_pid.values() if s > 0), reverse=True)
        ours += result["proxy_cpu_s"]
    result["busy_pct"] = round(100 * busy / total, 1) if total else None  # of the watched CPUs
    result["other_load_pct"] = round(100 * max(0.0, busy - ours * CLK_TCK) / total, 1) if total else None
    return result


def _brief(r: dict[str, Any]) -> str:
    text = f"{r['rps']:>8,.0f} req/s  p99 {fmt(r['p99'], '.2f')} ms"
    if r.get("proxy_cpu_s") and r["ok"]:
        text += f"  proxy {1e6 * r['proxy_cpu_s'] / r['ok']:.0f} µs/req"
    if r["errors"]:
        text += f"  {r['errors']} errors {r['error_kinds']}"
    return text


def _best(results: list[dict[str, Any]]) -> dict[str, Any]:
    return max(results, key=lambda r: r["rps"])


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def _per_req_us(r: dict[str, Any], *keys: str) -> float | None:
    if not r["ok"] or any(r.get(k) is None for k in keys):
        return None
    return 1e6 * sum(r[k] for k in keys) / r["ok"]


def _summarize(rounds: list[list[dict[str, Any]]], fixed: list[dict[str, Any]]) -> dict[str, Any]:
    bests = [_best(rs) for rs in rounds]
    rps = [b["rps"] for b in bests]
    split = [b["worker_cpu_s"][0] / sum(b["worker_cpu_s"]) for b in bests if len(b.get("worker_cpu_s", [])) > 1]
    return {
        "rps": _median(rps),
        "rps_range": f"{min(rps):,.0f}–{max(rps):,.0f}",
        "best_c": Counter(b["concurrency"] for b in bests).most_common(1)[0][0],
        "p99": _median([b["p99"] for b in bests]),
        "proxy_cpu_pct": _median([_pct_of(b.get("proxy_cpu_s"), b["elapsed_s"]) for b in bests]),
        "proxy_us": _median([_per_req_us(b, "proxy_cpu_s") for b in bests]),
        "rps_per_cpu_s": _median([b["ok"] / b["proxy_cpu_s"] if b.get("proxy_cpu_s") else None for b in bests]),
        "others_us": _median([_per_req_us(b, "upstream_cpu_s", "generator_cpu_s") for b in bests]),
        "busiest_worker_share": _median(split),
        "busy_pct": _median([b["busy_pct"] for b in bests]),
        "other_load_pct": _median([r["other_load_pct"] for rs in rounds for r in rs]),
        "errors": sum(r["errors"] for rs in rounds for r in rs),
        "requests": sum(r["count"] for rs in rounds for r in rs),
        "fixed_us": _median([_per_req_us(r, "proxy_cpu_s") for r in fixed]),
        "fixed_p99": _median([r["p99"] for r in fixed]),
        "fixed_errors": sum(r["errors"] for r in fixed),
    }


def _pct_of(cpu_s: float | None, elapsed_s: float) -> float | None:
    return None if cpu_s is None or not elapsed_s else 100 * cpu_s / elapsed_s


def _per_round(pairs: Iterable[tuple[dict[str, Any], dict[str, Any]]], fn: Any) -> dict[str, Any]:
    """fn(x, y) for the runs of each round (same round: the drift of a noisy machine cancels), median."""
    values = [fn(x, y) for x, y in pairs]
    present = [v for v in values if v is not None]
    return {
        "median": _median(present),
        "range": f"{min(present):.2f}–{max(present):.2f}" if present else None,
        "rounds": [None if v is None else round(v, 3) for v in values],
    }


def _rps_ratio(x: dict[str, Any], y: dict[str, Any]) -> float | None:
    return x["rps"] / y["rps"] if y["rps"] else None


def _cpu_ratio(x: dict[str, Any], y: dict[str, Any]) -> float | None:
    """Requests per proxy CPU-second, x over y."""
    if not (x.get("proxy_cpu_s") and y.get("proxy_cpu_s") and y["ok"]):
        return None
    return (x["ok"] / x["proxy_cpu_s"]) / (y["ok"] / y["proxy_cpu_s"])


def _us_ratio(x: dict[str, Any], y: dict[str, Any]) -> float | None:
    """Proxy CPU per request, x over y."""
    x_us, y_us = _per_req_us(x, "proxy_cpu_s"), _per_req_us(y, "proxy_cpu_s")
    return x_us / y_us if x_us and y_us else None


def _ratios(
    closed: dict[str, list[list[dict[str, Any]]]], fixed: dict[str, list[dict[str, Any]]], pinned: list[str], ncpu: int
) -> dict[str, Any]:
    def bests(a: str, b: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        return [(_best(x), _best(y)) for x, y in zip(closed[a], closed[b], strict=True)]

    out: dict[str, Any] = {}
    for name in pinned:
        if name not in ("direct", "bare"):
            out[f"{name} / bare"] = _per_round(bests(name, "bare"), _rps_ratio)
            out[f"{name} / bare, per CPU-s"] = _per_round(bests(name, "bare"), _cpu_ratio)
    for engine in ENGINES:
        one, many = f"{engine} 1w", f"{engine} {WORKERS}w"
        out[f"{engine} {WORKERS}w / 1w"] = _per_round(bests(many, one), _rps_ratio)
        out[f"{engine} {WORKERS}w / 1w, per CPU-s"] = _per_round(bests(many, one), _cpu_ratio)
        out[f"{engine} {WORKERS}w / 1w, CPU per request at {FIXED_RATE:g}/s"] = _per_round(
            zip(fixed[many], fixed[one], strict=True), _us_ratio
        )

        def ceiling(x: dict[str, Any], y: dict[str, Any]) -> float | None:
            """The most x (N workers) can beat y (1 worker) by here: y filling one CPU at its CPU per request,
            x filling every CPU with the gateway, the upstream and the generator at x's CPU per request."""
            total, alone = (
                _per_req_us(x, "proxy_cpu_s", "upstream_cpu_s", "generator_cpu_s"),
                _per_req_us(y, "proxy_cpu_s"),
            )
            return min(WORKERS, ncpu * alone / total) if total and alone else None

        out[f"{engine} {WORKERS}w / 1w, ceiling"] = _per_round(bests(many, one), ceiling)
    return out


# -- open-loop sweep -----------------------------------------------------------------------------------------


def _sweep(
    targets: list[Target], plan: CpuPlan, rates: list[float], duration: float, bound: float, retry: bool
) -> dict[str, dict[str, Any]]:
    """Every target at each rate in turn, until its first failing step (p99 over the bound, or errors)."""
    out: dict[str, dict[str, Any]] = {t.name: {"steps": [], "max_rate": None, "failed_at": None} for t in targets}
    for rate in rates:
        active = [t for t in targets if out[t.name]["failed_at"] is None]
        if not active:
            break
        for t in active:
            for attempt in range(2 if retry else 1):
                r = run_load(t.load_args("open", duration, rate=rate), plan.load, duration + 60, t.module)
                step = {
                    "rate": rate,
                    "attempt": attempt + 1,
                    "ok": r["errors"] == 0 and r["p99"] is not None and r["p99"] <= bound,
                    **{k: r[k] for k in ("rps", "p50", "p99", "p999", "max", "errors", "error_kinds")},
                    "send_lag_p99": r["sched_lag"]["p99"],
                }
                out[t.name]["steps"].append(step)
                progress(f"sweep {rate:>7,.0f} req/s {t.name:<11} p99 {fmt(r['p99'], '.2f')} ms {_verdict(step)}")
                if step["ok"]:
                    break
            if step["ok"]:
                out[t.name]["max_rate"] = rate
            else:
                out[t.name]["failed_at"] = rate
    return out


def _verdict(step: dict[str, Any]) -> str:
    if step["ok"]:
        return "ok"
    return f"over ({step['errors']} errors)" if step["errors"] else "over"


# -- verdicts and tables -------------------------------------------------------------------------------------


def _checks(
    summary: dict[str, dict[str, Any]], ratios: dict[str, Any], closed: dict[str, list[list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    checks = []
    for engine in ENGINES:
        r = ratios[f"gw {engine} / bare"]
        checks.append(
            check(
                f"gateway ({engine} engine) closed-loop max req/s ≥ {MIN_VS_BARE}× bare's",
                "performance",
                None if r["median"] is None else r["median"] >= MIN_VS_BARE,
                f"{fmt(r['median'], '.2f')}× (rounds {r['range']}); per proxy CPU-second "
                f"{fmt(ratios[f'gw {engine} / bare, per CPU-s']['median'], '.2f')}×",
            )
        )
    for engine in ENGINES:
        r, cpu = ratios[f"{engine} {WORKERS}w / 1w"], ratios[f"{engine} {WORKERS}w / 1w, per CPU-s"]
        at_rate = ratios[f"{engine} {WORKERS}w / 1w, CPU per request at {FIXED_RATE:g}/s"]
        ceiling = ratios[f"{engine} {WORKERS}w / 1w, ceiling"]["median"]
        checks.append(
            check(
                f"--workers {WORKERS} ≥ {MIN_SCALING}× one worker ({engine} engine, unpinned)",
                "performance",
                None if r["median"] is None else r["median"] >= MIN_SCALING,
                f"{fmt(r['median'], '.2f')}× (rounds {r['range']}); what this machine's CPUs allow at the "
                f"measured CPU per request (gateway + upstream + load generator): {fmt(ceiling, '.2f')}×",
            )
        )
        checks.append(
            check(
                f"--workers {WORKERS} costs ≤ {MAX_CPU_GROWTH}× one worker's gateway CPU per request at "
                f"{FIXED_RATE:,.0f} req/s ({engine})",
                "performance",
                None if at_rate["median"] is None else at_rate["median"] <= MAX_CPU_GROWTH,
                f"{fmt(at_rate['median'], '.2f')}× (rounds {at_rate['range']}); at full load (closed loop) "
                f"requests per gateway CPU-second, {WORKERS} workers over 1: {fmt(cpu['median'], '.2f')}×",
            )
        )
    for engine in ENGINES:
        name = f"{engine} {WORKERS}w"
        shares = [
            min(b["worker_cpu_s"][:WORKERS]) / sum(b["worker_cpu_s"])
            for b in map(_best, closed[name])
            if sum(b["worker_cpu_s"])
        ]
        checks.append(
            check(
                f"--workers {WORKERS}: every worker serves (each ≥ {MIN_WORKER_SHARE:.0%} of the gateway's CPU)",
                "correctness",
                bool(shares) and min(shares) >= MIN_WORKER_SHARE,
                f"{engine}: least busy worker's share {', '.join(f'{s:.0%}' for s in shares) or '—'}",
            )
        )
    checks.append(
        check(
            "no failed requests in the closed-loop and fixed-rate runs",
            "correctness",
            all(s["errors"] + s["fixed_errors"] == 0 for s in summary.values()),
            ", ".join(f"{n}: {s['errors'] + s['fixed_errors']}" for n, s in summary.items()),
        )
    )
    return checks


def _closed_table(
    summary: dict[str, dict[str, Any]],
    ratios: dict[str, Any],
    names: list[str],
    concurrencies: Sequence[int],
    rounds: int,
    plan: CpuPlan,
) -> str:
    def row(label: str, key: str, spec: str = "") -> tuple[str, list[str]]:
        return label, [fmt(summary[n].get(key), spec) for n in names]

    def ratio_row(label: str, suffix: str) -> tuple[str, list[str]]:
        cells = [fmt(ratios[f"{n} / bare{suffix}"]["median"], ".2f") if f"{n} / bare" in ratios else "—" for n in names]
        return label, cells

    title = (
        f"closed loop, pinned ({plan.describe()}): best of c={'/'.join(map(str, concurrencies))}, "
        f"median of {rounds} round(s)"
    )
    rows = [
        row("max req/s", "rps", ",.0f"),
        row("  range over rounds", "rps_range"),
        row("  best concurrency (most rounds)", "best_c", "d"),
        row("  p99 at the best (ms)", "p99", ".2f"),
        ratio_row("  vs bare", ""),
        row("proxy CPU %", "proxy_cpu_pct", ".0f"),
        row("proxy CPU per request (µs)", "proxy_us", ".0f"),
        row("requests per proxy CPU-second", "rps_per_cpu_s", ",.0f"),
        ratio_row("  vs bare", ", per CPU-s"),
        row("upstream + generator CPU / req (µs)", "others_us", ".0f"),
        row("other load on the proxy's CPU %", "other_load_pct", ".0f"),
        row("failed requests", "errors", "d"),
    ]
    return title + "\n" + table(names, rows, label_width=38)


def _scaling_table(summary: dict[str, dict[str, Any]], ratios: dict[str, Any], names: list[str], ncpu: int) -> str:
    def row(label: str, key: str, spec: str = "") -> tuple[str, list[str]]:
        return label, [fmt(summary[n].get(key), spec) for n in names]

    def per_engine(label: str, suffix: str, field: str = "median") -> tuple[str, list[str]]:
        cells = []
        for n in names:
            engine, workers = n.split()
            cells.append("" if workers == "1w" else fmt(ratios[f"{engine} {WORKERS}w / 1w{suffix}"][field], ".2f"))
        return label, cells

    rows = [
        row("max req/s", "rps", ",.0f"),
        row("  range over rounds", "rps_range"),
        row("  best concurrency (most rounds)", "best_c", "d"),
        per_engine(f"  {WORKERS} workers / 1", ""),
        per_engine("    range over rounds", "", "range"),
        per_engine("  ceiling: what the CPUs allow / 1", ", ceiling"),
        row("gateway CPU %", "proxy_cpu_pct", ".0f"),
        row("gateway CPU per request (µs)", "proxy_us", ".0f"),
        row("requests per gateway CPU-second", "rps_per_cpu_s", ",.0f"),
        per_engine(f"  {WORKERS} workers / 1", ", per CPU-s"),
        row("busiest worker's share of gateway CPU", "busiest_worker_share", ".0%"),
        row("upstream + generator CPU / req (µs)", "others_us", ".0f"),
        row(f"all {ncpu} CPUs busy %", "busy_pct", ".0f"),
        row("  of it other load %", "other_load_pct", ".0f"),
        row("failed requests", "errors", "d"),
        (f"open loop at {FIXED_RATE:,.0f} req/s", []),
        row("  gateway CPU per request (µs)", "fixed_us", ".0f"),
        per_engine(f"    {WORKERS} workers / 1", f", CPU per request at {FIXED_RATE:g}/s"),
        row("  p99 (ms)", "fixed_p99", ".2f"),
        row("  failed requests", "fixed_errors", "d"),
    ]
    title = (
        f"workers, unpinned (gateway, its fake upstream and the load generator free on all {ncpu} CPUs);\n"
        "closed loop as above; ceiling: every CPU busy with these three at the CPU per request measured"
    )
    return title + "\n" + table(names, rows, label_width=38)


def _sweep_table(sweep: dict[str, dict[str, Any]], names: list[str], rates: list[float], bound: float, d: float) -> str:
    def cell(name: str, rate: float) -> str:
        steps = [s for s in sweep[name]["steps"] if s["rate"] == rate]
        if not steps:
            return ""
        last = steps[-1]
        text = fmt(last["p99"], ".2f") + ("" if last["ok"] else " ✗")
        return ("(retried) " if len(steps) > 1 and last["ok"] else "") + text

    ran = [rate for rate in rates if any(s["rate"] == rate for v in sweep.values() for s in v["steps"])]
    bare = sweep["bare"]["max_rate"]

    def highest(name: str) -> str:
        top = sweep[name]["max_rate"]
        return fmt(top, ",.0f") if top is not None or not ran else f"< {ran[0]:,.0f}"

    def vs_bare(name: str) -> str:
        top = sweep[name]["max_rate"]
        return "—" if name in ("direct", "bare") or not bare or top is None else fmt(top / bare, ".2f")

    rows = [(f"{rate:,.0f} req/s: p99 (ms)", [cell(n, rate) for n in names]) for rate in ran]
    rows.append((f"highest rate with p99 ≤ {bound:g} ms", [highest(n) for n in names]))
    rows.append(("  vs bare", [vs_bare(n) for n in names]))
    rows.append(("  first failing rate", [fmt(sweep[n]["failed_at"], ",.0f") for n in names]))
    title = f"open-loop sweep, pinned: {d:g} s per step, a target stops at its first step over {bound:g} ms (✗)"
    return title + "\n" + table(names, rows, label_width=38)


def _charts(json_path: Path, report: dict[str, Any]) -> dict[str, str]:
    from benchmarks import charts

    if not charts.available():
        print("charts: skipped, matplotlib is not installed (pip install -e '.[bench]')")
        return {}
    paths = charts.throughput_charts(json_path, report)
    for name, path in paths.items():
        print(f"chart ({name}): {path}")
    return {name: str(path) for name, path in paths.items()}


# -- the load generator, with request headers ----------------------------------------------------------------


def _load_main(argv: list[str]) -> None:
    """`python -m benchmarks.load ARGS`, plus `--header "Name: value"` (repeatable) on every request."""
    from benchmarks import load

    headers: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--header":
            headers.append(next(args))
        else:
            rest.append(arg)
    base = load.build_request

    def build(host: str, port: int, path: str, body: bytes, key: str | None) -> bytes:
        head, sep, tail = base(host, port, path, body, key).partition(b"\r\n\r\n")
        return head + b"".join(b"\r\n" + h.encode() for h in headers) + sep + tail

    load.build_request = build  # type: ignore[assignment]
    load.main(rest)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["load"]:
        raise SystemExit("usage: python -m benchmarks.throughput load [--header 'Name: value'] … LOAD ARGS")
    _load_main(argv[1:])


if __name__ == "__main__":
    main()
