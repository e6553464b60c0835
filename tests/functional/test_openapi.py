"""The gateway against its own OpenAPI document (proxy/openapi.py), with Schemathesis.

A live gateway (each server engine) runs in a thread with a healthy fake provider and SQLite accounting in a
temporary directory; Schemathesis sends each operation a bounded, derandomized set of generated requests, valid
and invalid, and checks every answer: no 5xx, a documented status, the documented content type, body and
headers. On top of its checks, every response must carry a sane `X-Request-Id`: the client's when it sent one,
else the generation id of a proxied request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from proxy.app import new_gateway, routes
from proxy.config import Config, KeyConfig
from proxy.openapi import SPEC, spec_for
from proxy.server import serve
from tests.conftest import KEY, gateway_config, in_dir
from tests.fakes import fixture

ADMIN = "sk-admin-0123456789"
MODEL = "test/gpt-4o-mini"
EXAMPLES = 30  # per operation and phase (Hypothesis: derandomized, no deadline)


def fake_provider() -> web.Application:
    """A healthy OpenAI-compatible provider: each route answers its recorded fixture (SSE when asked)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            streamed = json.loads(await request.read()).get("stream") is True
        except ValueError:
            streamed = False
        if not streamed:
            return web.Response(body=fixture("chat_ok.json"), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(fixture("stream_ok.sse"))
        await resp.write_eof()
        return resp

    def static(name: str):  # type: ignore[no-untyped-def]
        async def handler(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(body=fixture(name), content_type="application/json")

        return handler

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", static("completion_ok.json"))
    app.router.add_post("/v1/embeddings", static("embeddings_ok.json"))
    app.router.add_get("/v1/models", static("models_ok.json"))
    return app


@dataclass
class Live:
    url: str
    cfg: Config


def _config(upstream: str, engine: str, tmp: Path) -> Config:
    cfg = gateway_config({"fake": upstream}, probe={"enabled": False})
    keys = [*cfg.keys, KeyConfig(name="admin", key=ADMIN, admin=True)]
    server = msgspec.structs.replace(cfg.server, engine=engine)
    return msgspec.structs.replace(cfg, keys=keys, server=server, accounting=in_dir(cfg.accounting, tmp))


@pytest.fixture(scope="module", params=["aiohttp", "lean"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A gateway and its fake provider on loopback, served by an event loop in a thread of their own (the
    Schemathesis tests are synchronous)."""
    engine: str = request.param
    tmp = tmp_path_factory.mktemp(f"openapi-{engine}")
    loop = asyncio.new_event_loop()
    started: list[Live] = []
    ready = threading.Event()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        runner = web.AppRunner(fake_provider(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        cfg = _config(f"http://127.0.0.1:{port}/v1", engine, tmp)

        def on_ready(gw_port: int) -> None:
            started.append(Live(f"http://127.0.0.1:{gw_port}", cfg))
            ready.set()

        try:
            await serve(cfg, on_ready=on_ready, stop=stop)
        finally:
            await runner.cleanup()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as e:  # reported by the fixture
            failure.append(e)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name=f"gateway-{engine}", daemon=True)
    thread.start()
    assert ready.wait(15), "the gateway did not start"
    if failure:
        raise failure[0]
    yield started[0]
    loop.call_soon_threadsafe(stop.set)
    thread.join(15)
    assert not thread.is_alive(), "the gateway did not stop"
    assert not failure, failure


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


_ADMIN_ONLY = r"^/api/v1/(keys|orgs|credits/\{id\}|generation)"  # the admin key here: more than 403s to check
CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {"max-examples": EXAMPLES, "deterministic": True},
        "phases": {"stateful": {"enabled": False}},
    }
)
schema = schemathesis.openapi.from_dict(SPEC, config=CONFIG)


class _Key:
    """Schemathesis sends the key itself, so it knows when it left it out on purpose (and expects a 401)."""

    secret = KEY

    def get(self, case: Any, ctx: Any) -> str:
        return self.secret

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schema.auth().apply_to(path_regex=_ADMIN_ONLY)
class AdminKey(_Key):
    secret = ADMIN


@schema.auth().skip_for(path_regex=_ADMIN_ONLY)
class GatewayKey(_Key):
    pass


_ids = itertools.count(1)
# Valid by the schema, refused by what it cannot hold: an expiry already past, `name` and `label` given both and
# different, a key given neither. A 400 is right there, even for valid data.
_STATEFUL_400 = {("POST", "/api/v1/keys"), ("PATCH", "/api/v1/keys/{id}")}
_PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages")


def _integers_as_integers(case: Any) -> None:
    """JSON Schema counts 1301.0 as an integer, and Schemathesis sends such; the gateway, like OpenAI's API
    ("expected an integer, but got a decimal number"), wants integers written as integers. Valid cases only."""
    for container in (case.body, case.query):
        if isinstance(container, dict):
            for name, value in container.items():
                if isinstance(value, float) and value.is_integer():
                    container[name] = int(value)


def request_id_check(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every response carries one sane `X-Request-Id`: the client's, or a proxied request's generation id."""
    values = response.headers.get("x-request-id") or []
    assert len(values) == 1, f"expected one X-Request-Id, got {values!r} ({response.status_code})"
    rid = values[0]
    assert 1 <= len(rid) <= 128 and rid.isascii() and rid.isprintable() and " " not in rid, rid
    sent = (case.headers or {}).get("X-Request-Id")
    if sent is not None:
        assert rid == sent, f"the client's X-Request-Id {sent!r} came back as {rid!r}"
    else:
        generation = response.headers.get("x-hedgerow-generation-id")
        if generation:
            assert rid == generation[0]
    return None


@schema.parametrize()
@settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), max_examples=EXAMPLES)
def test_gateway_conforms_to_its_openapi_document(case: Any, live: Live, session: requests.Session) -> None:
    op = case.operation
    n = next(_ids)
    if n % 3 == 0:
        case.headers = {**(case.headers or {}), "X-Request-Id": f"client-{n}"}
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive:
        _integers_as_integers(case)
    if positive and op.path in _PROXIED and isinstance(case.body, dict) and n % 4:
        case.body["model"] = MODEL  # a routable model for most valid requests (the rest: 404, model_not_found)
    excluded = [positive_data_acceptance] if (op.method.upper(), op.path) in _STATEFUL_400 else []
    case.call_and_validate(
        base_url=live.url,
        session=session,
        additional_checks=[request_id_check],
        excluded_checks=excluded,
        timeout=15,
    )


def test_served_document_names_exactly_the_mounted_routes(live: Live, session: requests.Session) -> None:
    resp = session.get(live.url + "/openapi.json", timeout=5)  # no key needed
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("application/json")
    served = resp.json()
    assert served["openapi"].startswith("3.1")

    async def table() -> list[tuple[str, str, object]]:
        return routes(new_gateway(live.cfg))  # routes() needs a running loop (it builds handlers only)

    mounted = {(m.lower(), p) for m, p, _ in asyncio.run(table())}
    documented = {(m, p) for p, ops in served["paths"].items() for m in ops}
    assert documented == mounted
    assert served == json.loads(json.dumps(spec_for(asyncio.run(table()))))
    # every operation answers with a request id and documents it
    for ops in served["paths"].values():
        for op in ops.values():
            for status, response in op["responses"].items():
                ref = response.get("$ref")
                resolved = served["components"]["responses"][ref.rpartition("/")[2]] if ref else response
                assert "X-Request-Id" in resolved["headers"], (op["operationId"], status)


def test_spec_documents_every_route_any_config_can_mount() -> None:
    """The full document (accounting, metrics on) is what `spec_for` filters: nothing is missing from it."""
    cfg = gateway_config({"fake": "http://127.0.0.1:9/v1"})

    async def table() -> list[tuple[str, str, object]]:
        return routes(new_gateway(cfg))

    mounted = {(m.lower(), p) for m, p, _ in asyncio.run(table())}
    assert mounted == {(m, p) for p, ops in SPEC["paths"].items() for m in ops}
    # accounting and metrics off: the admin and stats-over-time routes and /metrics are neither mounted nor named
    cfg = msgspec.structs.replace(
        cfg,
        server=msgspec.structs.replace(cfg.server, metrics=False),
        accounting=msgspec.structs.replace(cfg.accounting, enabled=False),
    )
    lean = asyncio.run(table())
    named = {(m, p) for p, ops in spec_for(lean)["paths"].items() for m in ops}
    assert named == {(m.lower(), p) for m, p, _ in lean}
    assert ("get", "/metrics") not in named and ("post", "/api/v1/keys") not in named


def test_document_is_valid_openapi_3_1() -> None:
    schema.validate()  # against the OpenAPI 3.1 meta-schema Schemathesis ships
    for name, response in SPEC["components"]["responses"].items():
        assert response["headers"]["X-Request-Id"] == {"$ref": "#/components/headers/RequestId"}, name
