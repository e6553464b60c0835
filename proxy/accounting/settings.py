"""The `accounting:` config section: where keys, credits and the ledger live, the fee, and how limits behave."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from proxy.structs import Base, PositiveFloat


class StoreConfig(Base):
    kind: Literal["sqlite", "redis"] = "sqlite"
    path: str = "hedgerow.db"  # sqlite: the database file (WAL); shared by the workers of one node
    url: str = "redis://127.0.0.1:6379/0"  # redis: shared by every node
    prefix: str = "hedgerow:"  # redis: every key name starts with this (several gateways can share a Redis)
    timeout_s: PositiveFloat = 1.0  # one store operation; slower counts as unreachable


class OrgConfig(Base):
    """An organisation created at startup if the store does not have it yet (top-ups then go through the API)."""

    id: str
    name: str = ""
    credits: Annotated[float, msgspec.Meta(ge=0)] | None = None  # initial balance, USD; None: unlimited


class AccountingConfig(Base):
    # false: no store, no ledger, no credits or rate limits — config keys only (a sidecar that meters nothing)
    enabled: bool = True
    store: StoreConfig = StoreConfig()
    catalog: str | None = None  # a price catalog file of the operator's, over the bundled one (same format)
    fee: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0  # the gateway's fee as a share of the provider cost
    # `cost` and `cost_details` in the final usage (body, last stream chunk): "request" when the client sends
    # `"usage": {"include": true}` (OpenRouter's switch), "always", or "never" (relay stays byte-identical).
    usage_cost: Literal["request", "always", "never"] = "request"
    flush_interval_s: PositiveFloat = 1.0  # ledger batches and credit settlements; a crash loses at most this
    queue_max: Annotated[int, msgspec.Meta(ge=100)] = 100_000  # records held while the store is unreachable
    fail_closed: bool = False  # store unreachable and a key's credit unknown: 503 (True) or serve (False)
    lease_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.1  # share of the remaining credit a node leases
    # a process silent this long (crashed) has its unspent leases returned by the others
    lease_ttl_s: Annotated[float, msgspec.Meta(ge=5)] = 30.0
    keys_sync_s: PositiveFloat = 1.0  # how often a node looks for keys changed elsewhere (Redis also pushes)
    orgs: list[OrgConfig] = []
