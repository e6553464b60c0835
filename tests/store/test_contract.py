"""The Store contract (proxy/store/base.py), run against every implementation through the `store` fixture."""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import Awaitable, Callable

import pytest

from proxy.store.base import (
    AttemptRecord,
    DayUsage,
    GenerationRecord,
    KeyRecord,
    KeyUsage,
    OrgRecord,
    Reset,
    Store,
    StoreError,
    period_of,
)


def utc(y: int, mo: int, d: int, h: int = 12, mi: int = 0) -> float:
    return float(calendar.timegm((y, mo, d, h, mi, 0)))


NOW = utc(2025, 3, 14)  # a Friday


async def usage(store: Store, key_id: str, reset: Reset | None = None, now: float = NOW) -> tuple[float, float]:
    u = await store.key_usage(key_id, reset, now)
    return u.usage, u.outstanding


async def balance(store: Store, org_id: str) -> float | None:
    org = await store.get_org(org_id)
    assert org is not None
    return org.balance


# ---------------------------------------------------------------- basics


async def test_ping(store: Store) -> None:
    await store.ping()
    assert store.kind in ("sqlite", "redis")


# ---------------------------------------------------------------- organisations


async def test_org_round_trip_and_missing(store: Store) -> None:
    org = OrgRecord(id="org_a", name="A", balance=12.5, spent=0.25, created_at=1700000000.5)
    await store.put_org(org)
    assert await store.get_org("org_a") == org
    assert await store.get_org("org_nope") is None


async def test_put_org_again_replaces_name_but_keeps_balance_and_spent(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0, created_at=5.0))
    await store.put_org(OrgRecord(id="org_a", name="A2", balance=99.0, spent=7.0, created_at=6.0))
    org = await store.get_org("org_a")
    assert org is not None
    assert (org.name, org.balance, org.spent) == ("A2", 10.0, 0.0)
    assert len(await store.list_orgs()) == 1


async def test_list_orgs(store: Store) -> None:
    assert await store.list_orgs() == []
    a = OrgRecord(id="org_a", name="A")
    b = OrgRecord(id="org_b", name="B", balance=1.0)
    await store.put_org(b)
    await store.put_org(a)
    assert sorted(await store.list_orgs(), key=lambda o: o.id) == [a, b]


