"""The edge (proxy/edge.py) on every server engine: TLS termination, CORS (off unless configured), request ids."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import orjson
import pytest
import trustme
import yaml

from proxy.config import ConfigError, TlsConfig, parse
from tests.conftest import AUTH, KEY, gateway_config
from tests.fakes import Script, fixture, sse_events

CHAT = {"model": "test/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
ORIGIN = "https://app.example.com"
PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}


def with_server(cfg: Any, **changes: Any) -> Any:
    return msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server, **changes))


def cors_config(upstream: str, **cors: Any) -> Any:
    return gateway_config({"fake": upstream}, server={"cors": cors})


# -- TLS --


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> TlsConfig:
    """A certificate for 127.0.0.1 signed by a throwaway CA, as PEM files."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    with cert_file.open("ab") as f:
        for pem in cert.cert_chain_pems[1:]:
            f.write(pem.bytes())
    return TlsConfig(cert_file=str(cert_file), key_file=str(key_file))


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_openai_sdk_gets_a_completion_over_https(fake_upstream, gateway, ca, tls_files):
    gw = await gateway(with_server(gateway_config({"fake": fake_upstream.base_url}), tls=tls_files))
    http = openai.DefaultAsyncHttpxClient(verify=client_context(ca))
    client = openai.AsyncOpenAI(
        base_url=f"https://127.0.0.1:{gw.port}/v1", api_key=KEY, max_retries=0, http_client=http
    )
    raw = await client.chat.completions.with_raw_response.create(
        model="test/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().choices[0].message.content == "Hello! How can I help you today?"
    assert raw.headers["x-request-id"] == raw.headers["x-hedgerow-generation-id"]
    fake_upstream.script(Script(sse=sse_events(fixture("stream_ok.sse"))))
    stream = await client.chat.completions.create(
        model="test/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(text) == "Hello! How can I help you today?"
    fake_upstream.script(Script())
    big = "x" * 900_000  # many TLS records (16 KiB each at most); under the fake provider's 1 MiB body limit
    raw = await client.chat.completions.with_raw_response.create(
        model="test/gpt-4o-mini", messages=[{"role": "user", "content": big}]
    )
    assert raw.http_response.status_code == 200
    assert orjson.loads(fake_upstream.requests[-1].body)["messages"][0]["content"] == big
    await client.close()


async def test_plain_http_to_the_tls_port_fails_cleanly(fake_upstream, gateway, ca, tls_files, caplog):
    gw = await gateway(with_server(gateway_config({"fake": fake_upstream.base_url}), tls=tls_files))
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientError):
            async with plain.get(f"http://127.0.0.1:{gw.port}/livez") as resp:
                await resp.read()
    # the listener lives on: the next client that speaks TLS is served
    async with aiohttp.ClientSession() as https:
        async with https.get(f"https://127.0.0.1:{gw.port}/livez", ssl=client_context(ca)) as resp:
            assert resp.status == 200 and resp.headers["X-Request-Id"]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


async def test_a_client_that_does_not_trust_the_certificate_is_refused(fake_upstream, gateway, tls_files):
    gw = await gateway(with_server(gateway_config({"fake": fake_upstream.base_url}), tls=tls_files))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(f"https://127.0.0.1:{gw.port}/livez")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
async def test_tls_below_1_2_is_refused(fake_upstream, gateway, ca, tls_files):
    gw = await gateway(with_server(gateway_config({"fake": fake_upstream.base_url}), tls=tls_files))
    old = client_context(ca)
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", gw.port, ssl=old), 5)
        writer.close()


def test_tls_files_that_do_not_load_are_a_config_error(tmp_path: Path, tls_files: TlsConfig) -> None:
    def load(tls: dict[str, str]) -> None:
        tree = {"keys": [{"name": "k", "key": KEY}], "server": {"tls": tls}}
        parse(yaml.safe_dump(tree), "yaml", env={})

    load({"cert-file": tls_files.cert_file, "key-file": tls_files.key_file})  # fine
    with pytest.raises(ConfigError) as e:
        load({"cert-file": str(tmp_path / "missing.pem"), "key-file": tls_files.key_file})
    assert "missing.pem" in str(e.value) and "$.server.tls" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load({"cert-file": tls_files.key_file, "key-file": tls_files.cert_file})  # swapped
    assert "$.server.tls" in str(e.value)


# -- CORS --


async def test_cors_is_off_unless_configured(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    async with http.options(gw.v1 + "/chat/completions", headers=PREFLIGHT) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
    async with http.post(gw.v1 + "/chat/completions", json=CHAT, headers={**AUTH, "Origin": ORIGIN}) as resp:
        assert resp.status == 200
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")]


async def test_preflight_answered_for_a_listed_origin_only(fake_upstream, gateway, http):
    gw = await gateway(cors_config(fake_upstream.base_url, **{"allow-origins": [ORIGIN], "max-age-s": 120}))
    asked = {**PREFLIGHT, "Access-Control-Request-Headers": "authorization, content-type"}
    async with http.options(gw.v1 + "/chat/completions", headers=asked) as resp:
        assert resp.status == 204, await resp.text()
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"authorization", "content-type", "x-request-id"} <= allowed
        assert resp.headers["Access-Control-Max-Age"] == "120"
        assert "Origin" in resp.headers["Vary"] and resp.headers["X-Request-Id"]
    other = {**PREFLIGHT, "Origin": "https://evil.example.com"}
    async with http.options(gw.v1 + "/chat/completions", headers=other) as resp:
        assert resp.status == 405  # as without CORS: the browser refuses
        assert "Access-Control-Allow-Origin" not in resp.headers
    async with http.options(gw.v1 + "/chat/completions", headers={"Origin": ORIGIN}) as resp:
        assert resp.status == 405  # OPTIONS without Access-Control-Request-Method is no preflight


async def test_responses_to_a_listed_origin_carry_cors_headers(fake_upstream, gateway, http):
    gw = await gateway(cors_config(fake_upstream.base_url, **{"allow-origins": [ORIGIN, "http://localhost:3000"]}))
    headers = {**AUTH, "Origin": ORIGIN}
    async with http.post(gw.v1 + "/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        exposed = resp.headers["Access-Control-Expose-Headers"]
        assert "X-Request-Id" in exposed and "X-Hedgerow-Generation-Id" in exposed and "Retry-After" in exposed
        assert resp.headers["Vary"] == "Origin"
    fake_upstream.script(Script(sse=sse_events(fixture("stream_ok.sse"))))
    async with http.post(gw.v1 + "/chat/completions", json={**CHAT, "stream": True}, headers=headers) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN  # streamed too
        await resp.read()
    async with http.get(gw.v1 + "/models", headers={"Origin": ORIGIN}) as resp:  # errors too
        assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    async with http.get(gw.url + "/dashboard", headers={"Origin": ORIGIN, "Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Vary"] == "Accept-Encoding, Origin"  # added to what the route varies on
    async with http.get(gw.url + "/livez", headers={"Origin": "https://evil.example.com"}) as resp:
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
    async with http.get(gw.url + "/livez") as resp:  # no Origin: not a cross-origin request
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_any_origin_with_star(fake_upstream, gateway, http):
    cfg = cors_config(fake_upstream.base_url, **{"allow-origins": ["*"], "allow-headers": ["*"]})
    gw = await gateway(cfg)
    asked = {**PREFLIGHT, "Origin": "https://anyone.example", "Access-Control-Request-Headers": "x-stainless-os"}
    async with http.options(gw.v1 + "/embeddings", headers=asked) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert resp.headers["Access-Control-Allow-Headers"] == "x-stainless-os"  # "*": what the page asks for
    async with http.get(gw.url + "/livez", headers={"Origin": "https://anyone.example"}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in resp.headers


def test_cors_entries_are_checked() -> None:
    def load(cors: dict[str, Any]) -> None:
        parse(yaml.safe_dump({"keys": [{"name": "k", "key": KEY}], "server": {"cors": cors}}), "yaml", env={})

    load({"allow-origins": ["*", "https://a.example", "http://localhost:8080"]})
    with pytest.raises(ConfigError) as e:
        load({"allow-origins": ["https://a.example/", "a.example"], "allow-headers": ["bad header"]})
    text = str(e.value)
    assert "allow-origins[0]" in text and "allow-origins[1]" in text and "allow-headers[0]" in text


# -- request ids --


async def test_request_ids_on_every_answer(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    seen = set()
    for method, url, headers in [
        ("GET", gw.url + "/livez", {}),
        ("GET", gw.url + "/nope", {}),  # 404
        ("DELETE", gw.url + "/livez", {}),  # 405
        ("GET", gw.v1 + "/models", {}),  # 401
        ("GET", gw.url + "/openapi.json", {}),
    ]:
        async with http.request(method, url, headers=headers) as resp:
            rid = resp.headers["X-Request-Id"]
            assert rid.startswith("req-") and rid not in seen, (url, rid)
            seen.add(rid)
    # the client's own, when sane
    async with http.get(gw.url + "/livez", headers={"X-Request-Id": "trace-7f3a"}) as resp:
        assert resp.headers["X-Request-Id"] == "trace-7f3a"
    for insane in ("a" * 129, "has space", "ünïcode", ""):
        async with http.get(gw.url + "/livez", headers={"X-Request-Id": insane}) as resp:
            assert resp.headers["X-Request-Id"].startswith("req-"), insane
    async with http.get(gw.url + "/livez", headers={"X-Request-Id": "x" * 128}) as resp:
        assert resp.headers["X-Request-Id"] == "x" * 128


async def test_a_proxied_request_is_known_by_its_generation_id(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    async with http.post(gw.v1 + "/chat/completions", json=CHAT, headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == resp.headers["X-Hedgerow-Generation-Id"]
    fake_upstream.script(Script(sse=sse_events(fixture("stream_ok.sse"))))
    async with http.post(gw.v1 + "/chat/completions", json={**CHAT, "stream": True}, headers=AUTH) as resp:
        assert resp.headers["X-Request-Id"] == resp.headers["X-Hedgerow-Generation-Id"]
        await resp.read()
    # an error after routing names the generation too (its record can be looked up)
    fake_upstream.script(Script(status=500, body=fixture("chat_500.json")))
    async with http.post(gw.v1 + "/chat/completions", json=CHAT, headers=AUTH) as resp:
        assert resp.status == 502
        assert resp.headers["X-Request-Id"] == resp.headers["X-Hedgerow-Generation-Id"]
        assert resp.headers["X-Request-Id"].startswith("gen-")
    # the client's id wins, and the generation keeps its own header
    headers = {**AUTH, "X-Request-Id": "client-42"}
    fake_upstream.script(Script())
    async with http.post(gw.v1 + "/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.headers["X-Request-Id"] == "client-42"
        assert resp.headers["X-Hedgerow-Generation-Id"].startswith("gen-")
    # an error before routing (bad body) has no generation: a fresh id
    async with http.post(gw.v1 + "/chat/completions", data=b"{", headers=AUTH) as resp:
        assert resp.status == 400 and resp.headers["X-Request-Id"].startswith("req-")


async def test_protocol_errors_carry_a_request_id(fake_upstream, gateway):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400"  # aiohttp answers a request it could not parse as HTTP/1.0
    assert b"\r\nx-request-id: req-" in head.lower()
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"


async def test_a_head_too_slow_is_answered_with_a_request_id(fake_upstream, gateway):
    cfg = gateway_config({"fake": fake_upstream.base_url}, server={"header-timeout-s": 0.2})
    gw = await gateway(cfg)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # and no more
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.split(b" ")[1] == b"408" and b"\r\nx-request-id: req-" in data.lower()
