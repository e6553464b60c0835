"""The `accounting` scenario: what keys, credits, rate limits and the ledger cost a request (issue #5).

The `overhead` scenario's machinery (its rounds, tests and medians: benchmarks/overhead.py), run against four
targets that share one zero-delay fake upstream:

- `direct`: the upstream itself, the floor "added" latency is counted from;
- `off`: the gateway with `accounting: {enabled: false}`;
- `sqlite`: the gateway metering its key: the key belongs to an org with 1e9 USD of credits and has rpm and tpm
  limits (1e7) that never trigger; the endpoint is priced, so every request reserves its worst-case cost from
  the node's lease; the ledger (SQLite, in the run's temporary directory) is written every second;
- `redis`: the same with `store: {kind: redis}`, on a `redis-server` this scenario starts on a free loopback
  port (no persistence), on the load generator's core; skipped when redis-server or the redis client is missing.

The gateways differ only in their `accounting:` section. The same three tests as `overhead` (open-loop
non-streamed latency, open-loop stream TTFB with byte identity, closed-loop req/s at c=32), rounds rotating the
target order; added = target − direct within a round, and the accounting gateways' added latency is divided by
the `off` gateway's of the same round (the median over rounds is the figure checked: ≤ 1.10).
After the rounds, a short probe run counts each gateway's X-RateLimit-Limit header (the limits were on); then
the gateways get SIGTERM (a graceful stop flushes the ledger and settles the credit) and each store is read:
one generation per request its gateway answered, and the spend settled in the org.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.harness import CpuPlan, Service, ServiceError, bench_engine, cpu_plan, free_ports, run_load
from benchmarks.kit import (
    GATEWAY_KEY,
    MODEL,
    UPSTREAM_MODEL,
    banner,
    check,
    exit_status,
    fmt,
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

MAX_RATIO = 1.10  # acceptance (issue #5): added p50 with accounting on ≤ 1.10 × with accounting off

RATE = 200.0
DURATION_S, QUICK_DURATION_S = 2.0, 0.4
ROUNDS, QUICK_ROUNDS = 7, 1
WARMUP_S, QUICK_WARMUP_S = 1.0, 0.2
PROBE_RATE, PROBE_S = 50.0, 0.4  # after the rounds: X-RateLimit-Limit counted on 20 requests per gateway
SETTLE_S = 1.5  # then > one flush interval (1 s) before the gateways' CPU time is read

ORG = "bench"
CREDITS = 1e9  # USD: never runs out
LIMIT = 10_000_000  # rpm and tpm: never reached
PRICE = "{input: 0.15, output: 0.60}"  # gpt-4o-mini's, USD per million tokens: every request costs something
REDIS_PREFIX = "hedgerow-bench:"
RATELIMIT_HEADER = "X-RateLimit-Limit"

LABELS = {
    "direct": "direct",
    "off": "gateway (accounting off)",
    "sqlite": "gateway + SQLite",
    "redis": "gateway + Redis",
}
SHORT = {"direct": "direct", "off": "acct off", "sqlite": "SQLite", "redis": "Redis"}  # table columns
METERED = ("sqlite", "redis")


def gateway_config(port: int, upstream_port: int, accounting: str) -> str:
    """overhead's gateway (one key, one provider, one model; the same server engine) with a key in org `bench`,
    rpm/tpm limits, a priced endpoint and the given `accounting:` section (YAML flow mapping)."""
    engine = bench_engine()  # as overhead: the gateway's HTTP server engine
    return (
        f"server: {{host: 127.0.0.1, port: {port}, engine: {engine}}}\n"
        f"keys:\n  - {{name: bench, key: {GATEWAY_KEY}, org: {ORG}, rpm: {LIMIT}, tpm: {LIMIT}}}\n"
        f'providers:\n  - {{name: fake, base-url: "http://127.0.0.1:{upstream_port}/v1"}}\n'
        f"models:\n  - name: {MODEL}\n"
        f"    endpoints: [{{provider: fake, model: {UPSTREAM_MODEL}, price: {PRICE}}}]\n"
        f"accounting: {accounting}\n"
    )


def accounting_section(store: str) -> str:
    return f"{{store: {store}, orgs: [{{id: {ORG}, credits: {CREDITS:.0f}}}]}}"


class RedisServer:
    """`redis-server` on a loopback port, no persistence, in a session of its own (stopped by its group)."""

    def __init__(self, port: int, cpus: frozenset[int] | None, workdir: Path) -> None:
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        exe = shutil.which("redis-server") or "redis-server"
        args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._log = (workdir / "redis.log").open("wb")
        self.proc = subprocess.Popen(
            [*args, "--dir", str(workdir)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"redis-server exited with status {self.proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise ServiceError(f"redis-server not ready after {timeout_s:g}s")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
                break
        self._log.close()


def redis_missing() -> str | None:
    """Why the Redis target cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    if importlib.util.find_spec("redis") is None:
        return "the redis client (Python package) is not installed"
    return None