async def test_top_up(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    assert await store.top_up("org_a", 5.5) == 15.5
    assert await balance(store, "org_a") == 15.5


async def test_top_up_makes_an_unlimited_org_limited(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_u", name="U"))
    assert await balance(store, "org_u") is None
    assert await store.top_up("org_u", 3.0) == 3.0
    assert await balance(store, "org_u") == 3.0


async def test_top_up_unknown_org_raises(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.top_up("org_nope", 1.0)
    assert await store.get_org("org_nope") is None


# ---------------------------------------------------------------- keys

FULL_KEY = KeyRecord(
    id="key_full",
    digest="ab" * 32,
    label="everything set",
    org="org_a",
    disabled=True,
    expires_at=1800000000.25,
    allowed_models=["openai/gpt-4o", "anthropic/claude-sonnet-4"],
    limit=12.75,
    limit_reset="monthly",
    rpm=60,
    tpm=100_000,
    created_at=1700000000.5,
    updated_at=1700000100.5,
)


async def test_key_round_trip(store: Store) -> None:
    bare = KeyRecord(id="key_bare", digest="cd" * 32)
    empty_models = KeyRecord(id="key_none", digest="ef" * 32, allowed_models=[])  # no model, not every model
    for k in (FULL_KEY, bare, empty_models):
        await store.put_key(k)
    assert await store.get_key("key_full") == FULL_KEY
    assert await store.get_key("key_bare") == bare
    got = await store.get_key("key_none")
    assert got is not None and got.allowed_models == []
    assert await store.get_key("key_nope") is None


def ids(keys: list[KeyRecord]) -> list[str]:
    return sorted(k.id for k in keys)


async def test_list_keys_by_org(store: Store) -> None:
    a1 = KeyRecord(id="key_a1", digest="1", org="org_a")
    a2 = KeyRecord(id="key_a2", digest="2", org="org_a")
    b1 = KeyRecord(id="key_b1", digest="3", org="org_b")
    for k in (b1, a2, a1):
        await store.put_key(k)
    assert ids(await store.list_keys()) == ["key_a1", "key_a2", "key_b1"]
    assert ids(await store.list_keys("org_a")) == ["key_a1", "key_a2"]
    assert ids(await store.list_keys("org_b")) == ["key_b1"]
    assert await store.list_keys("org_nope") == []


async def test_put_key_replaces_including_its_org(store: Store) -> None:
    await store.put_key(KeyRecord(id="key_1", digest="1", org="org_a", label="old"))
    moved = KeyRecord(id="key_1", digest="1", org="org_b", label="new")
    await store.put_key(moved)
    assert await store.get_key("key_1") == moved
    assert await store.list_keys() == [moved]
    assert await store.list_keys("org_a") == []
    assert await store.list_keys("org_b") == [moved]


async def test_delete_key(store: Store) -> None:
    await store.put_key(KeyRecord(id="key_1", digest="1", org="org_a"))
    await store.put_key(KeyRecord(id="key_2", digest="2", org="org_a"))
    assert await store.delete_key("key_1") is True
    assert await store.get_key("key_1") is None
    assert [k.id for k in await store.list_keys()] == ["key_2"]
    assert [k.id for k in await store.list_keys("org_a")] == ["key_2"]
    assert await store.delete_key("key_1") is False


async def test_keys_version_changes_on_every_write(store: Store) -> None:
    seen = {await store.keys_version()}
    assert await store.keys_version() in seen  # reading does not change it
    for write in (
        lambda: store.put_key(KeyRecord(id="key_1", digest="1")),
        lambda: store.put_key(KeyRecord(id="key_1", digest="1", label="same id again")),
        lambda: store.put_key(KeyRecord(id="key_2", digest="2")),
        lambda: store.delete_key("key_1"),
    ):
        await write()
        v = await store.keys_version()
        assert v not in seen
        seen.add(v)
    await store.put_org(OrgRecord(id="org_a", name="A"))  # orgs are not keys
    assert await store.keys_version() == v


# ---------------------------------------------------------------- leases


async def test_lease_capped_by_org_balance(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=5.0))
    assert await store.lease("key_1", "org_a", None, None, 1.0, 10.0, NOW) == 5.0
    assert await balance(store, "org_a") == 0.0
    assert await usage(store, "key_1") == (0.0, 5.0)
    assert await store.lease("key_1", "org_a", None, None, 0.5, 10.0, NOW) == 0.0


async def test_lease_capped_by_key_limit(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_u", name="U"))  # unlimited
    assert await store.lease("key_1", "org_u", 3.0, None, 1.0, 10.0, NOW) == 3.0
    assert await balance(store, "org_u") is None
    assert await usage(store, "key_1") == (0.0, 3.0)
    assert await store.lease("key_1", "org_u", 3.0, None, 0.01, 10.0, NOW) == 0.0


async def test_lease_grants_want_when_enough_and_outstanding_grows(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=100.0))
    assert await store.lease("key_1", "org_a", 50.0, None, 1.0, 2.0, NOW) == 2.0
    assert await store.lease("key_1", "org_a", 50.0, None, 1.0, 3.0, NOW) == 3.0
    assert await usage(store, "key_1") == (0.0, 5.0)
    assert await balance(store, "org_a") == 95.0
    assert await usage(store, "key_2") == (0.0, 0.0)  # per key


async def test_lease_counts_usage_and_outstanding_against_the_limit(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=100.0))
    assert await store.lease("key_1", "org_a", 10.0, None, 1.0, 4.0, NOW) == 4.0
    await store.settle("key_1", "org_a", None, 0.0, 4.0, NOW)  # usage 4
    assert await store.lease("key_1", "org_a", 10.0, None, 1.0, 3.0, NOW) == 3.0  # outstanding 3
    # 10 - 4 - 3 = 3 left
    assert await store.lease("key_1", "org_a", 10.0, None, 1.0, 8.0, NOW) == 3.0
    assert await usage(store, "key_1") == (4.0, 6.0)
    assert await balance(store, "org_a") == 90.0


async def test_lease_below_need_changes_nothing(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=2.0))
    assert await store.lease("key_1", "org_a", None, None, 3.0, 5.0, NOW) == 0.0
    assert await balance(store, "org_a") == 2.0
    assert await usage(store, "key_1") == (0.0, 0.0)
    await store.put_org(OrgRecord(id="org_u", name="U"))
    assert await store.lease("key_2", "org_u", 1.0, None, 1.5, 5.0, NOW) == 0.0  # the key limit is short
    assert await usage(store, "key_2") == (0.0, 0.0)


