"""Credits and rate limits hold under concurrency, on one node and on gateway processes sharing a real Redis;
the ledger survives SIGTERM whole and kill -9 up to its flush interval."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import parse
from proxy.store.redis import RedisStore
from proxy.store.sqlite import SQLiteStore
from tests.billing import BillingUpstream
from tests.conftest import AUTH, KEY
from tests.functional.test_ledger import running
from tests.functional.test_process import _spawn

MAX_TOKENS = 100
OUTPUT_PRICE = 10.0  # USD per million: each request costs exactly MAX_TOKENS * 10 / 1e6 = $0.001
COST = MAX_TOKENS * OUTPUT_PRICE / 1e6
FITS = 50


def tree(upstream: str, store: dict[str, Any], *, credits: float | None, rpm: int | None = None, **acct: Any) -> dict:
    key: dict[str, Any] = {"name": "test", "key": KEY, "org": "acme"}
    if rpm is not None:
        key["rpm"] = rpm
    return {
        "server": {"host": "127.0.0.1", "port": 0, "drain-grace-s": 5.0},
        "keys": [key],
        "accounting": {"store": store, "orgs": [{"id": "acme", "credits": credits}], **acct},
        "providers": [{"name": "bill", "base-url": upstream, "api-key": "sk-up", "probe": {"enabled": False}}],
        "models": [
            {
                "name": "bill/m",
                "endpoints": [{"provider": "bill", "model": "m", "price": {"input": 0, "output": OUTPUT_PRICE}}],
            }
        ],
    }


async def _ask(http: aiohttp.ClientSession, url: str, i: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"model": "bill/m", "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": f"q{i}"}]}
    async with http.post(url + "/v1/chat/completions", json=body, headers=AUTH) as r:
        return r.status, await r.json(), dict(r.headers)


async def _storm(urls: list[str], n: int) -> list[tuple[int, dict[str, Any], dict[str, str]]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        return await asyncio.gather(*(_ask(http, urls[i % len(urls)], i) for i in range(n)))


@pytest.fixture
async def billing(aiohttp_server: Any) -> BillingUpstream:
    fake = BillingUpstream("bill", completion_is_max_tokens=True)  # every answer costs its worst case
    fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    return fake


def _check_402s(results: list[tuple[int, dict[str, Any], dict[str, str]]]) -> int:
    served = sum(1 for s, _, _ in results if s == 200)
    refused = [b for s, b, _ in results if s == 402]
    assert served + len(refused) == len(results), {s for s, _, _ in results}
    assert all(b["error"]["type"] == "insufficient_quota" for b in refused)
    return served


async def test_budget_holds_under_200_concurrent_requests_on_one_node(billing, tmp_path):
    db = str(tmp_path / "h.db")
    cfg = parse(yaml.safe_dump(tree(billing.base_url, {"path": db}, credits=FITS * COST)), "yaml", env={})
    async with running(cfg) as url:
        results = await _storm([url], 200)
    served = _check_402s(results)
    assert served <= FITS and served >= FITS - 2  # what fits is served (float rounding may strand a request)
    assert billing.seen == served  # a refused request never reached the upstream
    store = SQLiteStore(db)
    await store.open()
    try:
        org = await store.get_org("acme")
        assert org is not None and org.balance is not None
        assert org.balance >= 0
        assert org.spent == pytest.approx(served * COST, abs=1e-9)
        assert org.balance + org.spent == pytest.approx(FITS * COST, abs=1e-9)  # nothing leaked or invented
    finally:
        await store.close()


async def _two_nodes(tmp_path: Path, doc: dict[str, Any]) -> list[tuple[asyncio.subprocess.Process, int]]:
    path = tmp_path / "hedgerow.yaml"
    path.write_text(yaml.safe_dump(doc))
    return [await _spawn("serve", "--config", str(path)) for _ in range(2)]


async def _stop(procs: list[tuple[asyncio.subprocess.Process, int]]) -> None:
    for proc, _ in procs:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for proc, _ in procs:
        async with asyncio.timeout(15):
            assert await proc.wait() == 0


async def test_budget_holds_across_two_gateway_processes_sharing_redis(billing, tmp_path, redis_url):
    url, prefix = redis_url
    store_cfg = {"kind": "redis", "url": url, "prefix": prefix}
    procs = await _two_nodes(tmp_path, tree(billing.base_url, store_cfg, credits=FITS * COST))
    try:
        results = await _storm([f"http://127.0.0.1:{port}" for _, port in procs], 200)
    finally:
        await _stop(procs)
    served = _check_402s(results)
    assert FITS - 10 <= served <= FITS  # never more than fits; a lease held by the other node may strand a few
    assert billing.seen == served
    store = RedisStore(url, prefix=prefix)
    await store.open()
    try:
        org = await store.get_org("acme")
        assert org is not None and org.balance is not None
        assert org.balance >= 0
        assert org.spent == pytest.approx(served * COST, abs=1e-9)
        assert org.balance + org.spent == pytest.approx(FITS * COST, abs=1e-9)  # leases all returned at stop
    finally:
        await store.close()


async def test_rate_limit_holds_across_two_gateway_processes_sharing_redis(billing, tmp_path, redis_url):
    url, prefix = redis_url
    rpm = 20
    doc = tree(billing.base_url, {"kind": "redis", "url": url, "prefix": prefix}, credits=None, rpm=rpm)
    procs = await _two_nodes(tmp_path, doc)
    try:
        urls = [f"http://127.0.0.1:{port}" for _, port in procs]
        started = time.time()
        results = await _storm(urls, 3 * rpm)
        windows = int(time.time()) // 60 - int(started) // 60 + 1  # the burst may straddle a minute boundary
    finally:
        await _stop(procs)
    ok = [h for s, _, h in results if s == 200]
    limited = [(b, h) for s, b, h in results if s == 429]
    assert len(ok) + len(limited) == len(results)
    assert rpm <= len(ok) <= rpm * windows  # the two nodes together stay within the limit (+1 window)
    assert all(h["X-RateLimit-Limit"] == str(rpm) for h in ok)
    for body, h in limited:
        assert body["error"]["type"] == "rate_limit_error"
        assert 0 < int(h["Retry-After"]) <= 60
        assert h["X-RateLimit-Remaining"] == "0" and h["X-RateLimit-Limit"] == str(rpm)


def _sqlite_tree(upstream: str, db: str, flush_s: float) -> dict[str, Any]:
    return tree(upstream, {"path": db}, credits=None, **{"flush-interval-s": flush_s})


async def test_sigterm_loses_no_ledger_record(billing, tmp_path):
    db = str(tmp_path / "h.db")
    path = tmp_path / "hedgerow.yaml"
    path.write_text(yaml.safe_dump(_sqlite_tree(billing.base_url, db, flush_s=600)))  # only the stop flushes
    proc, port = await _spawn("serve", "--config", str(path))
    try:
        results = await _storm([f"http://127.0.0.1:{port}"], 150)
    finally:
        await _stop([(proc, port)])
    ids = {h["X-Hedgerow-Generation-Id"] for _, _, h in results}
    store = SQLiteStore(db)
    await store.open()
    try:
        assert await store.count_generations() == 150
        assert all([await store.get_generation(i) is not None for i in ids])
    finally:
        await store.close()


async def test_kill_9_loses_at_most_the_last_flush_interval(billing, tmp_path):
    db = str(tmp_path / "h.db")
    flush_s = 0.5
    path = tmp_path / "hedgerow.yaml"
    path.write_text(yaml.safe_dump(_sqlite_tree(billing.base_url, db, flush_s)))
    proc, port = await _spawn("serve", "--config", str(path))
    done: list[tuple[float, str]] = []  # (monotonic time the answer arrived, generation id)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 3.0
            i = 0
            while time.monotonic() < deadline:  # bounded: 3 s of sequential requests
                _, _, h = await _ask(http, f"http://127.0.0.1:{port}", i)
                done.append((time.monotonic(), h["X-Hedgerow-Generation-Id"]))
                i += 1
        killed_at = time.monotonic()
        proc.kill()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    store = SQLiteStore(db)
    await store.open()
    try:
        # every record older than two flush intervals (one to be picked up, one to be written) is on disk
        old = [g for t, g in done if t < killed_at - 2 * flush_s]
        assert len(old) > 20
        missing = [g for g in old if await store.get_generation(g) is None]
        assert missing == []
        assert await store.count_generations() <= len(done)
    finally:
        await store.close()


async def test_a_crashed_nodes_lease_returns_to_the_org_after_the_lease_ttl(billing, tmp_path):
    db = str(tmp_path / "h.db")
    doc = tree(billing.base_url, {"path": db}, credits=10.0, **{"flush-interval-s": 600, "lease-ttl-s": 5})
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc, port = await _spawn("serve", "--config", str(path))
    try:
        assert (await _storm([f"http://127.0.0.1:{port}"], 1))[0][0] == 200
    finally:
        proc.kill()  # kill -9: its lease (a tenth of the balance) is never settled by it
        await proc.wait()
    store = SQLiteStore(db)
    await store.open()
    try:
        org = await store.get_org("acme")
        assert org is not None and org.balance == pytest.approx(9.0)  # the dead node's lease is out
        survivor = tree(billing.base_url, {"path": db}, credits=10.0, **{"flush-interval-s": 0.2, "lease-ttl-s": 5})
        async with running(parse(yaml.safe_dump(survivor), "yaml", env={})):
            async with asyncio.timeout(20):  # reaped within about one ttl of the survivor's start
                while (org := await store.get_org("acme")) is not None and org.balance != pytest.approx(10.0):
                    await asyncio.sleep(0.2)
        usage = await store.key_usage("test", None, time.time())
        assert usage.outstanding == pytest.approx(0.0, abs=1e-12)
    finally:
        await store.close()
