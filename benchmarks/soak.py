"""The `soak` scenario (issue #9): minutes of mixed load with faults; does anything leak, hang or go unrecorded?

Three fake upstreams serve one model (TTFT 30–60 ms, 5 ms between stream events): `steady` never fails;
`flaky` fails 20 % of its requests (500s, connection resets, first bytes 3 s late, and answers that stop halfway:
stalled or cut); `jittery` fails 2 % (500s, stalls, cuts). One gateway in front of them as a deployment runs it:
metered key (an org with ample credit, rpm/tpm limits that never trigger), SQLite ledger in the run's temporary
directory, metrics and access log on, routing at its defaults (P2C, failover, ejection, hedging), upstream
timeouts small enough that a fault resolves within seconds (first byte and first token 2 s, idle 1 s).

Load: `load.py`, open loop, half the requests streamed and half not (two generators at once), in slices (60 s;
`--quick`: 15 s) after a warm-up, every request with a 15 s deadline, so a hang shows as a timeout, never as a
wait. Meanwhile the gateway's RSS, open fds and in-flight requests (`/metrics`) are sampled every few seconds.
After the load: a settle time (the ledger flushes every second), the fds counted by kind, SIGTERM (a graceful
stop flushes the ledger), then the ledger, the access log and the upstreams' fault counters are read.

The error model. A fault before the first byte reaches the client (500, reset, slow, and a stall or cut of a
non-streamed answer, which the gateway reads whole before answering) is retried on another provider: `steady`
never fails and the retry budget's floor (10/s) is well above the rate of such faults, so it costs the client
time, not an error. A stall or cut of a stream strikes after the gateway has committed to it (its first content
event went out), so it cannot be retried: the client's stream ends with an error event. The upstreams count
these (`mid_stream` in their /stats), so the prediction is: non-streamed client errors 0; streamed client errors
at most the mid-stream faults (fewer only when the struck attempt lost a hedge race). The ledger must say the
same: the interrupted streams are those with status 200 and no finish reason.

Checks: every request the generators sent has exactly one ledger record (by the `X-Hedgerow-Generation-Id` each
answer carries: none lost, none duplicated, none unknown) and one access-log line; no request timed out or lost
its connection, none left in flight; RSS at the end ≤ 1.2 × after warm-up; fds back to the post-warm-up level
except for pooled upstream keep-alive connections (legitimate, and never closed by the fakes), no client
connection left open, no socket half-closed (CLOSE_WAIT); client errors as the faults predict.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import math
import os
import re
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.fake_upstream import FIXTURES
from benchmarks.harness import CpuPlan, Service, ServiceError, bench_engine, cpu_plan, free_ports, run_load
from benchmarks.kit import (
    GATEWAY_KEY,
    MODEL,
    STREAM_FIXTURE,
    UPSTREAM_MODEL,
    Upstream,
    banner,
    check,
    exit_status,
    fmt,
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
from benchmarks.streams import rss_bytes
from proxy.forward import GENERATION_HEADER

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

RATE = 80.0  # requests per second in all, half of them streamed: stability, not throughput
DURATION_S, QUICK_DURATION_S = 600.0, 45.0  # of load after the warm-up
SLICE_S, QUICK_SLICE_S = 60.0, 15.0  # one pair of load generators per slice: a timeline, and bounded output
WARMUP_S, QUICK_WARMUP_S = 15.0, 5.0
SAMPLE_S, QUICK_SAMPLE_S = 2.0, 1.0  # RSS, fds and in-flight sampled this often
SETTLE_S = 2.5  # after load: > the ledger's flush interval (1 s) and the access log's observer batch (0.5 s)
CLOSE_WAIT_S = 10.0  # at most this long for the gateway's client connections to close after the load
CLIENT_TIMEOUT_S = 15.0  # per request: > any legitimate path (three attempts of ≤ 2 s first byte, idle 1 s)
MAX_RSS_GROWTH = 0.20  # RSS at the end ≤ (1 + this) × after warm-up
FD_SLACK = 2  # fds other than pooled upstream connections: end ≤ after warm-up + this

TTFT_MS, TTFT_JITTER_MS, GAP_MS = 30.0, 30.0, 5.0
SLOW_MS = 3000.0  # > first-byte-s: a slow answer times out and fails over (a stream is hedged before that)
STALL_MS = 60000.0  # > the client's timeout: a gateway that missed a stall would show as a hung request
TIMEOUTS = "{connect-s: 1, first-byte-s: 2, first-token-s: 2, idle-s: 1, total-s: 10}"
# Fault shares per upstream (fake_upstream.py options without the leading --).
UPSTREAMS: dict[str, dict[str, float]] = {
    "steady": {},
    "flaky": {"fail-share": 0.06, "reset-share": 0.04, "slow-share": 0.04, "stall-share": 0.03, "cut-share": 0.03},
    "jittery": {"fail-share": 0.01, "stall-share": 0.005, "cut-share": 0.005},
}
FAULTS = ("failed", "reset", "slow", "stalled", "cut")  # the kinds, as the upstreams' /stats name them
ORG, CREDITS, LIMIT = "bench", 1e9, 10_000_000  # USD never spent; rpm and tpm never reached
PRICE = "{input: 0.15, output: 0.60}"  # USD per million tokens: every request costs something


def run(opts: Options) -> int:
    plan = cpu_plan()
    rate = opts.rate or RATE
    duration = opts.duration_s or (QUICK_DURATION_S if opts.quick else DURATION_S)
    slice_s = min(duration, QUICK_SLICE_S if opts.quick else SLICE_S)
    warmup = QUICK_WARMUP_S if opts.quick else WARMUP_S
    every = QUICK_SAMPLE_S if opts.quick else SAMPLE_S
    faults = "; ".join(
        f"{n}: " + (", ".join(f"{k[:-6]} {v:.1%}" for k, v in f.items()) or "none") for n, f in UPSTREAMS.items()
    )
    settings = {
        "rate": rate,
        "duration_s": duration,
        "slice_s": slice_s,
        "warmup_s": warmup,
        "sample_every_s": every,
        "client_timeout_s": CLIENT_TIMEOUT_S,
        "upstream_timeouts": TIMEOUTS,
        "ttft_ms": f"{TTFT_MS:g}–{TTFT_MS + TTFT_JITTER_MS:g}",
        "chunk_gap_ms": GAP_MS,
        "slow_ms": SLOW_MS,
        "faults": UPSTREAMS,
        "quick": opts.quick,
    }
    host = banner(
        "soak",
        f"{duration:g} s of load after a {warmup:g} s warm-up, in slices of {slice_s:g} s; open loop {rate:g} req/s, "
        f"half streamed\nupstreams (TTFT {TTFT_MS:g}–{TTFT_MS + TTFT_JITTER_MS:g} ms, {GAP_MS:g} ms between "
        f"events): {faults}\ngateway: metered key, SQLite ledger, metrics and access log on; upstream timeouts "
        f"{TIMEOUTS}",
        plan,
    )
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            upstreams: list[Upstream] = []
            gateway: Service | None = None
            try:
                ports = free_ports(len(UPSTREAMS) + 1)
                for i, (name, shares) in enumerate(UPSTREAMS.items()):
                    upstreams.append(start_upstream(name, ports[i], _upstream_args(shares, 31 + i), plan, Path(tmp)))
                soak = Soak(Path(tmp), plan, ports[-1], upstreams, rate, every)
                gateway = soak.start()
                data = soak.run(warmup, duration, slice_s)
            finally:
                if gateway is not None:
                    gateway.stop()
                for u in upstreams:
                    u.service.stop()
    except ServiceError as e:
        return startup_failed(e)

    summary = _summarize(data)
    checks = _checks(summary)
    print(_table(summary, data["slices"]))
    print(verdicts(checks, opts.quick))
    write_report(
        opts,
        {
            "scenario": "soak",
            "settings": settings,
            "machine": host,
            "pinning": plan.describe(),
            "summary": summary,
            "checks": checks,
            "slices": data["slices"],
            "samples": data["samples"],
        },
    )
    return exit_status(checks, opts.quick)


def _upstream_args(shares: dict[str, float], seed: int) -> list[str]:
    args = ["--ttft-ms", f"{TTFT_MS:g}", "--ttft-jitter-ms", f"{TTFT_JITTER_MS:g}", "--chunk-gap-ms", f"{GAP_MS:g}"]
    args += ["--slow-ms", f"{SLOW_MS:g}", "--stall-ms", f"{STALL_MS:g}", "--seed", str(seed)]
    for option, share in shares.items():
        args += [f"--{option}", f"{share:g}"]
    return args


def gateway_config(port: int, upstreams: list[Upstream], ledger: Path) -> str:
    engine = bench_engine()  # as overhead: the gateway's HTTP server engine
    providers = "".join(
        f'  - {{name: {u.name}, base-url: "http://127.0.0.1:{u.port}/v1", timeouts: {TIMEOUTS}}}\n' for u in upstreams
    )
    endpoints = ", ".join(f"{{provider: {u.name}, model: {UPSTREAM_MODEL}, price: {PRICE}}}" for u in upstreams)
    return (
        f"server: {{host: 127.0.0.1, port: {port}, engine: {engine}, metrics: true, access-log: true}}\n"
        f"keys:\n  - {{name: bench, key: {GATEWAY_KEY}, org: {ORG}, rpm: {LIMIT}, tpm: {LIMIT}}}\n"
        f"providers:\n{providers}"
        f"models:\n  - name: {MODEL}\n    endpoints: [{endpoints}]\n"
        f'accounting: {{store: {{kind: sqlite, path: "{ledger}"}}, orgs: [{{id: {ORG}, credits: {CREDITS:.0f}}}]}}\n'
    )


class Soak:
    """One gateway under slices of mixed load, sampled; what it looked like at each stage, and what it recorded."""

    def __init__(
        self, tmp: Path, plan: CpuPlan, port: int, upstreams: list[Upstream], rate: float, every: float
    ) -> None:
        self.tmp, self.plan, self.port, self.upstreams = tmp, plan, port, upstreams
        self.rate, self.every = rate, every
        self.ledger = tmp / "soak.db"
        self.pid = 0
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.ids: Counter[str] = Counter()  # X-Hedgerow-Generation-Id values the answers carried, and how often
        self.counted = {u.name: dict.fromkeys((*FAULTS, "mid_stream", "requests"), 0) for u in upstreams}
        # A stream passes if it is the fixture, byte for byte, after any keep-alive comments the gateway sends
        # while it waits for a first token (stream_keepalive_s); an interrupted one ends in an error event instead.
        self.stream_re = tmp / "stream.re"
        self.stream_re.write_bytes(rb"(?:: keep-alive\n\n)*" + re.escape(STREAM_FIXTURE.read_bytes()))

    def start(self) -> Service:
        config = gateway_config(self.port, self.upstreams, self.ledger)
        gateway = start_gateway("gateway", self.port, config, self.plan, self.tmp)
        self.pid = gateway.proc.pid  # one worker: the gateway serves in this very process
        self.gateway = gateway
        return gateway

    def run(self, warmup: float, duration: float, slice_s: float) -> dict[str, Any]:
        fresh = self.state()
        progress(f"warm-up: {warmup:g} s")
        warm = self.slice("warm-up", warmup)
        time.sleep(SETTLE_S)
        start = self.state()
        slices = []
        n = max(1, math.ceil(duration / slice_s - 1e-9))
        for i in range(n):
            length = min(slice_s, duration - i * slice_s)
            result = self.slice(f"{i + 1}/{n}", length)
            slices.append(result)
            progress(_brief(result))
        end = self.settle()
        metrics = _metrics(self.port)
        self.gateway.stop()
        return {
            "fresh": fresh,
            "start": start,
            "end": end,
            "metrics": metrics,
            "exit_status": self.gateway.proc.returncode,
            "warmup": warm,
            "slices": slices,
            "samples": self.samples,
            "ids": self.ids,
            "ledger": _ledger(self.ledger),
            "access_log": _access_log(self.tmp / "gateway.log"),
            "upstream": {u.name: u.stats() for u in self.upstreams},
        }

    def sample(self) -> dict[str, Any]:
        try:
            fds: int | None = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            fds = None
        rss = rss_bytes(self.pid)
        try:
            in_flight = _metrics(self.port)["in_flight"]
        except ServiceError:
            in_flight = None
        s = {"t": round(time.monotonic() - self.t0, 2), "rss_mb": _mb(rss), "fds": fds, "in_flight": in_flight}
        self.samples.append(s)
        return s

    def state(self) -> dict[str, Any]:
        """A sample with the fds by kind, while no load runs."""
        return {**self.sample(), **_fd_kinds(self.pid, self.port, {u.port for u in self.upstreams})}

    def slice(self, name: str, length: float) -> dict[str, Any]:
        """Streamed and non-streamed generators at once, `length` s each, sampling meanwhile."""
        half = self.rate / 2
        runs = {}
        first = len(self.samples)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {
                kind: pool.submit(run_load, self._load_args(kind, half, length), self.plan.load, length + 60)
                for kind in ("stream", "nonstream")
            }
            while not all(f.done() for f in futures.values()):
                self.sample()
                concurrent.futures.wait(futures.values(), timeout=self.every)
            for kind, f in futures.items():
                runs[kind] = f.result()  # a failed generator raises ServiceError here
                self.ids.update(runs[kind].pop("headers")[GENERATION_HEADER])  # not in the report: one per request
        counted = {u.name: u.stats() for u in self.upstreams}
        faults = {n: stats_delta(counted[n], self.counted[n]) for n in counted}
        self.counted = counted
        during = self.samples[first:]
        return {
            "name": name,
            "t_end": round(time.monotonic() - self.t0, 1),
            "runs": runs,
            "upstream": faults,
            "rss_mb_max": max((s["rss_mb"] for s in during if s["rss_mb"] is not None), default=None),
            "fds_max": max((s["fds"] for s in during if s["fds"] is not None), default=None),
            "in_flight_max": max((s["in_flight"] for s in during if s["in_flight"] is not None), default=None),
            **{k: v for k, v in self.sample().items() if k in ("rss_mb", "fds")},
        }

    def _load_args(self, kind: str, rate: float, length: float) -> list[str]:
        args = load_args(self.port, rate=rate, duration=length, count_headers=(GENERATION_HEADER,))
        args += ["--timeout", f"{CLIENT_TIMEOUT_S:g}"]
        if kind == "stream":
            return [*args, "--stream", "--expect-regex", str(self.stream_re)]
        return [*args, "--expect", str(FIXTURES / "chat_ok.json")]

    def settle(self) -> dict[str, Any]:
        """After the load: the ledger flushed, and the gateway's client connections closed (bounded)."""
        time.sleep(SETTLE_S)
        deadline = time.monotonic() + CLOSE_WAIT_S
        while True:
            state = self.state()
            if (state["client_conns"] == 0 and state["in_flight"] == 0) or time.monotonic() > deadline:
                return state
            time.sleep(0.5)


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _fd_kinds(pid: int, port: int, upstream_ports: set[int]) -> dict[str, Any]:
    """The gateway's fds by kind: TCP sockets by peer (from /proc/net/tcp*), and everything else."""
    tcp: dict[str, tuple[str, int, int]] = {}  # inode → (state, local port, remote port)
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table_path).read_text().splitlines()[1:]:
                f = line.split()
                tcp[f[9]] = (f[3], int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16))
    kinds = {"listen": 0, "client_conns": 0, "upstream_conns": 0, "other_sockets": 0, "close_wait": 0, "non_socket": 0}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {k: None for k in kinds}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if not target.startswith("socket:["):
            kinds["non_socket"] += 1
            continue
        state, local, remote = tcp.get(target[8:-1], ("", 0, 0))
        if state == "0A":
            kinds["listen"] += 1
        elif state == "08":  # CLOSE_WAIT: the peer closed, this process never did
            kinds["close_wait"] += 1
        elif local == port:
            kinds["client_conns"] += 1
        elif remote in upstream_ports:
            kinds["upstream_conns"] += 1
        else:
            kinds["other_sockets"] += 1  # unix sockets, UDP, and connections elsewhere
    return kinds


