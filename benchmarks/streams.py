"""The `streams` scenario (issue #7): many long-lived streams through one gateway worker.

A fake upstream streams slowly (`--stamp-events`: one event a second, each carrying its sequence number and
its send time, `time.perf_counter_ns()`), so streams stay open. A stream client of its own (this module run as
`python -m benchmarks.streams --url …`: asyncio + httptools on uvloop, one connection per stream) opens a level
of concurrent streams (100, 1,000, 5,000, 10,000; `--quick`: 100 and 1,000) at a steady pace, holds them, and
checks every event: sequence gaps (lost), sequence going back (reordered), and its lag, receive minus send time
on the same monotonic clock. Each level runs twice: against the upstream directly (the baseline: what the
client and the upstream themselves add at that concurrency), then through a freshly started gateway worker
(`--workers 1`; `HEDGEROW_BENCH_ENGINE=lean` picks the lean server engine, as in `overhead`), whose RSS
(`/proc/<pid>/status` VmRSS) is read when fresh, at idle before the level, every 0.5 s while the streams run,
and after. The gateway's added lag is its percentile minus the direct run's, in the same benchmark run. At
LAG_LEVEL the same client then runs through reference proxies on the gateway's core, one at a time: the bare
aiohttp pass-through (benchmarks/bare_proxy.py) and nginx when on PATH; their added lag is what any proxy adds
on this machine, to read the gateway's against (on a small VM much of the lag tail is the machine's, not a proxy's).

Lag and memory "with all streams open" are taken over the window in which every stream of the level was open:
from the last stream's response head to the first stream's end (each stream asks for as many events as fit
before a common end, so they all end together and the window covers the hold time, `--duration`).

Backpressure: a second fake upstream pushes a fast 50 MiB stream; the client reads the response head, then
stops reading for a few seconds while the gateway's RSS and the bytes the upstream managed to hand to its socket
are sampled; then it reads the rest and checks every event arrived, in order.

Client run: python -m benchmarks.streams --url http://127.0.0.1:PORT/v1/chat/completions --streams N
            [--open-rate 250] [--max-pending 64] [--events E | --end-after S [--gap 1]] [--model M] [--key K]
            [--timeout S]
Prints one JSON object: streams opened, completed, failed (by cause), events, lost, reordered, lag percentiles
(over the all-open window and over all events) and CDF points, the window's bounds, and RLIMIT_NOFILE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httptools
import uvloop

from benchmarks.harness import (
    NGINX_MISSING,
    ROOT,
    CpuPlan,
    Service,
    ServiceError,
    bench_engine,
    child_env,
    cpu_plan,
    free_ports,
    http_ok,
    nginx_service,
)
from benchmarks.kit import (
    CHAT_PATH,
    GATEWAY_KEY,
    MODEL,
    UPSTREAM_MODEL,
    Upstream,
    banner,
    check,
    exit_status,
    fmt,
    gateway_cpu,
    orchestrator_on,
    progress,
    start_gateway,
    start_upstream,
    startup_failed,
    table,
    verdicts,
)
from proxy.fds import SPARE_FDS

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

# Acceptance targets (issue #7).
MAX_RSS_MB_AT_TOP = 400.0  # worker RSS with the top level's streams open (10,000; --quick: its top level)
TOP_LEVEL = 10_000
MAX_ADDED_LAG_P99_MS = 1.0  # per-event lag the gateway adds, p99, at LAG_LEVEL streams
LAG_LEVEL = 1_000
MAX_IDLE_RSS_MB = 60.0  # a freshly started worker
MAX_BP_GROWTH_MIB = 10.0  # worker RSS growth while a client does not read a PUSH_MIB stream

LEVELS = (100, 1_000, 5_000, 10_000)
QUICK_LEVELS = (100, 1_000)
OPEN_RATE = 250.0  # streams opened per second; a level's ramp is n / OPEN_RATE, at least MIN_RAMP_S
MAX_PENDING = 64  # streams sent but not answered yet, at most: a target that falls behind slows the ramp down
MIN_RAMP_S = 1.0  # ≥ one event gap, so the streams' events spread over the whole second
GAP_S = 1.0  # between two events of a stream
HOLD_S, QUICK_HOLD_S = 10.0, 5.0  # seconds every stream of a level is open together (at least)
POOL = 20_000  # the provider's max-connections (default 1024: streams beyond it would wait for a connection)
SETTLE_S = 1.0  # after the gateway is ready / after a level, before reading an idle RSS
WARM_STREAMS, WARM_EVENTS = 20, 2  # before each level's idle RSS: first-request paths and imports done
SAMPLE_S = 0.5  # RSS sampling period while streams run
PUSH_MIB = 50
PAUSE_S, QUICK_PAUSE_S = 4.0, 2.0  # how long the slow client does not read
FD_SPARE = SPARE_FDS  # fds the gateway needs besides two per stream (its own estimate), checked below

STAMP = re.compile(rb"#(\d+)@(\d+)")
MIB = 1 << 20


# -- the stream client ----------------------------------------------------------------------------------------


class SeqCheck:
    """The events of one stream, fed its body as it arrives: each `#seq@send_ns` stamp is checked against the
    next sequence number expected (a jump counts the skipped events lost, a step back counts one reordered)
    and its lag (receive − send) recorded. Only whole events are read: a partial one waits for its end."""

    __slots__ = ("carry", "done", "events", "expected", "lost", "reordered")

    def __init__(self) -> None:
        self.carry = b""
        self.expected = 0
        self.events = 0
        self.lost = 0
        self.reordered = 0
        self.done = False  # saw `data: [DONE]`

    def feed(self, data: bytes, now_ns: int, sends: array[int] | None, lags: array[int] | None) -> None:
        buf = self.carry + data if self.carry else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            self.carry = buf
            return
        self.carry = buf[end + 2 :]
        for m in STAMP.finditer(buf, 0, end):
            seq, sent = int(m[1]), int(m[2])
            self.events += 1
            if seq == self.expected:
                self.expected += 1
            elif seq > self.expected:
                self.lost += seq - self.expected
                self.expected = seq + 1
            else:
                self.reordered += 1
            if lags is not None and sends is not None:
                sends.append(sent)
                lags.append(now_ns - sent)
        if b"data: [DONE]" in buf[max(0, end - 64) : end + 2]:
            self.done = True

    def finish(self, events: int) -> None:
        """The stream ended: events it never got to are lost too."""
        if self.expected < events:
            self.lost += events - self.expected
            self.expected = events


class _Run:
    """What one client run has seen, over all its streams. A stream asks for `events` events, or with `end_ns`
    as many as fit before that moment (at least 2), counted when its request goes out: streams opened at
    different times then all end together, so every stream is open at once for as long as planned."""

    def __init__(
        self, n: int, head: bytes, body: dict[str, Any], events: int, end_ns: int | None, gap_s: float, pending: int
    ) -> None:
        self.n = n
        self.head = head
        self.body = body
        self.events = events
        self.end_ns = end_ns
        self.gap_ns = gap_s * 1e9
        self.slots = asyncio.Semaphore(pending)  # streams sent but not yet answered: a saturated target slows us
        self.sends: array[int] = array("q")
        self.lags: array[int] = array("q")
        self.errors: Counter[str] = Counter()
        self.opened = 0
        self.open_now = 0
        self.max_open = 0
        self.completed = 0
        self.lost = 0
        self.reordered = 0
        self.last_open_ns = 0
        self.first_end_ns = 0

    def request(self) -> tuple[int, bytes]:
        events = self.events
        if self.end_ns is not None:
            events = max(2, math.ceil((self.end_ns - time.perf_counter_ns()) / self.gap_ns))
        body = json.dumps({**self.body, "max_tokens": events}, separators=(",", ":")).encode()
        return events, self.head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)

    def stream_opened(self) -> None:
        self.opened += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        self.last_open_ns = time.perf_counter_ns()

    def stream_ended(self, conn: _StreamConn, error: str | None) -> None:
        if conn.opened:
            self.open_now -= 1
            if not self.first_end_ns:
                self.first_end_ns = time.perf_counter_ns()
            conn.check.finish(conn.events)
            self.lost += conn.check.lost
            self.reordered += conn.check.reordered
        if error is None and conn.status == 200 and not conn.check.done:
            error = "ended without [DONE]"
        if error is None and conn.status != 200:
            error = f"http {conn.status}"
        if error is None:
            self.completed += 1
        else:
            self.errors[error] += 1


class _StreamConn(asyncio.Protocol):
    """One stream on its own connection. The receive time of a read is taken when it arrives, before parsing."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.parser = httptools.HttpResponseParser(self)
        self.check = SeqCheck()
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.opened = False
        self.events = 0
        self.now_ns = 0
        self.slot = True  # holds one of the run's pending slots until answered
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.events, request = self.run.request()
        self.transport.write(request)

    def release(self) -> None:
        if self.slot:
            self.slot = False
            self.run.slots.release()

    def data_received(self, data: bytes) -> None:
        self.now_ns = time.perf_counter_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self.end(f"bad HTTP: {type(e).__name__}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.end("connection closed before the stream ended")

    def end(self, error: str | None) -> None:
        self.release()
        if not self.done.done():
            self.run.stream_ended(self, error)
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    # httptools parser callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.release()
        if self.status == 200:
            self.opened = True
            self.run.stream_opened()

    def on_body(self, body: bytes) -> None:
        if self.status == 200:
            self.check.feed(body, self.now_ns, self.run.sends, self.run.lags)

    def on_message_complete(self) -> None:
        self.end(None)


def raise_nofile(needed: int) -> dict[str, Any]:
    """RLIMIT_NOFILE's soft limit up to what is needed (at most the hard limit); what it is now, and whether
    that is enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return {"soft": soft, "hard": hard, "needed": needed, "ok": soft == resource.RLIM_INFINITY or soft >= needed}


def _quantiles(sorted_ns: Sequence[int]) -> dict[str, float | None]:
    def q(p: float) -> float | None:
        if not sorted_ns:
            return None
        return round(sorted_ns[max(0, math.ceil(p * len(sorted_ns)) - 1)] / 1e6, 4)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p999": q(0.999), "max": q(1.0)}


CDF_QS = (
    *(i / 100 for i in range(1, 100)),
    0.995,
    0.998,
    0.999,
    0.9995,
    0.9998,
    0.9999,
)


def cdf_points(sorted_ns: Sequence[int]) -> list[tuple[float, float]]:
    """(quantile, ms) points of a sorted sample, dense in the tail, for a CDF chart; the max as quantile 1."""
    n = len(sorted_ns)
    if not n:
        return []
    points = [(q, round(sorted_ns[max(0, math.ceil(q * n) - 1)] / 1e6, 4)) for q in CDF_QS if q * n >= 1]
    return [*points, (1.0, round(sorted_ns[-1] / 1e6, 4))]


async def run_streams(
    url: str,
    n: int,
    open_rate: float,
    model: str,
    key: str | None,
    timeout_s: float,
    events: int = 10,
    end_after_s: float | None = None,
    gap_s: float = GAP_S,
    pending: int = MAX_PENDING,
) -> dict[str, Any]:
    host, port, path = _loopback(url)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    head += f"Authorization: Bearer {key}\r\n" if key else ""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    nofile = raise_nofile(n + FD_SPARE)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    t0 = time.perf_counter_ns()
    end_ns = None if end_after_s is None else t0 + int(end_after_s * 1e9)
    run = _Run(n, head.encode(), body, events, end_ns, gap_s, pending)

    async def one() -> None:
        conn = _StreamConn(run)
        try:
            async with asyncio.timeout_at(deadline):
                transport, _ = await loop.create_connection(lambda: conn, host, port)
                try:
                    await conn.done
                finally:
                    transport.close()
        except TimeoutError:
            conn.end("timeout")  # counted once, with the events it never got if it had opened
        except OSError as e:
            conn.end(f"{type(e).__name__} ({os.strerror(e.errno) if e.errno else e})")
        finally:
            conn.release()  # its pending slot, if it still holds it (never connected, or never answered)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    tasks = []
    for i in range(n):  # paced: stream i opens at t0 + i / open_rate, or later if `pending` are unanswered
        delay = (t0 + i * 1e9 / open_rate - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        async with asyncio.timeout_at(deadline):
            await run.slots.acquire()
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)  # each bounded by the deadline
    t_end = time.perf_counter_ns()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)

    # The all-open window: from the last stream's head to the first stream's end, if every stream that opened
    # was open together at some moment; else all events count (and the window is reported missing).
    lo, hi = run.last_open_ns, run.first_end_ns
    window = run.opened > 0 and 0 < lo < hi and run.max_open == run.opened
    in_window = sorted(lag for s, lag in zip(run.sends, run.lags, strict=True) if lo <= s < hi) if window else []
    all_lags = sorted(run.lags)
    lags = in_window if in_window else all_lags
    elapsed = (t_end - t0) / 1e9
    return {
        "url": url,
        "streams": n,
        "events_per_stream": events if end_after_s is None else None,
        "end_after_s": end_after_s,
        "open_rate": open_rate,
        "opened": run.opened,
        "completed": run.completed,
        "failed": n - run.completed,
        "error_kinds": dict(run.errors),
        "max_open": run.max_open,
        "events": len(run.lags),
        "lost": run.lost,
        "reordered": run.reordered,
        "t0_s": t0 / 1e9,  # perf_counter is CLOCK_MONOTONIC on Linux: comparable with the orchestrator's clock
        "open_s": round((lo - t0) / 1e9, 3) if lo else None,
        "all_open_s": lo / 1e9 if window else None,
        "first_end_s": hi / 1e9 if window else None,
        "window_s": round((hi - lo) / 1e9, 3) if window else None,
        "window_events": len(in_window),
        "lag_ms": _quantiles(lags),
        "lag_all_ms": _quantiles(all_lags),
        "cdf_ms": cdf_points(lags),
        "elapsed_s": round(elapsed, 3),
        "client_cpu_pct": round(
            100 * (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / elapsed if elapsed else 0, 1
        ),
        "nofile": nofile,
    }


def _loopback(url: str) -> tuple[str, int, str]:
    from benchmarks.load import _loopback as check_loopback  # refuses anything but http:// on loopback

    return check_loopback(url)


def client_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streams", description="the streams scenario's client")
    parser.add_argument("--url", required=True, help="loopback http URL of a chat completions route")
    parser.add_argument("--streams", type=int, required=True, help="concurrent streams, one connection each")
    parser.add_argument("--events", type=int, default=10, help="events per stream (sent as max_tokens)")
    parser.add_argument(
        "--end-after",
        type=float,
        metavar="S",
        help="instead of --events: each stream asks for as many events as fit until S s after the start (≥ 2)",
    )
    parser.add_argument("--gap", type=float, default=GAP_S, help="the upstream's seconds between events (--end-after)")
    parser.add_argument("--open-rate", type=float, default=OPEN_RATE, help="streams opened per second")
    parser.add_argument(
        "--max-pending", type=int, default=MAX_PENDING, help="streams sent but not yet answered, at most"
    )
    parser.add_argument("--model", default=UPSTREAM_MODEL)
    parser.add_argument("--key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--timeout", type=float, default=120.0, help="the whole run, seconds")
    args = parser.parse_args(argv)
    if min(args.streams, args.events, args.max_pending) < 1 or min(args.open_rate, args.timeout, args.gap) <= 0:
        parser.error("--streams, --events and --max-pending must be ≥ 1, --open-rate, --timeout and --gap > 0")
    result = uvloop.run(
        run_streams(
            args.url,
            args.streams,
            args.open_rate,
            args.model,
            args.key,
            args.timeout,
            events=args.events,
            end_after_s=args.end_after,
            gap_s=args.gap,
            pending=args.max_pending,
        )
    )
    print(json.dumps(result))


# -- the scenario ---------------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process, from /proc/<pid>/status; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def open_files(pid: int) -> tuple[int | None, int | None]:
    """(fds open now, the soft RLIMIT_NOFILE) of a process."""
    try:
        count: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        count = None
    limit = None
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                limit = None if value == "unlimited" else int(value)
    except OSError:
        pass
    return count, limit


def worker_pid(service: Service) -> int:
    """The gateway worker: with `--workers 1` the process itself serves (no supervisor, no fork)."""
    leader = service.proc.pid
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == leader:  # a forked worker: its parent is the leader
                return int(entry.name)
    return leader


def run_client(
    args: list[str], cpus: frozenset[int] | None, timeout_s: float, sample: Callable[[], Any] | None = None
) -> tuple[dict[str, Any], list[tuple[float, Any]]]:
    """One client run in a fresh, pinned process: its JSON result, and `sample()` every SAMPLE_S meanwhile
    (with time.monotonic(), the client's clock too)."""
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))

    def client() -> dict[str, Any]:
        try:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.streams", *args],
                cwd=ROOT,
                env=child_env(),
                capture_output=True,
                timeout=timeout_s,
                preexec_fn=pin,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ServiceError(f"stream client still running after {timeout_s:g}s; killed") from None
        if out.returncode != 0:
            raise ServiceError(
                f"stream client failed ({out.returncode}): {out.stderr.decode(errors='replace')[-2000:]}"
            )
        return json.loads(out.stdout)

    samples: list[tuple[float, Any]] = []
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(client)
        while True:
            if sample is not None:
                samples.append((time.monotonic(), sample()))
            try:
                result = future.result(timeout=SAMPLE_S)
                break
            except TimeoutError:
                continue
    return result, samples


