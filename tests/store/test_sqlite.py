"""SQLite-only behaviour: many processes on one file, migrations, the worker thread, locks and errors."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import pytest

import proxy.store.sqlite as sqlite_mod
from proxy.store.base import GenerationRecord, KeyRecord, OrgRecord, StoreError
from proxy.store.sqlite import SQLiteStore

NOW = 1741953600.0


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "h.db"))
    await s.open()
    yield s
    await s.close()


def _user_version(path: str) -> int:
    with closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


# ---------------------------------------------------------------- many processes, one file


def _lease_worker(path: str, rounds: int) -> float:
    """In a fresh process: lease 1.0 at a time, `rounds` times; the total granted."""

    async def run() -> float:
        store = SQLiteStore(path, timeout_s=30.0)  # long: four processes queue for one write lock
        await store.open()
        try:
            return sum([await store.lease("key_1", "org_a", None, None, 1.0, 1.0, NOW) for _ in range(rounds)])
        finally:
            await store.close()

    return asyncio.run(run())


def _put_key_worker(path: str, key_id: str) -> None:
    """In a fresh process: open (and so migrate) the file, and write one key."""

    async def run() -> None:
        store = SQLiteStore(path, timeout_s=30.0)
        await store.open()
        try:
            await store.put_key(KeyRecord(id=key_id, digest=key_id))
        finally:
            await store.close()

    asyncio.run(run())


async def test_leases_from_many_processes_never_overdraw(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    store = SQLiteStore(path)
    await store.open()
    await store.put_org(OrgRecord(id="org_a", name="A", balance=100.0))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        grants = await asyncio.to_thread(pool.starmap, _lease_worker, [(path, 40)] * 4)  # 160 asks for 100
    assert sum(grants) == 100.0
    org = await store.get_org("org_a")
    assert org is not None and org.balance == 0.0
    assert (await store.key_usage("key_1", None, NOW)).outstanding == 100.0
    await store.close()


async def test_processes_opening_a_new_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:  # migration 1 has no IF NOT EXISTS: running it twice would raise here
        await asyncio.to_thread(pool.starmap, _put_key_worker, [(path, f"key_{i}") for i in range(4)])
    assert _user_version(path) == len(sqlite_mod.MIGRATIONS)
    store = SQLiteStore(path)
    await store.open()
    assert len(await store.list_keys()) == 4
    assert await store.keys_version() == 4
    await store.close()


# ---------------------------------------------------------------- schema


async def test_reopening_keeps_data_and_applies_each_migration_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "h.db")
    org = OrgRecord(id="org_a", name="A", balance=3.0)
    store = SQLiteStore(path)
    await store.open()
    await store.put_org(org)
    await store.put_key(KeyRecord(id="key_1", digest="1"))
    await store.write_generations([GenerationRecord(id="gen_1", key_id="key_1", org="org_a", model="m")])
    await store.close()
    assert _user_version(path) == len(sqlite_mod.MIGRATIONS)

    # A later release adds a migration: it runs on the next open, and only then.
    extra = "CREATE TABLE extra (x INTEGER); INSERT INTO extra (x) VALUES (1)"
    monkeypatch.setattr(sqlite_mod, "MIGRATIONS", [*sqlite_mod.MIGRATIONS, extra])
    for _ in range(2):
        store = SQLiteStore(path)
        await store.open()
        assert await store.get_org("org_a") == org
        assert [k.id for k in await store.list_keys()] == ["key_1"]
        assert await store.keys_version() == 1
        assert await store.count_generations() == 1
        await store.close()
    assert _user_version(path) == len(sqlite_mod.MIGRATIONS)
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT x FROM extra").fetchall() == [(1,)]


async def test_a_file_from_before_node_leases_migrates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "h.db")
    with monkeypatch.context() as m:
        m.setattr(sqlite_mod, "MIGRATIONS", sqlite_mod.MIGRATIONS[:1])  # the release before node leases
        store = SQLiteStore(path)
        await store.open()
        await store.put_org(OrgRecord(id="org_a", name="A", balance=10.0))
        assert await store.lease("key_1", "org_a", None, None, 1.0, 3.0, NOW) == 3.0
        await store.close()
    assert _user_version(path) == 1

    store = SQLiteStore(path)
    await store.open()
    assert _user_version(path) == len(sqlite_mod.MIGRATIONS)
    assert await store.lease("key_1", "org_a", None, None, 1.0, 2.0, NOW, "n1") == 2.0
    assert await store.reap(30.0, NOW + 31) == 2.0  # the old lease had no node: it stays
    assert (await store.key_usage("key_1", None, NOW)).outstanding == 3.0
    org = await store.get_org("org_a")
    assert org is not None and org.balance == 7.0
    await store.close()


async def test_the_file_is_in_wal_mode(sqlite_store: SQLiteStore) -> None:
    with closing(sqlite3.connect(sqlite_store.path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------- the worker thread


async def test_operations_run_on_the_store_thread_not_the_loop(sqlite_store: SQLiteStore) -> None:
    released = threading.Event()
    seen: list[tuple[int, bool]] = []

    def trace(_sql: str) -> None:
        # Each statement waits for a loop timer. On the loop's own thread the timer could not fire: the wait
        # would time out and record False.
        seen.append((threading.get_ident(), released.wait(10)))

    await sqlite_store._run(lambda: sqlite_store._db().set_trace_callback(trace))
    asyncio.get_running_loop().call_later(0.01, released.set)
    assert await sqlite_store.lease("key_1", "org_cfg", None, None, 1.0, 1.0, NOW) == 1.0
    assert await sqlite_store.get_key("key_1") is None
    threads = {t for t, _ in seen}
    assert seen and all(ok for _, ok in seen)
    assert len(threads) == 1 and threading.get_ident() not in threads


# ---------------------------------------------------------------- errors


async def test_a_write_lock_held_too_long_is_a_store_error(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    store = SQLiteStore(path, timeout_s=0.05)
    await store.open()
    await store.put_org(OrgRecord(id="org_a", name="A", balance=5.0))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process mid-write
    try:
        with pytest.raises(StoreError):
            await store.lease("key_1", "org_a", None, None, 1.0, 1.0, NOW)
        org = await store.get_org("org_a")  # WAL: reading does not wait for the writer
        assert org is not None and org.balance == 5.0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await store.lease("key_1", "org_a", None, None, 1.0, 9.0, NOW) == 5.0


async def test_a_failed_operation_rolls_back_and_the_store_goes_on(sqlite_store: SQLiteStore) -> None:
    with pytest.raises(StoreError):
        await sqlite_store.top_up("org_nope", 1.0)
    await sqlite_store.put_org(OrgRecord(id="org_a", name="A"))
    assert await sqlite_store.top_up("org_a", 2.0) == 2.0  # BEGIN would fail inside a transaction left open


async def test_unopened_closed_or_unreachable_stores_raise_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "h.db"))
    with pytest.raises(StoreError):
        await store.ping()
    await store.open()
    await store.ping()
    await store.close()
    with pytest.raises(StoreError):
        await store.get_org("org_a")
    await store.close()  # twice is harmless
    with pytest.raises(StoreError):
        await SQLiteStore(str(tmp_path / "no" / "such" / "dir.db")).open()


# ---------------------------------------------------------------- counters


async def test_counter_windows_expire_and_expired_rows_are_swept(tmp_path: Path) -> None:
    now = [1000.0]
    store = SQLiteStore(str(tmp_path / "h.db"), clock=lambda: now[0])
    await store.open()
    assert await store.take("rpm:a", 5, 5, 60) == 5
    assert await store.add("tpm:b", 7, 10) == 7
    now[0] = 1059.5
    assert await store.take("rpm:a", 1, 5, 60) == 0  # same window
    assert await store.add("tpm:b", 1, 10) == 1  # b's window ended at 1010
    now[0] = 1060.0
    assert await store.take("rpm:a", 3, 5, 60) == 3  # a new window
    await store.close()
    with closing(sqlite3.connect(store.path)) as conn:
        rows = conn.execute("SELECT name, value, expires_at FROM counters ORDER BY name").fetchall()
    assert rows == [("rpm:a", 3, 1120.0), ("tpm:b", 1, 1069.5)]

    # Expired windows of names never used again go when some other window starts.
    now[0] = 2000.0
    await store.open()
    assert await store.add("tpm:c", 1, 10) == 1
    await store.close()
    with closing(sqlite3.connect(store.path)) as conn:
        assert conn.execute("SELECT name FROM counters").fetchall() == [("tpm:c",)]
