"""Accounting across nodes and through store outages: keys made on one node work on another; a store that goes
away never blocks a request, records wait in memory and reach the store once it is back."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import parse
from proxy.store.redis import RedisStore
from tests.billing import BillingUpstream
from tests.conftest import KEY
from tests.functional.test_budgets import _stop, _two_nodes
from tests.functional.test_ledger import running
from tests.redis_server import redis_server

ADMIN = "sk-admin-0123456789"


def _tree(upstream: str, store: dict[str, Any], **acct: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "drain-grace-s": 5.0},
        "keys": [
            {"name": "test", "key": KEY, "org": "acme"},
            {"name": "admin", "key": ADMIN, "admin": True},
        ],
        "accounting": {"store": store, "orgs": [{"id": "acme", "credits": 100.0}], **acct},
        "providers": [{"name": "bill", "base-url": upstream, "api-key": "sk-up", "probe": {"enabled": False}}],
        "models": [
            {"name": "bill/m", "endpoints": [{"provider": "bill", "model": "m", "price": {"input": 1, "output": 2}}]}
        ],
    }


@pytest.fixture
async def billing(aiohttp_server: Any) -> BillingUpstream:
    fake = BillingUpstream("bill")
    fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    return fake


async def _chat(http: aiohttp.ClientSession, url: str, key: str, i: int) -> tuple[int, dict[str, str]]:
    body = {"model": "bill/m", "max_tokens": 50, "messages": [{"role": "user", "content": f"q{i}"}]}
    async with http.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status, dict(r.headers)


async def test_a_key_created_on_one_node_works_on_the_other_at_once(billing, tmp_path, redis_url):
    url, prefix = redis_url
    procs = await _two_nodes(tmp_path, _tree(billing.base_url, {"kind": "redis", "url": url, "prefix": prefix}))
    a, b = (f"http://127.0.0.1:{port}" for _, port in procs)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                a + "/api/v1/keys",
                json={"name": "new", "org": "acme", "limit": 5.0},
                headers={"Authorization": f"Bearer {ADMIN}"},
            ) as r:
                assert r.status == 201, await r.text()
                created = await r.json()
            secret, key_id = created["key"], created["data"]["id"]
            async with asyncio.timeout(3):  # pushed by pub/sub; the poll (1 s) is the fallback
                while (await _chat(http, b, secret, 0))[0] != 200:
                    await asyncio.sleep(0.05)
            async with http.delete(a + f"/api/v1/keys/{key_id}", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 200
            async with asyncio.timeout(3):
                while (await _chat(http, b, secret, 1))[0] != 401:
                    await asyncio.sleep(0.05)
    finally:
        await _stop(procs)


async def test_redis_outage_never_blocks_requests_and_records_arrive_after_it(billing, tmp_path):
    with redis_server() as redis:
        store = {"kind": "redis", "url": redis.url, "prefix": "outage:", "timeout-s": 0.2}
        cfg = parse(yaml.safe_dump(_tree(billing.base_url, store, **{"flush-interval-s": 0.2})), "yaml", env={})
        async with running(cfg) as gw, aiohttp.ClientSession() as http:
            assert (await _chat(http, gw, KEY, 0))[0] == 200
            redis.stop()
            statuses = [(await _chat(http, gw, KEY, i))[0] for i in range(1, 21)]
            assert statuses == [200] * 20  # fail open (the default): served while the store is down
            with redis_server(port=redis.port):  # back, empty (no persistence): records queued meanwhile arrive
                check = RedisStore(redis.url, prefix="outage:")
                await check.open()
                try:
                    async with asyncio.timeout(10):
                        while await check.count_generations() < 20:
                            await asyncio.sleep(0.1)
                finally:
                    await check.close()


async def test_fail_closed_answers_503_for_metered_keys_while_the_store_is_down(billing, tmp_path):
    with redis_server() as redis:
        store = {"kind": "redis", "url": redis.url, "prefix": "closed:", "timeout-s": 0.2}
        cfg = parse(yaml.safe_dump(_tree(billing.base_url, store, **{"fail-closed": True})), "yaml", env={})
        async with running(cfg) as gw, aiohttp.ClientSession() as http:
            redis.stop()
            status, headers = await _chat(http, gw, KEY, 0)
            assert status == 503 and headers["Retry-After"]
            assert billing.seen == 0  # a metered key is never sent upstream without a reservation
