"""Three gateway processes sharing one real redis-server: keys made on one node work on another within the
stated delay, a rate limit holds across all three, and a Redis that dies is survived (fail open, the default)
and recovered from when it returns — nothing recorded meanwhile is lost."""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from typing import Any

import aiohttp
import yaml

from proxy.store.redis import RedisStore
from tests.billing import BillingUpstream
from tests.conftest import KEY
from tests.functional.test_process import _spawn
from tests.redis_server import free_port, redis_server

ADMIN = "sk-admin-0123456789"
KEYS_SYNC_S = 0.5  # the stated delay: a node polls the store this often (and Redis pushes at once)


def _doc(upstream: str, redis_url: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "drain-grace-s": 5.0},
        "keys": [{"name": "test", "key": KEY}, {"name": "ops", "key": ADMIN, "admin": True}],
        "accounting": {
            "store": {"kind": "redis", "url": redis_url, "prefix": "multi:", "timeout-s": 0.2},
            "flush-interval-s": 0.2,
            "keys-sync-s": KEYS_SYNC_S,
        },
        "providers": [{"name": "bill", "base-url": upstream, "api-key": "sk-up", "probe": {"enabled": False}}],
        "models": [{"name": "bill/m", "endpoints": [{"provider": "bill", "model": "m", "price": {"input": 1}}]}],
    }


async def _chat(http: aiohttp.ClientSession, url: str, secret: str, i: int) -> int:
    body = {"model": "bill/m", "messages": [{"role": "user", "content": f"q{i}"}]}
    async with http.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}) as r:
        await r.read()
        return r.status


async def test_three_nodes_share_keys_limits_and_survive_redis_dying(aiohttp_server, tmp_path):
    billing = BillingUpstream("bill")
    billing.base_url = str((await aiohttp_server(billing.app)).make_url("/v1"))
    port, data = free_port(), tempfile.mkdtemp(prefix="hedgerow-redis-", dir=tmp_path)
    path = tmp_path / "hedgerow.yaml"
    path.write_text(yaml.safe_dump(_doc(billing.base_url, f"redis://127.0.0.1:{port}/0")))
    sent = 0
    with redis_server(port=port, workdir=data) as redis:
        nodes = [await _spawn("serve", "--config", str(path)) for _ in range(3)]
        a, b, c = (f"http://127.0.0.1:{p}" for _, p in nodes)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    a + "/api/v1/keys", json={"name": "shared", "rpm": 10}, headers={"Authorization": f"Bearer {ADMIN}"}
                ) as r:
                    assert r.status == 201
                    secret = (await r.json())["key"]
                created = time.monotonic()
                while (status := await _chat(http, c, secret, 0)) == 401:
                    assert time.monotonic() - created < KEYS_SYNC_S * 4, "node C never saw the key made on node A"
                    await asyncio.sleep(0.02)
                assert status == 200
                sent += 1

                started = time.time()
                statuses = [await _chat(http, (a, b, c)[i % 3], secret, i) for i in range(1, 31)]
                sent += 30
                windows = int(time.time()) // 60 - int(started) // 60 + 1
                ok = statuses.count(200) + 1  # the first request above counted too
                assert set(statuses) <= {200, 429}
                assert 10 <= ok <= 10 * windows  # the three nodes together: the key's 10 per minute (+1 window)

                redis.proc.kill()  # kill -9: Redis is gone
                redis.proc.wait()
                outage = [await _chat(http, (a, b, c)[i % 3], KEY, 100 + i) for i in range(12)]
                sent += 12
                assert outage == [200] * 12  # fail open (the default): served while the store is away
                for url in (a, b, c):
                    async with http.get(url + "/readyz") as r:
                        assert r.status == 200  # not fail-closed: still ready

                with redis_server(port=port, workdir=data):  # back, with its data
                    check = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="multi:")
                    await check.open()
                    try:
                        async with asyncio.timeout(15):  # every record, the outage's included, arrives
                            while await check.count_generations() < sent:
                                await asyncio.sleep(0.2)
                        assert await check.count_generations() == sent
                    finally:
                        await check.close()
                    assert await _chat(http, b, KEY, 999) == 200
        finally:
            for proc, _ in nodes:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
            for proc, _ in nodes:
                async with asyncio.timeout(15):
                    await proc.wait()
