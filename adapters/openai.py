"""OpenAI and every OpenAI-compatible provider: the request passes through, the response too.

Compatible providers (Groq, Together, vLLM, Ollama, …) differ only in data (base URL, key, headers), so they
are config entries using this adapter, not code; `adapters/presets.py` holds that data for the common ones. A
preset's unsupported parameters are dropped here, in the one top-level rewrite, and only when present.

Streams are asked for their usage: a streamed chat or completions request without `stream_options.include_usage`
gets it set (other `stream_options` members kept), in the same one rewrite, unless the preset lists
`stream_options` as unsupported (Mistral sends the usage chunk unasked). Why: the gateway accounts every
request, and an OpenAI stream reports its usage only when asked. The stream then ends with that usage chunk
(`choices: []`) before `[DONE]`, whether or not the client asked for it (as the translating adapters' streams
always do).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

import msgspec

from adapters.base import RETRYABLE_STATUSES
from adapters.presets import PRESETS
from proxy.config import ProviderConfig
from proxy.errors import UpstreamStatus
from proxy.schema import GATEWAY_FIELDS
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

    __slots__ = ("_needles", "_provider", "_stream_usage", "_targets", "unsupported")

    def __init__(self, provider: ProviderConfig, base_url: str) -> None:
        self._provider = provider
        preset = PRESETS.get(provider.preset) if provider.preset else None
        # Parameters this provider does not honour: dropped from requests, and skipped by the router when a
        # request sets `provider.require_parameters` (it reads this attribute; other adapters may define it).
        self.unsupported: frozenset[str] = preset.unsupported if preset else frozenset()
        # `"name"` in the body bytes is a cheap pre-check: a miss (the usual case) proves the key absent, so
        # the body stays zero-copy; a hit (maybe just a string value) costs one rewrite that drops nothing.
        self._needles = tuple(f'"{name}"'.encode() for name in sorted(self.unsupported))
        self._stream_usage = "stream_options" not in self.unsupported
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
        drop = self.unsupported if self._needles and any(n in body for n in self._needles) else ()
        usage = self._stream_usage and _STREAM in body  # may stream: the rewrite decides
        same = not drop and not strip and public_model == upstream_model
        if same and not usage:
            return body  # zero-copy: the client's bytes go upstream unchanged
        return upstream_body(body, upstream_model, strip, drop, usage, same)

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


_STREAM = b'"stream"'  # absent from the bytes: certainly not streamed (`"stream_options"` does not match)
_TRUE = msgspec.Raw(b"true")
_WITH_USAGE = msgspec.Raw(b'{"include_usage":true}')
_raw_doc = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode


def upstream_body(
    body: bytes, model: str, strip: bool, drop: Iterable[str], stream_usage: bool, unchanged: bool
) -> bytes:
    """One top-level rewrite (untouched values copied as `msgspec.Raw`): set `model`, drop gateway-only fields
    when `strip` and the parameters in `drop`, and with `stream_usage` ask a streamed request for its usage.
    `unchanged`: the rest alone changes nothing, so when no usage must be asked for the client's bytes go."""
    doc = _raw_doc.decode(body)
    asked = stream_usage and _ask_usage(doc)
    if unchanged and not asked:
        return body
    doc["model"] = msgspec.Raw(_encode(model))
    if strip:
        for name in GATEWAY_FIELDS:
            doc.pop(name, None)
    for name in drop:
        doc.pop(name, None)
    return _encode(doc)


def _ask_usage(doc: dict[str, msgspec.Raw]) -> bool:
    """Set `stream_options.include_usage` in a streamed request without it; False if nothing changed."""
    if doc.get("stream") != _TRUE:
        return False
    options = doc.get("stream_options")
    if options is None or bytes(options) == b"null":
        doc["stream_options"] = _WITH_USAGE
        return True
    try:
        fields = _raw_doc.decode(options)
    except msgspec.DecodeError:
        return False  # not an object: the upstream's 400 tells the client, as it would without us
    if fields.get("include_usage") == _TRUE:
        return False
    fields["include_usage"] = _TRUE
    doc["stream_options"] = msgspec.Raw(_encode(fields))
    return True


def _relayable(headers: Mapping[str, str]) -> dict[str, str]:
    """The few upstream headers worth relaying with an error (the client may act on Retry-After)."""
    out = {}
    for name in ("Content-Type", "Retry-After"):
        value = headers.get(name)
        if value is not None:
            out[name] = value
    return out
