"""Response cache: keys only for deterministic requests, Cache-Control, aiocache round trips, failures as misses."""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import msgspec
import orjson
import pytest
from aiocache import Cache

from proxy.cache import CacheConfig, ResponseCache, cache_control, cache_key, replay_chunks

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a hedge?"}]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def body(**fields: object) -> bytes:
    return orjson.dumps({"model": "m", "messages": MESSAGES, "temperature": 0, **fields})


def key(b: bytes, stream: bool = False, kind: str = "chat", **kw: str) -> str | None:
    return cache_key(kind, "test/m", b, stream, **kw)


# --- keys -----------------------------------------------------------------------------------------------------


def test_key_ignores_key_order_and_whitespace():
    compact = b'{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}],"max_tokens":5}'
    spaced = (
        b'{ "max_tokens": 5,\n  "messages": [ {"content": "hi", "role": "user"} ],\n "model": "m", "temperature": 0.0 }'
    )
    k = key(compact)
    assert k is not None and len(k) == 32 and int(k, 16) >= 0
    assert key(spaced) == k


def test_streamed_and_plain_responses_get_separate_entries():
    b = body(stream=True)
    assert key(b, stream=True) is not None
    assert key(b, stream=True) != key(b, stream=False)


def test_non_deterministic_requests_have_no_key():
    assert key(body(temperature=1)) is None
    assert key(body(temperature=0.2)) is None
    assert key(orjson.dumps({"model": "m", "messages": MESSAGES})) is None  # absent = provider default, 1
    assert key(body(temperature=False)) is None  # a bool is not a temperature
    assert key(body(n=2)) is None
    assert key(body(n=1)) == key(body())


def test_fields_that_do_not_change_the_answer_do_not_split_entries():
    plain = key(body())
    assert key(body(user="alice", metadata={"trace": "1"}, provider={"order": ["a"]}, store=True)) == plain
    assert key(body(stream_options={"include_usage": True})) == plain  # irrelevant without a stream


def test_stream_options_split_streamed_entries():
    # include_usage adds a usage chunk: the stored stream differs
    with_usage = key(body(stream=True, stream_options={"include_usage": True}), stream=True)
    assert with_usage != key(body(stream=True), stream=True)


def test_what_changes_the_answer_changes_the_key():
    base = key(body())
    assert key(body(max_tokens=10)) != base
    assert key(body(messages=[*MESSAGES, {"role": "user", "content": "and?"}])) != base
    assert cache_key("chat", "test/other", body(), False) != base
    assert cache_key("completions", "test/m", body(), False) != base
    assert key(body(), scope="tenant-a") != key(body(), scope="tenant-b")


def test_embeddings_are_keyed_without_a_temperature():
    assert key(orjson.dumps({"model": "e", "input": "hello"}), kind="embeddings") is not None


def test_bodies_that_are_not_json_objects_have_no_key():
    assert key(b"not json") is None
    assert key(b"[1, 2]") is None


# --- Cache-Control, replay ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (True, True)),
        ("", (True, True)),
        ("no-cache", (False, True)),
        ("no-store", (True, False)),
        ("No-Cache, NO-STORE", (False, False)),
        ("max-age=0,no-store", (True, False)),
        ("private, no-cache=foo", (False, True)),
        ("no-caches", (True, True)),  # a different directive, not a prefix match
    ],
)
def test_cache_control_decides_lookup_and_store(header: str | None, expected: tuple[bool, bool]):
    assert cache_control(header) == expected


def test_replay_splits_a_stored_stream_into_events():
    events = [b'data: {"a":1}\n\n', b": keep-alive\n\n", b'data: {"b":2}\n\n', b"data: [DONE]\n\n"]
    sse = b"".join(events)
    assert replay_chunks(sse) == events
    assert replay_chunks(b"") == []


def test_replay_keeps_every_byte_of_an_unterminated_tail():
    sse = b"data: 1\n\ndata: 2\n"
    assert replay_chunks(sse) == [b"data: 1\n\n", b"data: 2\n"]
    assert b"".join(replay_chunks(b"data: x\r\n\r\ndata: y\n\n")) == b"data: x\r\n\r\ndata: y\n\n"


# --- config ---------------------------------------------------------------------------------------------------


