"""Tracing end to end: a gateway with `server.tracing` on exports, over OTLP/HTTP to a real receiver on
loopback, a SERVER span per request and a CLIENT span per upstream attempt — named and attributed by the GenAI
conventions, timed like the responses, linked to each other and to the client's `traceparent`. With tracing
off, the gateway does not even import opentelemetry."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from proxy.config import Config
from proxy.insights.tracing import TracingConfig
from tests.billing import BillingUpstream, usage_for
from tests.conftest import AUTH, KEY, gateway_config
from tests.fakes import FakeUpstream, Script
from tests.functional.test_ledger import PRICES, billing_config, expected_cost

trace_service_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

CHAT = "/v1/chat/completions"
ROOT = Path(__file__).resolve().parents[2]
SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
UNSET, ERROR = 0, 2  # opentelemetry.proto.trace.v1.Status.StatusCode
CLIENT_TRACE, CLIENT_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str  # "" for a root
    start: int  # ns since the epoch
    end: int
    status: int
    attrs: dict[str, Any]
    resource: dict[str, Any]


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which)


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


class Receiver:
    """An OTLP/HTTP trace receiver (what a collector listens with on :4318): protobuf in, spans kept."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.posts = 0
        self.url = ""
        self.app = web.Application()
        self.app.router.add_post("/v1/traces", self._traces)

    async def _traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = trace_service_pb2.ExportTraceServiceRequest()
        export.ParseFromString(body)
        self.posts += 1
        for rs in export.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent=s.parent_span_id.hex(),
                            start=s.start_time_unix_nano,
                            end=s.end_time_unix_nano,
                            status=s.status.code,
                            attrs=_attrs(s.attributes),
                            resource=resource,
                        )
                    )
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def request_span(self, gen_id: str) -> Span | None:
        for s in self.spans:
            if s.kind == SERVER and s.attrs.get("hedgerow.generation.id") == gen_id:
                return s
        return None

    def children(self, span: Span) -> list[Span]:
        return sorted((s for s in self.spans if s.parent == span.span_id), key=lambda s: s.start)

    async def wait(self, gen_ids: list[str], attempts: int, within: float = 15.0) -> list[Span]:
        """The request spans of `gen_ids`, once they and `attempts` attempt spans in all have arrived."""
        async with asyncio.timeout(within):
            while True:
                found = [self.request_span(g) for g in gen_ids]
                if all(found) and sum(len(self.children(s)) for s in found if s) >= attempts:
                    return [s for s in found if s]
                await asyncio.sleep(0.05)


@pytest.fixture
async def receiver(aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch) -> Receiver:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # the batch processor exports every 50 ms, not 5 s
    r = Receiver()
    r.url = str((await aiohttp_server(r.app)).make_url("/v1/traces"))
    return r


def traced(cfg: Config, receiver: Receiver) -> Config:
    tracing = TracingConfig(enabled=True, endpoint=receiver.url, service_name="hedgerow-test")
    return msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, tracing=tracing))


async def ask(
    http: aiohttp.ClientSession, url: str, text: str, stream: bool = False, headers: dict[str, str] | None = None
) -> tuple[str, int, int]:
    """One chat request; its generation id and the wall clock (ns) before it was sent and after its last byte."""
    body = {"model": "bill/m", "messages": [{"role": "user", "content": text}], "stream": stream}
    before = time.time_ns()
    async with http.post(url + CHAT, json=body, headers={**AUTH, **(headers or {})}) as r:
        assert r.status == 200, await r.text()
        data = await r.read()
        after = time.time_ns()
        if stream:
            assert data.endswith(b"data: [DONE]\n\n")
        return r.headers["X-Hedgerow-Generation-Id"], before, after


SLACK_NS = 5_000_000  # the spans' times are the wall clock at arrival plus loop-clock offsets


