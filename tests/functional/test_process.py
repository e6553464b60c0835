"""The gateway as an operator runs it: `hedgerow serve` in its own process, signals, workers, the demo."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import sys
import tempfile
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from proxy.config import Config
from proxy.cpus import usable_cpus
from tests.conftest import AUTH, KEY
from tests.fakes import Script, fixture, sse_events

CHAT = {"model": "test/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ENGINES = pytest.mark.parametrize("engine", ["aiohttp", "lean"])  # `hedgerow serve --engine`


async def _spawn(
    *args: str,
    env: dict[str, str] | None = None,
    nofile: tuple[int, int] | None = None,
    log: list[str] | None = None,
) -> tuple[asyncio.subprocess.Process, int]:
    """Start `python -m proxy …` and wait for its "listening on" line; return the process and its port.
    It runs in a fresh directory, where a config without a store path puts its SQLite ledger. `serve` runs one
    process unless the test asks for more: the default (one worker per CPU) varies with the machine.
    `nofile`: the (soft, hard) open-file limit it starts with; `log`: gets its stderr lines up to that one."""
    if args[:1] == ("serve",) and "--workers" not in args:
        args = (*args, "--workers", "1")
    limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=limit,
        env={**os.environ, **(env or {})}, cwd=tempfile.mkdtemp(prefix="hedgerow-node-"),
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(15):
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise AssertionError(f"gateway exited early: {await proc.wait()}")
            if log is not None:
                log.append(line)
            if m := re.search(r"listening on http://[^:]+:(\d+)", line):
                return proc, int(m.group(1))


def _config_file(tmp_path: Path, upstream: str, **server: object) -> str:
    tree = {
        "server": {"host": "127.0.0.1", "port": 0, **server},
        "keys": [{"name": "test", "key": KEY}],
        "providers": [{"name": "fake", "base-url": upstream}],
        "models": [{"name": "test/gpt-4o-mini", "endpoints": [{"provider": "fake", "model": "gpt-4o-mini"}]}],
    }
    path = tmp_path / "hedgerow.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@ENGINES
async def test_sigterm_drains_a_stream_in_flight_then_exits_zero(fake_upstream, http, tmp_path, engine):
    events = sse_events(fixture("stream_ok.sse"))
    fake_upstream.script(Script(sse=events, gap_s=0.08))  # ~1 s of streaming
    proc, port = await _spawn(
        "serve", "--config", _config_file(tmp_path, fake_upstream.base_url, **{"drain-grace-s": 10}), "--engine", engine
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with asyncio.timeout(10), http.post(url, json={**CHAT, "stream": True}, headers=AUTH) as r:
            first = await r.content.readany()
            proc.send_signal(signal.SIGTERM)
            rest = await r.read()
        assert first + rest == fixture("stream_ok.sse")  # the stream finished whole, after SIGTERM
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer accepting


@ENGINES
async def test_sigterm_cuts_streams_that_outlive_the_grace_period(fake_upstream, http, tmp_path, engine):
    events = sse_events(fixture("stream_ok.sse"))
    fake_upstream.script(Script(sse=events, gap_s=1.0))  # ~11 s: longer than the grace
    proc, port = await _spawn(
        "serve",
        "--config",
        _config_file(tmp_path, fake_upstream.base_url, **{"drain-grace-s": 0.5}),
        "--engine",
        engine,
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with asyncio.timeout(10):
            async with http.post(url, json={**CHAT, "stream": True}, headers=AUTH) as r:
                await r.content.readany()
                proc.send_signal(signal.SIGTERM)
                with pytest.raises(Exception):  # noqa: B017 - any transport error: the stream was cut
                    await r.read()
            assert await proc.wait() == 0
            await fake_upstream.wait_cancelled()  # and its upstream request did not linger
    finally:
        if proc.returncode is None:  # a failure above must not leave the gateway running
            proc.kill()
            await proc.wait()


async def test_embedded_default_config_serves_the_demo_provider_to_the_sdk():
    env = {"HEDGEROW_API_KEY": "", "OPENAI_API_KEY": ""}
    proc, port = await _spawn("serve", "--port", "0", env=env)
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-hedgerow-demo", max_retries=0)
        models = [m.id for m in (await client.models.list()).data]
        assert "hedgerow/demo" in models and "openai/gpt-4o-mini" not in models  # no OpenAI key → no OpenAI
        done = await client.chat.completions.create(
            model="hedgerow/demo", messages=[{"role": "user", "content": "ping"}]
        )
        assert "[demo]" in (done.choices[0].message.content or "")
        assert "ping" in (done.choices[0].message.content or "")
        parts = []
        async for chunk in await client.chat.completions.create(
            model="hedgerow/demo", messages=[{"role": "user", "content": "ping"}], stream=True
        ):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
        assert len(parts) > 5 and "".join(parts) == done.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            await openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong-key", max_retries=0
            ).models.list()
        await client.close()
    finally:
        proc.terminate()
        assert await proc.wait() == 0


async def test_openai_key_in_environment_enables_openai_models():
    env = {"HEDGEROW_API_KEY": "sk-custom-0123456789", "OPENAI_API_KEY": "sk-not-used-in-this-test"}
    proc, port = await _spawn("serve", "--port", "0", env=env)
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-custom-0123456789")
        assert "openai/gpt-4o-mini" in [m.id for m in (await client.models.list()).data]
        with pytest.raises(openai.AuthenticationError):  # the demo key is off once a real key is set
            await openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-hedgerow-demo", max_retries=0
            ).models.list()
        await client.close()
    finally:
        proc.terminate()
        await proc.wait()


async def test_demo_key_refused_on_a_non_loopback_address():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--host", "0.0.0.0", "--port", "0",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "HEDGEROW_API_KEY": ""},
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2
    assert b"demo key sk-hedgerow-demo is accepted only on a loopback address" in err


@ENGINES
async def test_workers_share_the_port_and_all_drain(fake_upstream, http, tmp_path, engine):
    config = _config_file(tmp_path, fake_upstream.base_url, engine=engine)  # the engine from the config file
    proc, port = await _spawn("serve", "--config", config, "--workers", "2")
    try:
        async with asyncio.timeout(20):
            while len(_children(proc.pid)) < 2:  # polling /proc: the second worker may still be starting
                await asyncio.sleep(0.05)
            for _ in range(20):
                async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=AUTH) as r:
                    assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert _children(proc.pid) == []


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def test_workers_auto_starts_one_per_usable_cpu_and_the_config_default_is_auto(fake_upstream, http, tmp_path):
    assert Config().server.workers == "auto"
    n = usable_cpus()
    proc, port = await _spawn("serve", "--config", _config_file(tmp_path, fake_upstream.base_url), "--workers", "auto")
    try:
        async with asyncio.timeout(20):
            while len(_children(proc.pid)) < (n if n > 1 else 0):
                await asyncio.sleep(0.05)
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=AUTH) as r:
                assert r.status == 200
        assert len(_children(proc.pid)) == (n if n > 1 else 0)  # one worker: it serves in the process itself
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_workers_stop_when_their_supervisor_is_killed(fake_upstream, tmp_path):
    proc, _ = await _spawn("serve", "--config", _config_file(tmp_path, fake_upstream.base_url), "--workers", "2")
    async with asyncio.timeout(20):
        while len(_children(proc.pid)) < 2:
            await asyncio.sleep(0.05)
    workers = _children(proc.pid)
    proc.kill()  # SIGKILL: the supervisor cannot pass anything on
    try:  # not `proc.wait()`: workers that outlive it hold its output pipes open, and that wait would hang
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):  # the kernel sends each worker SIGTERM: a drain, nothing in flight
                while any(_running(pid) for pid in workers):
                    await asyncio.sleep(0.05)
        assert [pid for pid in workers if _running(pid)] == []
    finally:
        for pid in workers:  # a failure must not leave workers serving
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # With every worker gone its pipes reach EOF: reap the supervisor and close its transport here, or the
        # garbage collector does it during a later test, whose loop is not this one ("Event loop is closed").
        await asyncio.wait_for(proc.communicate(), 15)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its (new) parent to reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def _open_files(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of a running process."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc/<pid>/limits")


async def test_the_gateway_raises_its_open_file_limit_to_the_hard_one(fake_upstream, tmp_path):
    """A soft limit of 256 (systemd's default is 1,024) would refuse the ~128th concurrent stream."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    log: list[str] = []
    config = _config_file(tmp_path, fake_upstream.base_url, **{"max-connections": 100})
    proc, _ = await _spawn("serve", "--config", config, "--workers", "2", nofile=(256, hard), log=log)
    try:
        async with asyncio.timeout(20):
            while len(_children(proc.pid)) < 2:
                await asyncio.sleep(0.05)
        assert _open_files(proc.pid) == (hard, hard)
        assert [_open_files(pid) for pid in _children(proc.pid)] == [(hard, hard)] * 2  # forked after the raise
        assert not [line for line in log if "open-file limit" in line]  # 100 connections fit: nothing to say
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_an_open_file_limit_too_low_for_max_connections_is_named_at_startup(fake_upstream, tmp_path):
    log: list[str] = []
    config = _config_file(tmp_path, fake_upstream.base_url, **{"max-connections": 1000})
    proc, port = await _spawn("serve", "--config", config, nofile=(300, 300), log=log)
    try:
        warned = [line for line in log if "open-file limit 300" in line]
        assert len(warned) == 1 and "about 118 proxied connections" in warned[0] and "(1000)" in warned[0]
        assert _open_files(proc.pid) == (300, 300)
        async with aiohttp.ClientSession() as http:  # it serves all the same
            async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=AUTH) as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
