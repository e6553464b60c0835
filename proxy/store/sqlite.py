"""SQLite store: the embedded default for one node, shared by its worker processes through one database file.

Each store owns one connection on one worker thread, so the event loop never waits on the disk; the file is in
WAL mode, so readers in other processes never wait for a writer. An operation that reads and then writes (lease,
settle, heartbeat, reap, take, add, top_up, key writes) runs in a `BEGIN IMMEDIATE` transaction: it takes the
database's write lock before reading, which makes it atomic across processes. A lock held by another process for
longer than `timeout_s` fails the operation with StoreError (SQLite's busy timeout), like any other SQLite error.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec

from proxy.store.base import (
    LEASE_EPS,
    AttemptRecord,
    DayUsage,
    GenerationRecord,
    KeyRecord,
    KeyUsage,
    OrgRecord,
    Reset,
    StoreError,
    day_bounds,
    period_of,
)

T = TypeVar("T")

# Schema migrations, applied in order; PRAGMA user_version counts those applied. Never edit one that has shipped:
# append a new one. Statements are split on ";", so keep semicolons out of literals and comments.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE orgs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        balance REAL,                       -- NULL: unlimited
        spent REAL NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        label TEXT NOT NULL,
        org TEXT NOT NULL,
        disabled INTEGER NOT NULL,
        expires_at REAL,
        allowed_models TEXT,                -- JSON list, NULL: every model
        "limit" REAL,
        limit_reset TEXT,
        rpm INTEGER,
        tpm INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX keys_by_org ON keys (org);
    CREATE TABLE key_usage (
        key_id TEXT PRIMARY KEY,
        period TEXT NOT NULL,
        usage REAL NOT NULL,
        outstanding REAL NOT NULL
    );
    CREATE TABLE counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX counters_by_expiry ON counters (expires_at);
    CREATE TABLE generations (
        id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        org TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        status INTEGER NOT NULL,
        streamed INTEGER NOT NULL,
        cancelled INTEGER NOT NULL,
        finish_reason TEXT,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cost REAL NOT NULL,
        fee REAL NOT NULL,
        ttft REAL,
        latency REAL NOT NULL,
        created REAL NOT NULL,
        attempts TEXT NOT NULL              -- JSON list of AttemptRecord
    );
    CREATE INDEX generations_by_created ON generations (created);
    CREATE TABLE meta (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO meta (name, value) VALUES ('keys_version', 0)
    """,
    """
    CREATE TABLE leases (
        node TEXT NOT NULL,
        key_id TEXT NOT NULL,
        org TEXT NOT NULL,                  -- where a reap returns the credit
        amount REAL NOT NULL,               -- leased by the node, not yet settled
        PRIMARY KEY (node, key_id)
    );
    CREATE TABLE nodes (
        node TEXT PRIMARY KEY,
        heartbeat REAL NOT NULL
    );
    CREATE INDEX nodes_by_heartbeat ON nodes (heartbeat)
    """,
    # usage_by_day filtered by key or organisation (the unfiltered one reads generations_by_created)
    """
    CREATE INDEX generations_by_key ON generations (key_id, created);
    CREATE INDEX generations_by_org ON generations (org, created)
    """,
]

