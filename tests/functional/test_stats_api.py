"""The stats API (proxy/insights/stats.py) on a running gateway: live endpoint stats after real traffic, rankings
and activity over records written straight into the real store (SQLite or Redis) at chosen times, and who may
read what."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml

from proxy.config import Config, parse
from proxy.store import open_store
from proxy.store.base import DAY_S, GenerationRecord, Store
from proxy.store.sqlite import SQLiteStore
from tests.billing import BillingUpstream
from tests.conftest import RunningGateway
from tests.functional.test_ledger import running

ALICE = "sk-alice-0123456789"  # org_a
BOB = "sk-bob-0123456789"  # org_b
OPS = "sk-ops-0123456789"  # a provisioning (admin) key
PRICE_A = {"input": 2.5, "output": 10.0}
PRICE_B = {"input": 0.15, "output": 0.6}


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def stats_config(urls: dict[str, str], store: dict[str, Any]) -> Config:
    """`bill/m` on provider a alone (no hedges: every request is one attempt), `bill/n` on b then a."""
    tree = {
        "server": {"host": "127.0.0.1", "port": 0, "drain-grace-s": 5.0},
        "keys": [
            {"name": "alice", "key": ALICE, "org": "org_a"},
            {"name": "bob", "key": BOB, "org": "org_b"},
            {"name": "ops", "key": OPS, "admin": True},
        ],
        "accounting": {"store": store, "flush-interval-s": 0.1, "orgs": [{"id": "org_a"}, {"id": "org_b"}]},
        "providers": [
            {"name": n, "base-url": url, "api-key": f"sk-upstream-{n}", "probe": {"enabled": False}}
            for n, url in urls.items()
        ],
        "models": [
            {"name": "bill/m", "endpoints": [{"provider": "a", "model": "m-a", "price": PRICE_A}]},
            {
                "name": "bill/n",
                "endpoints": [
                    {"provider": "b", "model": "m-b", "price": PRICE_B},
                    {"provider": "a", "model": "m-a", "price": PRICE_A},
                ],
            },
        ],
    }
    return parse(yaml.safe_dump(tree), "yaml", env={})


@pytest.fixture
async def upstreams(aiohttp_server: Any) -> dict[str, str]:
    urls = {}
    for name in ("a", "b"):
        fake = BillingUpstream(name)
        urls[name] = str((await aiohttp_server(fake.app)).make_url("/v1"))
    return urls


@pytest.fixture(params=["sqlite", "redis"])
def store_cfg(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    if request.param == "sqlite":
        return {"kind": "sqlite", "path": str(tmp_path / "stats.db")}
    url, prefix = request.getfixturevalue("redis_url")
    return {"kind": "redis", "url": url, "prefix": prefix}


@pytest.fixture
async def direct(store_cfg: dict[str, Any]) -> AsyncIterator[Store]:
    """The gateway's store, opened by the test (another process's connection, on SQLite)."""
    cfg = stats_config({"a": "http://127.0.0.1:9/v1", "b": "http://127.0.0.1:9/v1"}, store_cfg)
    store = open_store(cfg.accounting.store)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def get(http: aiohttp.ClientSession, url: str, secret: str | None = ALICE) -> tuple[int, Any]:
    async with http.get(url, headers=auth(secret) if secret else {}) as r:
        return r.status, await r.json()


async def chat(http: aiohttp.ClientSession, base: str, secret: str, model: str, text: str) -> None:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}], "stream": "stream" in text}
    async with http.post(base + "/v1/chat/completions", json=body, headers=auth(secret)) as r:
        assert r.status == 200, await r.text()
        await r.read()


# ---------------------------------------------------------------- /api/v1/models


async def test_models_carry_each_endpoints_live_stats(
    gateway: Callable[[Config], Awaitable[RunningGateway]],
    upstreams: dict[str, str],
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    gw = await gateway(stats_config(upstreams, {"path": str(tmp_path / "models.db")}))
    status, before = await get(http, gw.url + "/api/v1/models")
    assert status == 200
    [m0, _] = before["data"]
    assert [e["requests_5m"] for e in m0["endpoints"]] == [0]
    assert m0["endpoints"][0]["ttft_ms"] == {"p50": None, "p90": None, "p99": None}  # no samples yet

    sent = 25  # more than the monitor's minimum of samples for a quantile (20)
    for i in range(sent):
        await chat(http, gw.url, ALICE, "bill/m", f"request {i} {'stream' if i % 2 else 'plain'}")

    # An attempt is counted as it ends, maybe just after the client has the answer; quantiles are merged again
    # at most once a second (health/window.py, QUANTILE_REFRESH_S), and the first look above merged none.
    async with asyncio.timeout(5):
        while True:
            status, body = await get(http, gw.url + "/api/v1/models")
            assert status == 200
            [m, n] = body["data"]
            if m["endpoints"][0]["requests_5m"] == sent and m["endpoints"][0]["ttft_ms"]["p50"] is not None:
                break
            await asyncio.sleep(0.05)

    # the /v1/models entry, field for field, plus the endpoints
    status, plain = await get(http, gw.url + "/v1/models")
    assert status == 200
    assert [{k: v for k, v in e.items() if k != "endpoints"} for e in body["data"]] == plain["data"]
    assert all("endpoints" not in e for e in plain["data"])

    assert m["id"] == "bill/m" and n["id"] == "bill/n"
    [a] = m["endpoints"]
    assert a["provider"] == "a" and a["endpoint"] == "a/m-a"
    assert a["pricing"]["prompt"] == "0.0000025" and a["pricing"]["completion"] == "0.00001"
    assert a["status"] == "healthy"
    assert (a["requests_5m"], a["errors_5m"]) == (sent, 0)
    assert a["uptime"] == {"5m": 1.0, "30m": 1.0, "1d": 1.0}
    for kind in ("ttft_ms", "latency_ms"):
        assert set(a[kind]) == {"p50", "p90", "p99"}
        assert 0 < a[kind]["p50"] <= a[kind]["p90"] <= a[kind]["p99"] < 5000
    assert a["ttft_ms"]["p50"] <= a["latency_ms"]["p99"]
    assert "throughput_tps" in a and "context_length" in a

    # bill/n: b first, then a — the same endpoint record as bill/m's (health is per endpoint)
    assert [(e["provider"], e["endpoint"]) for e in n["endpoints"]] == [("b", "b/m-b"), ("a", "a/m-a")]
    b = n["endpoints"][0]
    assert b["pricing"]["prompt"] == "0.00000015"
    assert (b["requests_5m"], b["errors_5m"], b["status"]) == (0, 0, "healthy")
    assert b["uptime"] == {"5m": None, "30m": None, "1d": None}
    assert b["ttft_ms"]["p50"] is None and b["latency_ms"]["p99"] is None
    assert n["endpoints"][1]["requests_5m"] == sent

    # an admin key may read it too; no key, a bad key, may not
    assert (await get(http, gw.url + "/api/v1/models", OPS))[0] == 200
    status, err = await get(http, gw.url + "/api/v1/models", None)
    assert status == 401 and err["error"]["type"] == "authentication_error"
    assert (await get(http, gw.url + "/api/v1/models", "sk-nope-0123456789"))[0] == 401


# ---------------------------------------------------------------- rankings and activity


def today() -> float:
    """Midnight UTC starting today. (A test run across midnight could see two days: not worth guarding.)"""
    return time.time() // DAY_S * DAY_S


def rec(gen_id: str, model: str, created: float, prompt: int, completion: int, key: str = "alice", org: str = "org_a"):
    return GenerationRecord(
        id=gen_id,
        key_id=key,
        org=org,
        model=model,
        created=created,
        status=200 if prompt else 404,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=prompt // 4,
        reasoning_tokens=completion // 5,
        cost=(prompt + completion) / 1000,  # exact in binary for these counts: sums compare with ==
        fee=completion / 1000,
    )


def ranking_records(t0: float) -> list[GenerationRecord]:
    """Today (t0 is its midnight), yesterday, 2, 10 and 40 days ago; across keys and organisations."""
    d = DAY_S
    return [
        # today
        rec("y1", "rank/y", t0, 3000, 500, key="bob", org="org_b"),
        rec("y2", "rank/y", t0 + 1, 1000, 500, key="carol"),
        rec("x1", "rank/x", t0, 1000, 500),
        rec("x2", "rank/x", t0, 500, 250),
        rec("x3", "rank/x", t0, 500, 250, key="bob", org="org_b"),
        rec("z1", "rank/z", t0, 750, 250),
        rec("n1", "bill/n", t0, 0, 0),  # served here, failed: shown with 0 tokens
        rec("u1", "made/up", t0, 0, 0),  # a name a client made up: never shown
        # yesterday
        rec("x4", "rank/x", t0 - d + 60, 800, 200),
        rec("z2", "rank/z", t0 - d + 60, 1500, 500, key="bob", org="org_b"),
        rec("w1", "rank/w", t0 - 1, 250, 250),
        # 2 days ago: in this week, in no day period compared here
        rec("z3", "rank/z", t0 - 2 * d, 90000, 10000, key="carol"),
        # 10 days ago: the week before this one
        rec("x5", "rank/x", t0 - 10 * d, 5000, 1000),
        # 40 days ago: the month before this one
        rec("y3", "rank/y", t0 - 40 * d, 4000, 0, key="bob", org="org_b"),
    ]


def board(body: dict[str, Any]) -> list[tuple[str, int, int, int, int, float | None]]:
    return [
        (
            r["model"],
            r["requests"],
            r["total_tokens"],
            r["previous"]["requests"],
            r["previous"]["total_tokens"],
            r["trend"],
        )
        for r in body["data"]
    ]


async def test_rankings_order_models_by_tokens_with_the_trend(
    gateway: Callable[[Config], Awaitable[RunningGateway]],
    upstreams: dict[str, str],
    store_cfg: dict[str, Any],
    direct: Store,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway(stats_config(upstreams, store_cfg))
    t0 = today()
    await direct.write_generations(ranking_records(t0))
    url = gw.url + "/api/v1/rankings"

    status, day = await get(http, url)
    assert status == 200
    assert day["period"] == "day"
    assert (day["start"], day["end"]) == (iso(t0), iso(t0 + DAY_S))  # today, so far
    assert board(day) == [
        ("rank/y", 2, 5000, 0, 0, None),
        ("rank/x", 3, 3000, 1, 1000, 2.0),
        ("rank/z", 1, 1000, 1, 2000, -0.5),
        ("bill/n", 1, 0, 0, 0, None),
    ]
    y = day["data"][0]
    assert (y["prompt_tokens"], y["completion_tokens"], y["cost"]) == (4000, 1000, 5.0)
    assert [r["share"] for r in day["data"]] == pytest.approx([5 / 9, 3 / 9, 1 / 9, 0.0])
    assert set(y) == {
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost",
        "share",
        "previous",
        "trend",
    }
    text = str(day)
    assert "alice" not in text and "bob" not in text and "carol" not in text and "org_" not in text
    assert (await get(http, url + "?period=day", BOB))[1] == day  # any key sees the same board

    status, week = await get(http, url + "?period=week", OPS)
    assert status == 200 and week["period"] == "week"
    assert (week["start"], week["end"]) == (iso(t0 - 6 * DAY_S), iso(t0 + DAY_S))
    assert board(week) == [
        ("rank/z", 3, 103000, 0, 0, None),
        ("rank/y", 2, 5000, 0, 0, None),
        ("rank/x", 4, 4000, 1, 6000, pytest.approx(4000 / 6000 - 1)),
        ("rank/w", 1, 500, 0, 0, None),
        ("bill/n", 1, 0, 0, 0, None),
    ]

    status, month = await get(http, url + "?period=month")
    assert status == 200
    assert [(r["model"], r["total_tokens"], r["previous"]["total_tokens"]) for r in month["data"]] == [
        ("rank/z", 103000, 0),
        ("rank/x", 10000, 0),
        ("rank/y", 5000, 4000),
        ("rank/w", 500, 0),
        ("bill/n", 0, 0),
    ]
    assert month["data"][2]["trend"] == 0.25

    status, err = await get(http, url + "?period=year")
    assert status == 400 and err["error"]["param"] == "period"
    assert (await get(http, url, None))[0] == 401


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def expected(records: list[GenerationRecord], since: float, key: str | None = None, org: str | None = None):
    """The activity rows by hand: records created at or after `since` (a midnight), per day and model."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r.created < since or (key is not None and r.key_id != key) or (org is not None and r.org != org):
            continue
        day = time.strftime("%Y-%m-%d", time.gmtime(r.created))
        row = rows.setdefault(
            (day, r.model),
            {
                "day": day,
                "model": r.model,
                "requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "cached_tokens": 0,
                "reasoning_tokens": 0,
                "cost": 0.0,
                "fee": 0.0,
            },
        )
        row["requests"] += 1
        for f in ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "cost", "fee"):
            row[f] += getattr(r, f)
    return [rows[k] for k in sorted(rows)]


