"""Load generator, run in its own process: open loop (fixed arrival rate) or closed loop (fixed concurrency).

Why hand-rolled: the generator must cost far less than what it measures, so it speaks HTTP/1.1 itself: one
prebuilt request, httptools (llhttp) parsing responses, keep-alive connections with one request in flight
each, on uvloop.
Why open loop: request i is due at t0 + i/R whatever happened before, and its latency counts from that due time,
so a stall in the target shows in every request it held up (no coordinated omission).

Run: python -m benchmarks.load --url http://127.0.0.1:18080/v1/chat/completions --rate 200 --duration 5
Prints one JSON object on stdout: count, errors, rps, latency and (streams) TTFB percentiles in ms, and with
`--count-header NAME` how often each value of that response header came back (e.g. X-Hedgerow-Attempts).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import re
import resource
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import httptools
import uvloop

# uvloop timers tick in whole milliseconds; a request sleeps until 1 ms before its due time, then yields to
# the loop until the clock reaches it. Costs ~20% of a core at 200 req/s; sends go out within µs of due.
_SPIN_NS = 1_000_000


@dataclass(frozen=True)
class LoadSpec:
    url: str
    mode: Literal["open", "closed"] = "open"
    rate: float = 200.0  # open loop: requests per second
    duration_s: float = 5.0
    concurrency: int = 32  # closed loop: workers, one connection each
    connections: int = 8  # open loop: opened before t0; more open on demand, up to max_connections
    max_connections: int = 512
    stream: bool = False
    model: str = "gpt-4o-mini"
    key: str | None = None
    expect: bytes | None = None  # every response body must equal these bytes
    expect_re: re.Pattern[bytes] | None = None  # every response body must match this pattern, whole
    timeout_s: float = 10.0  # per request, connection wait included
    count_headers: tuple[str, ...] = ()  # response headers whose values are counted (any status)
    over_ms: tuple[float, ...] = ()  # count successful responses with latency (and TTFB) at or above these


def chat_body(model: str, stream: bool) -> bytes:
    doc: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        doc["stream"] = True
    return json.dumps(doc, separators=(",", ":")).encode()


def build_request(host: str, port: int, path: str, body: bytes, key: str | None) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Conn(asyncio.Protocol):
    """One keep-alive connection; `send()` resolves when the whole response has arrived.
    Timestamps are taken in the parser callbacks, not when the awaiting task resumes."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.status = 0
        self.keep_alive = True
        self.first_body_ns = 0
        self.done_ns = 0
        self.body: list[bytes] = []
        self.headers: dict[bytes, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionResetError("connection closed before the response ended"))

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(e)
            self.close()

    def send(self, request: bytes) -> asyncio.Future[None]:
        assert self._transport is not None
        self.first_body_ns = 0
        self.body = []
        self.headers = {}
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(request)
        return self._waiter

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    # httptools parser callbacks
    def on_body(self, body: bytes) -> None:
        if not self.first_body_ns:
            self.first_body_ns = time.perf_counter_ns()
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done_ns = time.perf_counter_ns()
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _HeaderConn(_Conn):
    """A connection that also keeps the response headers named in `WANTED` (lower case). A subclass, so
    runs that count no header pay nothing: httptools calls `on_header` only if the protocol has it."""

    WANTED: frozenset[bytes] = frozenset()

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in self.WANTED:
            self.headers[name] = value


def _conn_class(names: tuple[str, ...]) -> type[_Conn]:
    if not names:
        return _Conn
    return type("_Counting", (_HeaderConn,), {"WANTED": frozenset(n.lower().encode() for n in names)})


