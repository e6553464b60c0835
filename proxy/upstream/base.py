"""Interface types for upstream HTTP: a prebuilt target, a client that sends, a response that streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol
from urllib.parse import urlsplit

from proxy.config import Timeouts


class Target:
    """Where and how to send: built once per (provider, path) at startup, reused by every request.

    `headers` holds everything static (auth, content type, the provider's extra headers), so a client can
    prebuild the request head once; only Content-Length changes per request.
    """

    __slots__ = ("headers", "host", "max_connections", "method", "path", "port", "scheme", "timeouts", "url")

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
