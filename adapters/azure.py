"""Azure OpenAI: the OpenAI wire format (bodies and streams pass through) with Azure's addressing and auth.

Two URL schemes, chosen by `base-url`:
- Deployment URLs (the classic API): `base-url: https://<resource>.openai.azure.com`. Requests go to
  `{base-url}/openai/deployments/{deployment}/chat/completions?api-version=…`, where the deployment is the
  endpoint's upstream `model`. Azure takes the deployment from the URL and ignores the body's `model`, so the
  client's bytes go upstream unchanged even when the public model name differs (zero-copy), unless a stream
  must be asked for its usage (`stream_options.include_usage`, as in adapters/openai.py). The api-version is
  `API_VERSION` unless the base URL carries one: `https://<resource>.openai.azure.com?api-version=2025-04-01-preview`.
- The v1 API: `base-url: https://<resource>.openai.azure.com/openai/v1`. Plain OpenAI paths with no
  api-version; the deployment name travels in the body's `model`, rewritten as for OpenAI when it differs.

The key goes in the `api-key` header, not `Authorization: Bearer`. For Microsoft Entra ID instead, leave out
`api-key` and set `headers: {Authorization: "Bearer ${AZURE_TOKEN}"}`.

Why targets are built lazily: a deployment URL depends on the upstream model, which the adapter first sees
per request. Each (kind, deployment) target is built once and kept for the process, since the upstream client
keys its prebuilt request heads by Target identity; the set is bounded by the config's endpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from adapters.base import RETRYABLE_STATUSES
from adapters.openai import _STREAM, _relayable, upstream_body
from proxy.config import ProviderConfig
from proxy.errors import UpstreamStatus
from proxy.upstream import Target

# The latest GA data-plane inference version (Azure OpenAI REST reference); previews via `?api-version=`.
API_VERSION = "2024-10-21"

_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "models": "/models",
}


class AzureOpenAIAdapter:
    name: ClassVar[str] = "azure"
    passthrough: ClassVar[bool] = True

    __slots__ = ("_headers", "_prefix", "_provider", "_query", "_targets", "_v1")

    def __init__(self, provider: ProviderConfig, base_url: str) -> None:
        self._provider = provider
        parts = urlsplit(base_url)
        path = parts.path.rstrip("/")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        self._v1 = path.endswith("/openai/v1")
        if not self._v1:
            path = path.removesuffix("/openai")  # tolerate a base URL that already names the /openai root
            query.setdefault("api-version", API_VERSION)
        self._prefix = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self._query = f"?{urlencode(query)}" if query else ""
        headers = {"Content-Type": "application/json", "Accept": "*/*"}
        if provider.api_key:
            headers["api-key"] = provider.api_key
        headers.update(provider.headers)
        self._headers = headers
        self._targets: dict[tuple[str, str], Target] = {}

    def target(self, kind: str, model: str = "", stream: bool = False) -> Target | None:
        path = _PATHS.get(kind)
        if path is None:
            return None
        # The model list and every v1 URL are the same for all deployments: one target each.
        key = (kind, "" if self._v1 or kind == "models" else model)
        t = self._targets.get(key)
        if t is None:
            t = self._targets[key] = self._build(kind, key[1], path)
        return t

    def _build(self, kind: str, deployment: str, path: str) -> Target:
        if self._v1:
            url = self._prefix + path
        elif kind == "models":
            url = self._prefix + "/openai/models"  # models the resource can deploy (a cheap GET for probes)
        else:
            url = f"{self._prefix}/openai/deployments/{quote(deployment, safe='')}{path}"
        return Target(
            url + self._query,
            self._headers,
            self._provider.timeouts,
            method="GET" if kind == "models" else "POST",
            max_connections=self._provider.max_connections,
        )

    def request_body(self, body: bytes, public_model: str, upstream_model: str, strip: bool) -> bytes:
        same = not strip and (not self._v1 or public_model == upstream_model)
        usage = _STREAM in body  # may stream: ask for the usage chunk, as adapters/openai.py does
        if same and not usage:
            return body  # zero-copy: a deployment URL makes the body's `model` irrelevant
        return upstream_body(body, upstream_model if self._v1 else public_model, strip, (), usage, same)

    def parse_response(self, body: bytes, model: str) -> bytes:
        return body

    def new_transcoder(self, model: str) -> None:
        return None

    def error_body(self, status: int, body: bytes) -> bytes:
        return body  # already OpenAI-shaped

    def classify(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamStatus | None:
        # A content-filter refusal is a 400 (`content_filter`): the prompt's fault, relayed, never failed over.
        if status in RETRYABLE_STATUSES:
            return UpstreamStatus(status, body, _relayable(headers), upstream=self._provider.name)
        return None
