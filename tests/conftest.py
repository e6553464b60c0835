"""Fixtures: fake upstreams (real servers on loopback) and the gateway served by its real runner."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml
from hypothesis import settings

from proxy.accounting.settings import AccountingConfig, StoreConfig
from proxy.config import Config, parse
from proxy.server import serve
from tests.fakes import FakeUpstream
from tests.redis_server import RedisServer, redis_server

# Hypothesis: reproducible on CI (the same examples every run, none remembered between runs; a failure prints the
# blob that replays it); locally fewer examples, new ones each run, failures remembered in .hypothesis/. A test's
# own @settings (e.g. max_examples) still wins for what it sets. HYPOTHESIS_PROFILE=ci replays a CI run locally.
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", max_examples=100, deadline=None, print_blob=True)
_ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _ON_CI else "dev"))

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> FakeUpstream:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app)  # handler_cancellation is on in test servers
    fake.base_url = str(server.make_url("/v1"))
    return fake


def gateway_config(
    upstreams: dict[str, str],
    *,
    models: dict[str, list[tuple[str, str] | tuple[str, str, dict[str, float]]]] | None = None,
    timeouts: dict[str, float] | None = None,
    server: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    probe: dict[str, Any] | None = None,
    hedge: dict[str, Any] | None = None,
    adapter: str | dict[str, str] | None = None,
) -> Config:
    """A config with one provider per upstream URL; by default model `test/gpt-4o-mini` on every provider.

    An endpoint is `(provider, upstream model)` or `(provider, upstream model, price)` with price
    `{"input": …, "output": …}`. `routing` is the routing section, `probe` applies to every provider and
    `hedge` to every model (kebab-case keys, as in proxy/config.py).
    `adapter` is every provider's adapter, or a provider name → adapter map (default: openai).
    """
    t = {"connect-s": 1.0, "first-byte-s": 2.0, "idle-s": 2.0, "total-s": 10.0, **(timeouts or {})}
    tree: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain-grace-s": 5.0, **(server or {})},
        "keys": [{"name": "test", "key": KEY}],
        "providers": [
            {
                "name": n,
                "base-url": url,
                "api-key": f"sk-upstream-{n}",
                "timeouts": t,
                **({"probe": probe} if probe is not None else {}),
                "adapter": (adapter if isinstance(adapter, str) else (adapter or {}).get(n)) or "openai",
            }
            for n, url in upstreams.items()
        ],
        "models": [
            {
                "name": name,
                "endpoints": [
                    {"provider": e[0], "model": e[1], **({"price": e[2]} if len(e) > 2 else {})}  # type: ignore[misc]
                    for e in eps
                ],
                **({"hedge": hedge} if hedge is not None else {}),
            }
            for name, eps in (models or {"test/gpt-4o-mini": [(n, "gpt-4o-mini") for n in upstreams]}).items()
        ],
    }
    if routing is not None:
        tree["routing"] = routing
    return parse(yaml.safe_dump(tree), "yaml", env={})


def in_dir(acct: AccountingConfig, directory: Path) -> AccountingConfig:
    """The config's SQLite ledger moved into a test's own directory (unless the test chose a file itself)."""
    if acct.store.kind != "sqlite" or acct.store.path != StoreConfig().path:
        return acct
    path = str(directory / f"ledger-{os.urandom(4).hex()}.db")
    return msgspec.structs.replace(acct, store=msgspec.structs.replace(acct.store, path=path))


@dataclass
class RunningGateway:
    port: int
    url: str  # base URL, e.g. http://127.0.0.1:PORT

    @property
    def v1(self) -> str:
        return self.url + "/v1"


# (upstream client, server engine). The lean engine runs with the lean client only: crossing every pair
# would add a fourth run of the suite for a pairing the first three already cover.
GATEWAY_VARIANTS = [
    pytest.param(("lean", "aiohttp"), id="lean"),
    pytest.param(("aiohttp", "aiohttp"), id="aiohttp"),
    pytest.param(("lean", "lean"), id="lean-engine"),
]


@pytest.fixture(params=GATEWAY_VARIANTS)
async def gateway(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[Config], Awaitable[RunningGateway]]]:
    """Start gateways with the production runner (head deadline, drain) inside the test's loop; every
    test using it runs once per upstream client implementation, and once more on the lean server engine."""
    client, engine = request.param
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start(cfg: Config) -> RunningGateway:
        server = msgspec.structs.replace(cfg.server, upstream_client=client, engine=engine)
        cfg = msgspec.structs.replace(cfg, server=server, accounting=in_dir(cfg.accounting, tmp_path))
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        task = asyncio.create_task(serve(cfg, on_ready=ready.set_result, stop=stop))
        running.append((stop, task))
        done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises the startup error
        port = ready.result()
        return RunningGateway(port, f"http://127.0.0.1:{port}")

    yield start
    for stop, _ in running:
        stop.set()
    for _, task in running:
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    """One redis-server for the session; tests keep apart by key prefix (see `redis_url`)."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_url(redis_session: RedisServer, request: pytest.FixtureRequest) -> tuple[str, str]:
    """(URL, a key prefix unique to this test)."""
    return redis_session.url, f"t{abs(hash(request.node.nodeid)) % 10**12}:"