async def test_activity_is_the_callers_own_unless_an_admin_asks(
    gateway: Callable[[Config], Awaitable[RunningGateway]],
    upstreams: dict[str, str],
    store_cfg: dict[str, Any],
    direct: Store,
    http: aiohttp.ClientSession,
) -> None:
    gw = await gateway(stats_config(upstreams, store_cfg))
    t0 = today()
    records = ranking_records(t0)
    await direct.write_generations(records)
    url = gw.url + "/api/v1/activity"
    month = t0 - 29 * DAY_S  # days=30: the 30 days ending today

    # a key sees its own, whatever else it asks for that is its own
    status, own = await get(http, url)
    assert status == 200
    assert own["data"] == expected(records, month, key="alice")
    assert (own["start"], own["end"]) == (iso(month), iso(t0 + DAY_S))
    assert (await get(http, url + "?key=alice"))[1] == own
    assert (await get(http, url + "?org=org_a"))[1] == own  # its organisation's name: still its own key only
    status, bobs = await get(http, url + "?days=400", BOB)
    assert bobs["data"] == expected(records, t0 - 399 * DAY_S, key="bob")
    assert len(bobs["data"]) == 4  # the record of 40 days ago too

    # days
    assert (await get(http, url + "?days=1"))[1]["data"] == expected(records, t0, key="alice")
    ten, eleven = (await get(http, url + "?days=10"))[1]["data"], (await get(http, url + "?days=11"))[1]["data"]
    assert ten == expected(records, t0 - 9 * DAY_S, key="alice")
    assert eleven == expected(records, t0 - 10 * DAY_S, key="alice") == [eleven[0], *ten]  # + 10 days ago
    assert eleven[0]["day"] == time.strftime("%Y-%m-%d", time.gmtime(t0 - 10 * DAY_S))
    for bad in ("0", "401", "-3", "x", "1.5"):
        status, err = await get(http, url + f"?days={bad}")
        assert status == 400 and err["error"]["param"] == "days", bad

    # someone else's: 403
    for query in ("?key=bob", "?org=org_b", "?key=alice&org=org_b"):
        status, err = await get(http, url + query)
        assert status == 403 and err["error"]["type"] == "permission_error", query

    # an admin: everything, one key, one organisation, not both at once
    status, everything = await get(http, url, OPS)
    assert status == 200 and everything["data"] == expected(records, month)
    assert (await get(http, url + "?key=carol", OPS))[1]["data"] == expected(records, month, key="carol")
    assert (await get(http, url + "?org=org_a", OPS))[1]["data"] == expected(records, month, org="org_a")
    assert (await get(http, url + "?org=org_b&days=400", OPS))[1]["data"] == expected(
        records, t0 - 399 * DAY_S, org="org_b"
    )
    assert (await get(http, url + "?key=nobody", OPS))[1]["data"] == []
    assert (await get(http, url + "?key=bob&org=org_b", OPS))[0] == 400

    assert (await get(http, url, None))[0] == 401
    assert (await get(http, url, "sk-nope-0123456789"))[0] == 401

    # real traffic: in the activity once the ledger has flushed (every 0.1 s here)
    for i in range(3):
        await chat(http, gw.url, ALICE, "bill/m", f"activity {i}")
    async with asyncio.timeout(5):
        while not any(
            r["model"] == "bill/m" and r["requests"] == 3 for r in (await get(http, url + "?days=1"))[1]["data"]
        ):
            await asyncio.sleep(0.05)
    [served] = [r for r in (await get(http, url + "?days=1"))[1]["data"] if r["model"] == "bill/m"]
    assert served["prompt_tokens"] > 0 and served["cost"] > 0
    status, bobs_today = await get(http, url + "?days=1", BOB)
    assert all(r["model"] != "bill/m" for r in bobs_today["data"])


