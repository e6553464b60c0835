"""Where keys, organisations, credits, rate-limit windows and the ledger live: SQLite on one node, Redis across many.

Both implement `proxy.store.base.Store`; `open_store(config)` picks one. Nothing on the request path awaits a
store in the common case: callers lease credits and rate-limit tokens in chunks (proxy/accounting/limits.py) and
queue ledger records for batched writes (proxy/accounting/ledger.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.store.base import (
    AttemptRecord,
    GenerationRecord,
    KeyRecord,
    KeyUsage,
    OrgRecord,
    Store,
    StoreError,
    period_of,
)

if TYPE_CHECKING:
    from proxy.accounting.settings import StoreConfig


def open_store(cfg: StoreConfig) -> Store:
    """The store `cfg` names, built but not opened (the caller awaits `open()` where it has a loop)."""
    if cfg.kind == "redis":
        from proxy.store.redis import RedisStore  # late: the redis client is an optional dependency

        return RedisStore(cfg.url, prefix=cfg.prefix, timeout_s=cfg.timeout_s)
    from proxy.store.sqlite import SQLiteStore

    return SQLiteStore(cfg.path, timeout_s=cfg.timeout_s)


__all__ = [
    "AttemptRecord",
    "GenerationRecord",
    "KeyRecord",
    "KeyUsage",
    "OrgRecord",
    "Store",
    "StoreError",
    "open_store",
    "period_of",
]