async def test_lease_on_an_org_not_in_the_store_is_unlimited(store: Store) -> None:
    assert await store.lease("key_1", "org_cfg", None, None, 1.0, 7.0, NOW) == 7.0
    assert await usage(store, "key_1") == (0.0, 7.0)
    assert await store.get_org("org_cfg") is None


async def test_concurrent_leases_never_overdraw(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=100.0))
    grants = await asyncio.gather(*(store.lease(f"key_{i % 3}", "org_a", None, None, 1.0, 3.0, NOW) for i in range(60)))
    assert sum(grants) == 100.0
    assert all(g in (0.0, 1.0, 3.0) for g in grants)
    assert await balance(store, "org_a") == 0.0


# ---------------------------------------------------------------- settle


async def test_settle_returns_unspent_and_records_spent(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    assert await store.lease("key_1", "org_a", None, None, 1.0, 5.0, NOW) == 5.0
    await store.settle("key_1", "org_a", None, 3.0, 2.0, NOW)
    org = await store.get_org("org_a")
    assert org is not None
    assert (org.balance, org.spent) == (8.0, 2.0)
    assert await usage(store, "key_1") == (2.0, 0.0)


async def test_settle_partially(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    await store.lease("key_1", "org_a", None, None, 1.0, 6.0, NOW)
    await store.settle("key_1", "org_a", None, 0.0, 1.5, NOW)  # spent some, kept the rest
    assert await usage(store, "key_1") == (1.5, 4.5)
    assert await balance(store, "org_a") == 4.0


async def test_settle_never_drops_outstanding_below_zero(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    await store.lease("key_1", "org_a", None, None, 0.5, 0.5, NOW)
    await store.settle("key_1", "org_a", None, 1.0, 1.0, NOW)
    assert await usage(store, "key_1") == (1.0, 0.0)
    assert await balance(store, "org_a") == 10.5
    await store.settle("key_2", "org_a", None, 0.0, 0.25, NOW)  # never leased: still recorded
    assert await usage(store, "key_2") == (0.25, 0.0)


async def test_settle_on_unlimited_org_keeps_it_unlimited(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_u", name="U"))
    await store.lease("key_1", "org_u", None, None, 1.0, 4.0, NOW)
    await store.settle("key_1", "org_u", None, 1.0, 3.0, NOW)
    org = await store.get_org("org_u")
    assert org is not None
    assert (org.balance, org.spent) == (None, 3.0)
    await store.settle("key_1", "org_cfg", None, 0.0, 0.0, NOW)  # an org not in the store: no error
    assert await store.get_org("org_cfg") is None


# ---------------------------------------------------------------- node leases and reaping

TTL = 30.0
DEAD = NOW + TTL + 1  # a reaper's clock: a node last heard from at NOW is dead by then


async def test_reap_returns_a_dead_nodes_lease_once(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    assert await store.lease("key_1", "org_a", None, None, 1.0, 4.0, NOW, "n1") == 4.0
    assert await balance(store, "org_a") == 6.0
    assert await store.reap(TTL, DEAD) == 4.0
    assert await balance(store, "org_a") == 10.0
    assert await usage(store, "key_1") == (0.0, 0.0)
    assert await store.reap(TTL, DEAD) == 0.0  # idempotent
    assert await store.reap(TTL, DEAD + 1000) == 0.0
    assert await balance(store, "org_a") == 10.0


async def test_lease_and_settle_move_the_node_record(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    await store.lease("key_1", "org_a", None, "daily", 1.0, 4.0, NOW, "n1")
    await store.lease("key_1", "org_a", None, "daily", 1.0, 2.0, NOW, "n1")  # record 6
    await store.settle("key_1", "org_a", "daily", 1.0, 2.0, NOW, "n1")  # record 3
    assert await balance(store, "org_a") == 5.0
    assert await usage(store, "key_1", "daily") == (2.0, 3.0)
    assert await store.reap(TTL, DEAD) == 3.0  # exactly the unspent lease
    assert await balance(store, "org_a") == 8.0
    assert await usage(store, "key_1", "daily") == (2.0, 0.0)  # the settled spend stays billed
    org = await store.get_org("org_a")
    assert org is not None and org.spent == 2.0


async def test_a_settled_lease_leaves_nothing_to_reap(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    await store.lease("key_1", "org_a", None, None, 1.0, 4.0, NOW, "n1")
    await store.settle("key_1", "org_a", None, 3.0, 1.0, NOW, "n1")  # all of it
    await store.lease("key_2", "org_a", None, None, 0.5, 0.5, NOW, "n1")
    await store.settle("key_2", "org_a", None, 1.0, 1.0, NOW, "n1")  # more than leased: the record stops at 0
    await store.settle("key_3", "org_a", None, 0.0, 0.25, NOW, "n1")  # never leased: no record appears
    before = await balance(store, "org_a")
    assert await store.reap(TTL, DEAD) == 0.0
    assert await balance(store, "org_a") == before
    assert await usage(store, "key_1") == (1.0, 0.0)


async def test_leases_are_per_key_and_node_and_remember_their_org(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    await store.put_org(OrgRecord(id="org_b", name="B", balance=10.0))
    await store.lease("key_1", "org_a", None, None, 1.0, 3.0, NOW, "n1")
    await store.lease("key_2", "org_b", None, None, 1.0, 2.0, NOW, "n1")
    await store.lease("key_1", "org_a", None, None, 1.0, 1.0, NOW, "n2")
    await store.heartbeat("n2", NOW + 20)
    assert await store.reap(TTL, DEAD) == 5.0  # n1's leases; n2 lives
    assert (await balance(store, "org_a"), await balance(store, "org_b")) == (9.0, 10.0)
    assert await usage(store, "key_1") == (0.0, 1.0)  # n2's lease is left alone
    assert await usage(store, "key_2") == (0.0, 0.0)
    await store.settle("key_1", "org_a", None, 0.5, 0.5, NOW + 40, "n2")
    assert await store.reap(TTL, NOW + 100) == 0.0  # n2 died settled
    assert await balance(store, "org_a") == 9.5
    assert await usage(store, "key_1") == (0.5, 0.0)


async def test_heartbeat_lease_and_settle_keep_a_node_alive(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    await store.lease("key_1", "org_a", None, None, 1.0, 4.0, NOW, "n1")
    assert await store.reap(TTL, NOW + TTL) == 0.0  # heard from exactly ttl ago: not older, alive
    await store.heartbeat("n1", NOW + 25)
    assert await store.reap(TTL, NOW + 50) == 0.0
    await store.settle("key_1", "org_a", None, 0.0, 1.0, NOW + 50, "n1")
    assert await store.reap(TTL, NOW + 75) == 0.0
    assert await store.lease("key_1", "org_a", None, None, 20.0, 20.0, NOW + 75, "n1") == 0.0  # still a heartbeat
    assert await store.reap(TTL, NOW + 100) == 0.0
    assert await usage(store, "key_1") == (1.0, 3.0)
    assert await store.reap(TTL, NOW + 75 + TTL + 1) == 3.0
    assert await balance(store, "org_a") == 9.0
    assert await usage(store, "key_1") == (1.0, 0.0)


async def test_reap_on_an_unlimited_org(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_u", name="U"))
    await store.lease("key_1", "org_u", 10.0, None, 1.0, 4.0, NOW, "n1")
    await store.lease("key_2", "org_cfg", None, None, 1.0, 2.0, NOW, "n1")  # an org not in the store
    assert await store.reap(TTL, DEAD) == 6.0
    assert await balance(store, "org_u") is None
    assert await store.get_org("org_cfg") is None
    assert await usage(store, "key_1") == (0.0, 0.0)
    assert await usage(store, "key_2") == (0.0, 0.0)
    assert await store.lease("key_1", "org_u", 10.0, None, 1.0, 10.0, DEAD) == 10.0  # the limit's room is back


async def test_reap_never_drops_outstanding_below_zero(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    await store.lease("key_1", "org_a", None, None, 1.0, 4.0, NOW, "n1")
    await store.settle("key_1", "org_a", None, 0.0, 3.0, NOW)  # a caller without a node settled most of it
    assert await usage(store, "key_1") == (3.0, 1.0)
    assert await store.reap(TTL, DEAD) == 4.0  # the node's record still says 4
    assert await usage(store, "key_1") == (3.0, 0.0)
    assert await balance(store, "org_a") == 10.0


async def test_leases_without_a_node_are_never_reaped(store: Store) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
    await store.lease("key_1", "org_a", None, None, 1.0, 4.0, NOW)  # an old caller
    await store.lease("key_1", "org_a", None, None, 1.0, 1.0, NOW, "")
    await store.heartbeat("", NOW)
    assert await store.reap(TTL, DEAD + 10**6) == 0.0
    assert await balance(store, "org_a") == 5.0
    assert await usage(store, "key_1") == (0.0, 5.0)


async def test_concurrent_reaps_return_each_lease_once(
    store: Store, open_stores: Callable[[], Awaitable[Store]]
) -> None:
    other = await open_stores()  # another node's connection to the same data
    await store.put_org(OrgRecord(id="org_a", name="A", balance=100.0))
    for n in range(4):
        for k in range(3):
            assert await store.lease(f"key_{k}", "org_a", None, None, 1.0, 2.0, NOW, f"n{n}") == 2.0
    await store.heartbeat("n3", DEAD)  # alive
    assert await balance(store, "org_a") == 76.0
    reaped = await asyncio.gather(*(s.reap(TTL, DEAD) for _ in range(4) for s in (store, other)))
    assert sum(reaped) == 18.0  # n0..n2, 3 keys × 2.0 each, once
    assert await balance(store, "org_a") == 94.0
    assert [await usage(store, f"key_{k}") for k in range(3)] == [(0.0, 2.0)] * 3
    assert await asyncio.gather(store.reap(TTL, DEAD), other.reap(TTL, DEAD)) == [0.0, 0.0]


# ---------------------------------------------------------------- periods


async def test_key_usage_of_an_unknown_key(store: Store) -> None:
    u = await store.key_usage("key_nope", "daily", NOW)
    assert (u.usage, u.outstanding) == (0.0, 0.0)


async def test_lease_records_the_current_period(store: Store) -> None:
    await store.lease("key_1", "org_cfg", 10.0, "daily", 1.0, 1.0, NOW)
    assert await store.key_usage("key_1", "daily", NOW) == KeyUsage(
        usage=0.0, outstanding=1.0, period=period_of("daily", NOW)
    )


@pytest.mark.parametrize(
    ("reset", "first", "same", "next_"),
    [
        ("daily", utc(2025, 3, 14, 0, 1), utc(2025, 3, 14, 23, 59), utc(2025, 3, 15, 0, 1)),
        ("weekly", utc(2025, 3, 10, 0, 1), utc(2025, 3, 16, 23, 59), utc(2025, 3, 17, 0, 1)),  # Mon .. Sun, Mon
        ("weekly", utc(2024, 12, 30), utc(2025, 1, 5, 23, 59), utc(2025, 1, 6)),  # ISO week 2025-W01 spans years
        ("monthly", utc(2025, 3, 1, 0, 1), utc(2025, 3, 31, 23, 59), utc(2025, 4, 1, 0, 1)),
        ("monthly", utc(2024, 12, 31, 23, 59), utc(2024, 12, 1), utc(2025, 1, 1, 0, 1)),
    ],
    ids=["daily", "weekly", "weekly-new-year", "monthly", "monthly-new-year"],
)
async def test_usage_starts_again_in_a_new_period(
    store: Store, reset: Reset, first: float, same: float, next_: float
) -> None:
    await store.put_org(OrgRecord(id="org_a", name="A", balance=100.0))
    assert await store.lease("key_1", "org_a", 5.0, reset, 1.0, 5.0, first) == 5.0
    await store.settle("key_1", "org_a", reset, 1.0, 4.0, first)
    assert await usage(store, "key_1", reset, same) == (4.0, 0.0)
    assert await store.lease("key_1", "org_a", 5.0, reset, 2.0, 5.0, same) == 0.0  # 1.0 left this period
    assert await usage(store, "key_1", reset, next_) == (0.0, 0.0)
    assert await store.lease("key_1", "org_a", 5.0, reset, 2.0, 5.0, next_) == 5.0
    assert await usage(store, "key_1", reset, next_) == (0.0, 5.0)


async def test_outstanding_survives_a_new_period(store: Store) -> None:
    day1, day2 = utc(2025, 3, 14), utc(2025, 3, 15)
    await store.put_org(OrgRecord(id="org_a", name="A", balance=100.0))
    await store.lease("key_1", "org_a", 10.0, "daily", 1.0, 3.0, day1)
    await store.settle("key_1", "org_a", "daily", 0.0, 1.0, day1)
    assert await usage(store, "key_1", "daily", day2) == (0.0, 2.0)
    # the limit counts the outstanding credit leased yesterday
    assert await store.lease("key_1", "org_a", 10.0, "daily", 1.0, 10.0, day2) == 8.0
    await store.settle("key_1", "org_a", "daily", 0.0, 2.0, day2)  # yesterday's lease, spent today
    assert await usage(store, "key_1", "daily", day2) == (2.0, 8.0)


async def test_settle_in_a_new_period_starts_from_zero(store: Store) -> None:
    day1, day2 = utc(2025, 3, 14), utc(2025, 3, 15)
    await store.lease("key_1", "org_cfg", 10.0, "daily", 1.0, 6.0, day1)
    await store.settle("key_1", "org_cfg", "daily", 0.0, 3.0, day1)
    await store.settle("key_1", "org_cfg", "daily", 0.0, 2.0, day2)
    assert await usage(store, "key_1", "daily", day2) == (2.0, 1.0)


async def test_without_reset_usage_accumulates_forever(store: Store) -> None:
    years = [utc(2025, 1, 1), utc(2026, 6, 1), utc(2030, 12, 31)]
    for t in years:
        await store.lease("key_1", "org_cfg", 10.0, None, 1.0, 2.0, t)
        await store.settle("key_1", "org_cfg", None, 0.0, 2.0, t)
    assert await usage(store, "key_1", None, years[-1]) == (6.0, 0.0)
    assert await store.lease("key_1", "org_cfg", 10.0, None, 1.0, 10.0, years[-1]) == 4.0


# ---------------------------------------------------------------- rate-limit counters


async def test_take_grants_up_to_the_limit(store: Store) -> None:
    assert await store.take("rpm:key_1", 3, 5, 60) == 3
    assert await store.take("rpm:key_1", 3, 5, 60) == 2  # partial
    assert await store.take("rpm:key_1", 1, 5, 60) == 0
    assert await store.take("rpm:key_2", 9, 5, 60) == 5  # per name; more than the limit at once
    assert await store.add("rpm:key_1", 0, 60) == 5


async def test_take_concurrently_never_passes_the_limit(store: Store) -> None:
    grants = await asyncio.gather(*(store.take("tpm:key_1", 3, 20, 60) for _ in range(10)))
    assert sum(grants) == 20
    assert sorted(grants, reverse=True)[:8] == [3, 3, 3, 3, 3, 3, 2, 0]


async def test_add_totals(store: Store) -> None:
    assert await store.add("tpm:key_1", 0, 60) == 0
    assert await store.add("tpm:key_1", 5, 60) == 5
    assert await store.add("tpm:key_1", 7, 60) == 12
    assert await store.add("tpm:key_1", 0, 60) == 12
    assert await store.add("tpm:key_2", 1, 60) == 1
    # take sees what add counted
    assert await store.take("tpm:key_1", 10, 15, 60) == 3


# ---------------------------------------------------------------- ledger


def gen(gen_id: str, **kw: object) -> GenerationRecord:
    return GenerationRecord(id=gen_id, key_id="key_1", org="org_a", model="test/m", **kw)  # type: ignore[arg-type]


FULL_GEN = GenerationRecord(
    id="gen_full",
    key_id="key_1",
    org="org_a",
    model="anthropic/claude-sonnet-4",
    provider="anthropic",
    endpoint="anthropic/claude-sonnet-4-20250514",
    status=200,
    streamed=True,
    cancelled=True,
    finish_reason="stop",
    prompt_tokens=1234,
    completion_tokens=567,
    cached_tokens=1000,
    cache_write_tokens=200,
    reasoning_tokens=89,
    cost=0.0123456789,
    fee=0.000617283945,
    ttft=0.321,
    latency=4.56789,
    created=1741953600.123456,
    attempts=[
        AttemptRecord(
            provider="openai",
            endpoint="openai/gpt-4o",
            outcome="status",
            status=429,
            started=0.001,
            duration=0.2,
        ),
        AttemptRecord(
            provider="anthropic",
            endpoint="anthropic/claude-sonnet-4-20250514",
            outcome="ok",
            status=200,
            started=0.21,
            duration=4.3,
            prompt_tokens=1234,
            completion_tokens=567,
            cost=0.0123456789,
        ),
    ],
)


async def test_generation_round_trips_every_field(store: Store) -> None:
    bare = gen("gen_bare")  # None ttft and finish_reason, no attempts
    await store.write_generations([FULL_GEN, bare])
    assert await store.get_generation("gen_full") == FULL_GEN
    assert await store.get_generation("gen_bare") == bare
    assert await store.get_generation("gen_nope") is None


async def test_write_generations_is_idempotent(store: Store) -> None:
    assert await store.count_generations() == 0
    await store.write_generations([])
    batch = [gen("gen_1", cost=1.0), gen("gen_2", cost=2.0), gen("gen_3")]
    await store.write_generations(batch)
    await store.write_generations(batch)  # a retried batch
    assert await store.count_generations() == 3
    await store.write_generations([gen("gen_3"), gen("gen_4")])  # overlapping
    assert await store.count_generations() == 4
    for g in [*batch, gen("gen_4")]:
        assert await store.get_generation(g.id) == g


async def test_a_reaped_node_that_comes_back_returns_nothing_twice(store):
    await store.put_org(OrgRecord(id="o", name="o", balance=10.0))
    assert await store.lease("k", "o", None, None, 1.0, 4.0, 100.0, "n1") == 4.0
    assert await store.reap(30.0, 200.0) == 4.0  # n1 went silent: its lease is back
    await store.settle("k", "o", None, 3.0, 1.0, 201.0, "n1")  # n1 was only cut off; it settles late
    org = await store.get_org("o")
    assert org is not None
    assert org.balance == 10.0  # not 13: the lease came back once
    assert org.spent == 1.0
    usage = await store.key_usage("k", None, 201.0)
    assert usage.usage == 1.0 and usage.outstanding == 0.0


# ---------------------------------------------------------------- usage by day

DAY14 = utc(2025, 3, 14, 0)  # midnight UTC
DAY15 = DAY14 + 86400
DAY16 = DAY15 + 86400


def _usage_gen(gen_id: str, created: float, model: str = "test/a", key: str = "key_1", org: str = "org_a", n: int = 1):
    return GenerationRecord(
        id=gen_id,
        key_id=key,
        org=org,
        model=model,
        created=created,
        prompt_tokens=100 * n,
        completion_tokens=10 * n,
        cached_tokens=4 * n,
        reasoning_tokens=2 * n,
        cost=0.001 * n + 1e-9,
        fee=0.0001 * n,
    )


def _expected(records: list[GenerationRecord]) -> list[DayUsage]:
    """Added up by hand: per (UTC day, model)."""
    rows: dict[tuple[str, str], DayUsage] = {}
    for r in records:
        day = time.strftime("%Y-%m-%d", time.gmtime(r.created))
        u = rows.setdefault((day, r.model), DayUsage(day=day, model=r.model))
        u.requests += 1
        u.prompt_tokens += r.prompt_tokens
        u.completion_tokens += r.completion_tokens
        u.cached_tokens += r.cached_tokens
        u.reasoning_tokens += r.reasoning_tokens
        u.cost += r.cost
        u.fee += r.fee
    return [rows[k] for k in sorted(rows)]


def _same(got: list[DayUsage], want: list[DayUsage]) -> None:
    assert [(u.day, u.model, u.requests) for u in got] == [(u.day, u.model, u.requests) for u in want]
    for g, w in zip(got, want, strict=True):
        assert (g.prompt_tokens, g.completion_tokens, g.cached_tokens, g.reasoning_tokens) == (
            w.prompt_tokens,
            w.completion_tokens,
            w.cached_tokens,
            w.reasoning_tokens,
        )
        assert g.cost == pytest.approx(w.cost, rel=1e-12) and g.fee == pytest.approx(w.fee, rel=1e-12)


USAGE_RECORDS = [
    _usage_gen("g_before", DAY14 - 0.001),  # the 13th: before the range
    _usage_gen("g_first", DAY14),  # the first instant of the 14th
    _usage_gen("g_14a", DAY14 + 3600, n=2),
    _usage_gen("g_14b", DAY14 + 7200, model="test/b", key="key_2", n=3),
    _usage_gen("g_14c", DAY15 - 0.001, model="test/b", key="key_3", org="org_b", n=5),  # the 14th's last moment
    _usage_gen("g_15a", DAY15, n=7),  # midnight belongs to the 15th
    _usage_gen("g_15b", DAY15 + 43200, model="test/b", key="key_3", org="org_b", n=11),
    _usage_gen("g_after", DAY16),  # the 16th: after the range
]


async def test_usage_by_day_adds_up_per_utc_day_and_model(store: Store) -> None:
    assert await store.usage_by_day(DAY14, DAY16) == []
    await store.write_generations(USAGE_RECORDS[:3])
    await store.write_generations(USAGE_RECORDS[3:])
    got = await store.usage_by_day(DAY14, DAY16)
    _same(got, _expected(USAGE_RECORDS[1:-1]))
    assert [(u.day, u.model, u.requests) for u in got] == [
        ("2025-03-14", "test/a", 2),
        ("2025-03-14", "test/b", 2),
        ("2025-03-15", "test/a", 1),
        ("2025-03-15", "test/b", 1),
    ]
    assert got[0].prompt_tokens == 300 and got[1].completion_tokens == 80
    # one day at a time; the day before and after hold exactly their own record
    _same(await store.usage_by_day(DAY15, DAY16), _expected(USAGE_RECORDS[5:7]))
    _same(await store.usage_by_day(DAY14 - 86400, DAY14), _expected(USAGE_RECORDS[:1]))
    _same(await store.usage_by_day(DAY16, DAY16 + 86400), _expected(USAGE_RECORDS[-1:]))
    _same(await store.usage_by_day(DAY14 - 86400, DAY16 + 86400), _expected(USAGE_RECORDS))
    assert await store.usage_by_day(DAY16, DAY16) == []


async def test_usage_by_day_counts_whole_days_whose_midnight_is_in_range(store: Store) -> None:
    await store.write_generations(USAGE_RECORDS)
    now = DAY15 + 3600  # 01:00 on the 15th
    # [now - 1 day, now): the 15th, today, whole; [now - 2 days, now - 1 day): the 14th, whole
    _same(await store.usage_by_day(now - 86400, now), _expected(USAGE_RECORDS[5:7]))
    _same(await store.usage_by_day(now - 2 * 86400, now - 86400), _expected(USAGE_RECORDS[1:5]))
    _same(await store.usage_by_day(now - 2 * 86400, now), _expected(USAGE_RECORDS[1:7]))
    assert await store.usage_by_day(DAY15 + 1, DAY15 + 3600) == []  # no midnight inside


async def test_usage_by_day_filters_by_key_or_org(store: Store) -> None:
    await store.write_generations(USAGE_RECORDS)
    for key in ("key_1", "key_2", "key_3", "key_none"):
        want = _expected([r for r in USAGE_RECORDS[1:-1] if r.key_id == key])
        _same(await store.usage_by_day(DAY14, DAY16, key_id=key), want)
    for org in ("org_a", "org_b", "org_none"):
        want = _expected([r for r in USAGE_RECORDS[1:-1] if r.org == org])
        _same(await store.usage_by_day(DAY14, DAY16, org=org), want)
    assert [u.requests for u in await store.usage_by_day(DAY14, DAY16, key_id="key_3")] == [1, 1]
    with pytest.raises(ValueError):
        await store.usage_by_day(DAY14, DAY16, key_id="key_1", org="org_a")


async def test_usage_by_day_counts_a_rewritten_batch_once(store: Store) -> None:
    batch = USAGE_RECORDS[1:4]
    await store.write_generations(batch)
    await store.write_generations(batch)  # a retried batch
    await store.write_generations([*USAGE_RECORDS[2:6]])  # overlapping: two new records
    # a record written again with other numbers (a bug elsewhere) keeps its first copy, in the totals too
    await store.write_generations([_usage_gen("g_14a", DAY14 + 3600, n=1000)])
    want = _expected(USAGE_RECORDS[1:6])
    _same(await store.usage_by_day(DAY14, DAY16), want)
    _same(await store.usage_by_day(DAY14, DAY16, key_id="key_1"), _expected([USAGE_RECORDS[i] for i in (1, 2, 5)]))
    _same(await store.usage_by_day(DAY14, DAY16, org="org_b"), _expected([USAGE_RECORDS[4]]))
    assert await store.count_generations() == 5


async def test_usage_by_day_sees_every_nodes_writes(open_stores: Callable[[], Awaitable[Store]]) -> None:
    a, b = await open_stores(), await open_stores()
    await asyncio.gather(a.write_generations(USAGE_RECORDS[:4]), b.write_generations(USAGE_RECORDS[2:]))
    _same(await b.usage_by_day(DAY14, DAY16), _expected(USAGE_RECORDS[1:-1]))
    _same(
        await a.usage_by_day(DAY14, DAY16, org="org_a"), _expected([r for r in USAGE_RECORDS[1:-1] if r.org == "org_a"])
    )
