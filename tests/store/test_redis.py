"""RedisStore beyond the shared contract: atomicity across nodes, key-change pushes, and an unreachable Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.store.base import GenerationRecord, KeyRecord, OrgRecord, StoreError
from proxy.store.redis import AGG_TTL_S, GEN_TTL_S, RedisStore
from tests.redis_server import free_port, redis_server

NOW = 1741953600.0
NODES = 4


@pytest.fixture
async def nodes(redis_url: tuple[str, str]) -> AsyncIterator[list[RedisStore]]:
    """Stores sharing one Redis and prefix, each with its own connection pool: gateway nodes."""
    url, prefix = redis_url
    stores = [RedisStore(url, prefix=prefix) for _ in range(NODES)]
    for s in stores:
        await s.open()
    yield stores
    for s in stores:
        await s.close()


@pytest.fixture
async def raw(redis_url: tuple[str, str]) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.Redis.from_url(redis_url[0], decode_responses=True)
    yield r
    await r.aclose()


async def test_leases_across_nodes_never_overdraw(nodes: list[RedisStore]) -> None:
    await nodes[0].put_org(OrgRecord(id="org_a", name="A", balance=100.0))
    leases = [nodes[i % NODES].lease(f"key_{i % 5}", "org_a", None, None, 1.0, 1.0, NOW) for i in range(300)]
    grants = await asyncio.gather(*leases)
    assert sum(grants) == 100.0
    assert sorted(set(grants)) == [0.0, 1.0]
    org = await nodes[1].get_org("org_a")
    assert org is not None and org.balance == 0.0
    outstanding = [(await nodes[2].key_usage(f"key_{k}", None, NOW)).outstanding for k in range(5)]
    assert sum(outstanding) == 100.0


async def test_leases_across_nodes_respect_a_key_limit(nodes: list[RedisStore]) -> None:
    leases = [nodes[i % NODES].lease("key_1", "org_cfg", 25.0, "daily", 1.0, 1.0, NOW) for i in range(100)]
    assert sum(await asyncio.gather(*leases)) == 25.0


async def test_take_across_nodes_never_passes_the_limit(nodes: list[RedisStore], raw: aioredis.Redis) -> None:
    takes = [nodes[i % NODES].take("rpm:key_1", 3, 50, 60) for i in range(100)]
    assert sum(await asyncio.gather(*takes)) == 50
    assert await nodes[0].add("rpm:key_1", 0, 60) == 50
    assert 0 < await raw.ttl(nodes[0]._p + "rate:rpm:key_1") <= 60  # the window expires on its own


async def test_subscribe_keys_hears_a_put_from_another_node(nodes: list[RedisStore], raw: aioredis.Redis) -> None:
    listener, writer = nodes[0], nodes[1]
    changes = listener.subscribe_keys()
    first = asyncio.ensure_future(anext(changes))
    channel = writer._p + "keys"
    while (await raw.pubsub_numsub(channel))[0][1] == 0:  # subscribed before anything is published
        await asyncio.sleep(0.01)
    key = KeyRecord(id="key_new", digest="ab" * 32, org="org_a")
    await writer.put_key(key)
    assert await first == "key_new"
    assert await listener.get_key("key_new") == key
    await writer.delete_key("key_new")
    assert await anext(changes) == "key_new"
    await changes.aclose()  # type: ignore[attr-defined]


async def test_floats_keep_full_precision(nodes: list[RedisStore]) -> None:
    a, b = nodes[0], nodes[1]
    await a.put_org(OrgRecord(id="org_a", name="A", balance=0.1))
    assert await b.top_up("org_a", 0.2) == 0.1 + 0.2  # 0.30000000000000004: Lua wrote every digit
    assert await a.lease("key_1", "org_a", None, None, 0.01, 0.1, NOW) == 0.1
    await b.settle("key_1", "org_a", None, 1e-8, 0.1 - 1e-8, NOW)
    org = await a.get_org("org_a")
    assert org is not None
    assert (org.balance, org.spent) == (0.1 + 0.2 - 0.1 + 1e-8, 0.1 - 1e-8)


async def test_every_name_has_the_prefix(nodes: list[RedisStore], raw: aioredis.Redis) -> None:
    s = nodes[0]
    await s.put_org(OrgRecord(id="org_a", name="A", balance=5.0))
    await s.put_key(KeyRecord(id="key_1", digest="1", org="org_a"))
    await s.lease("key_1", "org_a", 3.0, "monthly", 1.0, 1.0, NOW, "node_1")
    await s.take("rpm:key_1", 1, 5, 60)
    await s.write_generations([GenerationRecord(id="gen_1", key_id="key_1", org="org_a", model="m", created=NOW)])
    names = [n async for n in raw.scan_iter(match=s._p + "*")]
    assert len(names) == 15  # one of each below, and three day counters
    assert {n.removeprefix(s._p).partition(":")[0] for n in names} == {
        "lease",
        "nodes",
        "org",
        "orgs",
        "key",
        "keyids",
        "orgkeys",
        "keys_version",
        "usage",
        "rate",
        "gen",
        "gens",
        "daily",
    }
    assert 0 < await raw.ttl(s._p + "gen:gen_1") <= GEN_TTL_S
    for name in ("daily:2025-03-14", "daily:2025-03-14:key:key_1", "daily:2025-03-14:org:org_a"):
        assert GEN_TTL_S < await raw.ttl(s._p + name) <= AGG_TTL_S


async def test_a_redis_that_forgot_the_ledger_script_gets_it_again(
    nodes: list[RedisStore], raw: aioredis.Redis
) -> None:
    a, b = nodes[0], nodes[1]
    first = [
        GenerationRecord(id=f"gen_{i}", key_id="k", org="o", model="m", prompt_tokens=10, created=NOW) for i in range(3)
    ]
    await a.write_generations(first[:2])
    await raw.script_flush()  # as after a restart without persistence, or a failover to a fresh replica
    await b.write_generations(first)  # gen_0 and gen_1 again: counted once
    assert await a.count_generations() == 3
    [usage] = await a.usage_by_day(NOW - 86400, NOW)  # the day holding NOW
    assert (usage.requests, usage.prompt_tokens) == (3, 30)


async def test_the_ledger_index_forgets_what_the_ttl_expired(nodes: list[RedisStore]) -> None:
    old = GenerationRecord(id="gen_old", key_id="k", org="o", model="m", created=NOW - GEN_TTL_S - 1)
    await nodes[0].write_generations([old])
    assert await nodes[0].count_generations() == 1
    await nodes[1].write_generations([GenerationRecord(id="gen_new", key_id="k", org="o", model="m", created=NOW)])
    assert await nodes[0].count_generations() == 1


async def test_a_reaper_spares_a_node_that_heartbeat_after_the_listing(
    nodes: list[RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    reaper, dead, other = nodes[0], nodes[1], nodes[2]
    await other.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    await dead.lease("key_1", "org_a", None, None, 1.0, 4.0, NOW, "n_dead")
    await other.lease("key_1", "org_a", None, None, 1.0, 2.0, NOW, "n_back")
    listing = reaper._r.zrangebyscore

    async def then_n_back_heartbeats(*args: object, **kwargs: object) -> list[str]:
        dead_nodes = await listing(*args, **kwargs)  # type: ignore[arg-type]
        await other.heartbeat("n_back", NOW + 60)  # between the listing and the reap scripts
        return dead_nodes

    monkeypatch.setattr(reaper._r, "zrangebyscore", then_n_back_heartbeats)
    assert await reaper.reap(30.0, NOW + 31) == 4.0
    org = await other.get_org("org_a")
    assert org is not None and org.balance == 8.0
    assert (await other.key_usage("key_1", None, NOW)).outstanding == 2.0


# ---------------------------------------------------------------- unreachable


async def test_a_closed_port_raises_store_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", prefix="x:")
    gen = GenerationRecord(id="gen_1", key_id="k", org="o", model="m")
    try:
        with pytest.raises(StoreError):
            await store.ping()
        with pytest.raises(StoreError):
            await store.lease("key_1", "org_a", None, None, 1.0, 1.0, NOW)
        with pytest.raises(StoreError):
            await store.write_generations([gen])
        with pytest.raises(StoreError):
            await store.open()
    finally:
        await store.close()


async def test_a_silent_server_raises_store_error_instead_of_hanging() -> None:
    """A peer that accepts and never answers (a hung Redis, a black-holed route): timeout_s ends the wait."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="x:", timeout_s=0.2)
    try:
        with pytest.raises(StoreError):
            await store.ping()
        with pytest.raises(StoreError):
            await store.lease("key_1", "org_a", None, None, 1.0, 1.0, NOW)
    finally:
        await store.close()
        server.close()
        await server.wait_closed()


