"""The key-management and credits API on a real SQLite store, served by aiohttp with the gateway's error middleware."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.accounting.admin import AdminAPI
from proxy.config import key_hash
from proxy.errors import Unauthorized
from proxy.handlers import error_middleware
from proxy.store.base import AttemptRecord, GenerationRecord, KeyRecord, OrgRecord
from proxy.store.sqlite import SQLiteStore

ADMIN_SECRET = "sk-admin-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
USER_SECRET = "sk-user-0123456789"
USER = {"Authorization": f"Bearer {USER_SECRET}"}
# Config keys (not in the store), as the gateway's keys module hands them over.
CONFIG_KEYS = [
    KeyRecord(id="admin", digest=key_hash(ADMIN_SECRET), label="admin"),
    KeyRecord(id="user", digest=key_hash(USER_SECRET), label="user"),
]


class Node:
    """What the gateway gives the admin API: keys by digest (config keys + the store's, reloaded on change),
    unsettled spend and the ledger's queue."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.by_digest = {k.digest: k for k in CONFIG_KEYS}
        self.reloads = 0
        self.unsettled: dict[str, float] = {}
        self.pending: dict[str, GenerationRecord] = {}

    def authenticate(self, header: str | None) -> KeyRecord:
        scheme, _, secret = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("missing API key")
        key = self.by_digest.get(hashlib.sha256(secret.encode()).hexdigest())
        if key is None or key.disabled:
            raise Unauthorized("invalid API key")
        return key

    async def keys_changed(self) -> None:
        self.reloads += 1
        stored = {k.digest: k for k in await self.store.list_keys()}
        self.by_digest = {**stored, **{k.digest: k for k in CONFIG_KEYS}}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "h.db"))
    await s.open()
    await s.put_org(OrgRecord(id="org_default", name="default", created_at=time.time()))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def node(store: SQLiteStore) -> Node:
    return Node(store)


@pytest.fixture
async def client(aiohttp_client: Any, node: Node) -> Any:
    api = AdminAPI(
        node.store,
        node.authenticate,
        lambda k: k.id == "admin",
        node.keys_changed,
        lambda key_id: node.unsettled.get(key_id, 0.0),
        node.pending.get,
    )
    app = web.Application(middlewares=[error_middleware])
    for method, path, handler in api.routes():
        app.router.add_route(method, path, handler)
    return await aiohttp_client(app)


async def _create(client: Any, **body: Any) -> dict[str, Any]:
    r = await client.post("/api/v1/keys", json={"name": "ci", **body}, headers=ADMIN)
    assert r.status == 201, await r.text()
    return await r.json()


async def _error(r: Any, status: int) -> dict[str, Any]:
    assert r.status == status, await r.text()
    return (await r.json())["error"]


async def test_create_shows_the_secret_once_and_stores_only_its_digest(client: Any, node: Node) -> None:
    created = await _create(client, limit=5, limit_reset="monthly", rpm=60, allowed_models=["hedgerow/demo"])
    secret, view = created["key"], created["data"]
    assert secret.startswith("sk-hr-") and len(secret) == len("sk-hr-") + 48
    assert view["id"].startswith("key_") and len(view["id"]) == 4 + 16
    assert view["label"] == "ci" and view["org"] == "org_default" and view["disabled"] is False
    assert view["limit"] == 5 and view["limit_remaining"] == 5 and view["usage"] == 0
    assert view["allowed_models"] == ["hedgerow/demo"] and view["rpm"] == 60 and view["tpm"] is None
    assert "digest" not in view
    stored = await node.store.get_key(view["id"])
    assert stored is not None and stored.digest == hashlib.sha256(secret.encode()).hexdigest()
    assert node.reloads == 1

    for path in ("/api/v1/keys", f"/api/v1/keys/{view['id']}"):
        r = await client.get(path, headers=ADMIN)
        assert r.status == 200
        text = await r.text()
        assert secret not in text and stored.digest not in text and "digest" not in text
    listed = (await (await client.get("/api/v1/keys", headers=ADMIN)).json())["data"]
    assert [k["id"] for k in listed] == [view["id"]]

    # the new key works at once (keys_changed reloaded this node), in OpenRouter's /key shape
    r = await client.get("/api/v1/key", headers={"Authorization": f"Bearer {secret}"})
    assert r.status == 200
    assert (await r.json())["data"] == {
        "label": "ci",
        "usage": 0.0,
        "limit": 5.0,
        "limit_remaining": 5.0,
        "limit_reset": "monthly",
        "is_free_tier": False,
        "rate_limit": {"requests": 60, "interval": "1m"},
        "tokens_per_minute": -1,
    }


