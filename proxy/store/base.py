"""The one small interface every store implements, and the records it holds.

Money is USD as float everywhere (a cent's millionth is 1e-8; doubles carry ~16 significant digits, so sums of
millions of records stay exact far below that). Times are Unix seconds (float) unless a name says otherwise.

Credits are *leased*: a node takes a chunk of a key's remaining credit (and of its organisation's balance) in
one atomic store operation, serves requests from the chunk in memory, and settles later: what it spent moves
into the key's usage, the rest goes back. So no request awaits the store unless its node's chunk ran dry, and
no two nodes can spend the same credit.

Leases are held per *node* (one gateway process, named by an opaque string): the store keeps, per key and node,
the credit leased and not yet settled, and when each node was last heard from (every lease, settle and
heartbeat). Any node may `reap` the nodes that stopped heartbeating: their leases go back to the org's balance
and the key's outstanding. So a crashed node's leases return after ttl; its spend since its last settlement —
at most one flush interval — is not billed. A node must heartbeat well within the ttl: one reaped while alive
(paused, or cut off from the store, for longer than the ttl) has lost its leases: what it settles afterwards
returns nothing (the reap returned it already) and its spend is recorded as usage without being taken from
the balance again.
"""

from __future__ import annotations

import time
from typing import Literal, Protocol

import msgspec

Reset = Literal["daily", "weekly", "monthly"]

LEASE_EPS = 1e-12  # USD: a lease record settled down to this (float rounding) is deleted


class StoreError(Exception):
    """The store could not be reached or refused the operation (callers degrade; see accounting/limits.py)."""


class OrgRecord(msgspec.Struct, kw_only=True):
    id: str  # e.g. "org_default"; what keys point to
    name: str
    balance: float | None = None  # USD credits still available (leases already taken out); None: unlimited
    spent: float = 0.0  # USD settled as spent, all time
    created_at: float = 0.0


class KeyRecord(msgspec.Struct, kw_only=True):
    id: str  # public id ("key_…"), safe to show and log; the secret itself is never stored
    digest: str  # hex SHA-256 of the secret
    label: str = ""
    org: str = "org_default"
    disabled: bool = False
    expires_at: float | None = None
    allowed_models: list[str] | None = None  # None: every model
    limit: float | None = None  # USD this key may spend per period (or ever, without `limit_reset`); None: no cap
    limit_reset: Reset | None = None
    rpm: int | None = None  # requests per minute; None: unlimited
    tpm: int | None = None  # tokens (prompt + completion) per minute; None: unlimited
    created_at: float = 0.0
    updated_at: float = 0.0


class KeyUsage(msgspec.Struct, kw_only=True):
    """A key's spend in its current limit period (all time without a reset)."""

    usage: float = 0.0  # settled spend this period
    outstanding: float = 0.0  # leased to nodes, not yet settled
    period: str = ""  # period_of(reset, now) when last touched


class AttemptRecord(msgspec.Struct, kw_only=True, gc=False):
    provider: str
    endpoint: str  # "provider/upstream-model"
    outcome: str  # "ok", "hedge_lost", "cancelled", "timeout", "connect", "status", "protocol", …
    status: int = 0  # upstream HTTP status, 0 if none arrived
    started: float = 0.0  # seconds after the request arrived
    duration: float = 0.0
    prompt_tokens: int = 0  # what this attempt reported, if anything
    completion_tokens: int = 0
    cost: float = 0.0


class GenerationRecord(msgspec.Struct, kw_only=True, gc=False):
    """One client request, as the ledger keeps it (DESIGN.md: generation). Not tracked by the collector
    (`gc=False`): records wait in the ledger's queue for a batch, and hold only values, never a cycle."""

    id: str
    key_id: str
    org: str
    model: str  # the public model asked for
    provider: str = ""  # who served ("" if nobody did)
    endpoint: str = ""
    status: int = 0  # HTTP status the client got
    streamed: bool = False
    cancelled: bool = False  # the client left before the end
    finish_reason: str | None = None
    prompt_tokens: int = 0  # all prompt tokens, cached ones included (OpenAI's semantics)
    completion_tokens: int = 0  # reasoning included
    cached_tokens: int = 0  # prompt tokens read from the provider's cache
    cache_write_tokens: int = 0  # prompt tokens written to the provider's cache
    reasoning_tokens: int = 0
    cost: float = 0.0  # USD at the provider's prices (what the upstream charges), every attempt included
    fee: float = 0.0  # the gateway's fee, USD, on top of cost
    ttft: float | None = None  # seconds to the first byte of the answer sent to the client
    latency: float = 0.0  # seconds, request arrival to the last byte
    created: float = 0.0
    attempts: list[AttemptRecord] = []


class DayUsage(msgspec.Struct, kw_only=True):
    """The generation records of one UTC day and one model, added up (Store.usage_by_day)."""

    day: str  # "YYYY-MM-DD", UTC
    model: str  # the public model asked for, as the records hold it
    requests: int = 0  # every record, whatever its status
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0  # USD at the providers' prices
    fee: float = 0.0  # the gateway's fee, USD


DAY_S = 86400