async def test_the_same_store_works_again_after_a_restart() -> None:
    with redis_server() as first:
        port = first.port
        store = RedisStore(first.url, prefix="x:")
        await store.put_org(OrgRecord(id="org_a", name="A", balance=5.0))
        assert await store.lease("key_1", "org_a", None, None, 1.0, 2.0, NOW) == 2.0
    try:
        with pytest.raises(StoreError):
            await store.lease("key_1", "org_a", None, None, 1.0, 2.0, NOW)
        with redis_server(port=port):  # empty: no persistence, and no scripts loaded
            await store.ping()
            await store.put_org(OrgRecord(id="org_a", name="A", balance=5.0))
            assert await store.lease("key_1", "org_a", None, None, 1.0, 2.0, NOW) == 2.0
    finally:
        await store.close()


async def test_subscribe_keys_raises_store_error_when_redis_goes_away() -> None:
    with redis_server() as server:
        store = RedisStore(server.url, prefix="x:")
        changes = store.subscribe_keys()
        first = asyncio.ensure_future(anext(changes))
        raw = aioredis.Redis.from_url(server.url)
        while (await raw.pubsub_numsub("x:keys"))[0][1] == 0:
            await asyncio.sleep(0.01)
        await raw.aclose()
    try:
        with pytest.raises(StoreError):
            await first
    finally:
        await store.close()


async def test_a_cancellation_the_client_turns_into_an_error_stays_a_cancellation(redis_url):
    url, prefix = redis_url
    store = RedisStore(url, prefix=prefix)
    await store.open()

    async def op() -> None:
        async with store._op():
            asyncio.current_task().cancel()  # the task is being cancelled (a graceful stop)…
            raise RedisConnectionError("Connection closed by server.")  # …and redis-py answers so

    try:
        task = asyncio.create_task(op())
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()  # not a StoreError, which a retrying loop would swallow
        with pytest.raises(StoreError):  # without a cancellation, the same error is a StoreError
            async with store._op():
                raise RedisConnectionError("Connection closed by server.")
    finally:
        await store.close()