def _metrics(port: int) -> dict[str, Any]:
    """The few figures of the gateway's /metrics this scenario reads (summed over their labels)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException) as e:
        raise ServiceError(f"GET :{port}/metrics failed: {e}") from None
    finally:
        conn.close()
    wanted = {
        "hedgerow_in_flight_requests": "in_flight",
        "hedgerow_requests_total": "requests",
        "hedgerow_ledger_dropped_total": "ledger_dropped",
        "hedgerow_store_errors_total": "store_errors",
        "hedgerow_hedges_total": "hedges",
        "hedgerow_endpoint_ejections_total": "ejections",
    }
    out: dict[str, Any] = dict.fromkeys(wanted.values(), 0)
    out["attempts"] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name, _, rest = line.partition("{")
        labels, _, value = rest.rpartition("} ") if rest else ("", "", line.split()[-1])
        name = name.split()[0]
        if name in wanted:
            out[wanted[name]] += int(float(value))
        elif name == "hedgerow_attempts_total":
            outcome = re.search(r'outcome="([^"]*)"', labels)
            key = outcome[1] if outcome else "?"
            out["attempts"][key] = out["attempts"].get(key, 0) + int(float(value))
    return out


def _ledger(path: Path) -> dict[str, Any]:
    """What the SQLite ledger holds after the graceful stop."""
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            ids = [row[0] for row in db.execute("SELECT id FROM generations")]
            (interrupted,) = db.execute(
                "SELECT COUNT(*) FROM generations WHERE streamed = 1 AND status = 200 AND finish_reason IS NULL"
            ).fetchone()
            statuses = dict(db.execute("SELECT status, COUNT(*) FROM generations GROUP BY status").fetchall())
            (streamed,) = db.execute("SELECT COUNT(*) FROM generations WHERE streamed = 1").fetchone()
            (spent,) = db.execute("SELECT spent FROM orgs WHERE id = ?", (ORG,)).fetchone() or (None,)
    except sqlite3.Error as e:
        return {"ids": [], "records": None, "read_error": f"{path}: {e}"}
    return {
        "ids": ids,
        "records": len(ids),
        "streamed": streamed,
        "interrupted": interrupted,
        "statuses": {str(k): v for k, v in statuses.items()},
        "spent": spent,
    }


def _access_log(path: Path) -> dict[str, Any]:
    """The access log's lines (JSON objects with an id) among the gateway's output."""
    ids = []
    with contextlib.suppress(OSError), path.open("rb") as f:
        for line in f:
            if line.startswith(b'{"'):
                with contextlib.suppress(ValueError):
                    ids.append(json.loads(line)["id"])
    return {"lines": len(ids), "distinct": len(set(ids))}


# -- the figures ------------------------------------------------------------------------------------------------


def _brief(s: dict[str, Any]) -> str:
    st, ns = s["runs"]["stream"], s["runs"]["nonstream"]
    return (
        f"slice {s['name']}: {st['count'] + ns['count']} requests ({st['count']} streamed), interrupted streams "
        f"{st.get('mismatches', 0)}, other errors {st['errors'] + ns['errors'] + ns.get('mismatches', 0)}; "
        f"RSS {fmt(s['rss_mb'], '.1f')} MB, fds {s['fds']}, in flight ≤ {s['in_flight_max']}"
    )


def _client(runs: list[dict[str, Any]], ids: Counter[str]) -> dict[str, Any]:
    """Every load run's outcome, summed; the generation ids the answers carried, by how often each came back."""
    out: dict[str, Any] = {"sent": 0, "streams": 0, "nonstream_http_errors": 0, "stream_http_errors": 0, "hung": 0}
    out.update(interrupted=0, nonstream_mismatches=0, hung_kinds={})
    for r in runs:
        kind = "stream" if r["stream"] else "nonstream"
        out["sent"] += r["count"]
        out["streams"] += r["count"] if r["stream"] else 0
        for k, n in r["error_kinds"].items():
            if k.startswith("http "):
                out[f"{kind}_http_errors"] += n
            else:  # no answer at all: a timeout, a connection closed or reset
                out["hung"] += n
                out["hung_kinds"][k] = out["hung_kinds"].get(k, 0) + n
        out["interrupted" if r["stream"] else "nonstream_mismatches"] += r.get("mismatches", 0)
    out["no_id"] = ids["(none)"]
    out["duplicated"] = sum(n - 1 for gen_id, n in ids.items() if n > 1 and gen_id != "(none)")
    return out


