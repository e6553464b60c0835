"""OpenAI and every OpenAI-compatible provider: the request passes through, the response too.

Compatible providers (Groq, Together, vLLM, Ollama, …) differ only in data (base URL, key, headers), so they
are config entries using this adapter, not code; `adapters/presets.py` holds that data for the common ones. A
preset's unsupported parameters are dropped here, in the one top-level rewrite, and only when present.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from adapters.base import RETRYABLE_STATUSES
from adapters.presets import PRESETS
from proxy.config import ProviderConfig
from proxy.errors import UpstreamStatus
from proxy.schema import rewrite
from proxy.upstream import Target

_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "models": "/models",
}


class OpenAIAdapter:
    name: ClassVar[str] = "openai"
    passthrough: ClassVar[bool] = True

    __slots__ = ("_needles", "_provider", "_targets", "unsupported")

    def __init__(self, provider: ProviderConfig, base_url: str) -> None:
        self._provider = provider
        preset = PRESETS.get(provider.preset) if provider.preset else None
        # Parameters this provider does not honour: dropped from requests, and skipped by the router when a
        # request sets `provider.require_parameters` (it reads this attribute; other adapters may define it).
        self.unsupported: frozenset[str] = preset.unsupported if preset else frozenset()
        # `"name"` in the body bytes is a cheap pre-check: a miss (the usual case) proves the key absent, so
        # the body stays zero-copy; a hit (maybe just a string value) costs one rewrite that drops nothing.
        self._needles = tuple(f'"{name}"'.encode() for name in sorted(self.unsupported))
        headers = {"Content-Type": "application/json", "Accept": "*/*"}
        if provider.api_key:
            if preset is not None and preset.auth_header:
                headers[preset.auth_header] = provider.api_key
            else:
                headers["Authorization"] = f"Bearer {provider.api_key}"
        headers.update(provider.headers)
        base = base_url.rstrip("/")
        self._targets = {
            kind: Target(
                base + path,
                headers,
                provider.timeouts,
                method="GET" if kind == "models" else "POST",
                max_connections=provider.max_connections,
            )
            for kind, path in _PATHS.items()
        }

    def target(self, kind: str, model: str = "", stream: bool = False) -> Target | None:
        return self._targets.get(kind)  # the model travels in the body, the stream flag too

    def request_body(self, body: bytes, public_model: str, upstream_model: str, strip: bool) -> bytes:
        if self._needles and any(n in body for n in self._needles):
            return rewrite(body, upstream_model, strip, self.unsupported)
        if not strip and public_model == upstream_model:
            return body  # zero-copy: the client's bytes go upstream unchanged
        return rewrite(body, upstream_model, strip)

    def parse_response(self, body: bytes, model: str) -> bytes:
        return body

    def new_transcoder(self, model: str) -> None:
        return None

    def classify(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamStatus | None:
        if status in RETRYABLE_STATUSES:
            return UpstreamStatus(status, body, _relayable(headers), upstream=self._provider.name)
        return None

    def error_body(self, status: int, body: bytes) -> bytes:
        return body  # already OpenAI-shaped


def _relayable(headers: Mapping[str, str]) -> dict[str, str]:
    """The few upstream headers worth relaying with an error (the client may act on Retry-After)."""
    out = {}
    for name in ("Content-Type", "Retry-After"):
        value = headers.get(name)
        if value is not None:
            out[name] = value
    return out
