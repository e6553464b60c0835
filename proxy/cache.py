"""Exact-match response cache: replay the answer to a deterministic request instead of paying for it again.

Why exact-match only: a cached answer is correct only if the upstream would have given the same one, so a request
is cached only when it asks for determinism (`temperature` 0, one choice) and only under a key that covers
everything that can change the answer. Semantic (similar-prompt) caching would trade correctness for hits.

Why it can never fail a request: the cache is an optimization. A backend error (Redis down, slow, full) is a
miss, logged at most once a minute; after a failure the backend is left alone for a moment, so an outage does
not add a timeout to every request.

Entries are the bytes the client received: the upstream JSON for a plain response, the whole SSE stream as
relayed for a streamed one (`replay_chunks` splits it back into events for the replay).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import msgspec
import orjson
from aiocache import Cache
from aiocache.serializers import NullSerializer

from proxy.structs import Base, PositiveFloat

log = logging.getLogger("hedgerow")

CACHE_HEADER = "X-Hedgerow-Cache"  # response header: one of the three values below
HIT, MISS, BYPASS = "hit", "miss", "bypass"  # bypass: not cacheable, or Cache-Control said no

# Fields that do not change the answer, left out of the key so they don't split entries: who asks (`user`,
# `safety_identifier`), bookkeeping (`metadata`, `store`), routing (`provider`: OpenRouter-style preferences;
# `service_tier`, `prompt_cache_key`: where and how fast, not what). `stream_options` is dropped only for plain
# responses: in a stream it decides whether a usage chunk is sent, so it changes the stored bytes.
IGNORED_FIELDS = ("user", "safety_identifier", "metadata", "store", "provider", "service_tier", "prompt_cache_key")

_LOG_EVERY_S = 60.0  # a Redis outage logs once a minute, not once a request
_COOLDOWN_S = 2.0  # after a backend failure, skip it this long: an outage costs one timeout, not one per request


class CacheConfig(Base):
    enabled: bool = False  # cache every model; else only models with `cache: true` or requests asking for it
    backend: Literal["memory", "redis"] = "memory"  # memory: one per worker process; redis: shared by all nodes
    redis_url: str | None = None  # redis://[user:password@]host[:port][/db], or rediss:// for TLS
    ttl_s: PositiveFloat = 300.0  # an entry lives this long after it was stored
    max_entry_bytes: Annotated[int, msgspec.Meta(ge=1)] = 1_048_576  # a larger response is served, not stored
    namespace: str = "hedgerow:cache:"  # key prefix, so gateways can share a Redis with other users
    timeout_s: PositiveFloat = 0.2  # per backend call: the most a slow or unreachable Redis adds to a request
    memory_max_bytes: Annotated[int, msgspec.Meta(ge=0)] = 256 * 1024 * 1024  # memory backend: payload bytes held

    def __post_init__(self) -> None:
        if self.backend == "redis":
            if not self.redis_url:
                raise ValueError("backend `redis` needs a `redis-url`, e.g. redis://127.0.0.1:6379/0")
            u = urlsplit(self.redis_url)
            if u.scheme not in ("redis", "rediss"):  # the URL itself is not echoed: it may hold a password
                raise ValueError(f"redis-url must start with redis:// or rediss://, not {u.scheme}://")
            u.port  # noqa: B018  # raises ValueError on a bad port: reported now, not at the first request
            db = u.path.strip("/")
            if db and not db.isdigit():
                raise ValueError(f"the redis-url path must be a database number, like /0, not {u.path!r}")


def cache_key(kind: str, model: str, body: bytes, stream: bool, *, scope: str = "") -> str | None:
    """The hex key of a cacheable request, or None when its answer may differ from one call to the next.

    Chat and completions must ask for `temperature` 0: absent means the provider default, which is 1 at OpenAI,
    so absent is not deterministic. `n` must be absent or 1. Embeddings have no sampling and are always keyed.
    The body is canonicalized (keys sorted, whitespace gone, ignored fields dropped) so that equal requests
    written differently share an entry. `scope` keeps tenants apart (e.g. the gateway key's name): without it,
    one tenant's hit would reveal that another sent the same prompt.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    if kind != "embeddings":
        # popped, not kept: they are fixed by the test, and 0 vs 0.0 must not split entries
        temperature = doc.pop("temperature", None)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature != 0:
            return None
        n = doc.pop("n", 1)
        if isinstance(n, bool) or n != 1:
            return None
    for name in IGNORED_FIELDS:
        doc.pop(name, None)
    if not stream:
        doc.pop("stream_options", None)
    h = hashlib.blake2b(digest_size=16)
    h.update(orjson.dumps((kind, model, stream, scope)))  # a JSON array: unambiguous whatever the strings hold
    h.update(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS))
    return h.hexdigest()


