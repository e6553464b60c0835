"""The store shared by many gateway nodes: one Redis, every multi-step change an atomic Lua script.

Layout (every name starts with `prefix`): `org:<id>`, `key:<id>` and `usage:<key id>` hashes; `orgs` and
`keyids` sets, and `orgkeys:<org>` per organisation; `keys_version` (INCR); `rate:<name>` counters;
`lease:<node>` hashes (key id → "<amount> <org id>", the node's unsettled leases) and the sorted set `nodes`
(node → last heartbeat); `gen:<id>` msgspec-JSON strings (30-day TTL) indexed by `created` in the sorted set
`gens`; usage counters per UTC day (~400-day TTL): `daily:<YYYY-MM-DD>` for everything, `daily:<day>:key:<id>`
and `daily:<day>:org:<id>` per key and organisation, each a hash of `<model>|<metric>` (a DayUsage field) →
total, added to by the same script that writes a record, and only when it is new. Key changes are
published on channel `keys` so nodes reload at once. Floats are written with full precision: `repr` in Python,
`%.17g` in Lua (whose numbers are doubles too).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from proxy.store.base import (
    LEASE_EPS,
    DayUsage,
    GenerationRecord,
    KeyRecord,
    KeyUsage,
    OrgRecord,
    Reset,
    StoreError,
    day_of,
    days_between,
    period_of,
)

GEN_TTL_S = 30 * 86400
AGG_TTL_S = 400 * 86400  # the day counters behind usage_by_day: kept this long after their last write
_IDLE_S = 30.0  # a silent subscription pings the server this often to find out it is still there

_encode_gen = msgspec.json.Encoder().encode
_decode_gen = msgspec.json.Decoder(GenerationRecord).decode
_S = TypeVar("_S", OrgRecord, KeyRecord)

# KEYS: org hash, orgs set. ARGV: id, name, created_at, spent, balance ("" = unlimited). An existing org keeps
# everything but its name (balance and spent change through lease, settle and top_up only).
_PUT_ORG = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'name', ARGV[2])
  return 0
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'name', ARGV[2], 'created_at', ARGV[3], 'spent', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'balance', ARGV[5]) end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

# KEYS: org hash. ARGV: amount. Returns the new balance, or nil if the org does not exist.
_TOP_UP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
local b = (tonumber(redis.call('HGET', KEYS[1], 'balance')) or 0) + tonumber(ARGV[1])
local s = string.format('%.17g', b)
redis.call('HSET', KEYS[1], 'balance', s)
return s
"""

# KEYS: key hash, keyids set, orgkeys set of the new org, keys_version. ARGV: id, org, old-org index prefix,
# channel, then field/value pairs. The old org's index is named here: only the hash knows it.
_PUT_KEY = """
local old = redis.call('HGET', KEYS[1], 'org')
if old and old ~= ARGV[2] then redis.call('SREM', ARGV[3] .. old, ARGV[1]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""

# KEYS: key hash, keyids set, keys_version. ARGV: id, org index prefix, channel.
_DELETE_KEY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local org = redis.call('HGET', KEYS[1], 'org')
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if org then redis.call('SREM', ARGV[2] .. org, ARGV[1]) end
redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"""

# KEYS: usage hash, org hash, the node's lease hash, nodes. ARGV: limit ("" = none), period, need, want, node
# ("" = keep no record), now, key id, org id. Returns the grant as a string (Redis would truncate a Lua number to
# an integer). A missing org, or one without a balance, is unlimited.
_LEASE = """
if ARGV[5] ~= '' then redis.call('ZADD', KEYS[4], ARGV[6], ARGV[5]) end
local u = redis.call('HMGET', KEYS[1], 'usage', 'outstanding', 'period')
local usage, out = tonumber(u[1]) or 0, tonumber(u[2]) or 0
if u[3] ~= ARGV[2] then usage = 0 end
local grant = tonumber(ARGV[4])
local bal = tonumber(redis.call('HGET', KEYS[2], 'balance'))
if bal and bal < grant then grant = bal end
if ARGV[1] ~= '' then
  local room = tonumber(ARGV[1]) - usage - out
  if room < grant then grant = room end
end
if grant < tonumber(ARGV[3]) or grant <= 0 then return '0' end
redis.call('HSET', KEYS[1], 'usage', string.format('%.17g', usage),
  'outstanding', string.format('%.17g', out + grant), 'period', ARGV[2])
if bal then redis.call('HSET', KEYS[2], 'balance', string.format('%.17g', bal - grant)) end
if ARGV[5] ~= '' then
  local rec = redis.call('HGET', KEYS[3], ARGV[7])
  local held = rec and tonumber(string.match(rec, '^(%S+)')) or 0
  redis.call('HSET', KEYS[3], ARGV[7], string.format('%.17g', held + grant) .. ' ' .. ARGV[8])
end
return string.format('%.17g', grant)
"""

