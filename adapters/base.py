"""What every adapter provides: one wire format's request building and error classification.

An adapter is built once per provider at startup; everything static (URLs, auth headers) is prebuilt into
`Target`s, so per request it only decides the body bytes and how to read the answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Protocol

from proxy.config import ProviderConfig
from proxy.errors import UpstreamStatus
from proxy.upstream import Target

# Request kinds the gateway serves; an adapter maps each to an upstream target.
KINDS = ("chat", "completions", "embeddings", "models")

# Statuses that mean "try elsewhere": the request may succeed on another endpoint. Other 4xx are the
# client's fault and are relayed as the upstream sent them.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class Adapter(Protocol):
    name: ClassVar[str]  # == REGISTRY key == `adapter:` in config
    passthrough: ClassVar[bool]  # True: responses and streams are already OpenAI-shaped bytes

    def __init__(self, provider: ProviderConfig, base_url: str) -> None: ...

    def target(self, kind: str) -> Target | None:
        """The prebuilt target for a request kind, or None if this wire format has no such endpoint."""
        ...

    def request_body(self, body: bytes, public_model: str, upstream_model: str, rewrite: bool) -> bytes:
        """Bytes to send upstream. `rewrite` says the client body has gateway-only fields to drop."""
        ...

    def classify(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamStatus | None:
        """For a non-2xx answer: an UpstreamStatus to fail over on, or None to relay it to the client."""
        ...
