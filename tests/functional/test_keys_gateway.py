"""Keys made through the admin API, enforced by a running gateway on every engine: allowed models, disabling,
expiry, provisioning keys, usage and generation lookups."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec
import pytest

from proxy.config import KeyConfig
from tests.billing import BillingUpstream, usage_for
from tests.conftest import AUTH, gateway_config

ADMIN_KEY = "sk-admin-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PRICE = {"input": 3.0, "output": 15.0}


@pytest.fixture
async def billing(aiohttp_server: Any) -> BillingUpstream:
    fake = BillingUpstream("bill")
    fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    return fake


async def _gateway(gateway: Any, billing: BillingUpstream) -> str:
    cfg = gateway_config(
        {"bill": billing.base_url},
        models={"bill/a": [("bill", "a", PRICE)], "bill/b": [("bill", "b", PRICE)]},
        probe={"enabled": False},
    )
    keys = [*cfg.keys, KeyConfig(name="ops", key=ADMIN_KEY, admin=True)]
    return (await gateway(msgspec.structs.replace(cfg, keys=keys))).url


async def _chat(http: aiohttp.ClientSession, url: str, secret: str, model: str, text: str) -> aiohttp.ClientResponse:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    async with http.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}) as r:
        await r.read()
        return r


async def test_api_keys_are_enforced_by_the_gateway(gateway, billing, http):
    url = await _gateway(gateway, billing)
    async with http.post(
        url + "/api/v1/keys", json={"name": "app", "allowed_models": ["bill/a"], "limit": 1.0}, headers=ADMIN
    ) as r:
        assert r.status == 201
        created = await r.json()
    secret, key_id = created["key"], created["data"]["id"]

    ok = await _chat(http, url, secret, "bill/a", "hello there")
    assert ok.status == 200
    gen_id = ok.headers["X-Hedgerow-Generation-Id"]
    denied = await _chat(http, url, secret, "bill/b", "hello there")
    assert denied.status == 403

    # the generation, queued or written, is the key's to read (and an admin's), with its cost
    u = usage_for("hello there")
    cost = (u["prompt"] * PRICE["input"] + u["completion"] * PRICE["output"]) / 1e6
    async with http.get(url + f"/api/v1/generation?id={gen_id}", headers={"Authorization": f"Bearer {secret}"}) as r:
        assert r.status == 200
        data = (await r.json())["data"]
    assert data["total_cost"] == pytest.approx(cost, abs=1e-12)
    assert data["tokens_prompt"] == u["prompt"] and data["provider_name"] == "bill"
    async with http.get(url + f"/api/v1/generation?id={gen_id}", headers=AUTH) as r:
        assert r.status == 404  # another key: not told it exists
    async with http.get(url + "/api/v1/key", headers={"Authorization": f"Bearer {secret}"}) as r:
        me = (await r.json())["data"]
    assert me["usage"] == pytest.approx(cost, abs=1e-12) and me["limit"] == 1.0

    async with http.patch(url + f"/api/v1/keys/{key_id}", json={"disabled": True}, headers=ADMIN) as r:
        assert r.status == 200
    assert (await _chat(http, url, secret, "bill/a", "again")).status == 401  # this node reloaded at once


async def test_an_expired_key_stops_working(gateway, billing, http):
    url = await _gateway(gateway, billing)
    async with http.post(
        url + "/api/v1/keys", json={"name": "brief", "expires_at": time.time() + 1.0}, headers=ADMIN
    ) as r:
        secret = (await r.json())["key"]
    assert (await _chat(http, url, secret, "bill/a", "now")).status == 200
    await asyncio.sleep(1.1)
    late = await _chat(http, url, secret, "bill/a", "later")
    assert late.status == 401


async def test_a_provisioning_key_manages_keys_but_calls_no_model(gateway, billing, http):
    url = await _gateway(gateway, billing)
    assert (await _chat(http, url, ADMIN_KEY, "bill/a", "hi")).status == 403
    async with http.get(url + "/api/v1/keys", headers=AUTH) as r:
        assert r.status == 403  # and a plain key manages nothing
    assert billing.seen == 0
