"""SIGHUP reloads the config live: a stream in flight finishes on the old config, the next request sees the new
models and prices, health of unchanged endpoints survives, and a broken file changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.config import parse
from proxy.server import serve
from tests.conftest import AUTH, KEY
from tests.fakes import Script, fixture, sse_events
from tests.functional.test_process import _spawn


def _doc(upstream: str, tmp_path: Path, *, price: float, extra_model: bool) -> dict[str, Any]:
    models = [
        {"name": "test/m", "endpoints": [{"provider": "fake", "model": "gpt-4o-mini", "price": {"input": price}}]}
    ]
    if extra_model:
        models.append({"name": "test/new", "endpoints": [{"provider": "fake", "model": "gpt-4o-mini"}]})
    return {
        "server": {"host": "127.0.0.1", "port": 0, "drain-grace-s": 5},
        "keys": [{"name": "test", "key": KEY}],
        "accounting": {"store": {"path": str(tmp_path / "h.db")}},
        "providers": [{"name": "fake", "base-url": upstream, "api-key": "sk-up", "probe": {"enabled": False}}],
        "models": models,
    }


async def _wait_line(proc: asyncio.subprocess.Process, needle: str, within: float = 10) -> str:
    assert proc.stderr is not None
    async with asyncio.timeout(within):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "the gateway exited"
            if needle in line:
                return line


async def _models(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/v1/models", headers=AUTH) as r:
        return {m["id"]: m for m in (await r.json())["data"]}


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_applies_a_new_config_without_dropping_a_stream(fake_upstream, http, tmp_path, workers):
    events = sse_events(fixture("stream_ok.sse"))
    fake_upstream.script(Script(sse=events, gap_s=0.1))  # ~1 s of streaming
    path = tmp_path / "hedgerow.yaml"
    path.write_text(yaml.safe_dump(_doc(fake_upstream.base_url, tmp_path, price=1.0, extra_model=False)))
    proc, port = await _spawn("serve", "--config", str(path), "--workers", str(workers))
    url = f"http://127.0.0.1:{port}"
    try:
        assert (await _models(http, url))["test/m"]["pricing"]["prompt"] == "0.000001"
        body = {"model": "test/m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with asyncio.timeout(10), http.post(url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            first = await r.content.readany()
            path.write_text(yaml.safe_dump(_doc(fake_upstream.base_url, tmp_path, price=5.0, extra_model=True)))
            proc.send_signal(signal.SIGHUP)
            for _ in range(workers):
                await _wait_line(proc, "config reloaded")
            rest = await r.read()
        assert first + rest == fixture("stream_ok.sse")  # the stream in flight finished whole

        fake_upstream.script(Script())
        models = await _models(http, url)
        assert models["test/m"]["pricing"]["prompt"] == "0.000005"  # the new price, on every worker
        new = {"model": "test/new", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(4):  # fresh connections: any worker answers
            async with aiohttp.ClientSession() as fresh:
                async with fresh.post(url + "/v1/chat/completions", json=new, headers=AUTH) as r2:
                    assert r2.status == 200

        path.write_text("providers: [{name: broken")  # not even YAML
        proc.send_signal(signal.SIGHUP)
        line = await _wait_line(proc, "config reload rejected")
        assert "cannot parse yaml" in line
        assert (await _models(http, url))["test/m"]["pricing"]["prompt"] == "0.000005"  # nothing changed
        async with http.post(url + "/v1/chat/completions", json=new, headers=AUTH) as r3:
            assert r3.status == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                assert await proc.wait() == 0


async def _ok_count(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url + "/api/v1/providers", headers=AUTH) as r:
        (endpoint,) = (await r.json())["data"]
    return endpoint["outcomes_5m"]["ok"]


async def test_a_reload_keeps_the_health_of_endpoints_that_still_exist(fake_upstream, tmp_path):
    path = tmp_path / "hedgerow.yaml"
    path.write_text(yaml.safe_dump(_doc(fake_upstream.base_url, tmp_path, price=1.0, extra_model=False)))
    cfg = parse(path.read_text(), "yaml", {})
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(cfg, on_ready=ready.set_result, stop=stop, reload=lambda: parse(path.read_text(), "yaml", {}))
    )
    url = f"http://127.0.0.1:{await ready}"
    chat = {"model": "test/m", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):
                async with http.post(url + "/v1/chat/completions", json=chat, headers=AUTH) as r:
                    assert r.status == 200
            assert await _ok_count(http, url) == 3

            async def reload_with(doc: dict[str, Any]) -> None:
                path.write_text(yaml.safe_dump(doc))
                os.kill(os.getpid(), signal.SIGHUP)  # serve() handles it on this loop
                async with asyncio.timeout(5):
                    while (await _models(http, url))["test/m"]["pricing"]["prompt"] != _per_token(doc):
                        await asyncio.sleep(0.02)

            await reload_with(_doc(fake_upstream.base_url, tmp_path, price=2.0, extra_model=True))
            assert await _ok_count(http, url) == 3  # the same upstream: its health window came along
            moved = _doc(fake_upstream.base_url.replace("/v1", "/v2"), tmp_path, price=3.0, extra_model=False)
            await reload_with(moved)
            assert await _ok_count(http, url) == 0  # another address: a new upstream, judged afresh
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def _per_token(doc: dict[str, Any]) -> str:
    return {2.0: "0.000002", 3.0: "0.000003"}[doc["models"][0]["endpoints"][0]["price"]["input"]]
