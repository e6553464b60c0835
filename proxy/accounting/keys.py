"""Gateway API keys: held only as SHA-256 digests, checked without leaking timing about the secret.

Why a digest lookup is safe: the dict is keyed by SHA-256 of the presented secret, so any timing difference
in the lookup depends on the digest, which an attacker cannot steer towards a real key's digest byte by
byte; the secret itself is never compared character by character.
"""

from __future__ import annotations

import hashlib

from proxy.config import KeyConfig, key_hash
from proxy.errors import Unauthorized


class KeyRing:
    __slots__ = ("_by_digest",)

    def __init__(self, keys: list[KeyConfig]) -> None:
        self._by_digest: dict[bytes, str] = {}
        for k in keys:
            hexdigest = k.key_sha256 or key_hash(k.key or "")
            self._by_digest[bytes.fromhex(hexdigest)] = k.name

    def check(self, authorization: str | None) -> str:
        """The key's name for a valid `Authorization: Bearer …` header, else Unauthorized."""
        if not authorization:
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("malformed Authorization header: expected `Bearer <key>`")
        return self.check_secret(secret)

    def check_secret(self, secret: str) -> str:
        """The key's name for a bare secret (Anthropic clients send it as `x-api-key`), else Unauthorized."""
        digest = hashlib.sha256(secret.strip().encode()).digest()
        name = self._by_digest.get(digest)
        if name is None:
            raise Unauthorized("invalid API key")
        return name