class _Pool:
    """Idle keep-alive connections; a semaphore caps how many exist (each carries one request at a time)."""

    def __init__(self, host: str, port: int, cap: int, conn_class: type[_Conn] = _Conn) -> None:
        self._host = host
        self._port = port
        self._conn_class = conn_class
        self._slots = asyncio.Semaphore(cap)
        self._idle: list[_Conn] = []

    async def _connect(self) -> _Conn:
        _, conn = await asyncio.get_running_loop().create_connection(self._conn_class, self._host, self._port)
        return conn

    async def prewarm(self, n: int) -> None:
        self._idle.extend(await asyncio.gather(*(self._connect() for _ in range(n))))

    async def acquire(self) -> _Conn:
        await self._slots.acquire()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        try:
            return await self._connect()
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: _Conn, reuse: bool) -> None:
        if reuse and not conn.closed:
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class _Recorder:
    def __init__(
        self, expect: bytes | None, count_headers: tuple[str, ...] = (), expect_re: re.Pattern[bytes] | None = None
    ) -> None:
        self.expect = expect
        self.expect_re = expect_re
        self.count_headers = [(n, n.lower().encode()) for n in count_headers]
        self.header_counts: dict[str, Counter[str]] = {n: Counter() for n in count_headers}
        self.latency_ns: list[int] = []
        self.ttfb_ns: list[int] = []
        self.lag_ns: list[int] = []
        self.errors: Counter[str] = Counter()
        self.mismatches = 0

    def response(self, conn: _Conn, start_ns: int) -> None:
        for name, key in self.count_headers:
            value = conn.headers.get(key)
            self.header_counts[name]["(none)" if value is None else value.decode(errors="replace")] += 1
        if conn.status != 200:
            self.errors[f"http {conn.status}"] += 1
            return
        self.latency_ns.append(conn.done_ns - start_ns)
        self.ttfb_ns.append((conn.first_body_ns or conn.done_ns) - start_ns)
        if self.expect is not None and b"".join(conn.body) != self.expect:
            self.mismatches += 1
        elif self.expect_re is not None and self.expect_re.fullmatch(b"".join(conn.body)) is None:
            self.mismatches += 1


async def _one(pool: _Pool, request: bytes, start_ns: int, rec: _Recorder, timeout_s: float) -> None:
    conn: _Conn | None = None
    try:
        async with asyncio.timeout(timeout_s):
            conn = await pool.acquire()
            await conn.send(request)
    except Exception as e:  # counted, not raised: one failed request must not end the run
        rec.errors[type(e).__name__] += 1
        if conn is not None:
            pool.release(conn, reuse=False)
        return
    rec.response(conn, start_ns)
    pool.release(conn, reuse=conn.keep_alive)


async def _sleep_until(due_ns: int) -> None:
    coarse_s = (due_ns - time.perf_counter_ns() - _SPIN_NS) / 1e9
    if coarse_s > 0:
        await asyncio.sleep(coarse_s)
    while time.perf_counter_ns() < due_ns:  # noqa: ASYNC110 - a clock, not an event: see _SPIN_NS
        await asyncio.sleep(0)


async def _open_loop(spec: LoadSpec, pool: _Pool, request: bytes, rec: _Recorder) -> int:
    await pool.prewarm(spec.connections)
    n = max(1, round(spec.rate * spec.duration_s))
    interval_ns = 1e9 / spec.rate
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter_ns() + 10_000_000
    for i in range(n):
        due = t0 + int(i * interval_ns)
        await _sleep_until(due)
        rec.lag_ns.append(time.perf_counter_ns() - due)
        task = asyncio.create_task(_one(pool, request, due, rec, spec.timeout_s))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)  # each request has its own timeout, so this ends by itself
    return t0


async def _closed_loop(spec: LoadSpec, pool: _Pool, request: bytes, rec: _Recorder) -> int:
    await pool.prewarm(spec.concurrency)
    t0 = time.perf_counter_ns()
    deadline = t0 + int(spec.duration_s * 1e9)

    async def worker() -> None:
        while time.perf_counter_ns() < deadline:
            await _one(pool, request, time.perf_counter_ns(), rec, spec.timeout_s)

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    return t0


def _pct(sorted_ns: list[int], q: float) -> float | None:
    """Nearest-rank percentile, in ms."""
    if not sorted_ns:
        return None
    return round(sorted_ns[max(0, math.ceil(q * len(sorted_ns)) - 1)] / 1e6, 4)