_KEY_COLS = KeyRecord.__struct_fields__
_GEN_COLS = GenerationRecord.__struct_fields__
_PUT_KEY = "INSERT OR REPLACE INTO keys ({}) VALUES ({})".format(
    ", ".join(f'"{c}"' for c in _KEY_COLS), ", ".join(f":{c}" for c in _KEY_COLS)
)
# Ledger rows: positional parameters (named ones make sqlite3 look up every column's name, for every row, in a
# dict built for it), and many rows per INSERT: sqlite3 releases and retakes the GIL around each statement it
# steps, and under load every retake waits for the busy event loop to let go of it; one statement per
# `_ROWS_PER_INSERT` rows makes that a wait per 32 rows rather than per row. 32 × 21 parameters stays under 999,
# the smallest limit SQLite builds have had. (Together ≈ 5 µs less of the store thread's CPU per record here.)
_ROWS_PER_INSERT = 32
_GEN_ROW = "({})".format(", ".join("?" for _ in _GEN_COLS))
_PUT_GEN = "INSERT OR IGNORE INTO generations ({}) VALUES {}".format(", ".join(_GEN_COLS), _GEN_ROW)
_PUT_GENS = "INSERT OR IGNORE INTO generations ({}) VALUES {}".format(
    ", ".join(_GEN_COLS), ", ".join([_GEN_ROW] * _ROWS_PER_INSERT)
)
assert _GEN_COLS[-1] == "attempts"  # `_gen_row` encodes the last column
_BUMP_KEYS = "UPDATE meta SET value = value + 1 WHERE name = 'keys_version'"
_DAY_FIELDS = DayUsage.__struct_fields__  # the columns of _USAGE_BY_DAY, in order
_USAGE_BY_DAY = (
    # The day in whole seconds, as gmtime() takes it (strftime on the REAL would round to the millisecond).
    "SELECT strftime('%Y-%m-%d', CAST(created AS INTEGER) / 86400 * 86400, 'unixepoch') AS day, model, count(*),"
    " sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(reasoning_tokens), sum(cost), sum(fee)"
    " FROM generations WHERE {}created >= ? AND created < ? GROUP BY day, model ORDER BY day, model"
)

_json = msgspec.json.Encoder()
_decode_models = msgspec.json.Decoder(list[str]).decode
_decode_attempts = msgspec.json.Decoder(list[AttemptRecord]).decode


def _key_row(key: KeyRecord) -> dict[str, Any]:
    row = msgspec.structs.asdict(key)
    if key.allowed_models is not None:
        row["allowed_models"] = _json.encode(key.allowed_models).decode()
    return row


def _key(row: sqlite3.Row) -> KeyRecord:
    d = dict(row)
    if d["allowed_models"] is not None:
        d["allowed_models"] = _decode_models(d["allowed_models"])
    return msgspec.convert(d, KeyRecord, strict=False)  # lax: INTEGER 0/1 → bool


def _gen_row(gen: GenerationRecord) -> tuple[Any, ...]:
    """The record's columns in `_GEN_COLS` order, its attempts as JSON text."""
    row = msgspec.structs.astuple(gen)
    return (*row[:-1], _json.encode(row[-1]).decode())


def _gen(row: sqlite3.Row) -> GenerationRecord:
    d = dict(row)
    d["attempts"] = _decode_attempts(d["attempts"])
    return msgspec.convert(d, GenerationRecord, strict=False)


def _usage(conn: sqlite3.Connection, key_id: str, period: str) -> tuple[float, float]:
    """(usage, outstanding) of a key in `period`: usage from an older period counts as 0."""
    row = conn.execute("SELECT period, usage, outstanding FROM key_usage WHERE key_id = ?", (key_id,)).fetchone()
    if row is None:
        return 0.0, 0.0
    return (row[1] if row[0] == period else 0.0), row[2]


def _set_usage(conn: sqlite3.Connection, key_id: str, period: str, usage: float, outstanding: float) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO key_usage (key_id, period, usage, outstanding) VALUES (?, ?, ?, ?)",
        (key_id, period, usage, outstanding),
    )


def _beat(conn: sqlite3.Connection, node: str, now: float) -> None:
    if node:
        conn.execute("INSERT OR REPLACE INTO nodes (node, heartbeat) VALUES (?, ?)", (node, now))