async def test_expires_at_accepts_unix_seconds_and_iso_8601(client: Any) -> None:
    soon = int(time.time()) + 3600
    a = (await _create(client, expires_at=soon))["data"]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(soon))
    b = (await _create(client, label="b", name="b", expires_at=iso))["data"]
    assert a["expires_at"] == b["expires_at"] == time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(soon))


async def test_list_filters_by_org(client: Any, node: Node) -> None:
    await node.store.put_org(OrgRecord(id="org_acme", name="Acme"))
    a = (await _create(client, org="org_acme"))["data"]
    await _create(client)
    r = await client.get("/api/v1/keys?org=org_acme", headers=ADMIN)
    assert [k["id"] for k in (await r.json())["data"]] == [a["id"]]


async def test_patch_changes_only_given_fields_and_null_clears(client: Any, node: Node) -> None:
    view = (await _create(client, limit=5, limit_reset="daily", rpm=10, tpm=1000))["data"]
    path = f"/api/v1/keys/{view['id']}"
    r = await client.patch(path, json={"rpm": 20}, headers=ADMIN)
    assert r.status == 200
    after = (await r.json())["data"]
    assert after["rpm"] == 20
    assert {k: after[k] for k in ("label", "limit", "limit_reset", "tpm")} == {
        "label": "ci",
        "limit": 5.0,
        "limit_reset": "daily",
        "tpm": 1000,
    }
    r = await client.patch(
        path, json={"limit": None, "limit_reset": None, "label": "renamed", "disabled": True}, headers=ADMIN
    )
    after = (await r.json())["data"]
    assert after["limit"] is None and after["limit_remaining"] is None and after["limit_reset"] is None
    assert after["label"] == "renamed" and after["disabled"] is True and after["rpm"] == 20
    stored = await node.store.get_key(view["id"])
    assert stored is not None and stored.limit is None and stored.disabled and stored.label == "renamed"
    assert node.reloads == 3

    await _error(await client.patch(path, json={"org": "org_nowhere"}, headers=ADMIN), 404)
    err = await _error(await client.patch(path, json={"disabled": None}, headers=ADMIN), 400)
    assert err["param"] == "disabled"


async def test_disabled_key_stops_authenticating(client: Any) -> None:
    created = await _create(client)
    auth = {"Authorization": f"Bearer {created['key']}"}
    assert (await client.get("/api/v1/key", headers=auth)).status == 200
    await client.patch(f"/api/v1/keys/{created['data']['id']}", json={"disabled": True}, headers=ADMIN)
    await _error(await client.get("/api/v1/key", headers=auth), 401)


async def test_delete_removes_the_key(client: Any, node: Node) -> None:
    created = await _create(client)
    path = f"/api/v1/keys/{created['data']['id']}"
    r = await client.delete(path, headers=ADMIN)
    assert r.status == 200 and (await r.json()) == {"data": {"deleted": True}}
    assert await node.store.get_key(created["data"]["id"]) is None
    await _error(await client.get(path, headers=ADMIN), 404)
    await _error(await client.delete(path, headers=ADMIN), 404)
    await _error(await client.get("/api/v1/key", headers={"Authorization": f"Bearer {created['key']}"}), 401)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/keys"),
        ("GET", "/api/v1/keys"),
        ("GET", "/api/v1/keys/key_0000000000000000"),
        ("PATCH", "/api/v1/keys/key_0000000000000000"),
        ("DELETE", "/api/v1/keys/key_0000000000000000"),
        ("POST", "/api/v1/orgs"),
        ("GET", "/api/v1/orgs"),
        ("POST", "/api/v1/credits/org_default"),
    ],
)
async def test_admin_routes_refuse_other_keys_and_no_key(client: Any, method: str, path: str) -> None:
    body = {"name": "x", "id": "x", "amount": 1}
    err = await _error(await client.request(method, path, json=body, headers=USER), 403)
    assert err["type"] == "permission_error"
    err = await _error(await client.request(method, path, json=body), 401)
    assert err["type"] == "authentication_error"
    await _error(await client.request(method, path, json=body, headers={"Authorization": "Bearer sk-wrong"}), 401)


@pytest.mark.parametrize("path", ["/api/v1/key", "/api/v1/credits", "/api/v1/generation?id=gen-1"])
async def test_self_service_routes_need_a_valid_key(client: Any, path: str) -> None:
    await _error(await client.get(path), 401)
    await _error(await client.get(path, headers={"Authorization": "Bearer sk-wrong"}), 401)