def _slope(samples: list[dict[str, Any]], t_from: float, t_to: float) -> float | None:
    """RSS growth, MB per minute, between two times: the least-squares line through the samples."""
    pts = [(s["t"], s["rss_mb"]) for s in samples if t_from <= s["t"] <= t_to and s["rss_mb"] is not None]
    if len(pts) < 3:
        return None
    mt, mr = sum(t for t, _ in pts) / len(pts), sum(r for _, r in pts) / len(pts)
    den = sum((t - mt) ** 2 for t, _ in pts)
    return round(60 * sum((t - mt) * (r - mr) for t, r in pts) / den, 3) if den else None


def _summarize(data: dict[str, Any]) -> dict[str, Any]:
    runs = [r for s in [data["warmup"], *data["slices"]] for r in s["runs"].values()]
    client = _client(runs, data["ids"])
    ids = set(data["ids"]) - {"(none)"}
    ledger = data["ledger"]
    ledger_ids = set(ledger.pop("ids"))
    up = data["upstream"]
    faults = {k: sum(u[k] for u in up.values()) for k in (*FAULTS, "mid_stream", "requests")}
    errors_stream = client["stream_http_errors"] + client["interrupted"]
    errors_nonstream = client["nonstream_http_errors"] + client["nonstream_mismatches"]
    errors = errors_stream + errors_nonstream + client["hung"]
    start, end = data["start"], data["end"]
    load_end = data["slices"][-1]["t_end"]
    elapsed = sum(r["elapsed_s"] for s in data["slices"] for r in s["runs"].values()) / 2
    return {
        "duration_s": round(elapsed, 1),
        "warmup_s": round(sum(r["elapsed_s"] for r in data["warmup"]["runs"].values()) / 2, 1),
        "client": client,
        "client_errors": {"total": errors, "stream": errors_stream, "nonstream": errors_nonstream},
        "client_error_pct": pct(errors, client["sent"], 3),
        "predicted_error_pct": pct(faults["mid_stream"], client["sent"], 3),
        "faults": faults,
        "upstream": up,
        "upstream_per_request": round(faults["requests"] / client["sent"], 3) if client["sent"] else None,
        "records": {
            "expected": client["sent"],
            "recorded": ledger.get("records"),
            "lost": len(ids - ledger_ids),
            "unknown": len(ledger_ids - ids),
            "duplicated": client["duplicated"],
            "access_log_lines": data["access_log"]["lines"],
            "access_log_distinct": data["access_log"]["distinct"],
        },
        "ledger": ledger,
        "metrics": data["metrics"],
        "exit_status": data["exit_status"],
        "fresh": data["fresh"],
        "start": start,
        "end": end,
        "rss_mb_max": max((s["rss_mb"] for s in data["samples"] if s["rss_mb"] is not None), default=None),
        "rss_mb_per_min_second_half": _slope(data["samples"], (start["t"] + load_end) / 2, load_end),
        "fds_max": max((s["fds"] for s in data["samples"] if s["fds"] is not None), default=None),
        "in_flight_max": max((s["in_flight"] for s in data["samples"] if s["in_flight"] is not None), default=None),
    }


