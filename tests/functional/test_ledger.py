"""The ledger is exact: what the gateway records equals what the upstreams reported, priced by hand.

A few thousand mixed requests (plain, tool calls, streamed, cached prompts, reasoning, cancelled mid-stream,
hedged) go through a real gateway to two billing fakes (tests/billing.py), which add up every usage they
reported. After a graceful stop, every generation is read back from the SQLite ledger.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml

from proxy.config import Config, parse
from proxy.server import serve
from proxy.store.sqlite import SQLiteStore
from tests.billing import BillingUpstream
from tests.conftest import AUTH, KEY

PRICES = {
    "a": {"input": 2.5, "output": 10.0, "cache-read": 1.25, "reasoning": 12.0},
    "b": {"input": 0.15, "output": 0.6, "cache-read": 0.075},
}


def expected_cost(u: dict[str, int], p: dict[str, float]) -> float:
    """Written out by hand, apart from proxy/accounting/usage.py: cached prompt tokens at the cache price,
    the rest at the input price; reasoning at its own price where there is one, else at the output price."""
    cache_read = p.get("cache-read", p["input"])
    reasoning = p.get("reasoning", p["output"])
    prompt = (u["prompt"] - u["cached"]) * p["input"] + u["cached"] * cache_read
    completion = (u["completion"] - u["reasoning"]) * p["output"] + u["reasoning"] * reasoning
    return (prompt + completion) / 1e6


def billing_config(urls: dict[str, str], db: str, **accounting: Any) -> Config:
    tree = {
        "server": {"host": "127.0.0.1", "port": 0, "drain-grace-s": 5.0},
        "keys": [{"name": "test", "key": KEY}],
        "accounting": {"store": {"path": db}, **accounting},
        "providers": [
            {"name": n, "base-url": url, "api-key": f"sk-upstream-{n}", "probe": {"enabled": False}}
            for n, url in urls.items()
        ],
        "models": [
            {
                "name": "bill/m",
                "endpoints": [{"provider": n, "model": f"m-{n}", "price": PRICES[n]} for n in urls],
                # Well above any answer time but the "slow" ones' (2-3 s), even on a loaded machine: a hedge whose
                # loser had already answered in full is billed by that upstream yet unknowable to the gateway
                # (it stopped reading), which the exact comparisons of these tests cannot allow for.
                "hedge": {"delay-s": 1.0, "budget": 1.0},
            }
        ],
        "routing": {"retry-budget": 10},
    }
    return parse(yaml.safe_dump(tree), "yaml", env={})


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[str]:
    """A gateway served by the production runner; stopped gracefully (ledger flushed) on exit."""
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(cfg, on_ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield f"http://127.0.0.1:{ready.result()}"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def _one(http: aiohttp.ClientSession, url: str, i: int, kind: str) -> str:
    text = f"request {i} {kind}"
    body: dict[str, Any] = {"model": "bill/m", "messages": [{"role": "user", "content": text}]}
    if kind in ("stream", "cancel", "slow stream"):
        body["stream"] = True
    async with http.post(url + "/v1/chat/completions", json=body, headers=AUTH) as r:
        gen_id = r.headers["X-Hedgerow-Generation-Id"]
        assert r.status == 200, await r.text()
        if kind == "cancel":
            await r.content.readuntil(b"Hello")  # a content chunk arrived: the stream is committed
            r.close()  # the client leaves mid-stream
        else:
            await r.read()
    return gen_id


@pytest.mark.timeout(300)
async def test_ledger_matches_the_upstreams_reported_usage_to_a_millionth_of_a_cent(aiohttp_server, tmp_path):
    fakes = {"a": BillingUpstream("a", slow_s=3.0), "b": BillingUpstream("b", slow_s=0.0)}
    for fake in fakes.values():
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    db = str(tmp_path / "ledger.db")
    cfg = billing_config({n: f.base_url for n, f in fakes.items()}, db)
    rng = random.Random(7)
    kinds = ["plain"] * 35 + ["tools"] * 10 + ["stream"] * 35 + ["cancel"] * 10 + ["slow stream"] * 10
    plan = [rng.choice(kinds) for _ in range(2000)]
    ids: dict[str, str] = {}
    async with running(cfg) as url, aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(24)

        async def go(i: int, kind: str) -> None:
            async with sem:
                ids[await _one(http, url, i, kind)] = kind

        await asyncio.gather(*(go(i, k) for i, k in enumerate(plan)))
    assert len(ids) == len(plan)  # generation ids are unique

    store = SQLiteStore(db)
    await store.open()
    try:
        assert await store.count_generations() == len(plan)  # every request, cancelled ones included
        records = {gen_id: await store.get_generation(gen_id) for gen_id in ids}
    finally:
        await store.close()

    # tokens by kind, per serving provider, equal what that provider reported
    for name, fake in fakes.items():
        mine = [r for r in records.values() if r is not None and r.provider == name and r.prompt_tokens]
        got = {
            "requests": len(mine),
            "prompt": sum(r.prompt_tokens for r in mine),
            "completion": sum(r.completion_tokens for r in mine),
            "cached": sum(r.cached_tokens for r in mine),
            "reasoning": sum(r.reasoning_tokens for r in mine),
        }
        rep = fake.reported
        want = {
            "requests": rep.requests,
            "prompt": rep.prompt,
            "completion": rep.completion,
            "cached": rep.cached,
            "reasoning": rep.reasoning,
        }
        assert got == want, name
    # costs: the ledger's sum equals the reported usage priced by hand, to 1e-8 USD
    recorded = sum(r.cost for r in records.values() if r is not None)
    priced = sum(expected_cost(u, PRICES[n]) for n, f in fakes.items() for u in f.reported.usages)
    assert recorded == pytest.approx(priced, abs=1e-8)
    assert priced > 0.1  # a meaningful sum, not zeros matching zeros
    assert all(r is not None and r.fee == 0.0 for r in records.values())

    by_kind: dict[str, list[Any]] = {}
    for gen_id, kind in ids.items():
        by_kind.setdefault(kind, []).append(records[gen_id])
    assert all(r.cancelled and r.cost == 0 and r.streamed for r in by_kind["cancel"])
    assert all(not r.cancelled and r.status == 200 for k in ("plain", "tools", "stream") for r in by_kind[k])
    assert all(r.finish_reason == "tool_calls" for r in by_kind["tools"])
    hedged = by_kind["slow stream"]
    # hedged requests: served by b; the loser's attempt on a is recorded, cancelled, with no cost
    won_by_hedge = [r for r in hedged if any(a.outcome == "hedge_lost" for a in r.attempts)]
    assert won_by_hedge, "no request was hedged"
    for r in won_by_hedge:
        assert r.provider == "b" and len(r.attempts) == 2
        lost = next(a for a in r.attempts if a.outcome == "hedge_lost")
        assert lost.provider == "a" and lost.cost == 0


async def test_cost_in_usage_when_asked_and_bytes_untouched_when_not(aiohttp_server, tmp_path):
    fake = BillingUpstream("a")
    fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    cfg = billing_config({"a": fake.base_url}, str(tmp_path / "l.db"), fee=0.05)
    async with running(cfg) as url, aiohttp.ClientSession() as http:
        body = {"model": "bill/m", "messages": [{"role": "user", "content": "plain one"}]}
        async with http.post(url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            plain = await r.json()
        assert "cost" not in plain["usage"]
        async with http.post(
            url + "/v1/chat/completions", json={**body, "usage": {"include": True}}, headers=AUTH
        ) as r:
            priced = await r.json()
        cost = expected_cost(fake.reported.usages[-1], PRICES["a"])
        assert priced["usage"]["cost"] == pytest.approx(cost * 1.05, abs=1e-12)
        details = priced["usage"]["cost_details"]
        assert details["upstream_inference_cost"] == pytest.approx(cost, abs=1e-12)
        assert details["gateway_fee"] == pytest.approx(cost * 0.05, abs=1e-12)
        assert fake.seen == 2 and "usage" not in fake.last_request  # a gateway field: the upstream never sees it

        stream = {**body, "messages": [{"role": "user", "content": "stream two"}], "stream": True}
        async with http.post(
            url + "/v1/chat/completions", json={**stream, "usage": {"include": True}}, headers=AUTH
        ) as r:
            raw = await r.read()
        events = [e for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
        last = msgspec.json.decode(events[-1][6:])
        cost = expected_cost(fake.reported.usages[-1], PRICES["a"])
        assert last["usage"]["cost"] == pytest.approx(cost * 1.05, abs=1e-12)
        assert raw.endswith(b"data: [DONE]\n\n")