def day_of(t: float) -> str:
    """The UTC day holding `t`, as "YYYY-MM-DD"."""
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def day_bounds(start: float, end: float) -> tuple[float, float]:
    """The whole UTC days usage_by_day(start, end) covers, as [first midnight, last midnight + 1 day): the days
    whose midnight falls in [start, end). Bounds on midnights select exactly [start, end); [now − N days, now)
    selects the N days ending with today."""
    lo = -(-start // DAY_S) * DAY_S  # the first midnight at or after start
    hi = -(-end // DAY_S) * DAY_S  # the first midnight at or after end: the days before it have theirs < end
    return lo, max(lo, hi)


def days_between(start: float, end: float) -> list[str]:
    """The names of the days usage_by_day(start, end) covers, oldest first."""
    lo, hi = day_bounds(start, end)
    return [day_of(lo + i * DAY_S) for i in range(int((hi - lo) // DAY_S))]


def period_of(reset: Reset | None, now: float) -> str:
    """The name of the limit period holding `now` (UTC): a key's usage starts again when it changes."""
    if reset is None:
        return ""
    t = time.gmtime(now)
    if reset == "daily":
        return time.strftime("%Y-%m-%d", t)
    if reset == "weekly":
        return time.strftime("%G-W%V", t)
    return time.strftime("%Y-%m", t)


class Store(Protocol):
    """Async; implementations never block the event loop (SQLite runs in a worker thread)."""

    kind: str  # "sqlite" or "redis"

    async def open(self) -> None:
        """Connect, and create or migrate the schema."""
        ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError if the store cannot be reached."""
        ...

    # organisations
    async def put_org(self, org: OrgRecord) -> None:
        """Create, or replace name (balance and spent of an existing org are kept: use top_up)."""
        ...

    async def get_org(self, org_id: str) -> OrgRecord | None: ...

    async def list_orgs(self) -> list[OrgRecord]: ...

    async def top_up(self, org_id: str, amount: float) -> float:
        """Add `amount` USD to the org's balance (an unlimited org becomes limited, starting at `amount`);
        returns the new balance. StoreError if the org does not exist."""
        ...

    # keys
    async def put_key(self, key: KeyRecord) -> None:
        """Insert or replace by id; bumps the keys version (and tells other nodes, on Redis)."""
        ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self, org_id: str | None = None) -> list[KeyRecord]: ...

    async def delete_key(self, key_id: str) -> bool:
        """True if it existed; bumps the keys version."""
        ...

    async def keys_version(self) -> int:
        """A number that changes whenever any key is put or deleted (nodes poll it to reload keys)."""
        ...

    async def key_usage(self, key_id: str, reset: Reset | None, now: float) -> KeyUsage: ...

    # credits
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
        """Atomically take credit for `node`: min(want, org balance, limit − usage − outstanding), or 0.0 when
        that is below `need`. Takes from the org's balance (unless unlimited) and adds to the key's
        outstanding. `limit`/`reset` are the key's (passed in: config keys are not in the store). A new period
        (period_of(reset, now) differs from the stored one) starts the key's usage at 0.

        The grant is added to the lease record of (key_id, node), which remembers org_id (the latest one), and
        the node's heartbeat becomes `now` (granted or not). Node "" (callers that predate nodes) keeps no
        record and no heartbeat: its leases are never reaped."""
        ...

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
        """Give back `returned` unspent credit to the org's balance and record `spent`: the key's outstanding
        drops by returned + spent (never below 0), its usage grows by spent (in the current period), the org's
        `spent` grows by spent. Spent credit is not added back to the balance: the lease took it out already.

        The lease record of (key_id, node) drops by returned + spent, never below 0, and is deleted at 0 (or
        within float rounding of it: LEASE_EPS); the node's heartbeat becomes `now`. Node "": no record. A node
        with no record for the key (reaped) returns nothing and its outstanding is left alone: `spent` only
        grows the key's usage and the org's spent."""
        ...

    async def heartbeat(self, node: str, now: float) -> None:
        """Record that `node` lives: its heartbeat becomes `now` (lease and settle do this too). Node "": no-op."""
        ...

    async def reap(self, ttl_s: float, now: float) -> float:
        """Return the leases of every node whose heartbeat is older than now − ttl_s (a crashed node's): each of
        its lease records goes back, the org's balance += amount (unless the org is unlimited or not in the
        store) and the key's outstanding −= amount (never below 0); then the node's records and heartbeat are
        deleted. Returns the total of the records reaped (0.0 if none). The spend a dead node had not settled
        is not billed, and its credit returns.

        Atomic per node: reapers racing (on any number of nodes) return each lease once; a node that heartbeats
        again before its reap is not reaped. Leases of node "" are never reaped."""
        ...

    # rate-limit windows (fixed windows; a window's counters expire on their own)
    async def take(self, name: str, amount: int, limit: int, ttl_s: int) -> int:
        """Atomically grant up to `amount` from counter `name` without passing `limit`; returns the grant."""
        ...

    async def add(self, name: str, amount: int, ttl_s: int) -> int:
        """Atomically add to counter `name` (amount may be 0); returns its new total."""
        ...

    # ledger
    async def write_generations(self, records: list[GenerationRecord]) -> None:
        """Write a batch (idempotent by id: a retried batch does not duplicate records)."""
        ...

    async def get_generation(self, gen_id: str) -> GenerationRecord | None: ...

    async def count_generations(self) -> int: ...

    async def usage_by_day(
        self, start: float, end: float, key_id: str | None = None, org: str | None = None
    ) -> list[DayUsage]:
        """The generation records added up per UTC day (of `created`) and model, sorted by (day, model); only
        one key's (`key_id`) or one organisation's (`org`) when given — at most one of the two (ValueError).

        Whole days only (Redis keeps day counters): a day counts when its midnight (00:00 UTC) falls in
        [start, end) (`day_bounds`), so day-aligned bounds select exactly the records created in [start, end),
        and [now − N days, now) the N days ending with today. Days without records are left out. Records are
        counted once each however often their batch was written. Redis keeps the day counters ~400 days
        (AGG_TTL_S), SQLite as long as the records."""
        ...