def run(opts: Options) -> int:
    plan = cpu_plan()
    rate = opts.rate or RATE
    duration = opts.duration_s or (QUICK_DURATION_S if opts.quick else DURATION_S)
    rounds = opts.rounds or (QUICK_ROUNDS if opts.quick else ROUNDS)
    warmup = QUICK_WARMUP_S if opts.quick else WARMUP_S
    skipped = redis_missing()
    names = ["direct", "off", "sqlite"] + ([] if skipped else ["redis"])
    settings = {
        "rounds": rounds,
        "duration_s": duration,
        "warmup_s": warmup,
        "rate": rate,
        "concurrency": CONCURRENCY,
        "quick": opts.quick,
        "credits": CREDITS,
        "rpm": LIMIT,
        "tpm": LIMIT,
        "redis_skipped": skipped,
    }
    host = banner(
        "accounting",
        f"{rounds} round(s) × {duration:g} s per run; open loop {rate:g} req/s, closed loop c={CONCURRENCY}\n"
        f"targets: {', '.join(LABELS[n] for n in names)}" + (f"\nRedis target skipped: {skipped}" if skipped else ""),
        plan,
    )
    warmups: dict[str, list[dict[str, Any]]] = {}
    probes: dict[str, dict[str, Any]] = {}
    ledgers: dict[str, dict[str, Any]] = {}
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            services: list[Service] = []
            redises: list[RedisServer] = []  # filled as soon as it starts, so it is stopped whatever fails next
            try:
                targets = _start(Path(tmp), plan, names, services, redises)
                cpu_before = {t.name: t.service.cpu_seconds() for t in targets[1:]}
                runs = run_rounds(targets, plan, rounds, rate, duration, warmup, warmups)
                progress(f"probe: {PROBE_S:g} s at {PROBE_RATE:g} req/s per gateway, counting {RATELIMIT_HEADER}")
                for t in targets[1:]:
                    args = load_args(t.port, rate=PROBE_RATE, duration=PROBE_S, count_headers=[RATELIMIT_HEADER])
                    probes[t.name] = run_load(args, plan.load, timeout_s=PROBE_S + 60)
                time.sleep(SETTLE_S)  # the last ledger flush and settlement, so the CPU they take is counted
                for t in targets[1:]:
                    ledgers[t.name] = {"cpu_s": t.service.cpu_seconds() - cpu_before[t.name]}
                progress("stopping the gateways (SIGTERM), reading the ledgers")
                for t in targets[1:]:  # graceful: the ledger is flushed and the credit settled on the way out
                    t.service.stop()
                    ledgers[t.name]["exit_status"] = t.service.proc.returncode
                ledgers["sqlite"].update(_sqlite_ledger(Path(tmp) / "sqlite.db"))
                for redis in redises:
                    ledgers["redis"].update(_redis_ledger(redis.port))
            finally:
                for service in reversed(services):
                    service.stop()
                for redis in redises:
                    redis.stop()
    except ServiceError as e:
        return startup_failed(e)

    summary = _summarize(runs, warmups, probes, ledgers)
    checks = _checks(summary, names)
    print(_table(summary, names))
    print(verdicts(checks, opts.quick))
    if skipped:
        print(f"  SKIP  gateway + Redis: {skipped}")
    write_report(
        opts,
        {
            "scenario": "accounting",
            "settings": settings,
            "machine": host,
            "pinning": plan.describe(),
            "summary": summary,
            "checks": checks,
            "runs": runs,
            "warmups": warmups,
            "probes": probes,
        },
    )
    return exit_status(checks, opts.quick)