def _reap_node(conn: sqlite3.Connection, node: str) -> float:
    """Return every lease of `node` to its org and key, forget the node; the total returned."""
    total = 0.0
    for key_id, org_id, amount in conn.execute(
        "SELECT key_id, org, amount FROM leases WHERE node = ?", (node,)
    ).fetchall():
        # NULL + x is NULL: an unlimited org stays unlimited. A missing org (or key usage) matches no row.
        conn.execute("UPDATE orgs SET balance = balance + ? WHERE id = ?", (amount, org_id))
        conn.execute("UPDATE key_usage SET outstanding = max(0.0, outstanding - ?) WHERE key_id = ?", (amount, key_id))
        total += amount
    conn.execute("DELETE FROM leases WHERE node = ?", (node,))
    conn.execute("DELETE FROM nodes WHERE node = ?", (node,))
    return total


class SQLiteStore:
    kind = "sqlite"

    def __init__(self, path: str, timeout_s: float = 1.0, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.clock = clock  # wall clock for counter windows (tests inject one)
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # created, used and closed on the executor's thread only

    # -- plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the store's thread; SQLite errors become StoreError."""
        if self._executor is None:
            raise StoreError("sqlite store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as e:
            raise StoreError(f"sqlite {self.path}: {e}") from e

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("sqlite store is closed")
        return self._conn

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` in one transaction holding the write lock from its first read (atomic across
        processes); rolled back if anything raises."""
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # some errors (disk full, I/O) have rolled it back already
                conn.execute("ROLLBACK")
            raise
        return result

    def _connect(self) -> None:
        # isolation_level=None: no implicit transactions; _write and the migrations open their own.
        conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL skips the fsync per commit: a power cut may lose the last commits, never consistency.
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
            self._write(self._migrate)
        except BaseException:
            self._conn = None
            conn.close()
            raise

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        # Read the version under the write lock: workers opening the file at once migrate it once.
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        for n, script in enumerate(MIGRATIONS[version:], start=version + 1):
            for stmt in script.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {n}")

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- lifecycle

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hedgerow-sqlite")
        try:
            await self._run(self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def close(self) -> None:
        if self._executor is None:
            return
        try:
            await self._run(self._disconnect)
        finally:
            self._executor.shutdown(wait=False)  # its queue is empty: the thread exits at once
            self._executor = None

    async def ping(self) -> None:
        await self._run(lambda: self._db().execute("SELECT 1").fetchone())

    # -- organisations

    async def put_org(self, org: OrgRecord) -> None:
        await self._run(
            lambda: self._db().execute(
                "INSERT INTO orgs (id, name, balance, spent, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET name = excluded.name",
                (org.id, org.name, org.balance, org.spent, org.created_at),
            )
        )

    async def get_org(self, org_id: str) -> OrgRecord | None:
        row = await self._run(lambda: self._db().execute("SELECT * FROM orgs WHERE id = ?", (org_id,)).fetchone())
        return None if row is None else msgspec.convert(dict(row), OrgRecord)

    async def list_orgs(self) -> list[OrgRecord]:
        rows = await self._run(lambda: self._db().execute("SELECT * FROM orgs ORDER BY id").fetchall())
        return [msgspec.convert(dict(r), OrgRecord) for r in rows]

    async def top_up(self, org_id: str, amount: float) -> float:
        def top_up(conn: sqlite3.Connection) -> float:
            row = conn.execute("SELECT balance FROM orgs WHERE id = ?", (org_id,)).fetchone()
            if row is None:
                raise StoreError(f"no organisation {org_id!r}")
            balance = amount if row[0] is None else row[0] + amount  # an unlimited org starts at `amount`
            conn.execute("UPDATE orgs SET balance = ? WHERE id = ?", (balance, org_id))
            return balance

        return await self._run(self._write, top_up)

    # -- keys

    async def put_key(self, key: KeyRecord) -> None:
        def put(conn: sqlite3.Connection) -> None:
            conn.execute(_PUT_KEY, _key_row(key))
            conn.execute(_BUMP_KEYS)

        await self._run(self._write, put)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        row = await self._run(lambda: self._db().execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone())
        return None if row is None else _key(row)

    async def list_keys(self, org_id: str | None = None) -> list[KeyRecord]:
        def select() -> list[sqlite3.Row]:
            if org_id is None:
                return self._db().execute("SELECT * FROM keys ORDER BY id").fetchall()
            return self._db().execute("SELECT * FROM keys WHERE org = ? ORDER BY id", (org_id,)).fetchall()

        return [_key(r) for r in await self._run(select)]

    async def delete_key(self, key_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> bool:
            if conn.execute("DELETE FROM keys WHERE id = ?", (key_id,)).rowcount == 0:
                return False  # nothing changed: nodes need not reload
            conn.execute(_BUMP_KEYS)
            return True

        return await self._run(self._write, delete)

    async def keys_version(self) -> int:
        row = await self._run(
            lambda: self._db().execute("SELECT value FROM meta WHERE name = 'keys_version'").fetchone()
        )
        return int(row[0])

    async def key_usage(self, key_id: str, reset: Reset | None, now: float) -> KeyUsage:
        period = period_of(reset, now)
        usage, outstanding = await self._run(lambda: _usage(self._db(), key_id, period))
        return KeyUsage(usage=usage, outstanding=outstanding, period=period)

    # -- credits

    async def lease(
        self,
        key_id: str,
        org_id: str,
        limit: float | None,
        reset: Reset | None,
        need: float,
        want: float,
        now: float,
        node: str = "",
    ) -> float:
        period = period_of(reset, now)

        def lease(conn: sqlite3.Connection) -> float:
            _beat(conn, node, now)
            org = conn.execute("SELECT balance FROM orgs WHERE id = ?", (org_id,)).fetchone()
            balance = None if org is None else org[0]  # an org not in the store (config only) is unlimited
            usage, outstanding = _usage(conn, key_id, period)
            grant = want
            if balance is not None:
                grant = min(grant, balance)
            if limit is not None:
                grant = min(grant, limit - usage - outstanding)
            if grant < need or grant <= 0.0:
                return 0.0  # nothing written but the heartbeat
            if balance is not None:
                conn.execute("UPDATE orgs SET balance = ? WHERE id = ?", (balance - grant, org_id))
            _set_usage(conn, key_id, period, usage, outstanding + grant)
            if node:
                conn.execute(
                    "INSERT INTO leases (node, key_id, org, amount) VALUES (?, ?, ?, ?) ON CONFLICT (node, key_id)"
                    " DO UPDATE SET org = excluded.org, amount = amount + excluded.amount",
                    (node, key_id, org_id, grant),
                )
            return grant

        return await self._run(self._write, lease)

    async def settle(
        self,
        key_id: str,
        org_id: str,
        reset: Reset | None,
        returned: float,
        spent: float,
        now: float,
        node: str = "",
    ) -> None:
        period = period_of(reset, now)

        def settle(conn: sqlite3.Connection) -> None:
            back, dropped = returned, returned + spent
            if node:
                _beat(conn, node, now)
                row = conn.execute("SELECT amount FROM leases WHERE node = ? AND key_id = ?", (node, key_id)).fetchone()
                if row is None:  # reaped while this node was away: the lease went back already
                    back = dropped = 0.0
                else:
                    left = row[0] - returned - spent
                    if left > LEASE_EPS:
                        conn.execute("UPDATE leases SET amount = ? WHERE node = ? AND key_id = ?", (left, node, key_id))
                    else:
                        conn.execute("DELETE FROM leases WHERE node = ? AND key_id = ?", (node, key_id))
            usage, outstanding = _usage(conn, key_id, period)
            _set_usage(conn, key_id, period, usage + spent, max(0.0, outstanding - dropped))
            # NULL + x is NULL: an unlimited org stays unlimited. A missing org matches no row.
            conn.execute("UPDATE orgs SET balance = balance + ?, spent = spent + ? WHERE id = ?", (back, spent, org_id))

        await self._run(self._write, settle)

    async def heartbeat(self, node: str, now: float) -> None:
        if node:
            await self._run(self._write, _beat, node, now)

    async def reap(self, ttl_s: float, now: float) -> float:
        def reap(conn: sqlite3.Connection) -> float:
            # One transaction for every dead node: a racing reaper (in any process) waits for the write lock,
            # then finds none of them.
            dead = conn.execute("SELECT node FROM nodes WHERE heartbeat < ?", (now - ttl_s,)).fetchall()
            return sum((_reap_node(conn, n) for (n,) in dead), 0.0)

        return await self._run(self._write, reap)

    # -- rate-limit windows

    def _counter(self, conn: sqlite3.Connection, name: str, ttl_s: int) -> tuple[int, float]:
        """(value, expires_at) of the live window of `name`; a new window starts at 0 and sweeps expired rows."""
        now = self.clock()
        row = conn.execute("SELECT value, expires_at FROM counters WHERE name = ?", (name,)).fetchone()
        if row is not None and row[1] > now:
            return row[0], row[1]
        # Once per window per name: keeps the table as small as the live windows, at the cost of an indexed delete.
        conn.execute("DELETE FROM counters WHERE expires_at <= ?", (now,))
        return 0, now + ttl_s

    def _set_counter(self, conn: sqlite3.Connection, name: str, value: int, expires_at: float) -> None:
        conn.execute(
            "INSERT OR REPLACE INTO counters (name, value, expires_at) VALUES (?, ?, ?)", (name, value, expires_at)
        )

    async def take(self, name: str, amount: int, limit: int, ttl_s: int) -> int:
        def take(conn: sqlite3.Connection) -> int:
            value, expires_at = self._counter(conn, name, ttl_s)
            grant = max(0, min(amount, limit - value))
            self._set_counter(conn, name, value + grant, expires_at)
            return grant

        return await self._run(self._write, take)

    async def add(self, name: str, amount: int, ttl_s: int) -> int:
        def add(conn: sqlite3.Connection) -> int:
            value, expires_at = self._counter(conn, name, ttl_s)
            self._set_counter(conn, name, value + amount, expires_at)
            return value + amount

        return await self._run(self._write, add)

    # -- ledger

    async def write_generations(self, records: list[GenerationRecord]) -> None:
        if not records:
            return
        rows = [_gen_row(g) for g in records]  # encoded here: the store's thread only does I/O
        n = _ROWS_PER_INSERT
        full = len(rows) - len(rows) % n
        many = [[v for row in rows[i : i + n] for v in row] for i in range(0, full, n)]
        rest = rows[full:]

        def write(conn: sqlite3.Connection) -> None:
            # OR IGNORE: a retried batch keeps the first copy (row by row, in a many-row INSERT too)
            for params in many:
                conn.execute(_PUT_GENS, params)
            if rest:
                conn.executemany(_PUT_GEN, rest)

        await self._run(self._write, write)

    async def get_generation(self, gen_id: str) -> GenerationRecord | None:
        row = await self._run(
            lambda: self._db().execute("SELECT * FROM generations WHERE id = ?", (gen_id,)).fetchone()
        )
        return None if row is None else _gen(row)

    async def count_generations(self) -> int:
        row = await self._run(lambda: self._db().execute("SELECT count(*) FROM generations").fetchone())
        return int(row[0])

    async def usage_by_day(
        self, start: float, end: float, key_id: str | None = None, org: str | None = None
    ) -> list[DayUsage]:
        if key_id is not None and org is not None:
            raise ValueError("usage_by_day filters by a key or by an organisation, not both")
        lo, hi = day_bounds(start, end)
        if key_id is not None:
            sql, args = _USAGE_BY_DAY.format("key_id = ? AND "), (key_id, lo, hi)
        elif org is not None:
            sql, args = _USAGE_BY_DAY.format("org = ? AND "), (org, lo, hi)
        else:
            sql, args = _USAGE_BY_DAY.format(""), (lo, hi)
        rows = await self._run(lambda: self._db().execute(sql, args).fetchall())
        return [DayUsage(**dict(zip(_DAY_FIELDS, r, strict=True))) for r in rows]