def test_redis_backend_needs_a_redis_url():
    with pytest.raises(msgspec.ValidationError, match="redis-url"):
        msgspec.convert({"backend": "redis"}, CacheConfig)
    with pytest.raises(msgspec.ValidationError, match="redis://"):
        msgspec.convert({"backend": "redis", "redis-url": "http://127.0.0.1:6379"}, CacheConfig)
    with pytest.raises(msgspec.ValidationError, match="database number"):
        msgspec.convert({"backend": "redis", "redis-url": "redis://cache:6379/cache"}, CacheConfig)
    with pytest.raises(msgspec.ValidationError, match=r"[Pp]ort"):
        msgspec.convert({"backend": "redis", "redis-url": "redis://cache:99999"}, CacheConfig)
    cfg = msgspec.convert({"backend": "redis", "redis-url": "redis://cache:6379/1", "ttl-s": 60}, CacheConfig)
    assert cfg.ttl_s == 60 and not cfg.enabled


# --- memory backend -------------------------------------------------------------------------------------------


async def test_memory_backend_round_trip():
    cache = ResponseCache(CacheConfig())
    try:
        assert await cache.get("k1") is None
        assert await cache.put("k1", b'{"id":"chatcmpl-1"}')
        assert await cache.get("k1") == b'{"id":"chatcmpl-1"}'
        buf = bytearray(b"data: 1\n\n")
        await cache.put("k2", buf)
        buf += b"data: 2\n\n"  # the caller keeps using its buffer
        assert await cache.get("k2") == b"data: 1\n\n"
    finally:
        await cache.close()


async def test_memory_entries_expire_after_ttl():
    cache = ResponseCache(CacheConfig(ttl_s=0.2))
    try:
        await cache.put("k", b"v")
        assert await cache.get("k") == b"v"
        await asyncio.sleep(0.25)
        assert await cache.get("k") is None
    finally:
        await cache.close()


async def test_entries_over_max_entry_bytes_are_not_stored():
    cache = ResponseCache(CacheConfig(max_entry_bytes=10))
    try:
        assert not await cache.put("big", b"x" * 11)
        assert await cache.get("big") is None
        assert await cache.put("small", b"x" * 10)
        assert await cache.get("small") == b"x" * 10
    finally:
        await cache.close()


async def test_memory_backend_stops_storing_at_memory_max_bytes_until_entries_expire():
    clock = FakeClock()
    cache = ResponseCache(CacheConfig(memory_max_bytes=1000, ttl_s=300), clock=clock)
    try:
        assert await cache.put("a", b"x" * 400)
        assert await cache.put("b", b"x" * 400)
        assert not await cache.put("c", b"x" * 400)
        clock.t += 300
        assert await cache.put("c", b"x" * 400)  # a and b have expired: their bytes count no more
    finally:
        await cache.close()


# --- failures -------------------------------------------------------------------------------------------------


async def test_backend_failures_are_misses_logged_once_a_minute(caplog: pytest.LogCaptureFixture):
    clock = FakeClock()
    cache = ResponseCache(CacheConfig(), clock=clock)
    calls = 0

    async def down(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("connection refused")

    cache._backend.get = down  # type: ignore[method-assign]  # stands in for an unreachable Redis
    cache._backend.set = down  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="hedgerow"):
        assert await cache.get("k") is None
        assert await cache.get("k") is None  # within the cooldown: the backend is not asked again
        assert calls == 1
        for _ in range(5):  # 50 s: past each cooldown, still within the minute
            clock.t += 5
            assert await cache.get("k") is None
            clock.t += 5
            assert not await cache.put("k", b"v")
        assert calls == 11
        clock.t += 60
        assert await cache.get("k") is None
    warnings = [r for r in caplog.records if "response cache unavailable" in r.getMessage()]
    assert len(warnings) == 2
    assert "11 failure(s)" in warnings[1].getMessage()  # the suppressed ones are counted, not lost


async def test_redis_down_is_a_fast_miss():
    pytest.importorskip("redis", reason="the `redis` package (needed by aiocache's Redis backend) is not installed")
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = FakeClock()
    cache = ResponseCache(
        CacheConfig(backend="redis", redis_url=f"redis://127.0.0.1:{port}/0", timeout_s=0.2), clock=clock
    )
    try:
        t0 = time.perf_counter()
        assert await cache.get("k") is None
        clock.t += 10  # past the cooldown, so put really tries the backend
        assert not await cache.put("k", b"v")
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.5, f"a dead Redis cost {elapsed:.3f}s"
    finally:
        await cache.close()


def test_redis_backend_without_the_redis_package_says_what_to_install():
    if Cache.REDIS is not None:
        pytest.skip("the `redis` package is installed")
    with pytest.raises(ImportError, match="pip install"):
        ResponseCache(CacheConfig(backend="redis", redis_url="redis://127.0.0.1:6379/0"))