def _start(
    tmp: Path, plan: CpuPlan, names: list[str], services: list[Service], redises: list[RedisServer]
) -> list[Target]:
    gateways = names[1:]
    up_port, redis_port, *ports = free_ports(2 + len(gateways))
    upstream = start_upstream("upstream", up_port, [], plan, tmp)
    services.append(upstream.service)
    targets = [Target("direct", up_port, UPSTREAM_MODEL, None, upstream.service)]
    redis = None
    if "redis" in names:
        redis = RedisServer(redis_port, plan.load, tmp)  # on the load generator's core: the store is elsewhere
        redises.append(redis)
        redis.wait_ready()
    stores = {
        "off": "{enabled: false}",
        "sqlite": accounting_section(f'{{kind: sqlite, path: "{tmp / "sqlite.db"}"}}'),
        "redis": accounting_section(f'{{kind: redis, url: "{redis.url if redis else ""}", prefix: "{REDIS_PREFIX}"}}'),
    }
    for name, port in zip(gateways, ports, strict=True):
        service = start_gateway(name, port, gateway_config(port, up_port, stores[name]), plan, tmp)
        services.append(service)
        targets.append(Target(name, port, MODEL, GATEWAY_KEY, service))
    return targets


def _sqlite_ledger(path: Path) -> dict[str, Any]:
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            (generations,) = db.execute("SELECT COUNT(*) FROM generations").fetchone()
            row = db.execute("SELECT spent FROM orgs WHERE id = ?", (ORG,)).fetchone()
    except sqlite3.Error as e:  # the ledger check fails, with the reason in the report
        return {"generations": None, "spent": None, "read_error": f"{path}: {e}"}
    return {"generations": generations, "spent": None if row is None else row[0]}


