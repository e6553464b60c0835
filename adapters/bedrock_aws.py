"""The AWS half of the Bedrock adapter: credentials, region, SigV4 signing and event-stream framing.

Signing and the binary event-stream framing come from botocore (`SigV4Auth`, `EventStreamBuffer`): both are
easy to get subtly wrong by hand (canonical paths, CRCs) and botocore is what AWS itself ships. botocore is
an optional extra (`pip install 'hedgerow[bedrock]'`), imported only when a Bedrock provider is built, so a
gateway without Bedrock neither needs it nor pays its import time.

Credentials, in this order (read once at startup):
1. The provider's `api-key`: `ACCESS_KEY_ID:SECRET_ACCESS_KEY` (or `…:SECRET:SESSION_TOKEN`) → SigV4; a
   value without `:` is a Bedrock API key → `Authorization: Bearer` (AWS key ids, secrets, session tokens and
   Bedrock API keys never contain `:`, so the colon tells them apart).
2. `AWS_BEARER_TOKEN_BEDROCK` → Bearer (what the AWS SDKs read for Bedrock API keys).
3. `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`) → SigV4.
The region for SigV4 comes from the base URL's host (`bedrock-runtime[-fips].<region>.amazonaws.com`, VPC
endpoint hosts included), else `AWS_REGION`, else `AWS_DEFAULT_REGION` (for proxies and local stand-ins).

TODO: temporary credentials are not refreshed, so a session token that expires needs a restart. botocore's
full credential chain (profiles, SSO, instance and container roles) would refresh them, but it reaches the
network (instance metadata) at startup, which a gateway should not do implicitly; it wants an opt-in setting.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from proxy.config import ConfigError, ProviderConfig

SERVICE = "bedrock"  # the SigV4 signing name of bedrock-runtime
_REGION_IN_HOST = re.compile(r"(?:^|\.)bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.(?:vpce\.)?amazonaws\.com(?:\.cn)?$")


@functools.cache
def _botocore(module: str) -> ModuleType:
    import importlib

    return importlib.import_module(f"botocore.{module}")


def require_botocore(provider: str) -> None:
    """Fail at startup, naming the fix, rather than at the first request."""
    try:
        _botocore("eventstream")
    except ImportError:
        raise ConfigError(
            [f"provider `{provider}` uses the bedrock adapter, which needs botocore: pip install 'hedgerow[bedrock]'"]
        ) from None


def region_of(host: str, env: Mapping[str, str]) -> str | None:
    m = _REGION_IN_HOST.search(host)
    if m is not None:
        return m.group(1)
    return env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None


class SigV4Signer:
    """Signs one request's exact body bytes; the headers it returns go out as the request's extra headers.

    Only host, x-amz-date and x-amz-content-sha256 (and the session token) are signed: they are the headers
    whose wire values the signer knows, so nothing a client library adds or reorders can break the signature.
    """

    __slots__ = ("_auth", "_request")

    def __init__(self, access_key: str, secret_key: str, token: str | None, region: str) -> None:
        credentials = _botocore("credentials").Credentials(access_key, secret_key, token)
        self._auth = _botocore("auth").SigV4Auth(credentials, SERVICE, region)
        self._request = _botocore("awsrequest").AWSRequest

    def headers(self, url: str, body: bytes) -> dict[str, str]:
        """Authorization, X-Amz-Date, X-Amz-Content-Sha256 (and X-Amz-Security-Token) for POST `url`.

        `url` must be the URL as it goes on the wire (see BedrockAdapter.target): AWS checks the signature
        against the path it receives, percent-encoded once more.
        """
        request = self._request("POST", url, headers={"X-Amz-Content-SHA256": hashlib.sha256(body).hexdigest()})
        self._auth.add_auth(request)
        return dict(request.headers.items())


def auth_for(provider: ProviderConfig, host: str, env: Mapping[str, str] | None = None) -> str | SigV4Signer:
    """A Bedrock API key (sent as a Bearer token) or a SigV4 signer; ConfigError if there is neither."""
    env = os.environ if env is None else env
    key = provider.api_key or env.get("AWS_BEARER_TOKEN_BEDROCK")
    if key and ":" not in key:
        return key
    if key:
        access, secret, *rest = key.split(":", 2)
        token = rest[0] if rest else None
        source = "api-key"
    else:
        access, secret = env.get("AWS_ACCESS_KEY_ID", ""), env.get("AWS_SECRET_ACCESS_KEY", "")
        token = env.get("AWS_SESSION_TOKEN") or None
        source = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    where = f"provider `{provider.name}`"
    if not access or not secret:
        raise ConfigError(
            [
                f"{where}: no AWS credentials; set api-key to ACCESS_KEY_ID:SECRET_ACCESS_KEY or a Bedrock API key, "
                "or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_BEARER_TOKEN_BEDROCK"
            ]
        )
    region = region_of(host, env)
    if region is None:
        raise ConfigError(
            [f"{where}: cannot tell the AWS region for SigV4 ({source}) from host `{host}`; set AWS_REGION"]
        )
    return SigV4Signer(access, secret, token, region)


# Bedrock sends a handful of distinct header blocks (one per event type), so parsed headers are memoised by
# their bytes: header parsing is over half of botocore's cost per frame. Bounded, because error frames carry a
# free-text `:error-message` header that would otherwise grow the cache without limit.
_HEADER_CACHE_MAX = 256
_headers_of: dict[bytes, dict[str, Any]] = {}


class _CachedHeaders:
    """botocore's EventStreamHeaderParser with a memo in front (same `parse(bytes) -> dict` interface)."""

    __slots__ = ("_parser",)

    def __init__(self, parser: Any) -> None:
        self._parser = parser

    def parse(self, data: bytes) -> dict[str, Any]:
        headers = _headers_of.get(data)
        if headers is None:
            headers = self._parser.parse(data)
            if len(_headers_of) < _HEADER_CACHE_MAX:
                _headers_of[data] = headers  # shared between streams: read, never mutated
        return headers


class EventFrames:
    """AWS event-stream frames out of a byte stream cut anywhere: (headers, payload) per complete frame.

    After bytes that are not valid framing, `error` is set and no further frame is read: the frames decoded
    before it are still returned, so what the upstream did send gets through.
    """

    __slots__ = ("_buffer", "_parser_error", "error")

    def __init__(self) -> None:
        eventstream = _botocore("eventstream")
        self._buffer = eventstream.EventStreamBuffer()
        parser = getattr(self._buffer, "_header_parser", None)  # private: without it, no memo, same output
        if parser is not None:
            self._buffer._header_parser = _CachedHeaders(parser)
        self._parser_error: type[Exception] = eventstream.ParserError
        self.error: str | None = None

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        frames: list[tuple[dict[str, Any], bytes]] = []
        if self.error is not None:
            return frames
        self._buffer.add_data(data)
        try:
            for m in self._buffer:
                frames.append((m.headers, m.payload))
        except self._parser_error as e:
            self.error = f"{type(e).__name__}: {e}"
        return frames