def _checks(s: dict[str, Any]) -> list[dict[str, Any]]:
    rec, c, err, f = s["records"], s["client"], s["client_errors"], s["faults"]
    start, end = s["start"], s["end"]
    checks = [
        check(
            "records expected = recorded: one ledger record per request sent, none lost or duplicated",
            "correctness",
            rec["recorded"] == rec["expected"]
            and rec["lost"] == rec["unknown"] == rec["duplicated"] == c["no_id"] == s["exit_status"] == 0,
            f"expected {rec['expected']:,}, recorded {fmt(rec['recorded'], ',')}; ids lost {rec['lost']}, "
            f"unknown to the clients {rec['unknown']}, duplicated {rec['duplicated']}, answers without one "
            f"{c['no_id']}; gateway exit status {s['exit_status']}"
            + (f"; {s['ledger']['read_error']}" if s["ledger"].get("read_error") else ""),
        ),
        check(
            "one access-log line per record, metrics dropped no record",
            "correctness",
            rec["access_log_lines"] == rec["access_log_distinct"] == rec["recorded"]
            and s["metrics"]["ledger_dropped"] == 0
            and s["metrics"]["store_errors"] == 0,
            f"{rec['access_log_lines']:,} lines ({rec['access_log_distinct']:,} ids); ledger dropped "
            f"{s['metrics']['ledger_dropped']}, store errors {s['metrics']['store_errors']}",
        ),
        check(
            "no hung connection: every request answered within its deadline, none left in flight or open",
            "correctness",
            c["hung"] == 0 and end["in_flight"] == 0 and end["client_conns"] == 0,
            f"no answer: {c['hung']}"
            + (f" {c['hung_kinds']}" if c["hung_kinds"] else "")
            + f"; in flight after the load {end['in_flight']}, client connections still open {end['client_conns']}",
        ),
        check(
            "client errors as the faults predict: non-streamed 0, streamed ≤ mid-stream faults, = the ledger's",
            "correctness",
            err["nonstream"] == 0
            and err["stream"] <= f["mid_stream"]
            and c["interrupted"] == s["ledger"].get("interrupted")
            and c["stream_http_errors"] == 0,
            f"non-streamed {err['nonstream']}; streamed {err['stream']} (interrupted {c['interrupted']}, HTTP errors "
            f"{c['stream_http_errors']}) vs {f['mid_stream']} mid-stream faults; the ledger's interrupted "
            f"streams {s['ledger'].get('interrupted')}",
        ),
        check(
            f"RSS stable: at the end ≤ {1 + MAX_RSS_GROWTH:.2f} × after warm-up",
            "correctness",
            None
            if None in (start["rss_mb"], end["rss_mb"])
            else end["rss_mb"] <= (1 + MAX_RSS_GROWTH) * start["rss_mb"],
            f"{fmt(start['rss_mb'], '.1f')} → {fmt(end['rss_mb'], '.1f')} MB (max {fmt(s['rss_mb_max'], '.1f')})",
        ),
    ]
    known = None not in (start["fds"], start["upstream_conns"], end["fds"], end["upstream_conns"])
    other_start = start["fds"] - start["upstream_conns"] if known else None
    other_end = end["fds"] - end["upstream_conns"] if known else None
    checks.append(
        check(
            f"fds stable: back to after warm-up's (+ {FD_SLACK}) but for pooled upstream connections; none half-closed",
            "correctness",
            None if not known else other_end <= other_start + FD_SLACK and end["close_wait"] == 0,
            f"{start['fds']} → {end['fds']} (max {s['fds_max']}); pooled upstream connections "
            f"{start['upstream_conns']} → {end['upstream_conns']}, the rest {other_start} → {other_end}; "
            f"CLOSE_WAIT {end['close_wait']}",
        )
    )
    return checks


