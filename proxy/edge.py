"""What every response gets at the edge, on both server engines: an `X-Request-Id`, CORS headers when configured;
and the listener's TLS context.

Request ids. Every response carries `X-Request-Id`: the client's own when it sent a sane one (1–128 visible ASCII
characters: echoing it can never split a header), else the generation id of a proxied request (the
`X-Hedgerow-Generation-Id` it answers with, error answers included), else a fresh id. Fresh ids are a random
per-process prefix and a counter, as generation ids are: no syscall and no uuid4 per request; a forked worker
draws its own prefix. aiohttp stamps the header in `on_response_prepare` (so streamed answers and the error
middleware's answers get it too), the lean engine where it writes a head; both engines' protocol-level errors
(malformed HTTP, a head too slow or too large) carry a fresh one.

CORS. Off unless `server.cors.allow-origins` names an origin: then no response carries a CORS header and a
preflight `OPTIONS` is a 405 like any other unsupported method. When on, a preflight from a listed origin (any
origin, with "*") is answered 204 with the methods, the allowed request headers and `Access-Control-Max-Age`, on
any path; and every response to such an origin carries `Access-Control-Allow-Origin` (the origin itself, or "*")
and `Access-Control-Expose-Headers`, so a page can read the request id, the routing headers and `Retry-After`.
An origin not listed gets no CORS header at all, and its preflight the plain 405: the browser refuses it.
"""

from __future__ import annotations

import itertools
import os
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from aiohttp import web

from proxy.config import CorsConfig, TlsConfig
from proxy.forward import GENERATION_HEADER

REQUEST_ID = "X-Request-Id"
MAX_REQUEST_ID = 128
_sane = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID}}}").fullmatch  # visible ASCII: no space, CR, LF


def _id_source() -> Callable[[], str]:
    return map(f"req-{os.urandom(6).hex()}-{{:x}}".format, itertools.count(1)).__next__


_next_id = _id_source()


def _reseed() -> None:
    global _next_id
    _next_id = _id_source()  # a forked worker must not repeat its parent's ids


os.register_at_fork(after_in_child=_reseed)


def fresh_id() -> str:
    return _next_id()


def request_id(headers: Mapping[str, str], generation: str | None = None) -> str:
    """The client's `X-Request-Id` if it is sane, else the generation id (if any), else a fresh id."""
    rid = headers.get(REQUEST_ID)
    if rid is not None and _sane(rid):
        return rid
    return generation or _next_id()


# Response headers a cross-origin page may read (beyond the CORS-safelisted ones).
EXPOSED = ", ".join(
    (
        REQUEST_ID,
        GENERATION_HEADER,
        "X-Hedgerow-Provider",
        "X-Hedgerow-Endpoint",
        "X-Hedgerow-Attempts",
        "X-Hedgerow-Hedged",
        "X-Hedgerow-Cache",
        "X-Hedgerow-Upstream-TTFB-Ms",
        "Server-Timing",
        "Retry-After",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "X-RateLimit-Limit-Tokens",
        "X-RateLimit-Remaining-Tokens",
    )
)
METHODS = "GET, HEAD, POST, PATCH, DELETE"  # every method the route table uses
_HEADER_LIST = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")


class Cors:
    """The CORS policy of `server.cors` (built only when it lists an origin)."""

    __slots__ = ("_any", "_echo_headers", "_origins", "_preflight_headers")

    def __init__(self, cfg: CorsConfig) -> None:
        self._any = "*" in cfg.allow_origins
        self._origins = frozenset(o for o in cfg.allow_origins if o != "*")
        self._echo_headers = "*" in cfg.allow_headers  # allow whatever the preflight asks for
        self._preflight_headers = {
            "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Allow-Headers": ", ".join(h for h in cfg.allow_headers if h != "*"),
            "Access-Control-Max-Age": str(cfg.max_age_s),
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        }

    def allow_origin(self, origin: str | None) -> str | None:
        """The `Access-Control-Allow-Origin` value for a request from `origin`, or None: no CORS headers."""
        if origin is None:
            return None
        if origin in self._origins:
            return origin
        return "*" if self._any else None

    def stamp(self, origin: str | None, headers: MutableMapping[str, str]) -> None:
        allow = self.allow_origin(origin)
        if allow is None:
            return
        headers["Access-Control-Allow-Origin"] = allow
        headers["Access-Control-Expose-Headers"] = EXPOSED
        if allow != "*":  # the answer depends on the Origin: shared caches must keep one per origin
            vary = headers.get("Vary")
            if vary is None:
                headers["Vary"] = "Origin"
            elif "origin" not in vary.lower():
                headers["Vary"] = f"{vary}, Origin"

    def is_preflight(self, headers: Mapping[str, str]) -> bool:
        """An OPTIONS request is a preflight this policy answers (else it is a 405, as without CORS)."""
        return "Access-Control-Request-Method" in headers and self.allow_origin(headers.get("Origin")) is not None

    def preflight(self, headers: Mapping[str, str]) -> web.Response:
        out = dict(self._preflight_headers)
        asked = headers.get("Access-Control-Request-Headers")
        if self._echo_headers and asked and _HEADER_LIST.fullmatch(asked.strip()):
            out["Access-Control-Allow-Headers"] = asked.strip()
        return web.Response(status=204, headers=out)


class Edge:
    """Request ids and CORS, for one server (either engine)."""

    __slots__ = ("cors",)

    def __init__(self, cors: CorsConfig) -> None:
        self.cors = Cors(cors) if cors.allow_origins else None

    def stamp(self, request_headers: Mapping[str, str], headers: MutableMapping[str, str]) -> None:
        """Add the request id (and CORS headers) to a response's headers, before its head is written."""
        if REQUEST_ID not in headers:
            headers[REQUEST_ID] = request_id(request_headers, headers.get(GENERATION_HEADER))
        if self.cors is not None:
            self.cors.stamp(request_headers.get("Origin"), headers)

    # -- the aiohttp engine --

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        self.stamp(request.headers, response.headers)

    def middlewares(self) -> list[Callable[..., Awaitable[web.StreamResponse]]]:
        cors = self.cors
        if cors is None:
            return []

        @web.middleware
        async def preflight(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.method == "OPTIONS" and cors.is_preflight(request.headers):
                return cors.preflight(request.headers)
            return await handler(request)

        return [preflight]

    # -- the lean engine: a handler for its route table's misses --

    def preflight_handler(
        self, method: str, headers: Mapping[str, str]
    ) -> Callable[[Any], Awaitable[web.StreamResponse]] | None:
        cors = self.cors
        if cors is None or method != "OPTIONS" or not cors.is_preflight(headers):
            return None

        async def preflight(request: Any) -> web.StreamResponse:
            return cors.preflight(request.headers)

        return preflight


def tls_context(cfg: TlsConfig) -> ssl.SSLContext:
    """A server context for the listener: TLS 1.2 or newer, HTTP/1.1 over ALPN, the configured PEM files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except OSError as e:  # neither OpenSSL's words nor a missing file's name the file
        why = (e.reason if isinstance(e, ssl.SSLError) else e.strerror) or str(e)
        raise ValueError(f"cert-file {cfg.cert_file}, key-file {cfg.key_file}: {why}") from None
    return ctx
