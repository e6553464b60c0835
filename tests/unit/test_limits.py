"""Credits, rate limits and the ledger queue against a real SQLite store (proxy/accounting/limits.py, ledger.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.accounting.ledger import Ledger
from proxy.accounting.limits import WINDOW_S, Credits, RateLimits
from proxy.accounting.settings import AccountingConfig
from proxy.errors import PaymentRequired, RateLimited, Unavailable
from proxy.store.base import GenerationRecord, KeyRecord, OrgRecord
from proxy.store.sqlite import SQLiteStore


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "l.db"))
    await s.open()
    yield s
    await s.close()


def key(**kw: object) -> KeyRecord:
    return KeyRecord(id="k1", digest="00" * 32, org="acme", **kw)  # type: ignore[arg-type]


async def credits_for(store: SQLiteStore, balance: float | None, clock: Clock, **cfg: object) -> Credits:
    await store.put_org(OrgRecord(id="acme", name="acme", balance=balance))
    c = Credits(store, AccountingConfig(**cfg), clock)  # type: ignore[arg-type]
    c.orgs = {o.id: o for o in await store.list_orgs()}
    return c


async def test_reservations_lease_in_chunks_and_commit_gives_back_the_unspent(store):
    clock = Clock()
    c = await credits_for(store, 10.0, clock, **{"lease_fraction": 0.1})
    k = key()
    assert c.metered(k)
    assert await c.reserve(k, 0.4) == 0.4  # leases max(need, 10% of 10) = 1.0
    org = await store.get_org("acme")
    assert org is not None and org.balance == pytest.approx(9.0)
    assert await c.reserve(k, 0.4) == 0.4  # from the lease: the store is not asked
    assert (await store.get_org("acme")).balance == pytest.approx(9.0)  # type: ignore[union-attr]
    c.commit(k, 0.4, 0.1)
    c.commit(k, 0.4, 0.3)
    assert c.unsettled("k1") == pytest.approx(0.4)
    clock.now += 60  # idle: the settlement returns the lease too
    await c.settle()
    org = await store.get_org("acme")
    assert org is not None
    assert org.spent == pytest.approx(0.4)
    assert org.balance == pytest.approx(10.0 - 0.4)  # every unspent cent went back
    assert c.unsettled("k1") == 0


async def test_a_reservation_that_does_not_fit_is_refused_and_takes_nothing(store):
    c = await credits_for(store, 1.0, Clock())
    k = key()
    with pytest.raises(PaymentRequired):
        await c.reserve(k, 1.5)
    org = await store.get_org("acme")
    assert org is not None and org.balance == 1.0


async def test_a_key_limit_caps_within_an_unlimited_org(store):
    clock = Clock()
    c = await credits_for(store, None, clock)
    k = key(limit=1.0)
    assert c.metered(k) and not c.metered(key())
    await c.reserve(k, 0.6)
    with pytest.raises(PaymentRequired):
        await c.reserve(k, 0.6)  # 0.6 + 0.6 > the key's 1.0
    c.commit(k, 0.6, 0.6)
    await c.settle(final=True)
    usage = await store.key_usage("k1", None, clock())
    assert usage.usage == pytest.approx(0.6) and usage.outstanding == pytest.approx(0.0, abs=1e-12)


async def test_unmetered_keys_reserve_nothing_but_their_spend_is_settled(store):
    c = await credits_for(store, None, Clock())
    k = key()
    assert await c.reserve(k, 5.0) == 0.0
    c.commit(k, 0.0, 0.25)
    await c.settle()
    assert (await store.key_usage("k1", None, 0)).usage == pytest.approx(0.25)


async def test_store_down_fails_open_by_default_and_closed_when_configured(store):
    c = await credits_for(store, 10.0, Clock())
    closed = await credits_for(store, 10.0, Clock(), fail_closed=True)
    await store.close()
    assert await c.reserve(key(), 1.0) == 0.0  # served without a reservation, counted
    assert c.unreachable == 1
    with pytest.raises(Unavailable):
        await closed.reserve(key(), 1.0)
    c.commit(key(), 0.0, 0.5)
    await c.settle()  # fails: the spend is kept for the next round, not lost
    assert c.unsettled("k1") == 0.5
    await store.open()


async def test_rpm_grants_the_limit_per_window_then_429_with_headers(store):
    clock = Clock(60 * 1_000_000 + 10)
    r = RateLimits(store, AccountingConfig(), clock)
    k = key(rpm=5)
    remaining = []
    for _ in range(5):
        remaining.append(int((await r.admit(k))["X-RateLimit-Remaining"]))
    assert remaining == [4, 3, 2, 1, 0]
    with pytest.raises(RateLimited) as e:
        await r.admit(k)
    headers = e.value.headers()
    assert headers["Retry-After"] == str(WINDOW_S - 10) and headers["X-RateLimit-Remaining"] == "0"
    clock.now += WINDOW_S  # the next window
    assert (await r.admit(k))["X-RateLimit-Limit"] == "5"


async def test_rpm_is_shared_by_every_node_of_one_store(store):
    clock = Clock(60 * 2_000_000)
    nodes = [RateLimits(store, AccountingConfig(), clock) for _ in range(3)]
    k = key(rpm=10)
    admitted = 0
    for i in range(30):
        try:
            await nodes[i % 3].admit(k)
            admitted += 1
        except RateLimited:
            pass
    assert admitted == 10


async def test_tpm_refuses_once_the_window_used_its_tokens(store):
    clock = Clock(60 * 3_000_000)
    a, b = RateLimits(store, AccountingConfig(), clock), RateLimits(store, AccountingConfig(), clock)
    k = key(tpm=1000)
    await a.admit(k)
    a.add_tokens(k, 1200)
    with pytest.raises(RateLimited):
        await a.admit(k)
    await b.admit(k)  # b does not know yet…
    await a.sync()
    await b.sync()  # …until the counts are synced
    with pytest.raises(RateLimited):
        await b.admit(k)


def rec(i: int) -> GenerationRecord:
    return GenerationRecord(id=f"gen-{i}", key_id="k1", org="acme", model="m", cost=0.001 * i)


async def test_ledger_batches_keeps_records_through_an_outage_and_bounds_its_queue(store):
    ledger = Ledger(store, flush_interval_s=1.0, queue_max=100)
    for i in range(50):
        ledger.append(rec(i))
    assert ledger.pending("gen-7") is not None
    assert await ledger.flush()
    assert await store.count_generations() == 50 and len(ledger) == 0 and ledger.pending("gen-7") is None
    await store.close()
    for i in range(50, 180):
        ledger.append(rec(i))
    assert not await ledger.flush()  # the store is down: nothing lost from the queue
    assert len(ledger) == 100 and ledger.dropped == 30  # bounded: the oldest went, counted
    await store.open()
    assert await ledger.flush()
    assert await store.count_generations() == 150
    assert await store.get_generation("gen-179") is not None and await store.get_generation("gen-60") is None