def cache_control(header: str | None) -> tuple[bool, bool]:
    """(lookup, store) from a request's Cache-Control: `no-cache` skips the lookup, `no-store` the storing."""
    lookup = store = True
    if header:
        for part in header.split(","):
            directive = part.partition("=")[0].strip().lower()
            if directive == "no-cache":
                lookup = False
            elif directive == "no-store":
                store = False
    return lookup, store


def replay_chunks(sse: bytes) -> list[bytes]:
    """Split a stored SSE stream into its events, each with its `\\n\\n`, to write them one by one.

    The pieces always join back into `sse`: a trailing partial event, or a stream framed otherwise (`\\r\\n`),
    is kept as it is, so a replay sends exactly the bytes that were stored.
    """
    chunks: list[bytes] = []
    start = 0
    while (end := sse.find(b"\n\n", start)) != -1:
        chunks.append(sse[start : end + 2])
        start = end + 2
    if start < len(sse):
        chunks.append(sse[start:])
    return chunks


def _backend(cfg: CacheConfig) -> Any:
    # No aiocache namespace: its Redis backend inserts ":" after it; we prefix keys ourselves, alike everywhere.
    if cfg.backend == "memory":
        return Cache(Cache.MEMORY, timeout=None)  # cannot hang, and wait_for would cost a task per call
    if Cache.REDIS is None:  # aiocache registers its Redis backend only if `redis` imports
        raise ImportError("cache backend `redis` needs the `redis` package: pip install 'redis>=5'")
    u = urlsplit(cfg.redis_url or "")
    pool_kwargs = {"username": unquote(u.username)} if u.username else {}
    return Cache(
        Cache.REDIS,
        endpoint=u.hostname or "127.0.0.1",
        port=u.port or 6379,
        db=int(u.path.strip("/") or 0),
        password=unquote(u.password) if u.password else None,
        ssl=u.scheme == "rediss",
        connection_pool_kwargs=pool_kwargs,
        serializer=NullSerializer(encoding=None),  # bytes in, bytes out (the default JSON serializer can't)
        create_connection_timeout=cfg.timeout_s,
        timeout=cfg.timeout_s,  # aiocache wraps every call in wait_for(timeout): redis-py's own retries included
    )


class ResponseCache:
    """aiocache behind get/put that never raise: an unusable backend is a miss."""

    __slots__ = (
        "_backend",
        "_clock",
        "_down_until",
        "_failures",
        "_live",
        "_live_bytes",
        "_logged_at",
        "_max_entry",
        "_max_live",
        "_ns",
        "_ttl_s",
    )

    def __init__(self, cfg: CacheConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._backend = _backend(cfg)
        self._ns = cfg.namespace
        self._ttl_s = cfg.ttl_s
        self._max_entry = cfg.max_entry_bytes
        self._clock = clock
        self._down_until = float("-inf")
        self._logged_at = float("-inf")
        self._failures = 0  # since the last log line
        # aiocache's memory backend has no size bound (entries leave only by TTL), so we count what it holds:
        # one (expiry, size) per put, in expiry order since the TTL is fixed. A key stored twice is counted
        # twice until the first expires: an overestimate, which errs on the side of storing less.
        self._max_live = cfg.memory_max_bytes if cfg.backend == "memory" else -1  # -1: none (Redis has maxmemory)
        self._live: deque[tuple[float, int]] = deque()
        self._live_bytes = 0

    async def get(self, key: str) -> bytes | None:
        if self._clock() < self._down_until:
            return None
        try:
            value = await self._backend.get(self._ns + key)
        except Exception as e:  # never fail a request over the cache; CancelledError still propagates
            self._failed("get", e)
            return None
        return value if isinstance(value, bytes) else None

    async def put(self, key: str, value: bytes | bytearray) -> bool:
        """Store an entry; False when it was not stored (too large, memory bound reached, backend down)."""
        size = len(value)
        if size > self._max_entry:
            return False
        now = self._clock()
        if now < self._down_until:
            return False
        if self._max_live >= 0 and not self._reserve(now, size):
            return False
        try:
            # bytes(): a bytearray the caller keeps filling must not change the stored entry
            await self._backend.set(self._ns + key, bytes(value), ttl=self._ttl_s)
        except Exception as e:
            self._failed("put", e)
            return False
        return True

    async def close(self) -> None:
        try:
            await self._backend.close()
        except Exception as e:
            log.warning("response cache: close failed: %r", e)

    def _reserve(self, now: float, size: int) -> bool:
        live = self._live
        while live and live[0][0] <= now:
            self._live_bytes -= live.popleft()[1]
        if self._live_bytes + size > self._max_live:
            return False
        live.append((now + self._ttl_s, size))
        self._live_bytes += size
        return True

    def _failed(self, op: str, e: Exception) -> None:
        now = self._clock()
        self._down_until = now + _COOLDOWN_S
        self._failures += 1
        if now - self._logged_at >= _LOG_EVERY_S:
            log.warning(
                "response cache unavailable (%s: %r); serving without it, %d failure(s) since the last report",
                op,
                e,
                self._failures,
            )
            self._logged_at = now
            self._failures = 0