def _loopback(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise SystemExit(f"refusing {url!r}: the load generator only targets http:// on loopback")
    return host, parts.port or 80, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


async def run(spec: LoadSpec) -> dict[str, Any]:
    host, port, path = _loopback(spec.url)
    request = build_request(host, port, path, chat_body(spec.model, spec.stream), spec.key)
    cap = spec.concurrency if spec.mode == "closed" else spec.max_connections
    pool = _Pool(host, port, cap, _conn_class(spec.count_headers))
    rec = _Recorder(spec.expect, spec.count_headers, spec.expect_re)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        loop_fn = _open_loop if spec.mode == "open" else _closed_loop
        t0 = await loop_fn(spec, pool, request, rec)
    finally:
        pool.close()
    elapsed_s = (time.perf_counter_ns() - t0) / 1e9
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    ok = len(rec.latency_ns)
    latency = sorted(rec.latency_ns)
    result: dict[str, Any] = {
        "mode": spec.mode,
        "url": spec.url,
        "stream": spec.stream,
        "count": ok + sum(rec.errors.values()),
        "ok": ok,
        "errors": sum(rec.errors.values()),
        "error_kinds": dict(rec.errors),
        "elapsed_s": round(elapsed_s, 4),
        "t0_monotonic_s": t0 / 1e9,  # perf_counter is CLOCK_MONOTONIC on Linux: comparable across processes
        "rps": round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50": _pct(latency, 0.50),
        "p90": _pct(latency, 0.90),
        "p99": _pct(latency, 0.99),
        "p999": _pct(latency, 0.999),
        "max": _pct(latency, 1.0),
        "generator_cpu_pct": round(100 * cpu_s / elapsed_s, 1) if elapsed_s > 0 else None,
    }
    if spec.mode == "open":
        lag = sorted(rec.lag_ns)
        result["rate"] = spec.rate
        result["sched_lag"] = {"p50": _pct(lag, 0.5), "p99": _pct(lag, 0.99), "max": _pct(lag, 1.0)}
    else:
        result["concurrency"] = spec.concurrency
    if spec.stream:
        ttfb = sorted(rec.ttfb_ns)
        result["ttfb_p50"] = _pct(ttfb, 0.50)
        result["ttfb_p99"] = _pct(ttfb, 0.99)
        result["ttfb_p999"] = _pct(ttfb, 0.999)
        result["ttfb_max"] = _pct(ttfb, 1.0)
    if spec.expect is not None or spec.expect_re is not None:
        result["mismatches"] = rec.mismatches
    if spec.count_headers:
        result["headers"] = {name: dict(sorted(c.items())) for name, c in rec.header_counts.items()}
    if spec.over_ms:
        result["over_ms"] = {
            f"{ms:g}": {
                "latency": sum(1 for v in rec.latency_ns if v >= ms * 1e6),
                "ttfb": sum(1 for v in rec.ttfb_ns if v >= ms * 1e6),
            }
            for ms in spec.over_ms
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--url", required=True, help="loopback http URL, e.g. http://127.0.0.1:18080/v1/chat/completions"
    )
    parser.add_argument("--mode", choices=("open", "closed"), default="open")
    parser.add_argument("--rate", type=float, default=200.0, help="open loop: requests per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load (open loop: schedule length)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: concurrent connections")
    parser.add_argument("--connections", type=int, default=8, help="open loop: connections opened before start")
    parser.add_argument("--stream", action="store_true", help='send "stream":true and record TTFB')
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--expect", type=Path, help="file whose bytes every response body must equal")
    parser.add_argument(
        "--expect-regex",
        type=Path,
        metavar="FILE",
        help="file holding a regular expression every response body must match whole (e.g. a transcoded stream "
        "with its timestamps left open)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request timeout, seconds")
    parser.add_argument(
        "--count-header",
        action="append",
        default=[],
        metavar="NAME",
        help="count the values of this response header (repeatable; '(none)' when absent)",
    )
    parser.add_argument(
        "--count-over-ms",
        action="append",
        type=float,
        default=[],
        metavar="MS",
        help="count successful responses whose latency (and TTFB) is at least MS (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.concurrency < 1 or args.connections < 0:
        parser.error("--rate and --duration must be > 0, --concurrency ≥ 1, --connections ≥ 0")
    spec = LoadSpec(
        url=args.url,
        mode=args.mode,
        rate=args.rate,
        duration_s=args.duration,
        concurrency=args.concurrency,
        connections=args.connections,
        stream=args.stream,
        model=args.model,
        key=args.key,
        expect=args.expect.read_bytes() if args.expect else None,
        expect_re=re.compile(args.expect_regex.read_bytes(), re.DOTALL) if args.expect_regex else None,
        timeout_s=args.timeout,
        count_headers=tuple(args.count_header),
        over_ms=tuple(args.count_over_ms),
    )
    print(json.dumps(uvloop.run(run(spec))))


if __name__ == "__main__":
    main()