async def test_spans_per_request_and_attempt_reach_an_otlp_receiver(gateway, aiohttp_server, http, receiver, tmp_path):
    fake = BillingUpstream("a")
    fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    gw = await gateway(traced(billing_config({"a": fake.base_url}, str(tmp_path / "ledger.db")), receiver))

    plain = await ask(http, gw.url, "traced plain")
    streamed = await ask(http, gw.url, "traced stream", stream=True)
    parented = await ask(
        http, gw.url, "traced with a parent", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    )
    asked = {"traced plain": plain, "traced stream": streamed, "traced with a parent": parented}
    spans = await receiver.wait([g for g, _, _ in asked.values()], attempts=3)

    for (text, (gen_id, before, after)), span in zip(asked.items(), spans, strict=True):
        u = usage_for(text)
        assert span.name == "chat bill/m"
        assert span.kind == SERVER and span.status == UNSET
        assert span.resource["service.name"] == "hedgerow-test"
        a = span.attrs
        assert a["hedgerow.generation.id"] == gen_id
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "bill/m"
        assert a["gen_ai.provider.name"] == "a"
        assert a["gen_ai.usage.input_tokens"] == u["prompt"]  # what the upstream reported
        assert a["gen_ai.usage.output_tokens"] == u["completion"]
        # a stream's finish reason is found in its tail (the last chunk read: perhaps only the usage event)
        assert a.get("gen_ai.response.finish_reasons") in ([["stop"]] if "stream" not in text else [["stop"], None])
        assert a["http.response.status_code"] == 200
        assert a["hedgerow.hedged"] is False
        assert a["hedgerow.streamed"] is ("stream" in text)
        assert a["hedgerow.attempts"] == 1
        assert a["hedgerow.cost_usd"] == pytest.approx(expected_cost(u, PRICES["a"]), rel=1e-12)
        assert "error.type" not in a
        # timed like the response: inside the client's own view of the request
        assert before - SLACK_NS <= span.start <= span.end <= after + SLACK_NS, (before, span.start, span.end, after)
        assert span.end > span.start

        (attempt,) = receiver.children(span)
        assert attempt.name == "chat m-a"
        assert attempt.kind == CLIENT and attempt.status == UNSET
        assert attempt.trace_id == span.trace_id
        b = attempt.attrs
        assert b["gen_ai.provider.name"] == "a"
        assert b["gen_ai.request.model"] == "m-a"
        assert b["hedgerow.endpoint"] == "a/m-a"
        assert b["hedgerow.attempt.outcome"] == "ok"
        assert b["http.response.status_code"] == 200
        assert (b["gen_ai.usage.input_tokens"], b["gen_ai.usage.output_tokens"]) == (u["prompt"], u["completion"])
        assert span.start <= attempt.start <= attempt.end <= span.end

    assert spans[0].parent == "" and spans[1].parent == ""  # no traceparent: a trace of its own
    assert len({spans[0].trace_id, spans[1].trace_id, CLIENT_TRACE}) == 3
    assert spans[2].trace_id == CLIENT_TRACE and spans[2].parent == CLIENT_SPAN  # a child of the client's span
    assert "hedgerow.ttft_s" in spans[1].attrs and spans[1].attrs["hedgerow.ttft_s"] > 0
    assert fake.reported.requests == 3


async def test_a_failed_attempt_is_an_error_span_and_the_failover_a_sibling(gateway, aiohttp_server, http, receiver):
    fakes = {"bad": FakeUpstream(), "good": FakeUpstream()}
    for fake in fakes.values():
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    fakes["bad"].script(Script(status=500, body=b'{"error": {"message": "boom", "type": "server_error"}}'))
    cfg = gateway_config(
        {n: f.base_url for n, f in fakes.items()},
        models={"bill/m": [("bad", "gpt-4o-mini"), ("good", "gpt-4o-mini")]},
        probe={"enabled": False},
    )
    gw = await gateway(traced(cfg, receiver))
    body = {"model": "bill/m", "messages": [{"role": "user", "content": "hi"}], "provider": {"order": ["bad", "good"]}}
    async with http.post(gw.url + CHAT, json=body, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        assert r.headers["X-Hedgerow-Provider"] == "good"
        gen_id = r.headers["X-Hedgerow-Generation-Id"]
        await r.read()
    (span,) = await receiver.wait([gen_id], attempts=2)

    assert span.status == UNSET  # the client got its answer
    assert span.attrs["gen_ai.provider.name"] == "good"
    assert span.attrs["hedgerow.attempts"] == 2
    assert (span.attrs["gen_ai.usage.input_tokens"], span.attrs["gen_ai.usage.output_tokens"]) == (9, 10)
    failed, served = receiver.children(span)
    assert failed.name == served.name == "chat gpt-4o-mini"
    assert failed.status == ERROR
    assert failed.attrs["gen_ai.provider.name"] == "bad"
    assert failed.attrs["hedgerow.attempt.outcome"] == failed.attrs["error.type"] == "server_error"
    assert failed.attrs["http.response.status_code"] == 500
    assert "gen_ai.usage.input_tokens" not in failed.attrs
    assert served.status == UNSET
    assert served.attrs["gen_ai.provider.name"] == "good"
    assert served.attrs["hedgerow.attempt.outcome"] == "ok"
    assert span.start <= failed.start <= failed.end <= served.start <= served.end <= span.end


_BUILD = """
import json, sys
from proxy.app import build_app
from proxy.config import parse
build_app(parse(sys.argv[1], "yaml", env={}))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")))
"""


@pytest.mark.parametrize("enabled", [False, True], ids=["off", "on"])
def test_opentelemetry_is_imported_only_with_tracing_on(enabled, tmp_path):
    config = f"""
server:
  tracing: {{enabled: {str(enabled).lower()}, exporter: console, service-name: t}}
accounting:
  store: {{path: {tmp_path / "ledger.db"}}}
keys: [{{name: t, key: {KEY}}}]
providers: [{{name: demo, base-url: "builtin:demo"}}]
models: [{{name: demo/m, endpoints: [{{provider: demo, model: m}}]}}]
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", _BUILD, config], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout.splitlines()[-1])
    if enabled:
        assert "opentelemetry.sdk.trace" in modules  # the check below can see an import
    else:
        assert modules == []