def client_args(port: int, n: int, open_rate: float, timeout_s: float, via_gateway: bool) -> list[str]:
    args = ["--url", f"http://127.0.0.1:{port}{CHAT_PATH}", "--streams", str(n)]
    args += ["--open-rate", f"{open_rate:g}", "--timeout", f"{timeout_s:g}"]
    if via_gateway:
        args += ["--model", MODEL, "--key", GATEWAY_KEY]
    return args


def config(port: int, upstream_port: int, engine: str) -> str:
    return (
        f"server: {{host: 127.0.0.1, port: {port}, engine: {engine}}}\n"
        f"keys:\n  - {{name: bench, key: {GATEWAY_KEY}}}\n"
        f'providers:\n  - {{name: fake, base-url: "http://127.0.0.1:{upstream_port}/v1", max-connections: {POOL}}}\n'
        f"models:\n  - name: {MODEL}\n    endpoints: [{{provider: fake, model: {UPSTREAM_MODEL}}}]\n"
    )


def _mb(b: float | None) -> float | None:
    return None if b is None else round(b / 1e6, 1)


def level(
    n: int, upstream: Upstream, plan: CpuPlan, log_dir: Path, engine: str, hold_s: float, open_rate: float
) -> dict[str, Any]:
    """One concurrency level: the direct baseline, then a fresh gateway worker; at LAG_LEVEL, then the
    reference proxies too."""
    ramp = max(MIN_RAMP_S, n / open_rate)
    rate = n / ramp
    end_after = 1.5 * ramp + hold_s + 2  # every stream ends then: the ramp may run up to 50 % late
    timeout = end_after + 60
    pace = ["--end-after", f"{end_after:g}", "--gap", f"{GAP_S:g}"]

    def client(
        port: int, via_gateway: bool, sample: Callable[[], Any] | None = None
    ) -> tuple[dict[str, Any], list[tuple[float, Any]]]:
        """The level's client run against `port`: the same ramp, rate and common end for every target."""
        return run_client([*client_args(port, n, rate, timeout, via_gateway), *pace], plan.load, timeout + 10, sample)

    out: dict[str, Any] = {"streams": n, "ramp_s": ramp, "end_after_s": end_after}
    progress(f"{n:,} streams: direct (ramp {ramp:g} s, all end {end_after:g} s after the start)")
    out["direct"], _ = client(upstream.port, False)
    progress(f"{n:,} streams: direct {_brief(out['direct'])}")

    port = free_ports(1)[0]
    gateway = start_gateway(f"gateway-{n}", port, config(port, upstream.port, engine), plan, log_dir)
    try:
        pid = worker_pid(gateway)
        time.sleep(SETTLE_S)
        out["rss_fresh"] = rss_bytes(pid)
        warm_args = [*client_args(port, WARM_STREAMS, 100, 30, True), "--events", str(WARM_EVENTS)]
        warm, _ = run_client(warm_args, plan.load, 40)
        out["warmup_failed"] = warm["failed"]
        time.sleep(SETTLE_S)
        out["rss_idle"] = rss_bytes(pid)
        fds, limit = open_files(pid)
        out["fds_idle"], out["nofile_limit"] = fds, limit
        out["fds_needed"] = 2 * n + (fds or 0) + FD_SPARE
        if limit is not None and out["fds_needed"] > limit:
            progress(
                f"{n:,} streams: the gateway's open-file limit is {limit:,} (this process's hard limit: "
                f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,}), it needs ~{out['fds_needed']:,} "
                f"(2 per stream + {fds} open at idle + {FD_SPARE}): not all can be open at once"
            )
        peak_fds = [fds or 0]

        def sample() -> tuple[int | None, float]:
            peak_fds[0] = max(peak_fds[0], open_files(pid)[0] or 0)
            return rss_bytes(pid), gateway.cpu_seconds()

        with gateway_cpu(plan, gateway) as cpu:
            result, samples = client(port, True, sample)
        out["gateway"] = result
        out["samples"] = [(round(t, 3), rss, round(cpu_s, 3)) for t, (rss, cpu_s) in samples]
        out["gateway_cpu"] = cpu
        out["fds_peak"] = peak_fds[0]
        time.sleep(SETTLE_S)
        out["rss_after"] = rss_bytes(pid)
    finally:
        gateway.stop()
    lo, hi = result["all_open_s"], result["first_end_s"]
    during = [(t, rss, cpu_s) for t, (rss, cpu_s) in samples if rss is not None and lo is not None and lo <= t <= hi]
    out["rss_open"] = max(rss for _, rss, _ in during) if during else None
    out["rss_peak"] = max((rss for _, (rss, _) in samples if rss is not None), default=None)
    out["rss_open_samples"] = len(during)
    # The gateway's CPU while every stream was open: how much of its core relaying n streams takes.
    span = during[-1][0] - during[0][0] if len(during) > 1 else 0
    out["gateway_cpu_pct_open"] = round(100 * (during[-1][2] - during[0][2]) / span, 1) if span > 0 else None
    rss_open, rss_idle = out["rss_open"], out["rss_idle"]
    held = result["max_open"]
    out["bytes_per_stream"] = round((rss_open - rss_idle) / held) if rss_open and rss_idle and held else None
    elapsed = result["elapsed_s"]
    out["gateway_cpu_pct"] = round(100 * cpu["gateway_cpu_s"] / elapsed, 1) if cpu["gateway_cpu_s"] else None
    out["added_lag_ms"] = _added_lag(result, out["direct"])
    progress(
        f"{n:,} streams: gateway {_brief(result)}; RSS idle {_mb(rss_idle)} MB, open {_mb(rss_open)} MB, "
        f"{fmt(out['bytes_per_stream'], ',')} B/stream"
    )
    if n == LAG_LEVEL:
        out["refs"] = references(upstream.port, plan, log_dir, lambda port: client(port, False)[0], out["direct"])
    return out


