"""Interface types for upstream HTTP: a prebuilt target, a client that sends, a response that streams."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

from proxy.config import Timeouts


class Target:
    """Where and how to send: built once per (provider, path) at startup, reused by every request.

    `headers` holds everything static (auth, content type, the provider's extra headers), so a client can
    prebuild the request head once; only Content-Length changes per request.

    `secrets`: the credentials in those headers and the URL (a provider's API key), each with its mask, so an
    upstream's error answer that echoes the key it received ("Incorrect API key provided: sk-…") is relayed
    without it (`redact`).
    """

    __slots__ = (
        "headers",
        "host",
        "max_connections",
        "method",
        "path",
        "port",
        "scheme",
        "secrets",
        "timeouts",
        "url",
    )

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        timeouts: Timeouts,
        *,
        method: str = "POST",
        max_connections: int = 1024,
    ) -> None:
        parts = urlsplit(url)
        self.url = url
        self.method = method
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.headers = dict(headers)
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.secrets = credentials(self.headers, parts.query)

    def redact(self, data: bytes) -> bytes:
        """`data` (an upstream's error body) without this target's credentials: each replaced by its mask."""
        for secret, mask in self.secrets:
            if secret in data:
                data = data.replace(secret, mask)
        return data

    def redact_text(self, text: str) -> str:
        """`redact` for a message the gateway built from upstream bytes."""
        for secret, mask in self.secrets:
            s = secret.decode()
            if s in text:
                text = text.replace(s, mask.decode())
        return text


# Header and query names that carry a credential: Authorization, x-api-key, api-key, x-goog-api-key,
# x-amz-security-token, a provider's own `X-Auth-Token`…
_CREDENTIAL_NAME = re.compile(r"auth|key|token|secret|signature", re.IGNORECASE)
_MIN_SECRET = 8  # shorter values ("Bearer", "1") are not secrets, and masking them would mangle error bodies
_KEY_PREFIX = re.compile(r"(?:[a-z]{2,4}-){1,2}")  # "sk-", "sk-ant-", "sk-proj-": the kind, not the secret


def credentials(headers: Mapping[str, str], query: str = "") -> tuple[tuple[bytes, bytes], ...]:
    """(secret, mask) for each credential in `headers` and the URL's `query`, longest first (a secret that
    contains another is masked whole). A `Scheme token` value's secret is its token."""
    found: set[str] = set()
    for name, value in (*headers.items(), *parse_qsl(query)):
        if _CREDENTIAL_NAME.search(name):
            token = value.rpartition(" ")[2].strip()
            if len(token) >= _MIN_SECRET:
                found.add(token)
    return tuple((s.encode(), _mask(s).encode()) for s in sorted(found, key=len, reverse=True))


def _mask(secret: str) -> str:
    """The shape of a key without any of its secret part: `sk-...redacted` for `sk-…`."""
    m = _KEY_PREFIX.match(secret)
    prefix = m.group() if m is not None and m.end() <= len(secret) // 3 else ""
    return prefix + "...redacted"


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]  # case-insensitive lookups ("content-type", "retry-after")

    async def read(self, limit: int) -> bytes:
        """The whole body (at most `limit` bytes, else UpstreamProtocolError); then release()s itself."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive, unchanged. Raises UpstreamTimeout after `idle_s` of silence and
        StreamInterrupted if the connection ends before the body does."""
        ...

    def release(self) -> None:
        """Done with this response: the connection goes back to the pool if the body was fully read,
        otherwise it is closed at once (that is how an attempt is cancelled). Idempotent."""
        ...


class UpstreamClient(Protocol):
    async def send(
        self, target: Target, body: bytes, extra_headers: Mapping[str, str] | None = None
    ) -> UpstreamResponse:
        """Send one request and wait for the response head. Applies connect and first-byte timeouts;
        raises UpstreamConnectError, UpstreamTimeout or UpstreamProtocolError. Cancelling the awaiting
        task closes the connection."""
        ...

    async def close(self) -> None: ...