async def test_activity_of_a_stopped_gateways_traffic(
    upstreams: dict[str, str], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """What a gateway served is in the aggregates after a graceful stop (its last flush), read by the next."""
    cfg = stats_config(upstreams, {"path": str(tmp_path / "stop.db")})
    async with running(cfg) as url:
        for i in range(4):
            await chat(http, url, BOB, "bill/n", f"before the stop {i}")
    store = SQLiteStore(str(tmp_path / "stop.db"))
    await store.open()
    try:
        [day] = await store.usage_by_day(today(), today() + DAY_S, key_id="bob")
        assert (day.model, day.requests) == ("bill/n", 4)
        assert await store.usage_by_day(today(), today() + DAY_S, key_id="alice") == []
    finally:
        await store.close()
    async with running(cfg) as url:
        status, body = await get(http, url + "/api/v1/activity", BOB)
        assert status == 200 and [(r["model"], r["requests"]) for r in body["data"]] == [("bill/n", 4)]
        status, body = await get(http, url + "/api/v1/rankings")
        assert status == 200 and [(r["model"], r["requests"]) for r in body["data"]] == [("bill/n", 4)]


async def test_without_accounting_only_the_model_list_is_served(
    gateway: Callable[[Config], Awaitable[RunningGateway]], upstreams: dict[str, str], http: aiohttp.ClientSession
) -> None:
    cfg = stats_config(upstreams, {"path": "unused.db"})
    cfg = msgspec.structs.replace(cfg, accounting=msgspec.structs.replace(cfg.accounting, enabled=False))
    gw = await gateway(cfg)
    status, body = await get(http, gw.url + "/api/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["bill/m", "bill/n"]
    for path in ("/api/v1/rankings", "/api/v1/activity"):
        assert (await get(http, gw.url + path))[0] == 404
