"""The `store` fixture: every contract test runs once per Store implementation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.store.base import Store
from proxy.store.sqlite import SQLiteStore


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened, empty store; closed after the test."""
    s: Store
    if request.param == "sqlite":
        s = SQLiteStore(str(tmp_path / "h.db"))
    else:
        # Skipped only while proxy/store/redis.py is missing; redis-server itself is required (tests/redis_server.py).
        redis_mod = pytest.importorskip("proxy.store.redis")
        url, prefix = request.getfixturevalue("redis_url")
        s = redis_mod.RedisStore(url, prefix=prefix)
    await s.open()
    try:
        yield s
    finally:
        await s.close()
