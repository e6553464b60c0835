"""Observability end to end: `/metrics` counts what the upstreams reported and the ledger recorded, one scrape
counts every worker, the access log has one clean line per request, and responses carry their timings."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.billing import BillingUpstream
from tests.conftest import AUTH, KEY, gateway_config
from tests.fakes import FakeUpstream, Script, fixture
from tests.functional.test_ledger import billing_config
from tests.functional.test_process import _children, _spawn

CHAT = "/v1/chat/completions"
TIMING = re.compile(r"^gateway;dur=(\d+\.\d+), upstream;dur=(\d+\.\d+)$")

Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> list[Sample]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


async def scrape(http: aiohttp.ClientSession, url: str) -> list[Sample]:
    async with http.get(url + "/metrics") as r:  # no key: Prometheus sends none
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await r.text())


async def ask(http: aiohttp.ClientSession, url: str, text: str, stream: bool = False) -> tuple[str, Any]:
    """One chat request; returns its generation id and response headers (after the whole body was read)."""
    body: dict[str, Any] = {"model": "bill/m", "messages": [{"role": "user", "content": text}], "stream": stream}
    async with http.post(url + CHAT, json=body, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["X-Hedgerow-Generation-Id"], r.headers


def check_timing(headers: Any) -> None:
    m = TIMING.match(headers["Server-Timing"])
    assert m is not None, headers["Server-Timing"]
    gateway_ms, upstream_ms = float(m.group(1)), float(m.group(2))
    assert float(headers["X-Hedgerow-Upstream-TTFB-Ms"]) == upstream_ms
    assert 0 <= gateway_ms < 5000 and 0 <= upstream_ms < 5000


async def test_metrics_count_every_request_and_the_usage_and_cost_the_upstreams_reported(
    gateway, aiohttp_server, http, tmp_path
):
    fakes = {"a": BillingUpstream("a"), "b": BillingUpstream("b")}
    for fake in fakes.values():
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    cfg = billing_config({n: f.base_url for n, f in fakes.items()}, str(tmp_path / "ledger.db"))
    gw = await gateway(cfg)
    kinds = ["plain"] * 12 + ["tools"] * 4 + ["stream"] * 12
    ids = []
    for i, kind in enumerate(kinds):
        gen_id, headers = await ask(http, gw.url, f"request {i} {kind}", stream=kind == "stream")
        check_timing(headers)
        ids.append(gen_id)
    unknown = {"model": "nope/none", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(gw.url + CHAT, json=unknown, headers=AUTH) as r:
        assert r.status == 404
    n = len(kinds) + 1

    m = await scrape(http, gw.url)
    assert total(m, "hedgerow_requests_total") == n
    assert total(m, "hedgerow_requests_total", model="bill/m", status_class="2xx") == len(kinds)
    assert total(m, "hedgerow_requests_total", model="other", status_class="4xx") == 1  # no client-made labels
    assert total(m, "gen_ai_client_operation_duration_seconds_count") == n
    assert total(m, "gen_ai_client_operation_duration_seconds_count", error_type="404") == 1
    assert total(m, "gen_ai_server_time_to_first_token_seconds_count") == kinds.count("stream")
    assert total(m, "hedgerow_attempts_total", outcome="ok") == len(kinds)
    assert total(m, "hedgerow_gateway_overhead_seconds_count") == len(kinds)
    assert total(m, "hedgerow_in_flight_requests") == 0
    assert total(m, "hedgerow_endpoint_healthy", endpoint="a/m-a") == 1
    for name, fake in fakes.items():
        rep = fake.reported
        want = {"input": rep.prompt, "output": rep.completion, "cached": rep.cached, "reasoning": rep.reasoning}
        tokens = "gen_ai_client_token_usage_total"
        got = {k: total(m, tokens, gen_ai_provider_name=name, gen_ai_token_type=k) for k in want}
        assert got == want, name
    assert sum(f.reported.requests for f in fakes.values()) == len(kinds)  # every answer reported its usage

    ledger = 0.0  # what the ledger recorded, read back through the API (queued records included)
    for gen_id in ids:
        async with http.get(gw.url + "/api/v1/generation", params={"id": gen_id}, headers=AUTH) as r:
            ledger += (await r.json())["data"]["upstream_inference_cost"]
    assert ledger > 0
    assert total(m, "hedgerow_cost_usd_total") == pytest.approx(ledger, rel=1e-12, abs=1e-15)


async def test_metrics_and_timings_work_with_accounting_off(fake_upstream, gateway, http):
    cfg = gateway_config({"fake": fake_upstream.base_url}, probe={"enabled": False})
    cfg = msgspec.structs.replace(cfg, accounting=msgspec.structs.replace(cfg.accounting, enabled=False))
    gw = await gateway(cfg)
    body = {"model": "test/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(5):
        async with http.post(gw.url + CHAT, json=body, headers=AUTH) as r:
            assert r.status == 200
            check_timing(r.headers)
    m = await scrape(http, gw.url)
    assert total(m, "hedgerow_requests_total", model="test/gpt-4o-mini", status_class="2xx") == 5
    assert total(m, "hedgerow_attempts_total", provider="fake", outcome="ok") == 5
    assert total(m, "gen_ai_client_token_usage_total", gen_ai_token_type="input") > 0
    assert total(m, "hedgerow_ledger_queue") == 0


async def test_ejections_and_endpoint_health_are_counted(aiohttp_server, gateway, http):
    fakes = {}
    for name in ("good", "bad"):
        fake = FakeUpstream()
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
        fakes[name] = fake
    cfg = gateway_config(
        {n: f.base_url for n, f in fakes.items()},
        routing={"ejection": {"consecutive-failures": 2, "base-s": 30, "jitter": 0}},
        probe={"enabled": False},
    )
    gw = await gateway(cfg)
    fakes["bad"].script(Script(status=500, body=fixture("chat_500.json")))
    body = {"model": "test/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body["provider"] = {"order": ["bad", "good"]}
    async with asyncio.timeout(10):
        while True:
            async with http.post(gw.url + CHAT, json=body, headers=AUTH) as r:
                assert r.status == 200
            m = await scrape(http, gw.url)
            if total(m, "hedgerow_endpoint_healthy", endpoint="bad/gpt-4o-mini") == 0:
                break
    assert total(m, "hedgerow_endpoint_ejections_total", provider="bad") == 1
    assert total(m, "hedgerow_endpoint_ejections_total", provider="good") == 0
    assert total(m, "hedgerow_endpoint_healthy", endpoint="good/gpt-4o-mini") == 1
    assert total(m, "hedgerow_attempts_total", provider="bad", outcome="server_error") == 2


async def test_access_log_has_one_json_line_per_request_without_secrets_or_prompts(
    gateway, aiohttp_server, http, tmp_path
):
    fake = BillingUpstream("a")
    fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    cfg = billing_config({"a": fake.base_url}, str(tmp_path / "ledger.db"))
    cfg = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, access_log=True))
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(record.getMessage().split("\n"))  # one record per batch, one line per request

    access = logging.getLogger("hedgerow.access")
    handler, level = Collect(), access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        gw = await gateway(cfg)
        marker = "PROMPT-TEXT-MUST-NOT-BE-LOGGED"
        ids = set()
        for i in range(10):
            gen_id, headers = await ask(http, gw.url, f"{marker} {i}", stream=i % 2 == 1)
            check_timing(headers)
            ids.add(gen_id)
        async with asyncio.timeout(5):
            while len(lines) < len(ids):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # one more observer round: nothing is logged twice
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    assert len(lines) == len(ids)
    records = [orjson.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in records)
    assert {r["id"] for r in records} == ids
    for line in lines:
        assert KEY not in line and marker not in line
    for r in records:
        assert r["key"] == "test" and r["model"] == "bill/m" and r["provider"] == "a" and r["status"] == 200
        assert r["attempts"] == 1 and r["tokens_in"] > 0 and r["tokens_out"] > 0 and r["cost"] > 0
        assert r["duration_ms"] >= r["ttft_ms"] > 0 and r["cancelled"] is False
    assert sum(r["streamed"] for r in records) == 5


@pytest.mark.timeout(120)
async def test_one_scrape_counts_the_requests_of_every_worker(fake_upstream, tmp_path):
    tree = {
        "server": {"host": "127.0.0.1", "port": 0},
        "keys": [{"name": "test", "key": KEY}],
        "providers": [{"name": "fake", "base-url": fake_upstream.base_url, "probe": {"enabled": False}}],
        "models": [{"name": "test/gpt-4o-mini", "endpoints": [{"provider": "fake", "model": "gpt-4o-mini"}]}],
    }
    config = tmp_path / "hedgerow.yaml"
    config.write_text(yaml.safe_dump(tree))
    tmp = tmp_path / "tmp"  # the supervisor's temporary directory for the workers' metric files
    tmp.mkdir()
    proc, port = await _spawn("serve", "--config", str(config), "--workers", "3", env={"TMPDIR": str(tmp)})
    url = f"http://127.0.0.1:{port}"
    body = {"model": "test/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with asyncio.timeout(20):
            while len(_children(proc.pid)) < 3:
                await asyncio.sleep(0.05)
        # A fresh connection per request: the kernel spreads connections (not requests) over the workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            for _ in range(9):
                await asyncio.gather(*(_post(http, url, body) for _i in range(10)))
            async with asyncio.timeout(10):  # each worker hands its batch over within half a second
                while total(m := await scrape(http, url), "hedgerow_requests_total") < 90:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.6)
            m = await scrape(http, url)
        assert total(m, "hedgerow_requests_total") == 90
        assert total(m, "hedgerow_requests_total", status_class="2xx") == 90
        assert total(m, "gen_ai_client_operation_duration_seconds_count") == 90
        per_worker = {lab["pid"]: v for n, lab, v in m if n == "hedgerow_worker_requests"}
        assert set(per_worker) <= {str(p) for p in _children(proc.pid)}
        assert sum(per_worker.values()) == 90
        assert sum(1 for v in per_worker.values() if v > 0) > 1  # more than one worker served
        dirs = list(tmp.glob("hedgerow-metrics-*"))
        assert len(dirs) == 1 and list(dirs[0].glob("counter_*.db"))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert not any(tmp.iterdir())  # the supervisor removed its metrics directory


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    async with http.post(url + CHAT, json=body, headers=AUTH) as r:
        assert r.status == 200
        check_timing(r.headers)