# KEYS: usage hash, org hash, the node's lease hash, nodes. ARGV: period, returned, spent, node ("" = no
# record), now, key id, LEASE_EPS.
_SETTLE = """
local ret, spent = tonumber(ARGV[2]), tonumber(ARGV[3])
local dropped = ret + spent
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4])
  local rec = redis.call('HGET', KEYS[3], ARGV[6])
  if rec then
    local held, org = string.match(rec, '^(%S+) (.*)$')
    local left = tonumber(held) - ret - spent
    if left > tonumber(ARGV[7]) then
      redis.call('HSET', KEYS[3], ARGV[6], string.format('%.17g', left) .. ' ' .. org)
    else
      redis.call('HDEL', KEYS[3], ARGV[6])
    end
  else
    -- reaped while this node was away: the lease went back already; nothing is ours to return
    ret, dropped = 0, 0
  end
end
local u = redis.call('HMGET', KEYS[1], 'usage', 'outstanding', 'period')
local usage, out = tonumber(u[1]) or 0, tonumber(u[2]) or 0
if u[3] ~= ARGV[1] then usage = 0 end
out = math.max(0, out - dropped)
redis.call('HSET', KEYS[1], 'usage', string.format('%.17g', usage + spent),
  'outstanding', string.format('%.17g', out), 'period', ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  local bal = tonumber(redis.call('HGET', KEYS[2], 'balance'))
  if bal then redis.call('HSET', KEYS[2], 'balance', string.format('%.17g', bal + ret)) end
  local s = (tonumber(redis.call('HGET', KEYS[2], 'spent')) or 0) + spent
  redis.call('HSET', KEYS[2], 'spent', string.format('%.17g', s))
end
return 1
"""

# KEYS: nodes, the node's lease hash. ARGV: node, cutoff, prefix. Reaps the node if its heartbeat is still
# older than the cutoff (a racing reaper already removed it; a revived node has a newer one); returns the total
# returned, as a string. The usage and org hashes are named here: only the lease records know them.
_REAP = """
local beat = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if not beat or beat >= tonumber(ARGV[2]) then return '0' end
local recs = redis.call('HGETALL', KEYS[2])
local total = 0
for i = 1, #recs, 2 do
  local held, org_id = string.match(recs[i + 1], '^(%S+) (.*)$')
  local amount = tonumber(held)
  local org = ARGV[3] .. 'org:' .. org_id
  local bal = tonumber(redis.call('HGET', org, 'balance'))
  if bal then redis.call('HSET', org, 'balance', string.format('%.17g', bal + amount)) end
  local usage = ARGV[3] .. 'usage:' .. recs[i]
  local out = tonumber(redis.call('HGET', usage, 'outstanding'))
  if out then redis.call('HSET', usage, 'outstanding', string.format('%.17g', math.max(0, out - amount))) end
  total = total + amount
end
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return string.format('%.17g', total)
"""

# KEYS: counter. ARGV: amount, limit, ttl_s. EXPIRE NX: a window's first grant starts its clock.
_TAKE = """
local cur = tonumber(redis.call('GET', KEYS[1])) or 0
local grant = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - cur)
if grant <= 0 then return 0 end
redis.call('INCRBY', KEYS[1], grant)
redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX')
return grant
"""


