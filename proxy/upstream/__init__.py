"""The upstream HTTP client behind a small interface of our own.

The router, adapters and relay only ever see `Target`, `UpstreamClient.send()` and `UpstreamResponse`, so the
HTTP library underneath can change (aiohttp's client today; a lean httptools pool where it pays) without
touching anything else. Both implementations raise only errors from `proxy.errors`.
"""

from proxy.upstream.base import Target, UpstreamClient, UpstreamResponse

__all__ = ["Target", "UpstreamClient", "UpstreamResponse", "new_client"]


def new_client(kind: str = "lean") -> UpstreamClient:
    """One pooled client per process. `kind` picks the implementation ("aiohttp" or "lean")."""
    if kind == "lean":
        from proxy.upstream.lean_pool import LeanClient

        return LeanClient()
    from proxy.upstream.aiohttp_pool import AiohttpClient

    return AiohttpClient()