async def test_unknown_key_id_is_404(client: Any) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        r = await client.request(method, "/api/v1/keys/key_ffffffffffffffff", json={}, headers=ADMIN)
        err = await _error(r, 404)
        assert "key_ffffffffffffffff" in err["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "x", "bogus": 1}, "bogus"),
        ({"name": "x", "rpm": "many"}, "rpm"),
        ({"name": "x", "rpm": 0}, "rpm"),
        ({"name": "x", "limit": -1}, "limit"),
        ({"name": "x", "limit_reset": "hourly"}, "limit_reset"),
        ({"name": "x", "allowed_models": []}, "allowed_models"),
        ({"name": "x", "allowed_models": ["ok", 3]}, "allowed_models[1]"),
        ({"name": "x", "expires_at": 1.0}, "expires_at"),
        ({"name": "x", "expires_at": "next tuesday"}, "expires_at"),
        ({"name": "x", "disabled": "yes"}, "disabled"),
        ({"name": ""}, "name"),
        ({"name": "a", "label": "b"}, "label"),
        ({"limit": 5}, "name"),
    ],
)
async def test_bad_key_body_is_400_naming_the_field(client: Any, node: Node, body: dict[str, Any], param: str) -> None:
    err = await _error(await client.post("/api/v1/keys", json=body, headers=ADMIN), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert await node.store.list_keys() == []


async def test_body_that_is_not_a_json_object_is_400(client: Any) -> None:
    for data in (b"", b"{not json", b"[1, 2]"):
        r = await client.post("/api/v1/keys", data=data, headers={**ADMIN, "Content-Type": "application/json"})
        await _error(r, 400)


async def test_key_in_unknown_org_is_404(client: Any, node: Node) -> None:
    err = await _error(await client.post("/api/v1/keys", json={"name": "x", "org": "org_x"}, headers=ADMIN), 404)
    assert err["param"] == "org"
    assert await node.store.list_keys() == []


async def test_limit_remaining_counts_settled_leased_and_unsettled_spend(client: Any, node: Node) -> None:
    key_id = (await _create(client, limit=10))["data"]["id"]
    now = time.time()
    assert await node.store.lease(key_id, "org_default", 10.0, None, 1.0, 2.0, now) == 2.0
    await node.store.settle(key_id, "org_default", None, 0.0, 0.5, now)  # 0.5 spent, 1.5 still leased
    view = (await (await client.get(f"/api/v1/keys/{key_id}", headers=ADMIN)).json())["data"]
    assert view["usage"] == pytest.approx(0.5)
    assert view["limit_remaining"] == pytest.approx(10 - 0.5 - 1.5)
    # this node spent 0.25 more out of its lease, not settled yet: usage shows it, the lease already holds it
    node.unsettled[key_id] = 0.25
    view = (await (await client.get(f"/api/v1/keys/{key_id}", headers=ADMIN)).json())["data"]
    assert view["usage"] == pytest.approx(0.75)
    assert view["limit_remaining"] == pytest.approx(8.0)
    # more unsettled than leased (served while the store was unreachable): all of it counts
    node.unsettled[key_id] = 3.0
    view = (await (await client.get(f"/api/v1/keys/{key_id}", headers=ADMIN)).json())["data"]
    assert view["usage"] == pytest.approx(3.5)
    assert view["limit_remaining"] == pytest.approx(10 - 0.5 - 3.0)


async def test_orgs_top_up_and_credits(client: Any, node: Node) -> None:
    r = await client.post("/api/v1/orgs", json={"id": "org_acme", "name": "Acme", "credits": 5}, headers=ADMIN)
    assert r.status == 201
    assert (await r.json())["data"]["balance"] == 5.0
    await _error(await client.post("/api/v1/orgs", json={"id": "org_acme"}, headers=ADMIN), 409)
    err = await _error(await client.post("/api/v1/orgs", json={"id": "bad id!"}, headers=ADMIN), 400)
    assert err["param"] == "id"
    orgs = (await (await client.get("/api/v1/orgs", headers=ADMIN)).json())["data"]
    assert sorted(o["id"] for o in orgs) == ["org_acme", "org_default"]

    r = await client.post("/api/v1/credits/org_acme", json={"amount": 2.5}, headers=ADMIN)
    assert r.status == 200
    assert (await r.json())["data"] == {"id": "org_acme", "balance": 7.5}
    for bad in ({"amount": 0}, {"amount": -1}, {}, {"amount": "5"}, {"amount": 1, "currency": "EUR"}):
        await _error(await client.post("/api/v1/credits/org_acme", json=bad, headers=ADMIN), 400)
    await _error(await client.post("/api/v1/credits/org_nowhere", json={"amount": 1}, headers=ADMIN), 404)

    created = await _create(client, org="org_acme")
    auth = {"Authorization": f"Bearer {created['key']}"}
    key_id = created["data"]["id"]
    now = time.time()
    assert await node.store.lease(key_id, "org_acme", None, None, 1.0, 1.0, now) == 1.0
    await node.store.settle(key_id, "org_acme", None, 0.0, 1.0, now)
    r = await client.get("/api/v1/credits", headers=auth)
    assert (await r.json())["data"] == {"total_credits": pytest.approx(7.5), "total_usage": pytest.approx(1.0)}
    # org_default is unlimited
    r = await client.get("/api/v1/credits", headers=USER)
    assert (await r.json())["data"] == {"total_credits": None, "total_usage": 0.0}


def _generation(gen_id: str, key_id: str) -> GenerationRecord:
    return GenerationRecord(
        id=gen_id,
        key_id=key_id,
        org="org_default",
        model="test/gpt-4o-mini",
        provider="p2",
        endpoint="p2/gpt-4o-mini",
        status=200,
        streamed=True,
        finish_reason="stop",
        prompt_tokens=10,
        completion_tokens=20,
        cached_tokens=4,
        reasoning_tokens=5,
        cost=0.002,
        fee=0.0001,
        ttft=0.25,
        latency=1.5,
        created=1_700_000_000.0,
        attempts=[
            AttemptRecord(provider="p1", endpoint="p1/gpt-4o-mini", outcome="status", status=503, duration=0.1),
            AttemptRecord(
                provider="p2", endpoint="p2/gpt-4o-mini", outcome="ok", status=200, started=0.1, duration=1.4
            ),
        ],
    )


async def test_generation_lookup_pending_then_stored_and_hidden_from_other_keys(client: Any, node: Node) -> None:
    await node.store.write_generations([_generation("gen-stored", "user")])
    node.pending["gen-pending"] = _generation("gen-pending", "user")

    r = await client.get("/api/v1/generation?id=gen-stored", headers=USER)
    assert r.status == 200
    data = (await r.json())["data"]
    assert data["id"] == "gen-stored"
    assert data["total_cost"] == data["usage"] == pytest.approx(0.0021)
    assert data["upstream_inference_cost"] == pytest.approx(0.002) and data["gateway_fee"] == pytest.approx(0.0001)
    assert data["created_at"] == "2023-11-14T22:13:20+00:00"
    assert data["latency"] == 1500 and data["generation_time"] == 1250
    assert data["provider_name"] == "p2" and data["streamed"] is True and data["cancelled"] is False
    assert (data["tokens_prompt"], data["tokens_completion"]) == (10, 20)
    assert (data["native_tokens_reasoning"], data["native_tokens_cached"]) == (5, 4)
    assert data["cache_discount"] is None and data["is_byok"] is False and data["origin"] == ""
    assert [(a["provider"], a["outcome"], a["status"]) for a in data["attempts"]] == [
        ("p1", "status", 503),
        ("p2", "ok", 200),
    ]
    assert data["attempts"][1]["started"] == 100 and data["attempts"][1]["duration"] == 1400

    r = await client.get("/api/v1/generation?id=gen-pending", headers=USER)
    assert r.status == 200 and (await r.json())["data"]["id"] == "gen-pending"
    assert (await client.get("/api/v1/generation?id=gen-stored", headers=ADMIN)).status == 200

    other = await _create(client)
    other_auth = {"Authorization": f"Bearer {other['key']}"}
    hidden = await _error(await client.get("/api/v1/generation?id=gen-stored", headers=other_auth), 404)
    missing = await _error(await client.get("/api/v1/generation?id=gen-nope", headers=other_auth), 404)
    assert hidden["message"].replace("gen-stored", "X") == missing["message"].replace("gen-nope", "X")
    await _error(await client.get("/api/v1/generation?id=gen-pending", headers=other_auth), 404)
    err = await _error(await client.get("/api/v1/generation", headers=USER), 400)
    assert err["param"] == "id"


async def test_store_failure_is_503_not_a_traceback(client: Any, node: Node) -> None:
    await node.store.close()
    r = await client.get("/api/v1/keys", headers=ADMIN)
    err = await _error(r, 503)
    assert err["type"] == "service_unavailable" and "Traceback" not in await r.text()
    assert r.headers["Retry-After"] == "1"