# KEYS: gen string, gens index, then the day's hashes: everything, the key's, the org's. ARGV: record JSON,
# GEN_TTL_S, created, id, model, prompt, completion, cached, reasoning tokens, cost, fee. The counters move only
# when the record is new (SET NX): a retried batch counts each record once. Returns 1 if it was new.
_WRITE_GEN = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[4])
local m = ARGV[5] .. '|'
for i = 3, 5 do
  local h = KEYS[i]
  redis.call('HINCRBY', h, m .. 'requests', 1)
  redis.call('HINCRBY', h, m .. 'prompt_tokens', ARGV[6])
  redis.call('HINCRBY', h, m .. 'completion_tokens', ARGV[7])
  redis.call('HINCRBY', h, m .. 'cached_tokens', ARGV[8])
  redis.call('HINCRBY', h, m .. 'reasoning_tokens', ARGV[9])
  redis.call('HINCRBYFLOAT', h, m .. 'cost', ARGV[10])
  redis.call('HINCRBYFLOAT', h, m .. 'fee', ARGV[11])
end
return 1
"""
_INT_METRICS = frozenset(("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens"))


def _num(x: float) -> str:
    return repr(float(x))  # shortest string that reads back as the same double


def _to_hash(rec: msgspec.Struct) -> dict[str, str]:
    """Struct → hash fields; None is an absent field, so the Struct's default comes back."""
    out: dict[str, str] = {}
    for name in rec.__struct_fields__:
        v = getattr(rec, name)
        if v is None:
            continue
        if isinstance(v, bool):
            out[name] = "1" if v else "0"
        elif isinstance(v, float):
            out[name] = repr(v)
        elif isinstance(v, list):
            out[name] = msgspec.json.encode(v).decode()
        else:
            out[name] = str(v)
    return out


def _from_hash(h: dict[str, str], cls: type[_S]) -> _S:
    fields: dict[str, Any] = dict(h)
    if "allowed_models" in fields:
        fields["allowed_models"] = msgspec.json.decode(fields["allowed_models"])
    return msgspec.convert(fields, cls, strict=False)  # strict=False: "1.5" → float, "1" → bool