def references(
    upstream_port: int, plan: CpuPlan, log_dir: Path, client: Callable[[int], dict[str, Any]], direct: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The level's client run through reference proxies on the gateway's core, one at a time: the bare aiohttp
    pass-through, then nginx when installed. Their added lag is what any proxy adds on this machine at this
    concurrency (loopback hops, wake-ups), to read the gateway's against. Each: the client's result with its
    `added_lag_ms`."""
    bare_port, nginx_port = free_ports(2)
    upstream = f"http://127.0.0.1:{upstream_port}"
    bare_args = ["-m", "benchmarks.bare_proxy", "--port", str(bare_port), "--upstream", upstream]
    starts: dict[str, tuple[int, Callable[[], Service | None]]] = {
        "bare": (bare_port, lambda: Service("bare", bare_args, plan.proxy, log_dir)),
        "nginx": (nginx_port, lambda: nginx_service(log_dir, plan.proxy, upstream_port, nginx_port)),
    }
    refs: dict[str, dict[str, Any]] = {}
    for name, (port, start) in starts.items():  # started one at a time: each has the core to itself
        service = start()
        if service is None:
            print(NGINX_MISSING, flush=True)
            continue
        try:
            service.wait_ready(http_ok(port, "/v1/models"))
            result = client(port)
        finally:
            service.stop()
        refs[name] = {**result, "added_lag_ms": _added_lag(result, direct)}
        progress(f"{direct['streams']:,} streams: {name} {_brief(result)}")
    return refs


def _added_lag(result: dict[str, Any], direct: dict[str, Any]) -> dict[str, float | None]:
    """A proxied run's lag percentiles minus the direct run's."""
    return {k: _diff(result["lag_ms"][k], direct["lag_ms"][k]) for k in ("p50", "p90", "p99", "p999", "max")}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 4)


def _brief(r: dict[str, Any]) -> str:
    lag = r["lag_ms"]
    text = (
        f"{r['completed']:,}/{r['streams']:,} completed, max {r['max_open']:,} open, {r['events']:,} events, "
        f"lag p50 {fmt(lag['p50'], '.3f')} p99 {fmt(lag['p99'], '.3f')} max {fmt(lag['max'], '.1f')} ms"
    )
    if r["failed"]:
        text += f", failed: {r['error_kinds']}"
    if r["lost"] or r["reordered"]:
        text += f", lost {r['lost']}, reordered {r['reordered']}"
    return text


class _Reader:
    """A blocking reader of one streamed response, for the backpressure test: reads only when told to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = httptools.HttpResponseParser(self)
        self.check = SeqCheck()
        self.status = 0
        self.body_bytes = 0
        self.head_done = False
        self.complete = False

    def read_once(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.parser.feed_data(data)
        return True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        self.check.feed(body, 0, None, None)

    def on_message_complete(self) -> None:
        self.complete = True


def backpressure(plan: CpuPlan, log_dir: Path, engine: str, pause_s: float) -> dict[str, Any]:
    """A fast 50 MiB stream to a client that reads its head, then nothing for `pause_s`: does the gateway
    stop reading its upstream (RSS flat, the upstream stalled), and does the whole stream arrive afterwards?"""
    up_port, port = free_ports(2)
    push = start_upstream("push-upstream", up_port, ["--push-bytes", str(PUSH_MIB * MIB)], plan, log_dir)
    out: dict[str, Any] = {"pushed_bytes": PUSH_MIB * MIB, "pause_s": pause_s}
    try:
        gateway = start_gateway("gateway-backpressure", port, config(port, up_port, engine), plan, log_dir)
        try:
            pid = worker_pid(gateway)
            out["warmup"] = _pull(port, pid, push, 0.0)  # a reading client first: the path warm, RSS settled
            time.sleep(SETTLE_S)
            out.update(_pull(port, pid, push, pause_s))
        finally:
            gateway.stop()
    finally:
        push.service.stop()
    return out


def _pull(port: int, pid: int, push: Upstream, pause_s: float) -> dict[str, Any]:
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    request = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: Bearer {GATEWAY_KEY}\r\n\r\n"
    ).encode() + body
    rss0 = rss_bytes(pid) or 0
    stats0 = push.stats()
    t0 = time.monotonic()
    samples: list[tuple[float, int, int]] = []  # (s since start, RSS growth, bytes the upstream wrote)

    def sample() -> None:
        samples.append(
            (
                round(time.monotonic() - t0, 3),
                (rss_bytes(pid) or 0) - rss0,
                push.stats()["push_bytes"] - stats0["push_bytes"],
            )
        )

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        reader = _Reader(sock)
        while not reader.head_done and reader.read_once():
            pass
        read_before = reader.body_bytes
        sample()
        paused_until = time.monotonic() + pause_s
        while time.monotonic() < paused_until:  # not reading: the gateway must stop reading its upstream
            time.sleep(0.1)
            sample()
        pause_end = len(samples)
        deadline = time.monotonic() + 60
        next_sample = time.monotonic() + 0.1
        sock.settimeout(5)
        while not reader.complete and time.monotonic() < deadline and reader.read_once():
            if time.monotonic() >= next_sample:
                sample()
                next_sample += 0.1
        sample()
    stats1 = push.stats()
    during = samples[:pause_end]
    one_s_before = [w for t, _, w in during if t <= during[-1][0] - 1.0]
    return {
        "status": reader.status,
        "complete": reader.complete,
        "done_seen": reader.check.done,
        "read_before_pause": read_before,
        "rss_before": rss0,
        "rss_growth_paused": max(g for _, g, _ in during),
        "rss_growth_peak": max(g for _, g, _ in samples),
        "upstream_written_paused": during[-1][2],
        "upstream_written_last_1s": during[-1][2] - one_s_before[-1] if one_s_before else None,
        "upstream_events": stats1["push_events"] - stats0["push_events"],
        "upstream_done": stats1["push_done"] - stats0["push_done"],
        "received_body_bytes": reader.body_bytes,
        "events": reader.check.events,
        "lost": reader.check.lost + max(0, stats1["push_events"] - stats0["push_events"] - reader.check.expected),
        "reordered": reader.check.reordered,
        "samples": samples,
    }


# -- summary, checks, report ----------------------------------------------------------------------------------


def _checks(levels: list[dict[str, Any]], bp: dict[str, Any] | None, quick: bool) -> list[dict[str, Any]]:
    checks = []
    by_n = {lv["streams"]: lv for lv in levels}
    top = by_n.get(TOP_LEVEL) or (levels[-1] if levels else None)
    if top is not None:
        g = top["gateway"]
        rss = top["rss_open"]
        ok = g["failed"] == 0 and rss is not None and rss <= MAX_RSS_MB_AT_TOP * 1e6 and g["lost"] + g["reordered"] == 0
        detail = (
            f"{g['max_open']:,} of {top['streams']:,} held at once, {g['failed']:,} failed; worker RSS {_mb(rss)} MB "
            f"with all open; lost {g['lost']}, reordered {g['reordered']}"
        )
        short = g["failed"] or g["max_open"] < top["streams"]
        if short and top.get("nofile_limit") is not None and top["fds_needed"] > top["nofile_limit"]:
            detail += (
                f"; the worker's open-file limit {top['nofile_limit']:,} < ~{top['fds_needed']:,} it needs "
                f"(2 per stream + {top['fds_idle']} at idle + {FD_SPARE})"
            )
        checks.append(
            check(
                f"{top['streams']:,} streams held with worker RSS ≤ {MAX_RSS_MB_AT_TOP:g} MB and 0 lost/reordered",
                "performance",
                ok,
                detail,
            )
        )
    lag = by_n.get(LAG_LEVEL)
    if lag is not None:
        added = lag["added_lag_ms"]["p99"]
        checks.append(
            check(
                f"added per-event lag p99 ≤ {MAX_ADDED_LAG_P99_MS:g} ms at {LAG_LEVEL:,} streams",
                "performance",
                None if added is None else added <= MAX_ADDED_LAG_P99_MS,
                f"{fmt(added, '.3f')} ms (gateway p99 {fmt(lag['gateway']['lag_ms']['p99'], '.3f')} − direct p99 "
                f"{fmt(lag['direct']['lag_ms']['p99'], '.3f')} ms){_refs_added(lag)}",
            )
        )
    fresh = [lv["rss_fresh"] for lv in levels if lv.get("rss_fresh")]
    checks.append(
        check(
            f"idle RSS of a freshly started worker ≤ {MAX_IDLE_RSS_MB:g} MB",
            "performance",
            bool(fresh) and max(fresh) <= MAX_IDLE_RSS_MB * 1e6,
            f"{_mb(max(fresh)) if fresh else '—'} MB (largest of {len(fresh)} fresh starts: "
            f"{', '.join(str(_mb(f)) for f in fresh)})",
        )
    )
    lost = [(lv["streams"], t, r["lost"], r["reordered"]) for lv in levels for t, r in _runs(lv)]
    checks.append(
        check(
            "no event lost or reordered, at every level (direct, through the gateway and the reference proxies)",
            "correctness",
            all(a == 0 and b == 0 for _, _, a, b in lost),
            ", ".join(f"{n:,} {t}: {a}/{b}" for n, t, a, b in lost) + " (lost/reordered)",
        )
    )
    failed = [(lv["streams"], t, r["failed"]) for lv in levels for t, r in _runs(lv)]
    checks.append(
        check(
            "no stream failed",
            "correctness",
            all(f == 0 for _, _, f in failed),
            ", ".join(f"{n:,} {t}: {f}" for n, t, f in failed),
        )
    )
    if bp is not None:
        growth, written = bp["rss_growth_paused"], bp["upstream_written_paused"]
        intact = bp["complete"] and bp["done_seen"] and bp["lost"] == 0 and bp["reordered"] == 0
        checks.append(
            check(
                f"a client that stops reading makes the gateway stop reading its upstream (worker RSS growth ≤ "
                f"{MAX_BP_GROWTH_MIB:g} MiB while a {PUSH_MIB} MiB stream waits; the stream intact afterwards)",
                "correctness",
                growth <= MAX_BP_GROWTH_MIB * MIB and written < bp["pushed_bytes"] and intact,
                f"RSS +{growth / MIB:.1f} MiB over {bp['pause_s']:g} s not reading; the upstream got "
                f"{written / MIB:.1f} of {PUSH_MIB} MiB out (+{(bp['upstream_written_last_1s'] or 0) / MIB:.2f} MiB "
                f"in the last second); afterwards {bp['received_body_bytes'] / MIB:.1f} MiB, {bp['events']:,} "
                f"events received, lost {bp['lost']}, reordered {bp['reordered']}",
            )
        )
    return checks


def _runs(lv: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A level's client runs by target: direct, gateway, and the reference proxies it has."""
    return [("direct", lv["direct"]), ("gateway", lv["gateway"]), *lv.get("refs", {}).items()]


def _refs_added(lv: dict[str, Any]) -> str:
    """The reference proxies' added p99 lag beside the gateway's, in the lag check's detail."""
    refs = lv.get("refs")
    if refs is None:
        return ""
    added = {name: fmt(ref["added_lag_ms"]["p99"], ".3f") for name, ref in refs.items()}
    nginx = f"nginx {added['nginx']} ms" if "nginx" in added else "nginx not on PATH"
    return f"; same run, same topology: bare aiohttp added p99 {added['bare']} ms, {nginx}"


def _table(levels: list[dict[str, Any]]) -> str:
    def row(label: str, get: Callable[[dict[str, Any]], Any], spec: str = "") -> tuple[str, list[str]]:
        return label, [fmt(get(lv), spec) for lv in levels]

    def ref_row(label: str, get: Callable[[dict[str, Any]], Any], spec: str = "") -> tuple[str, list[str]]:
        """Cells "bare / nginx" of `get(reference run)`; — at a level without references."""

        def cell(lv: dict[str, Any]) -> str | None:
            if "refs" not in lv:
                return None
            return " / ".join(fmt(get(lv["refs"][n]) if n in lv["refs"] else None, spec) for n in ("bare", "nginx"))

        return row(label, cell)

    ref_lag = [
        ref_row("  bare / nginx p50", lambda r: r["lag_ms"]["p50"], ".3f"),
        ref_row("  bare / nginx p99", lambda r: r["lag_ms"]["p99"], ".3f"),
        ref_row("  added p99: bare / nginx", lambda r: r["added_lag_ms"]["p99"], ".3f"),
        ref_row("  bare / nginx max", lambda r: r["lag_ms"]["max"], ".2f"),
    ]
    ref_errors = [
        ref_row("events lost / reordered: bare / nginx", lambda r: f"{r['lost']}/{r['reordered']}"),
        ref_row("streams failed: bare / nginx", lambda r: r["failed"]),
    ]
    has_refs = any("refs" in lv for lv in levels)
    return table(
        [f"{lv['streams']:,}" for lv in levels],
        [
            row(
                "streams opened / completed (gateway)",
                lambda lv: f"{lv['gateway']['opened']:,}/{lv['gateway']['completed']:,}",
            ),
            row("  most open at once", lambda lv: lv["gateway"]["max_open"], ","),
            row("  time to open all (s)", lambda lv: lv["gateway"]["open_s"], ".1f"),
            row(
                "  streams failed: direct / gateway", lambda lv: f"{lv['direct']['failed']} / {lv['gateway']['failed']}"
            ),
            ("worker RSS (MB)", []),
            row("  fresh, idle", lambda lv: _mb(lv["rss_fresh"]), ".1f"),
            row("  idle before (after a warm-up)", lambda lv: _mb(lv["rss_idle"]), ".1f"),
            row("  all streams open", lambda lv: _mb(lv["rss_open"]), ".1f"),
            row("  peak", lambda lv: _mb(lv["rss_peak"]), ".1f"),
            row("  after the streams ended", lambda lv: _mb(lv["rss_after"]), ".1f"),
            row("bytes per open stream", lambda lv: lv["bytes_per_stream"], ","),
            row("worker fds idle / peak / limit", lambda lv: f"{lv['fds_idle']}/{lv['fds_peak']}/{lv['nofile_limit']}"),
            ("per-event lag, all-open window (ms)", []),
            row("  direct p50", lambda lv: lv["direct"]["lag_ms"]["p50"], ".3f"),
            row("  gateway p50", lambda lv: lv["gateway"]["lag_ms"]["p50"], ".3f"),
            row("  added p50", lambda lv: lv["added_lag_ms"]["p50"], ".3f"),
            row("  direct p99", lambda lv: lv["direct"]["lag_ms"]["p99"], ".3f"),
            row("  gateway p99", lambda lv: lv["gateway"]["lag_ms"]["p99"], ".3f"),
            row("  added p99", lambda lv: lv["added_lag_ms"]["p99"], ".3f"),
            row("  direct max", lambda lv: lv["direct"]["lag_ms"]["max"], ".2f"),
            row("  gateway max", lambda lv: lv["gateway"]["lag_ms"]["max"], ".2f"),
            *(ref_lag if has_refs else []),
            row("  events in the window: direct", lambda lv: lv["direct"]["window_events"], ","),
            row("  events in the window: gateway", lambda lv: lv["gateway"]["window_events"], ","),
            row("  window length, gateway (s)", lambda lv: lv["gateway"]["window_s"], ".1f"),
            row("gateway lag p99, all events (ms)", lambda lv: lv["gateway"]["lag_all_ms"]["p99"], ".3f"),
            row("events lost / reordered: direct", lambda lv: f"{lv['direct']['lost']}/{lv['direct']['reordered']}"),
            row("events lost / reordered: gateway", lambda lv: f"{lv['gateway']['lost']}/{lv['gateway']['reordered']}"),
            *(ref_errors if has_refs else []),
            row("gateway CPU % with all open", lambda lv: lv["gateway_cpu_pct_open"], ".0f"),
            row("gateway CPU % (whole run)", lambda lv: lv["gateway_cpu_pct"], ".0f"),
            row(
                "client CPU %: direct / gateway",
                lambda lv: f"{lv['direct']['client_cpu_pct']:.0f} / {lv['gateway']['client_cpu_pct']:.0f}",
            ),
            row("other load on the gateway's CPU %", lambda lv: lv["gateway_cpu"]["other_load_pct"], ".0f"),
        ],
        label_width=38,
    )


def _bp_lines(bp: dict[str, Any]) -> str:
    return (
        f"\nbackpressure: a {PUSH_MIB} MiB stream, the client reads its head ({bp['read_before_pause']:,} body bytes) "
        f"then nothing for {bp['pause_s']:g} s\n"
        f"  worker RSS before {_mb(bp['rss_before'])} MB; growth while not reading "
        f"+{bp['rss_growth_paused'] / MIB:.2f} MiB, peak +{bp['rss_growth_peak'] / MIB:.2f} MiB "
        f"(a reading client, warm-up: peak "
        f"+{bp['warmup']['rss_growth_peak'] / MIB:.2f} MiB)\n"
        f"  the upstream handed {bp['upstream_written_paused'] / MIB:.2f} MiB to its socket meanwhile "
        f"(+{(bp['upstream_written_last_1s'] or 0) / MIB:.2f} MiB in the last second), the rest waited\n"
        f"  after reading resumed: status {bp['status']}, {bp['received_body_bytes'] / MIB:.2f} MiB, "
        f"{bp['events']:,} of {bp['upstream_events']:,} events, lost {bp['lost']}, reordered {bp['reordered']}, "
        f"[DONE] {'seen' if bp['done_seen'] else 'missing'}"
    )


def _levels(quick: bool) -> tuple[int, ...]:
    """The levels to run: HEDGEROW_BENCH_STREAM_LEVELS (e.g. "10000" or "100,5000") if set, else the defaults."""
    text = os.environ.get("HEDGEROW_BENCH_STREAM_LEVELS", "").strip()
    if not text:
        return QUICK_LEVELS if quick else LEVELS
    levels = tuple(int(part.replace("_", "")) for part in text.split(",") if part.strip())
    if not levels or min(levels) < 1:
        raise SystemExit(f"HEDGEROW_BENCH_STREAM_LEVELS={text!r}: give positive stream counts, comma-separated")
    return levels


def run(opts: Options) -> int:
    plan = cpu_plan()
    levels_n = _levels(opts.quick)
    hold_s = opts.duration_s or (QUICK_HOLD_S if opts.quick else HOLD_S)
    open_rate = opts.rate or OPEN_RATE
    pause_s = QUICK_PAUSE_S if opts.quick else PAUSE_S
    engine = bench_engine()
    # Children inherit this process's limit: the gateway needs 2 fds per stream, the client and upstream 1.
    nofile = raise_nofile(2 * max(levels_n) + 256)
    settings = {
        "levels": list(levels_n),
        "hold_s": hold_s,
        "open_rate": open_rate,
        "event_gap_s": GAP_S,
        "engine": engine,
        "provider_max_connections": POOL,
        "push_mib": PUSH_MIB,
        "pause_s": pause_s,
        "nofile": nofile,
        "quick": opts.quick,
    }
    host = banner(
        "streams",
        f"levels {', '.join(f'{n:,}' for n in levels_n)} concurrent streams, one event per {GAP_S:g} s each, "
        f"opened at {open_rate:g}/s, all open together ≥ {hold_s:g} s\n"
        f"gateway: 1 worker, {engine} engine, fresh per level; RLIMIT_NOFILE soft {nofile['soft']:,}, hard "
        f"{nofile['hard']:,} (the gateway needs ~{nofile['needed']:,} for {max(levels_n):,} streams)",
        plan,
    )
    levels: list[dict[str, Any]] = []
    bp: dict[str, Any] | None = None
    t_start = time.monotonic()
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            log_dir = Path(tmp)
            upstream = start_upstream(
                "upstream",
                free_ports(1)[0],
                ["--stamp-events", "10", "--chunk-gap-ms", f"{GAP_S * 1000:g}"],
                plan,
                log_dir,
            )
            try:
                for n in levels_n:
                    levels.append(level(n, upstream, plan, log_dir, engine, hold_s, open_rate))
            finally:
                upstream.service.stop()
            progress("backpressure: a client that stops reading")
            bp = backpressure(plan, log_dir, engine, pause_s)
    except ServiceError as e:
        return startup_failed(e)
    wall_s = round(time.monotonic() - t_start, 1)

    checks = _checks(levels, bp, opts.quick)
    print(_table(levels))
    if bp is not None:
        print(_bp_lines(bp))
    print(verdicts(checks, opts.quick))
    print(f"\nwall time {wall_s:g} s")
    if opts.json_path is not None:
        report = {
            "scenario": "streams",
            "settings": settings,
            "machine": host,
            "pinning": plan.describe(),
            "wall_s": wall_s,
            "levels": levels,
            "backpressure": bp,
            "checks": checks,
        }
        report["charts"] = _charts(opts.json_path, report)
        opts.json_path.write_text(json.dumps(report, indent=2) + "\n")
    else:
        print("charts: pass --json FILE to get PNG charts next to it")
    return exit_status(checks, opts.quick)


def _charts(json_path: Path, report: dict[str, Any]) -> dict[str, str]:
    from benchmarks import charts

    if not charts.available():
        print("charts: skipped, matplotlib is not installed (pip install -e '.[bench]')")
        return {}
    paths = charts.streams_charts(json_path, report)
    for name, path in paths.items():
        print(f"chart ({name}): {path}")
    return {name: str(path) for name, path in paths.items()}


if __name__ == "__main__":
    client_main()
