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

Connection caps. `ConnectionCaps` counts a worker's open client connections, in all and by client address, and
answers one over a cap with a 503 before reading anything from it (both engines, in `connection_made`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, cast

from aiohttp import web

from proxy.config import CorsConfig, ServerConfig, TlsConfig
from proxy.errors import TooManyConnections
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


UNSUPPORTED_TE = "Transfer-Encoding must be exactly `chunked`, the one transfer coding the gateway implements"


def only_chunked(values: Sequence[str]) -> bool:
    """A request's Transfer-Encoding header(s) say exactly `chunked`. Both engines refuse anything else with a
    400 and close: a coding the gateway does not implement (`gzip, chunked`) would reach the handler as the
    body, and two TE headers, or a list of codings, are how a request is framed one way by one parser and
    another way by the next (request smuggling). Called only for chunked requests, so no other pays for it."""
    return len(values) == 1 and values[0].strip().lower() == "chunked"


def _refusal(message: str) -> tuple[bytes, bytes]:
    """A 503 for a connection over a cap: its head up to the request id's value, and its body."""
    body = TooManyConnections(message).body()
    head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    return head + b"Connection: close\r\nContent-Length: %d\r\nX-Request-Id: " % len(body), body


# A refused connection's answer is followed by its end (FIN), then the client's bytes are read and dropped until
# it closes, for at most this long: long enough for a request sent on connect to arrive (and not turn the close
# into a reset that destroys the answer), short enough that refused connections do not pile up.
REFUSED_LINGER_S = 1.0
MAX_LINGERING = 1024  # refused connections lingering at once, at most; more are closed right after the answer

_OVER_TOTAL = _refusal("too many connections to this server; retry shortly")
_OVER_PEER = _refusal("too many connections from your address; close some, then retry")


def peer_key(transport: asyncio.BaseTransport) -> str:
    """What the per-address cap counts by: the client's IP address; for IPv6 its /64, the block one subscriber
    is usually given (counting single IPv6 addresses would let one client take as many as it likes)."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple) or not peer:
        return ""  # not an IP socket, or already gone: one shared bucket
    host = peer[0]
    if ":" in host and not host.startswith("::ffff:"):  # an IPv4 client on a dual-stack listener stays itself
        try:
            return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])[:8].hex() + "/64"
        except OSError:
            return host
    return host


class ConnectionCaps:
    """A worker's open client connections, in all and by client address (`peer_key`): an int and a dict, O(1)
    per connection, and the dict only when `max-connections-per-ip` is set. Each engine's connection calls
    `admit` in `connection_made` and, once admitted, `release` in `connection_lost`, so nothing leaks however a
    connection ends.

    Over a cap, the new connection is answered right away — a 503 `too_many_connections` with `Retry-After: 1`
    and `Connection: close`, written to the transport before anything is read — and ended. Why answer rather
    than only close: a bare reset looks like a network fault that clients retry at once, while an OpenAI-shaped
    503 with Retry-After makes SDKs back off and tells an operator what happened. Why not write and close at
    once: a client sends its request as soon as it connects, and closing a socket with unread input makes the
    kernel send a reset, which can destroy the answer before the client reads it (seen on uvloop, one run in
    four). So the answer is followed by a FIN (`write_eof`), what the client sends is read and dropped by the
    engine (nothing is parsed), and the connection closes when the client does, or after `REFUSED_LINGER_S`.
    Bounded: at most `MAX_LINGERING` refused connections linger at once; beyond that (a flood) they are
    closed right after the answer. A refused connection is never counted and starts no task, so it costs an
    accept, a write, a timer and a close. With TLS, a connection counts once its handshake is done (the
    protocol sees it only then).

    Why these defaults (proxy/config.py): 16,384 connections per worker is above the 10,000 concurrent streams
    one worker holds in benchmarks/streams.py (all from 127.0.0.1) and below common fd limits; the per-address
    cap is off, because on the default loopback listener (a sidecar) and behind a load balancer every client
    shares one or a few addresses. Set it where clients connect directly. Caps are per worker: with N workers
    the kernel spreads connections over them (SO_REUSEPORT), so a node takes about N times as many.
    """

    __slots__ = ("_by_peer", "_max", "_max_per_peer", "lingering", "open", "refused")

    def __init__(self, max_connections: int, max_per_peer: int | None = None) -> None:
        self._max = max_connections
        self._max_per_peer = max_per_peer or 0
        self._by_peer: dict[str, int] | None = {} if max_per_peer else None
        self.open = 0
        self.refused = 0  # connections refused so far
        self.lingering = 0  # refused connections not closed yet (their timer pending)

    @classmethod
    def of(cls, s: ServerConfig) -> ConnectionCaps:
        return cls(s.max_connections, s.max_connections_per_ip)

    def admit(self, transport: asyncio.BaseTransport) -> str | None:
        """Count a new connection and return the key to `release` it with; None: over a cap, it was answered
        503 and is closing (the caller serves nothing on it and releases nothing)."""
        if self.open >= self._max:
            return self._refuse(transport, _OVER_TOTAL)
        by_peer = self._by_peer
        if by_peer is None:
            self.open += 1
            return ""
        key = peer_key(transport)
        n = by_peer.get(key, 0)
        if n >= self._max_per_peer:
            return self._refuse(transport, _OVER_PEER)
        by_peer[key] = n + 1
        self.open += 1
        return key

    def release(self, key: str) -> None:
        self.open -= 1
        by_peer = self._by_peer
        if by_peer is not None:
            n = by_peer.pop(key, 1) - 1
            if n > 0:
                by_peer[key] = n

    def _refuse(self, transport: asyncio.BaseTransport, answer: tuple[bytes, bytes]) -> None:
        self.refused += 1
        head, body = answer
        t = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        t.write(b"%s%s\r\n\r\n%s" % (head, fresh_id().encode(), body))
        if self.lingering >= MAX_LINGERING or not t.can_write_eof():
            t.close()
            return
        t.write_eof()  # after the answer; the engine drops what still comes, and closes at the client's end
        self.lingering += 1
        asyncio.get_running_loop().call_later(REFUSED_LINGER_S, self._linger_over, t)

    def _linger_over(self, transport: asyncio.Transport) -> None:
        self.lingering -= 1
        transport.close()  # a no-op if the client closed first


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