def _table(s: dict[str, Any], slices: list[dict[str, Any]]) -> str:
    c, rec, f, err = s["client"], s["records"], s["faults"], s["client_errors"]
    start, end, m = s["start"], s["end"], s["metrics"]

    def row(label: str, value: Any, spec: str = "") -> tuple[str, list[str]]:
        return label, [fmt(value, spec)]

    rows = [
        row("duration (s, after a warm-up of)", f"{s['duration_s']:g} (+{s['warmup_s']:g})"),
        row("requests sent (warm-up included)", c["sent"], ","),
        row("  streamed", c["streams"], ","),
        row("upstream requests per client request", s["upstream_per_request"], ".3f"),
        ("faults injected (all upstreams)", []),
        *(row(f"  {k}", f[k], ",") for k in FAULTS),
        row("  of them mid-stream (stall or cut)", f["mid_stream"], ","),
        row("hedges / ejections (metrics)", f"{m['hedges']:,} / {m['ejections']:,}"),
        ("client-visible errors", []),
        row("  non-streamed (HTTP errors, bad bodies)", err["nonstream"], ","),
        row("  streamed (HTTP errors, interrupted)", f"{c['stream_http_errors']} + {c['interrupted']}"),
        row("  no answer (timeouts, closed)", c["hung"], ","),
        row(
            "  error rate %, predicted ≤",
            f"{fmt(s['client_error_pct'], '.3f')}, ≤ {fmt(s['predicted_error_pct'], '.3f')}",
        ),
        ("records", []),
        row("  expected (requests sent)", rec["expected"], ","),
        row("  in the ledger", rec["recorded"], ","),
        row("  lost / unknown / duplicated ids", f"{rec['lost']} / {rec['unknown']} / {rec['duplicated']}"),
        row("  access-log lines", rec["access_log_lines"], ","),
        ("gateway process: fresh → after warm-up → end", []),
        row(
            "  RSS (MB)",
            f"{fmt(s['fresh']['rss_mb'], '.1f')} → {fmt(start['rss_mb'], '.1f')} → {fmt(end['rss_mb'], '.1f')}",
        ),
        row("  RSS max (MB)", s["rss_mb_max"], ".1f"),
        row("  RSS trend, second half of the load (MB/min)", s["rss_mb_per_min_second_half"], "+.2f"),
        row("  open fds", f"{s['fresh']['fds']} → {start['fds']} → {end['fds']}"),
        row(
            "    pooled upstream connections",
            f"{s['fresh']['upstream_conns']} → {start['upstream_conns']} → {end['upstream_conns']}",
        ),
        row(
            "    client connections", f"{s['fresh']['client_conns']} → {start['client_conns']} → {end['client_conns']}"
        ),
        row("  open fds max", s["fds_max"], "d"),
        row("  in flight max / after the load", f"{s['in_flight_max']} / {end['in_flight']}"),
    ]
    out = table(["value"], rows, label_width=46)
    out += "\nupstream attempts by outcome (metrics): " + ", ".join(
        f"{k} {v:,}" for k, v in sorted(m["attempts"].items())
    )
    timeline = [
        (
            f"{sl['name']} (t={sl['t_end']:g} s)",
            [
                f"{sum(r['count'] for r in sl['runs'].values()):,}",
                str(sum(r["errors"] + r.get("mismatches", 0) for r in sl["runs"].values())),
                str(sum(sl["upstream"][u][k] for u in sl["upstream"] for k in FAULTS)),
                fmt(sl["rss_mb"], ".1f"),
                fmt(sl["fds"], "d"),
                fmt(sl["in_flight_max"], "d"),
            ],
        )
        for sl in slices
    ]
    cols = ["requests", "errors", "faults", "RSS MB", "fds", "in flight"]
    note = "per slice (errors: client-visible, interrupted streams included; faults: injected in it; RSS, fds: "
    return f"{out}\n\n{note}at its end)\n" + table(cols, timeline, 24)
