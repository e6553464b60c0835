"""The `store` fixture: every contract test runs once per Store implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from proxy.store.base import Store
from proxy.store.sqlite import SQLiteStore


@pytest.fixture(params=["sqlite", "redis"])
async def open_stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[], Awaitable[Store]]]:
    """Opens a store each call, every one on the same (empty) data with its own connection: another node's
    (another process's, on SQLite). All are closed after the test."""
    opened: list[Store] = []

    async def new() -> Store:
        s: Store
        if request.param == "sqlite":
            s = SQLiteStore(str(tmp_path / "h.db"))
        else:
            # Skipped only while proxy/store/redis.py is missing; redis-server itself is required
            # (tests/redis_server.py).
            redis_mod = pytest.importorskip("proxy.store.redis")
            url, prefix = request.getfixturevalue("redis_url")
            s = redis_mod.RedisStore(url, prefix=prefix)
        await s.open()
        opened.append(s)
        return s

    try:
        yield new
    finally:
        for s in opened:
            await s.close()


@pytest.fixture
async def store(open_stores: Callable[[], Awaitable[Store]]) -> Store:
    """An opened, empty store; closed after the test."""
    return await open_stores()
