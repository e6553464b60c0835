"""Credits and rate limits that hold across workers and nodes without a store round trip per request.

Credits: before an attempt is sent, the request reserves its worst-case cost from credit this node has
*leased* from the store (proxy/store/base.py: a lease takes credit out of the organisation's balance and the
key's limit atomically, so no two nodes can spend the same dollar). Completion commits the actual cost and
gives the rest of the reservation back to the lease; a background task settles spend and returns leases that
sat idle. Only a request that finds its node's lease too small awaits the store (one lease per chunk).

Rate limits: fixed one-minute windows per key. Requests per minute are leased in chunks the same way (the store
never grants past the limit, so all nodes together stay within it per window); tokens per minute are known only
after the fact, so they are added up locally and synced each flush: a node refuses new requests once the
window's tokens, as far as it knows, reached the limit.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Callable

from proxy.accounting.settings import AccountingConfig
from proxy.errors import PaymentRequired, RateLimited, Unavailable
from proxy.store.base import KeyRecord, OrgRecord, Store, StoreError

log = logging.getLogger("hedgerow")

WINDOW_S = 60  # rate-limit window (rpm, tpm)
_IDLE_RETURN_S = 5.0  # a lease unused this long goes back to the store, so other nodes can spend it
_EPS = 1e-12  # float slack when comparing money


class _Credit:
    """One key's lease on this node."""

    __slots__ = ("avail", "inflight", "key", "lock", "spent", "used_at")

    def __init__(self, key: KeyRecord) -> None:
        self.key = key
        self.avail = 0.0  # leased, not reserved
        self.spent = 0.0  # committed, not yet settled
        self.inflight = 0  # reservations not yet committed
        self.used_at = 0.0
        self.lock = asyncio.Lock()  # one lease call at a time per key


