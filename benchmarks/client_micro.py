"""Micro-benchmark of the upstream clients alone: AiohttpClient vs LeanClient, in the same run.

What a client costs per request, without a gateway around it: sequential latency (p50/p99 of send + read,
after a warm-up) and concurrent throughput (c tasks sending back to back for a fixed time). The upstream is a
raw asyncio.Protocol in a child process answering one fixed small JSON with keep-alive, as cheap as an
upstream can be, so the difference between the rows is the clients'. Loopback only; counts and durations
are bounded.

Run: python -m benchmarks.client_micro [--requests 3000] [--concurrency 32] [--seconds 2] [--loop uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from proxy.config import Timeouts
from proxy.upstream.aiohttp_pool import AiohttpClient
from proxy.upstream.base import Target
from proxy.upstream.lean_pool import LeanClient

HOST = "127.0.0.1"
REQUEST = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi."}],"max_tokens":16}'
RESPONSE_BODY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"Hi!"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'
)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(RESPONSE_BODY),
    RESPONSE_BODY,
)
CLIENTS: dict[str, Callable[[], Any]] = {"aiohttp": AiohttpClient, "lean": LeanClient}


# -- the upstream (child process) --


class _Upstream(asyncio.Protocol):
    """Answers every request with RESPONSE: finds the head's end, skips Content-Length body bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower()
            i = head.find(b"content-length:")
            length = 0
            if i >= 0:
                j = head.find(b"\r\n", i)
                length = int(head[i + 15 : j if j >= 0 else len(head)])
            if len(buf) < end + 4 + length:
                break
            buf = buf[end + 4 + length :]
            out.append(RESPONSE)
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


def _serve(conn: Connection, use_uvloop: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Upstream, HOST, 0, backlog=1024)
        conn.send(server.sockets[0].getsockname()[1])
        await loop.run_in_executor(None, conn.recv)  # parent says stop (or dies: EOFError ends us too)

    try:
        _run(main(), use_uvloop)
    except EOFError:
        pass


def _run(coro: Any, use_uvloop: bool) -> Any:
    if use_uvloop:
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


# -- the measurements --


async def _one(client: Any, target: Target) -> None:
    resp = await client.send(target, REQUEST)
    await resp.read(1 << 20)


async def _sequential(client: Any, target: Target, n: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        await _one(client, target)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        await _one(client, target)
        samples.append(clock() - t0)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[min(len(samples) - 1, int(len(samples) * 0.99))] / 1000


async def _throughput(client: Any, target: Target, concurrency: int, seconds: float) -> float:
    loop = asyncio.get_running_loop()
    done = 0

    async def worker(stop: float) -> None:
        nonlocal done
        while loop.time() < stop:
            await _one(client, target)
            done += 1

    # Warm-up opens the `concurrency` connections so the timed part measures steady state only.
    await asyncio.gather(*(worker(loop.time() + min(0.3, seconds)) for _ in range(concurrency)))
    done = 0
    started = time.perf_counter()
    await asyncio.gather(*(worker(loop.time() + seconds) for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def _bench(port: int, args: argparse.Namespace) -> dict[str, list[tuple[float, float, float]]]:
    target = Target(
        f"http://{HOST}:{port}/v1/chat/completions",
        {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"},
        Timeouts(connect_s=2.0, first_byte_s=5.0, idle_s=5.0),
    )
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in CLIENTS}
    for r in range(args.rounds):
        names = list(CLIENTS) if r % 2 == 0 else list(reversed(CLIENTS))  # alternate who goes first
        for name in names:
            client = CLIENTS[name]()
            try:
                p50, p99 = await _sequential(client, target, args.requests, args.warmup)
                rps = await _throughput(client, target, args.concurrency, args.seconds)
            finally:
                await client.close()
            results[name].append((p50, p99, rps))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.client_micro", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="timed sequential requests (max 100000)")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=32, help="tasks in the throughput phase (max 512)")
    ap.add_argument("--seconds", type=float, default=2.0, help="throughput phase length (max 30)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat and report medians (max 10)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args(argv)
    args.requests = max(100, min(args.requests, 100_000))
    args.concurrency = max(1, min(args.concurrency, 512))
    args.seconds = max(0.2, min(args.seconds, 30.0))
    args.rounds = max(1, min(args.rounds, 10))
    use_uvloop = args.loop == "uvloop"

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    upstream = ctx.Process(target=_serve, args=(child, use_uvloop), daemon=True)
    upstream.start()
    try:
        if not parent.poll(10):
            print("upstream did not start", file=sys.stderr)
            return 1
        port = parent.recv()
        results = _run(_bench(port, args), use_uvloop)
    finally:
        parent.send("stop")
        upstream.join(5)
        if upstream.is_alive():
            upstream.terminate()
            upstream.join()

    rows = {name: tuple(statistics.median(m[i] for m in runs) for i in range(3)) for name, runs in results.items()}
    print(
        f"client micro-benchmark: loop={args.loop} python={sys.version.split()[0]} cpus={os.cpu_count()} "
        f"sequential={args.requests} (+{args.warmup} warm-up) concurrency={args.concurrency}x{args.seconds:g}s "
        f"rounds={args.rounds}"
    )
    print(f"{'client':<16}{'p50 µs':>10}{'p99 µs':>10}{'req/s':>12}")
    for name, (p50, p99, rps) in rows.items():
        print(f"{name:<16}{p50:>10.1f}{p99:>10.1f}{rps:>12.0f}")
    a, b = rows["aiohttp"], rows["lean"]
    print(f"{'lean / aiohttp':<16}{b[0] / a[0]:>9.2f}×{b[1] / a[1]:>9.2f}×{b[2] / a[2]:>11.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
