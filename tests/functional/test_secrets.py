"""Secrets never leak: provider API keys, gateway keys and the admin key appear in nothing the gateway writes.

One `hedgerow serve` process, configured from environment variables (the config file holds no secret), is
driven through a tour of every kind of answer: successes streamed and not, the gateway's own errors, upstream
errors — among them an upstream that echoes the credential it received, as OpenAI's "Incorrect API key
provided: sk-…" does — connect failures, the admin, stats and self-service APIs, /metrics, /openapi.json and
the dashboard. Then every response (headers and body), the process's stdout and stderr (access log, console
trace spans, diagnostics at DEBUG) and every file under the test's directory (the SQLite ledger and its WAL,
temporary files) are searched for each secret, with and without its `sk-` prefix. A SHA-256 of a secret may
appear (the store keeps digests); the secret itself only in the one answer that creates a key, and there
only that key's.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from proxy.config import Timeouts
from proxy.upstream import Target
from proxy.upstream.base import credentials
from tests.conftest import AUTH, gateway_config
from tests.fakes import fixture

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def _secret(kind: str) -> str:
    return f"sk-{kind}-{secrets.token_hex(20)}"


class EchoUpstream:
    """An OpenAI- and Anthropic-format provider whose behaviour is its upstream model's name; its errors quote
    the credential it received, in the body and in a header, as careless providers do."""

    def __init__(self) -> None:
        self.seen: set[str] = set()  # credentials received
        self.echoed: set[str] = set()  # credentials written into an answer
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self._openai)
        self.app.router.add_post("/v1/completions", self._openai)
        self.app.router.add_post("/v1/embeddings", self._openai)
        self.app.router.add_post("/v1/messages", self._anthropic)
        self.app.router.add_get("/v1/models", self._models)

    def _credential(self, request: web.Request) -> str:
        key = request.headers.get("x-api-key") or request.headers.get("Authorization", "").partition(" ")[2]
        self.seen.add(key)
        return key

    def _echo(self, key: str, status: int, body: dict[str, Any]) -> web.Response:
        self.echoed.add(key)
        headers = {"WWW-Authenticate": f'Bearer error="invalid_token", key="{key}"', "X-Echo-Key": key}
        return web.Response(status=status, body=orjson.dumps(body), headers=headers, content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        self._credential(request)
        return web.Response(body=fixture("models_ok.json"), content_type="application/json")

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        key = self._credential(request)
        req = await request.json()
        model, stream = req["model"], bool(req.get("stream"))
        if model == "ok":
            name = {"/v1/completions": "completion_ok.json", "/v1/embeddings": "embeddings_ok.json"}
            if stream:
                return await _sse(request, fixture("stream_ok.sse"))
            return web.Response(body=fixture(name.get(request.path, "chat_ok.json")), content_type="application/json")
        text = f"Incorrect API key provided: {key}. You can find your API key at https://platform.openai.com."
        error = {"error": {"message": text, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
        if model == "echo-stream":  # a 200 stream whose first event is an error quoting the key
            self.echoed.add(key)
            return await _sse(request, b"data: " + orjson.dumps(error) + b"\n\n")
        if model == "echo-garbage":  # a 200 that is not JSON
            self.echoed.add(key)
            return web.Response(body=f"<html>bad key {key}</html>".encode(), content_type="text/html")
        return self._echo(key, int(model.removeprefix("echo-")), error)  # echo-401, echo-429, echo-500

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        key = self._credential(request)
        req = await request.json()
        if req["model"] == "ok":
            if req.get("stream"):
                return await _sse(request, fixture("stream_ok.sse", "anthropic"))
            return web.Response(body=fixture("chat_ok.json", "anthropic"), content_type="application/json")
        error = {"type": "error", "error": {"type": "authentication_error", "message": f"invalid x-api-key: {key}"}}
        return self._echo(key, int(req["model"].removeprefix("echo-")), error)


async def _sse(request: web.Request, data: bytes) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(data)
    await resp.write_eof()
    return resp


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Answer:
    label: str
    status: int
    head: bytes  # the response's headers, as text
    body: bytes


class Tour:
    """Makes requests and keeps every answer."""

    def __init__(self, http: aiohttp.ClientSession, url: str) -> None:
        self.http = http
        self.url = url
        self.answers: list[Answer] = []

    async def call(
        self, label: str, method: str, path: str, *, key: str | None = None, expect: int | None = None, **kw: Any
    ) -> Answer:
        headers = dict(kw.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        async with self.http.request(method, self.url + path, headers=headers, **kw) as r:
            body = await r.read()
            head = "".join(f"{k}: {v}\n" for k, v in r.headers.items()).encode()
        answer = Answer(label, r.status, head, body)
        self.answers.append(answer)
        if expect is not None:
            assert r.status == expect, (label, r.status, body[:500])
        return answer

    async def chat(self, label: str, key: str, model: str, expect: int, stream: bool = False) -> Answer:
        body = {"model": model, "messages": HI, "stream": stream}
        return await self.call(label, "POST", CHAT, key=key, json=body, expect=expect)


def _found(blob: bytes, secret_values: dict[str, str]) -> list[str]:
    """The names of the secrets in `blob`, whole or without their `sk-` prefix."""
    return [
        name
        for name, value in secret_values.items()
        if value.encode() in blob or value.removeprefix("sk-").encode() in blob
    ]


async def _wait_for(path: Path, pattern: str, proc: asyncio.subprocess.Process, within: float = 15.0) -> re.Match:
    async with asyncio.timeout(within):
        while True:
            text = await asyncio.to_thread(path.read_text, errors="replace")
            m = re.search(pattern, text)
            if m is not None:
                return m
            if proc.returncode is not None:
                raise AssertionError(f"gateway exited early ({proc.returncode}): {text[-2000:]}")
            await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_no_secret_appears_in_any_answer_log_or_file(aiohttp_server, http, tmp_path):
    fake = EchoUpstream()
    upstream = str((await aiohttp_server(fake.app)).make_url("/v1"))
    keys = {
        "alpha": _secret("alpha"),  # OpenAI format
        "beta": _secret("beta"),  # OpenAI format
        "claude": _secret("ant-claude"),  # Anthropic format (x-api-key)
        "down": _secret("down"),  # nobody listening
        "admin": _secret("hr-admin"),
        "user": _secret("hr-user"),
        "user2": _secret("hr-user2"),
    }
    env_names = {name: f"SECRETS_TEST_{name.upper()}" for name in keys}
    quick = {"connect-s": 1.0, "first-byte-s": 5.0, "idle-s": 5.0, "total-s": 10.0}

    def provider(name: str, url: str, adapter: str = "openai") -> dict[str, Any]:
        return {
            "name": name,
            "base-url": url,
            "adapter": adapter,
            "api-key": f"${{{env_names[name]}}}",
            "timeouts": quick,
            "probe": {"enabled": False},
        }

    def model(name: str, *endpoints: tuple[str, str]) -> dict[str, Any]:
        return {"name": name, "endpoints": [{"provider": p, "model": m} for p, m in endpoints]}

    tree = {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "max-body-bytes": 4096,
            "drain-grace-s": 2,
            "metrics": True,
            "access-log": True,
            "tracing": {"enabled": True, "exporter": "console", "service-name": "secrets"},
        },
        "accounting": {"store": {"path": str(tmp_path / "ledger.db")}, "flush-interval-s": 0.2},
        "keys": [
            {"name": "admin", "key": f"${{{env_names['admin']}}}", "admin": True},
            {"name": "user", "key": f"${{{env_names['user']}}}"},
            {"name": "user2", "key": f"${{{env_names['user2']}}}"},
        ],
        "providers": [
            provider("alpha", upstream),
            provider("beta", upstream),
            provider("claude", upstream, "anthropic"),
            provider("down", f"http://127.0.0.1:{_closed_port()}/v1"),
        ],
        "models": [
            model("t/ok", ("alpha", "ok")),
            model("t/claude", ("claude", "ok")),
            model("t/echo-401", ("alpha", "echo-401")),
            model("t/claude-401", ("claude", "echo-401")),
            model("t/echo-429", ("alpha", "echo-429"), ("beta", "echo-429")),
            model("t/echo-500", ("alpha", "echo-500"), ("claude", "echo-500")),
            model("t/echo-stream", ("beta", "echo-stream")),
            model("t/echo-garbage", ("beta", "echo-garbage")),
            model("t/down", ("down", "x")),
            model("t/flaky", ("down", "x"), ("alpha", "echo-stream")),
        ],
    }
    config = tmp_path / "hedgerow.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert not _found(config.read_bytes(), keys)  # the file holds variable names only
    (tmp_path / "tmp").mkdir()
    (tmp_path / "cwd").mkdir()
    env = {**os.environ, **{env_names[n]: v for n, v in keys.items()}, "TMPDIR": str(tmp_path / "tmp")}
    env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config), "--log-level", "DEBUG",
            stdout=stdout, stderr=stderr, env=env, cwd=tmp_path / "cwd",
        )  # fmt: skip
    created: dict[str, Any] = {}
    try:
        port = int((await _wait_for(err, r"listening on http://[^:]+:(\d+)", proc)).group(1))
        tour = Tour(http, f"http://127.0.0.1:{port}")
        created = await _drive(tour, keys, proc, err)
        # While it runs (after SIGTERM the WAL is checkpointed away and temporary files are removed).
        live = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    # The echoes were made: a gateway that relayed upstream errors as received would have leaked them.
    provider_keys = {keys[n] for n in ("alpha", "beta", "claude")}
    assert provider_keys <= fake.seen and provider_keys <= fake.echoed
    all_secrets = {**keys, "created": created["key"]}
    leaks = []
    for a in tour.answers:
        allowed = {"created"} if a.label == "admin: create a key" else set()
        for name in _found(a.head + a.body, all_secrets):
            if name not in allowed:
                leaks.append(f"{name} in the answer to {a.label} ({a.status})")
    assert {tmp_path / "ledger.db", tmp_path / "ledger.db-wal", out, err} <= set(live)
    for when, files in (
        ("while serving", live),
        ("after the exit", {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}),
    ):
        for path, data in files.items():
            for name in _found(data, all_secrets):
                leaks.append(f"{name} in {path.relative_to(tmp_path)} ({when})")
    assert not leaks, "\n".join(leaks)
    echo = next(a for a in tour.answers if a.label == "upstream 401 echoing its key")
    assert b"Incorrect API key provided: sk-...redacted." in echo.body  # relayed, masked
    # What was searched is what it should be: an access-log line per request, spans, a ledger with records.
    assert out.read_bytes().count(b'"key":') >= 20
    assert b'"service.name": "secrets"' in err.read_bytes() and b"span_id" in err.read_bytes()
    assert (tmp_path / "ledger.db").stat().st_size > 0


async def _drive(tour: Tour, keys: dict[str, str], proc: asyncio.subprocess.Process, err: Path) -> dict[str, Any]:
    """The tour; returns the answer that created a key."""
    user, user2, admin = keys["user"], keys["user2"], keys["admin"]
    # Successes, streamed and not, on every API and both wire formats.
    ok = await tour.chat("chat", user, "t/ok", 200)
    await tour.chat("chat stream", user, "t/ok", 200, stream=True)
    await tour.chat("chat via anthropic", user, "t/claude", 200)
    await tour.chat("chat stream via anthropic", user, "t/claude", 200, stream=True)
    await tour.call("completions", "POST", "/v1/completions", key=user, json={"model": "t/ok", "prompt": "hi"})
    await tour.call("embeddings", "POST", "/v1/embeddings", key=user, json={"model": "t/ok", "input": "hi"})
    messages = {"model": "t/claude", "max_tokens": 16, "messages": HI}
    for model in ("t/claude", "t/ok"):
        for stream in (False, True):
            await tour.call(
                f"messages {model} stream={stream}", "POST", "/v1/messages",
                headers={"x-api-key": user2}, json={**messages, "model": model, "stream": stream}, expect=200,
            )  # fmt: skip
    # The gateway's own errors.
    await tour.chat("bad key", _secret("wrong"), "t/ok", 401)
    await tour.chat("no such model", user, "t/nope", 404)
    await tour.call("invalid JSON", "POST", CHAT, key=user, data=b'{"model": "t/ok", "messages": [', expect=400)
    await tour.call("too large", "POST", CHAT, key=user, data=b"x" * 8192, expect=413)
    await tour.call("admin calls a model", "POST", CHAT, key=admin, json={"model": "t/ok", "messages": HI}, expect=403)
    await tour.call("messages bad key", "POST", "/v1/messages", headers={"x-api-key": "sk-nope"}, json=messages)
    # Upstream errors: echoed keys relayed (401, both formats; 429 once failover ran out), 5xx, error events,
    # garbage, nobody listening.
    echo = await tour.chat("upstream 401 echoing its key", user, "t/echo-401", 401)
    await tour.chat("upstream 401 echoing its key, stream", user, "t/echo-401", 401, stream=True)
    await tour.chat("anthropic 401 echoing its key", user, "t/claude-401", 401)
    await tour.call(
        "messages: anthropic 401 echoing its key", "POST", "/v1/messages",
        headers={"x-api-key": user2}, json={**messages, "model": "t/claude-401"}, expect=401,
    )  # fmt: skip
    await tour.call(
        "messages: openai 401 echoing its key", "POST", "/v1/messages",
        headers={"x-api-key": user2}, json={**messages, "model": "t/echo-401"}, expect=401,
    )  # fmt: skip
    await tour.chat("upstreams 429 echoing their keys", user, "t/echo-429", 429)
    await tour.chat("upstreams 500 echoing their keys", user, "t/echo-500", 503)
    await tour.chat("error event before the first token", user, "t/echo-stream", 502, stream=True)
    await tour.chat("not JSON", user, "t/echo-garbage", 502)
    await tour.chat("connect failure", user, "t/down", 502)
    await tour.chat("connect failure, then an error event", user, "t/flaky", 503, stream=True)
    # The admin API: a key created (its secret shown once), listed, read, used.
    a = await tour.call("admin: create a key", "POST", "/api/v1/keys", key=admin, json={"name": "made"}, expect=201)
    created = orjson.loads(a.body)
    key_id, made = created["data"]["id"], created["key"]
    await tour.call("admin: list keys", "GET", "/api/v1/keys", key=admin, expect=200)
    await tour.call("admin: get the key", "GET", f"/api/v1/keys/{key_id}", key=admin, expect=200)
    await tour.call("admin: update the key", "PATCH", f"/api/v1/keys/{key_id}", key=admin, json={"limit": 5})
    await tour.call("admin: list orgs", "GET", "/api/v1/orgs", key=admin, expect=200)
    await tour.call("admin API without a key", "GET", "/api/v1/keys", expect=401)
    await tour.call("admin API with a user key", "GET", "/api/v1/keys", key=user, expect=403)
    await tour.chat("chat with the created key", made, "t/ok", 200)
    await tour.chat("stream with the created key", made, "t/ok", 200, stream=True)
    await tour.call("key: created", "GET", "/api/v1/key", key=made, expect=200)
    # A reload (SIGHUP) in the middle: its log lines too.
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGHUP)
    await _wait_for(err, r"config reloaded", proc)
    # Everything else a client or an operator can read.
    for key in (user, admin):
        await tour.call("key", "GET", "/api/v1/key", key=key)
        await tour.call("credits", "GET", "/api/v1/credits", key=key)
    for gen in (ok, echo):
        gen_id = dict(line.split(": ", 1) for line in gen.head.decode().splitlines())["X-Hedgerow-Generation-Id"]
        await tour.call("generation", "GET", "/api/v1/generation", key=user, params={"id": gen_id})
    await asyncio.sleep(0.5)  # the ledger's flush: the stats below read it
    for path in ("/v1/models", "/api/v1/models", "/api/v1/rankings", "/api/v1/activity", "/api/v1/endpoints"):
        await tour.call(path, "GET", path, key=user, expect=200)
    await tour.call("providers", "GET", "/api/v1/providers", key=admin)
    for path in ("/metrics", "/openapi.json", "/dashboard", "/livez", "/readyz"):
        await tour.call(path, "GET", path, expect=200)
    await tour.call("no route", "GET", "/v2/nothing", key=user, expect=404)
    return created


# --- the masking itself, in process ---


def test_credentials_are_found_in_auth_headers_and_the_query_and_masked_by_shape():
    headers = {
        "Authorization": "Bearer sk-proj-abcdefghijklmnopqrstuvwxyz",
        "x-goog-api-key": "AIzaSyA-0123456789abcdef",
        "X-Custom-Token": "sk-Abc-0123456789",
        "anthropic-version": "2023-06-01",
        "Content-Type": "application/json",
        "X-Short-Key": "abc",
    }
    found = dict(credentials(headers, "api-version=2024-10-21&key=query-secret-0123"))
    assert found == {
        b"sk-proj-abcdefghijklmnopqrstuvwxyz": b"sk-proj-...redacted",
        b"AIzaSyA-0123456789abcdef": b"...redacted",
        b"query-secret-0123": b"...redacted",
        b"sk-Abc-0123456789": b"sk-...redacted",
    }
    t = Target("http://up.test/v1/chat?key=query-secret-0123", headers, Timeouts())
    body = b'{"error":{"message":"Incorrect API key provided: sk-proj-abcdefghijklmnopqrstuvwxyz."}}'
    assert t.redact(body) == b'{"error":{"message":"Incorrect API key provided: sk-proj-...redacted."}}'
    assert t.redact(b"nothing to hide") == b"nothing to hide"
    assert t.redact_text("key=query-secret-0123") == "key=...redacted"


async def test_an_upstream_error_quoting_the_key_is_relayed_without_it(gateway, aiohttp_server, http):
    """In process, on every upstream client and server engine: the status and shape survive, the key does not,
    and the body's length is what Content-Length says."""
    fake = EchoUpstream()
    url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    cfg = gateway_config(
        {"a": url, "b": url},
        models={"t/401": [("a", "echo-401")], "t/429": [("a", "echo-429"), ("b", "echo-429")]},
        probe={"enabled": False},
    )
    gw = await gateway(cfg)
    for model, status in (("t/401", 401), ("t/429", 429)):
        body = {"model": model, "messages": HI}
        async with http.post(gw.url + CHAT, json=body, headers=AUTH) as r:
            data = await r.read()
            assert r.status == status
            assert int(r.headers["Content-Length"]) == len(data)
            assert "X-Echo-Key" not in r.headers and "WWW-Authenticate" not in r.headers
        error = orjson.loads(data)["error"]
        assert error["code"] == "invalid_api_key"
        assert error["message"].startswith("Incorrect API key provided: sk-...redacted.")
        assert b"sk-upstream-" not in data
    assert {"sk-upstream-a", "sk-upstream-b"} <= fake.echoed
