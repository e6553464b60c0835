"""Gateway API keys: held only as SHA-256 digests, checked in memory without leaking timing about the secret.

Why a digest lookup is safe: the dict is keyed by SHA-256 of the presented secret, so any timing difference
in the lookup depends on the digest, which an attacker cannot steer towards a real key's digest byte by
byte; the secret itself is never compared character by character.

Two sources: keys written in the config (fixed while the process runs) and keys created through the admin API
(in the store; `load()` swaps them in when the store says they changed — see accounting/accountant.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from proxy.config import KeyConfig, key_hash
from proxy.errors import Unauthorized
from proxy.store.base import KeyRecord


def config_key(k: KeyConfig) -> KeyRecord:
    """A config key as a store-shaped record: its id is its name (unique, checked by validate())."""
    return KeyRecord(
        id=k.name, digest=k.key_sha256 or key_hash(k.key or ""), label=k.name, org=k.org, rpm=k.rpm, tpm=k.tpm
    )


class KeyRing:
    __slots__ = ("_admin", "_by_digest", "_config", "_stored", "clock")

    def __init__(self, keys: list[KeyConfig], clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # wall clock: expiry times are Unix seconds
        self._stored: list[KeyRecord] = []
        self.configure(keys)

    def configure(self, keys: list[KeyConfig]) -> None:
        """The config's keys (at start, and again on a reload)."""
        self._config = {bytes.fromhex(r.digest): r for r in map(config_key, keys)}
        self._admin = frozenset(k.name for k in keys if k.admin)
        self.load(self._stored)

    def load(self, records: list[KeyRecord]) -> None:
        """Replace the store's keys (one dict swap: a request sees the old set or the new, never half).
        A config key wins over a store key with the same digest."""
        self._stored = records
        by_digest = {bytes.fromhex(r.digest): r for r in records}
        by_digest.update(self._config)
        self._by_digest = by_digest

    def is_admin(self, key: KeyRecord) -> bool:
        return key.id in self._admin and bytes.fromhex(key.digest) in self._config

    def check(self, authorization: str | None) -> KeyRecord:
        """The key for a valid `Authorization: Bearer …` header, else Unauthorized."""
        if not authorization:
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("malformed Authorization header: expected `Bearer <key>`")
        return self.check_secret(secret)

    def check_secret(self, secret: str) -> KeyRecord:
        """The key for a bare secret (Anthropic clients send it as `x-api-key`), else Unauthorized."""
        key = self._by_digest.get(hashlib.sha256(secret.strip().encode()).digest())
        if key is None:
            raise Unauthorized("invalid API key")
        if key.disabled:
            raise Unauthorized("this API key is disabled")
        if key.expires_at is not None and key.expires_at <= self.clock():
            raise Unauthorized("this API key has expired")
        return key