class RedisStore:
    """`Store` on Redis. Commands are never retried by the client: a lease or settle that timed out may
    have run, and running it twice would move credit twice. A stale pooled connection (say, after a Redis
    restart) is still replaced before use."""

    kind = "redis"

    def __init__(self, url: str, prefix: str = "hedgerow:", timeout_s: float = 1.0) -> None:
        self._p = prefix
        self._timeout_s = timeout_s
        self._channel = prefix + "keys"
        self._r = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._put_org = self._r.register_script(_PUT_ORG)
        self._top_up = self._r.register_script(_TOP_UP)
        self._put_key = self._r.register_script(_PUT_KEY)
        self._delete_key = self._r.register_script(_DELETE_KEY)
        self._lease = self._r.register_script(_LEASE)
        self._settle = self._r.register_script(_SETTLE)
        self._reap = self._r.register_script(_REAP)
        self._take = self._r.register_script(_TAKE)
        self._write_gen = self._r.register_script(_WRITE_GEN)

    @contextlib.asynccontextmanager
    async def _op(self, timeout_s: float | None = None) -> AsyncIterator[None]:
        """One store operation: bounded by timeout_s; every failure becomes StoreError."""
        try:
            async with asyncio.timeout(timeout_s or self._timeout_s):
                yield
        except (RedisError, OSError, TimeoutError) as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # The task was being cancelled and the client answered with an error of its own (it drops the
                # connection on cancel): pass the cancellation on, or a background loop that retries on
                # StoreError would never stop, and neither would the process.
                raise asyncio.CancelledError from e
            raise StoreError(f"redis: {e!r}") from e

    async def open(self) -> None:
        await self.ping()  # nothing to migrate; surface a wrong URL at startup

    async def close(self) -> None:
        await self._r.aclose()

    async def ping(self) -> None:
        async with self._op():
            await self._r.ping()

    # organisations
    async def put_org(self, org: OrgRecord) -> None:
        balance = "" if org.balance is None else _num(org.balance)
        keys = [self._p + "org:" + org.id, self._p + "orgs"]
        async with self._op():
            await self._put_org(keys=keys, args=[org.id, org.name, _num(org.created_at), _num(org.spent), balance])

    async def get_org(self, org_id: str) -> OrgRecord | None:
        async with self._op():
            h = await self._r.hgetall(self._p + "org:" + org_id)
        return _from_hash(h, OrgRecord) if h else None

    async def list_orgs(self) -> list[OrgRecord]:
        async with self._op():
            ids = await self._r.smembers(self._p + "orgs")
            hashes = await self._hgetall_many("org:", sorted(ids))
        return [_from_hash(h, OrgRecord) for h in hashes if h]

    async def top_up(self, org_id: str, amount: float) -> float:
        async with self._op():
            balance = await self._top_up(keys=[self._p + "org:" + org_id], args=[_num(amount)])
        if balance is None:
            raise StoreError(f"no organisation {org_id!r}")
        return float(balance)

    # keys
    async def put_key(self, key: KeyRecord) -> None:
        h = _to_hash(key)
        p = self._p
        keys = [p + "key:" + key.id, p + "keyids", p + "orgkeys:" + key.org, p + "keys_version"]
        args = [key.id, key.org, p + "orgkeys:", self._channel, *(x for kv in h.items() for x in kv)]
        async with self._op():
            await self._put_key(keys=keys, args=args)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self._op():
            h = await self._r.hgetall(self._p + "key:" + key_id)
        return _from_hash(h, KeyRecord) if h else None

    async def list_keys(self, org_id: str | None = None) -> list[KeyRecord]:
        index = self._p + ("keyids" if org_id is None else "orgkeys:" + org_id)
        async with self._op():
            ids = await self._r.smembers(index)
            hashes = await self._hgetall_many("key:", sorted(ids))
        return [_from_hash(h, KeyRecord) for h in hashes if h]

    async def delete_key(self, key_id: str) -> bool:
        p = self._p
        keys = [p + "key:" + key_id, p + "keyids", p + "keys_version"]
        async with self._op():
            return bool(await self._delete_key(keys=keys, args=[key_id, p + "orgkeys:", self._channel]))

    async def keys_version(self) -> int:
        async with self._op():
            return int(await self._r.get(self._p + "keys_version") or 0)

    async def subscribe_keys(self) -> AsyncIterator[str]:
        """Ids of keys put or deleted from now on, by any node. Raises StoreError once the connection is lost
        (messages sent meanwhile are gone: reconnect, then reload every key)."""
        pubsub = self._r.pubsub(ignore_subscribe_messages=True)
        try:
            async with self._op():
                await pubsub.subscribe(self._channel)
            pinged = False
            while True:
                async with self._op(_IDLE_S + self._timeout_s):
                    msg = await pubsub.get_message(timeout=_IDLE_S)  # None after _IDLE_S of silence
                if msg is None:
                    if pinged:  # the last ping got no answer in a whole idle period
                        raise StoreError("redis: the subscription connection went silent")
                    async with self._op():
                        await pubsub.ping()
                    pinged = True
                    continue
                pinged = False
                if msg["type"] == "message":
                    yield msg["data"]
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def key_usage(self, key_id: str, reset: Reset | None, now: float) -> KeyUsage:
        period = period_of(reset, now)
        async with self._op():
            usage, out, stored = await self._r.hmget(self._p + "usage:" + key_id, ["usage", "outstanding", "period"])
        return KeyUsage(
            usage=float(usage or 0) if stored == period else 0.0, outstanding=float(out or 0), period=period
        )

    # credits
    def _lease_keys(self, key_id: str, org_id: str, node: str) -> list[str]:
        p = self._p
        return [p + "usage:" + key_id, p + "org:" + org_id, p + "lease:" + node, p + "nodes"]

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
        keys = self._lease_keys(key_id, org_id, node)
        args = ["" if limit is None else _num(limit), period_of(reset, now), _num(need), _num(want)]
        args += [node, _num(now), key_id, org_id]
        async with self._op():
            return float(await self._lease(keys=keys, args=args))

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
        keys = self._lease_keys(key_id, org_id, node)
        args = [period_of(reset, now), _num(returned), _num(spent), node, _num(now), key_id, _num(LEASE_EPS)]
        async with self._op():
            await self._settle(keys=keys, args=args)

    async def heartbeat(self, node: str, now: float) -> None:
        if node:
            async with self._op():
                await self._r.zadd(self._p + "nodes", {node: now})

    async def reap(self, ttl_s: float, now: float) -> float:
        nodes = self._p + "nodes"
        cutoff = now - ttl_s
        total = 0.0
        async with self._op():
            dead = await self._r.zrangebyscore(nodes, "-inf", f"({cutoff!r}")
        for node in dead:  # one script per node: each is atomic, and Redis is never blocked for long
            keys = [nodes, self._p + "lease:" + node]
            async with self._op():
                total += float(await self._reap(keys=keys, args=[node, _num(cutoff), self._p]))
        return total

    # rate-limit windows
    async def take(self, name: str, amount: int, limit: int, ttl_s: int) -> int:
        async with self._op():
            return int(await self._take(keys=[self._p + "rate:" + name], args=[amount, limit, ttl_s]))

    async def add(self, name: str, amount: int, ttl_s: int) -> int:
        key = self._p + "rate:" + name
        async with self._op(), self._r.pipeline(transaction=True) as pipe:
            total, _ = await pipe.incrby(key, amount).expire(key, ttl_s, nx=True).execute()
        return int(total)

    # ledger
    async def write_generations(self, records: list[GenerationRecord]) -> None:
        if not records:
            return
        async with self._op():
            try:
                await self._write_batch(records)
            except NoScriptError:  # a new or restarted Redis: load the script, then write again (idempotent)
                await self._r.script_load(_WRITE_GEN)
                await self._write_batch(records)

    async def _write_batch(self, records: list[GenerationRecord]) -> None:
        """One pipeline: a script per record (atomic, short: Redis is never blocked for a whole batch), then a
        TTL on every day hash the batch touched (EXPIRE on a hash no record created does nothing)."""
        p = self._p
        index = p + "gens"
        # The index forgets ids older than the TTL, counted back from the newest record (bounded by now, so
        # one node's skewed clock cannot empty it), roughly as their strings expire.
        cutoff = min(max(r.created for r in records), time.time()) - GEN_TTL_S
        sha = self._write_gen.sha  # EVALSHA straight into the pipeline: no SCRIPT EXISTS round trip per batch
        counters: set[str] = set()
        async with self._r.pipeline(transaction=False) as pipe:
            for r in records:
                daily = p + "daily:" + day_of(r.created)
                keys = (p + "gen:" + r.id, index, daily, daily + ":key:" + r.key_id, daily + ":org:" + r.org)
                counters.update(keys[2:])
                pipe.evalsha(
                    sha, 5, *keys, _encode_gen(r), GEN_TTL_S, _num(r.created), r.id, r.model, r.prompt_tokens,
                    r.completion_tokens, r.cached_tokens, r.reasoning_tokens, _num(r.cost), _num(r.fee),
                )  # fmt: skip
            for name in counters:
                pipe.expire(name, AGG_TTL_S)
            pipe.zremrangebyscore(index, "-inf", f"({cutoff!r}")
            await pipe.execute()

    async def get_generation(self, gen_id: str) -> GenerationRecord | None:
        async with self._op():
            data = await self._r.get(self._p + "gen:" + gen_id)
        return None if data is None else _decode_gen(data)

    async def count_generations(self) -> int:
        async with self._op():
            return int(await self._r.zcard(self._p + "gens"))

    async def usage_by_day(
        self, start: float, end: float, key_id: str | None = None, org: str | None = None
    ) -> list[DayUsage]:
        if key_id is not None and org is not None:
            raise ValueError("usage_by_day filters by a key or by an organisation, not both")
        suffix = ""
        if key_id is not None:
            suffix = ":key:" + key_id
        elif org is not None:
            suffix = ":org:" + org
        days = days_between(start, end)
        async with self._op(), self._r.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(self._p + "daily:" + day + suffix)
            hashes: list[dict[str, str]] = await pipe.execute()
        out: list[DayUsage] = []
        for day, h in zip(days, hashes, strict=True):
            rows: dict[str, dict[str, Any]] = {}
            for field, value in h.items():
                model, _, metric = field.rpartition("|")
                rows.setdefault(model, {})[metric] = int(value) if metric in _INT_METRICS else float(value)
            out.extend(DayUsage(day=day, model=m, **rows[m]) for m in sorted(rows))
        return out

    async def _hgetall_many(self, kind: str, ids: list[str]) -> list[dict[str, str]]:
        async with self._r.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hgetall(self._p + kind + i)
            return await pipe.execute()