class Credits:
    __slots__ = ("_by_key", "cfg", "clock", "node", "orgs", "reaped", "store", "unreachable")

    def __init__(self, store: Store, cfg: AccountingConfig, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cfg = cfg
        self.clock = clock
        # this process, as the store's lease records know it: its leases come back if it stops heartbeating
        self.node = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self.reaped = 0.0  # credit this process returned from crashed processes' leases
        self.orgs: dict[str, OrgRecord] = {}  # refreshed with the keys: which orgs have a balance
        self._by_key: dict[str, _Credit] = {}
        self.unreachable = 0  # lease attempts that failed on the store (a metric for #6)

    def metered(self, key: KeyRecord) -> bool:
        """Does this key need reservations? (A key without a limit in an unlimited org does not.)"""
        if key.limit is not None:
            return True
        org = self.orgs.get(key.org)
        return org is not None and org.balance is not None

    def _state(self, key: KeyRecord) -> _Credit:
        st = self._by_key.get(key.id)
        if st is None:
            st = self._by_key[key.id] = _Credit(key)
        else:
            st.key = key  # the latest limits (keys reload)
        return st

    async def reserve(self, key: KeyRecord, amount: float) -> float:
        """Reserve `amount` USD for a request, leasing more from the store if this node's lease is short.
        Returns what was reserved (to pass to commit). Raises PaymentRequired when the credit cannot cover it."""
        if not self.metered(key) or amount <= 0:
            return self.reserve_free(key)
        st = self._state(key)
        st.used_at = self.clock()
        if st.avail + _EPS >= amount:  # the common case: no await
            st.avail -= amount
            st.inflight += 1
            return amount
        async with st.lock:
            if st.avail + _EPS < amount:
                need = amount - st.avail
                want = max(need, self._chunk(key))
                try:
                    grant = await self.store.lease(
                        key.id, key.org, key.limit, key.limit_reset, need, want, self.clock(), self.node
                    )
                except StoreError as e:
                    self.unreachable += 1
                    if self.cfg.fail_closed:
                        raise Unavailable("the credit store is unreachable; try again shortly") from e
                    log.warning("credit store unreachable, serving key %s without a reservation: %s", key.id, e)
                    st.inflight += 1
                    return 0.0
                if grant + _EPS < need:
                    raise PaymentRequired(
                        f"insufficient credits: this request may cost up to ${amount:.6f}; "
                        "lower max_tokens, or add credits"
                    )
                st.avail += grant
            st.avail -= amount
            st.inflight += 1
            return amount

    def reserve_free(self, key: KeyRecord) -> float:
        """A request that needs no credit (an unmetered key, a free model): counted in flight, nothing held."""
        st = self._state(key)
        st.used_at = self.clock()
        st.inflight += 1
        return 0.0

    def _chunk(self, key: KeyRecord) -> float:
        """How much to lease at once: a share of the smaller of the key's limit and the org's balance."""
        org = self.orgs.get(key.org)
        caps = [c for c in (key.limit, org.balance if org is not None else None) if c is not None]
        return self.cfg.lease_fraction * min(caps) if caps else 0.0

    def commit(self, key: KeyRecord, reserved: float, actual: float) -> None:
        """The request ended: `actual` USD was spent; the rest of its reservation returns to the lease.
        Synchronous, so a cancelled request still commits (called from a `finally`)."""
        st = self._state(key)
        st.inflight -= 1
        st.avail += reserved - actual  # may go below zero if a provider reported more than the worst case
        st.spent += actual

    def unsettled(self, key_id: str) -> float:
        st = self._by_key.get(key_id)
        return st.spent if st is not None else 0.0

    async def settle(self, final: bool = False) -> None:
        """Move committed spend into the store and return idle leases (everything, when `final`)."""
        now = self.clock()
        for st in list(self._by_key.values()):
            spent = st.spent
            idle = st.inflight == 0 and (final or now - st.used_at >= _IDLE_RETURN_S)
            returned = max(st.avail, 0.0) if idle else 0.0
            if spent == 0 and returned == 0:
                continue
            key = st.key
            try:
                await self.store.settle(key.id, key.org, key.limit_reset, returned, spent, now, self.node)
            except StoreError as e:
                self.unreachable += 1
                log.warning("credit store unreachable, settlement of key %s deferred: %s", key.id, e)
                return  # try again next round; nothing was lost
            st.spent -= spent
            st.avail -= returned

    async def heartbeat(self, reap: bool) -> None:
        """Tell the store this process lives (so its leases stay its own); with `reap`, return the leases of
        processes that stopped heartbeating (crashed: their spend since their last settlement is lost)."""
        now = self.clock()
        try:
            await self.store.heartbeat(self.node, now)
            if reap:
                self.reaped += await self.store.reap(self.cfg.lease_ttl_s, now)
        except StoreError as e:
            self.unreachable += 1
            log.warning("credit store unreachable, heartbeat skipped: %s", e)


class _Window:
    __slots__ = ("exhausted", "granted_total", "lock", "reqs", "start", "tokens_local", "tokens_total", "tpm")

    def __init__(self, start: int, tpm: bool) -> None:
        self.start = start
        self.tpm = tpm  # the key has a tokens-per-minute limit: sync its counts
        self.reqs = 0  # requests leased to this node in this window, not yet used
        self.granted_total = 0  # the store's count for the window at our last lease (all nodes)
        self.tokens_local = 0  # tokens this node used this window, not yet synced
        self.tokens_total = 0  # the store's count at the last sync (all nodes)
        self.exhausted = False  # the store granted nothing: the window is spent on every node, don't ask again
        self.lock = asyncio.Lock()


class RateLimits:
    __slots__ = ("_windows", "cfg", "clock", "store", "unreachable")

    def __init__(self, store: Store, cfg: AccountingConfig, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.cfg = cfg
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self.unreachable = 0

    def _window(self, key: KeyRecord, now: float) -> _Window:
        start = int(now) // WINDOW_S * WINDOW_S
        w = self._windows.get(key.id)
        if w is None or w.start != start:
            if w is not None and w.tokens_local:
                # the last window's unsynced tokens count in the one they happened in
                asyncio.get_running_loop().create_task(self._sync_tokens(key.id, w))
            w = self._windows[key.id] = _Window(start, key.tpm is not None)
        return w

    async def admit(self, key: KeyRecord) -> dict[str, str]:
        """Count one request against the key's rpm and check its tpm; the X-RateLimit-* headers for the
        response. Raises RateLimited (429 + Retry-After) when either limit is reached."""
        now = self.clock()
        w = self._window(key, now)
        reset = w.start + WINDOW_S - int(now)
        if key.tpm is not None and w.tokens_total + w.tokens_local >= key.tpm:
            raise RateLimited(
                f"token rate limit reached ({key.tpm} tokens per minute)",
                reset,
                {"X-RateLimit-Limit-Tokens": str(key.tpm), "X-RateLimit-Remaining-Tokens": "0"},
            )
        if key.rpm is None:
            return {}
        if w.reqs == 0 and not w.exhausted:
            async with w.lock:
                if w.reqs == 0 and not w.exhausted:
                    chunk = max(1, math.ceil(key.rpm * self.cfg.lease_fraction))
                    name = f"rpm:{key.id}:{w.start}"
                    try:
                        grant = await self.store.take(name, chunk, key.rpm, WINDOW_S * 2)
                        w.granted_total = await self.store.add(name, 0, WINDOW_S * 2)
                    except StoreError as e:
                        self.unreachable += 1
                        if self.cfg.fail_closed:
                            raise Unavailable("the rate-limit store is unreachable; try again shortly") from e
                        return {}
                    w.reqs += grant
                    w.exhausted = grant == 0
        headers = {
            "X-RateLimit-Limit": str(key.rpm),
            "X-RateLimit-Remaining": str(max(0, key.rpm - w.granted_total) + max(0, w.reqs - 1)),
            "X-RateLimit-Reset": str(reset),
        }
        if w.reqs == 0:
            headers["X-RateLimit-Remaining"] = "0"
            raise RateLimited(f"rate limit reached ({key.rpm} requests per minute)", reset, headers)
        w.reqs -= 1
        return headers

    def add_tokens(self, key: KeyRecord, tokens: int) -> None:
        if key.tpm is not None and tokens > 0:
            self._window(key, self.clock()).tokens_local += tokens

    async def _sync_tokens(self, key_id: str, w: _Window) -> None:
        n = w.tokens_local
        try:
            w.tokens_total = await self.store.add(f"tpm:{key_id}:{w.start}", n, WINDOW_S * 2)
        except StoreError:
            self.unreachable += 1
            return
        w.tokens_local -= n

    async def sync(self) -> None:
        """Publish this node's token counts and learn the other nodes'."""
        current = int(self.clock()) // WINDOW_S * WINDOW_S
        for key_id, w in list(self._windows.items()):
            if w.tpm and (w.start == current or w.tokens_local):
                await self._sync_tokens(key_id, w)
            if w.start < current and self._windows.get(key_id) is w:
                del self._windows[key_id]  # idle since an earlier window: forget it