def _redis_ledger(port: int) -> dict[str, Any]:
    import redis  # the gateway's own optional dependency; present, or this target was skipped

    client: Any = redis.Redis(host="127.0.0.1", port=port, db=0, socket_timeout=5)  # sync: replies, not awaitables
    try:
        with contextlib.closing(client):
            generations = int(client.zcard(REDIS_PREFIX + "gens"))
            spent = client.hget(REDIS_PREFIX + "org:" + ORG, "spent")
    except redis.RedisError as e:
        return {"generations": None, "spent": None, "read_error": f"redis :{port}: {e}"}
    return {"generations": generations, "spent": None if spent is None else float(spent)}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def _summarize(
    runs: Runs,
    warmups: dict[str, list[dict[str, Any]]],
    probes: dict[str, dict[str, Any]],
    ledgers: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    summary = summarize(runs)
    for name, s in summary.items():
        s["label"] = LABELS[name]
        measured = [r for results in runs[name].values() for r in results]
        every = measured + warmups.get(name, []) + ([probes[name]] if name in probes else [])
        s["requests"] = sum(r["count"] for r in every)
        s["errors"] = sum(r["errors"] for r in every)
        cpu = [c for r in runs[name]["closed"] if (c := cpu_us_per_request(r)) is not None]
        s["cpu_us"] = _median(cpu) if name != "direct" else None
        if name in probes:
            s["ratelimit_header"] = probes[name]["headers"][RATELIMIT_HEADER]
        s.update(ledgers.get(name, {}))
        cpu_s = s.pop("cpu_s", None)
        s["cpu_us_all"] = None if cpu_s is None or not s["requests"] else round(1e6 * cpu_s / s["requests"], 1)
    for name, s in summary.items():
        if name in METERED:
            vs: dict[str, Any] = {}
            for key, test, field, added in (
                ("added_p50", "nonstream", "p50", True),
                ("added_ttfb_p50", "stream", "ttfb_p50", True),
                ("rps", "closed", "rps", False),
            ):
                per_round = vs_baseline(runs, name, "off", test, field, added)
                vs[key] = _median(per_round)
                vs[key + "_range"] = f"{min(per_round):.2f}–{max(per_round):.2f}" if per_round else None
            vs["cpu_us"] = _median(cpu_vs_baseline(runs, name, "off"))
            all_off = summary["off"].get("cpu_us_all")
            vs["cpu_us_all"] = round(s["cpu_us_all"] / all_off, 4) if s["cpu_us_all"] and all_off else None
            s["vs_off"] = vs
    return summary


def _checks(summary: dict[str, dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    checks = []
    off = summary["off"]
    for name in (n for n in METERED if n in names):
        s = summary[name]
        r = s["vs_off"]["added_p50"]
        checks.append(
            check(
                f"{LABELS[name]}: added p50 ≤ {MAX_RATIO:.2f} × accounting off's",
                "performance",
                None if r is None else r <= MAX_RATIO,
                f"{fmt(r, '.2f')}× ({fmt(s.get('added_p50'), '.3f')} vs {fmt(off.get('added_p50'), '.3f')} ms; "
                f"per round {s['vs_off']['added_p50_range']})",
            )
        )
    for name in (n for n in METERED if n in names):
        s = summary[name]
        ok = s.get("exit_status") == 0 and s.get("generations") == s["requests"]
        checks.append(
            check(
                f"{LABELS[name]}: one ledger record per request answered, after a graceful stop",
                "correctness",
                ok,
                f"{fmt(s.get('generations'), ',')} generations, {s['requests']:,} requests; "
                f"exit status {s.get('exit_status')}" + (f"; {s['read_error']}" if s.get("read_error") else ""),
            )
        )
    for name in (n for n in METERED if n in names):
        s = summary[name]
        seen = s.get("ratelimit_header", {})
        spent = s.get("spent")
        checks.append(
            check(
                f"{LABELS[name]}: the key is metered (rate-limit headers, spend settled in the org)",
                "correctness",
                set(seen) == {str(LIMIT)} and spent is not None and spent > 0,
                f"{RATELIMIT_HEADER}: {seen}; spent {fmt(spent, '.6f')} USD",
            )
        )
    gateways = [n for n in names if n != "direct"]
    checks.append(
        check(
            "every relayed stream byte-identical to the upstream's",
            "correctness",
            all(summary[n]["mismatches"] == 0 and summary[n]["streams_checked"] > 0 for n in gateways),
            ", ".join(f"{n}: {summary[n]['mismatches']}/{summary[n]['streams_checked']} differ" for n in gateways),
        )
    )
    checks.append(
        check(
            "no failed requests",
            "correctness",
            all(summary[n]["errors"] == 0 for n in names),
            ", ".join(f"{n}: {summary[n]['errors']}" for n in names),
        )
    )
    return checks


# (label, summary key, format, vs-off key or None)
_ROWS: list[tuple[str, str, str, str | None]] = [
    ("non-stream latency p50 (ms)", "p50", ".3f", None),
    ("non-stream latency p99 (ms)", "p99", ".3f", None),
    ("  added p50 (ms)", "added_p50", ".3f", "added_p50"),
    ("  added p50, range over rounds", "added_p50_range", "", "added_p50_range"),
    ("  added p99 (ms)", "added_p99", ".3f", None),
    ("stream TTFB p50 (ms)", "ttfb_p50", ".3f", None),
    ("  added TTFB p50 (ms)", "added_ttfb_p50", ".3f", "added_ttfb_p50"),
    ("  added TTFB p99 (ms)", "added_ttfb_p99", ".3f", None),
    ("stream bodies differing", "mismatches", "d", None),
    ("stream bodies checked", "streams_checked", "d", None),
    (f"closed-loop req/s (c={CONCURRENCY})", "rps", ",.0f", "rps"),
    ("  gateway CPU µs per request", "cpu_us", ".0f", "cpu_us"),
    ("  proxy CPU %", "proxy_cpu_pct", ".0f", None),
    ("gateway CPU µs/request, whole run", "cpu_us_all", ".0f", "cpu_us_all"),
    ("open-loop send lag p99 (ms)", "sched_lag_p99", ".3f", None),
    ("other load on proxy's CPU %", "other_load_pct", ".0f", None),
    ("requests answered (all runs)", "requests", ",", None),
    ("failed requests", "errors", "d", None),
    ("generations in the ledger", "generations", ",", None),
    ("spend settled in the org (USD)", "spent", ".4f", None),
]


def _table(summary: dict[str, dict[str, Any]], names: list[str]) -> str:
    metered = [n for n in METERED if n in names]
    columns = [SHORT[n] for n in names] + [f"{SHORT[n]}/off" for n in metered]
    rows = []
    for label, key, spec, vs_key in _ROWS:
        cells = [fmt(summary[n].get(key), spec) for n in names]
        for n in metered:
            vs = None if vs_key is None else summary[n]["vs_off"][vs_key]
            cells.append("" if vs_key is None else fmt(vs, "" if "range" in vs_key else ".2f"))
        rows.append((label, cells))
    note = (
        "acct off: the gateway with accounting off; SQLite, Redis: with keys, limits and the ledger on that store.\n"
        "x/off: per round, x's figure (added latency: minus direct's) over the accounting-off gateway's in the\n"
        "same round; the median over rounds (or their range)\n"
    )
    return note + table(columns, rows, label_width=34)
