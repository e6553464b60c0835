"""Every bad input and upstream failure gets its status and an OpenAI-shaped error body, and nothing hangs.

Each case also checks that the gateway still serves a normal request afterwards (it is not wedged), and that
no body leaks a traceback or an upstream secret. Anything that could hang runs under `asyncio.timeout`.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest

from proxy.config import Config
from tests.conftest import AUTH, KEY, gateway_config
from tests.fakes import FakeUpstream, Script, fixture, sse_events

MODEL = "test/gpt-4o-mini"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
STREAM_CHAT = {**CHAT, "stream": True}
PIECES = sse_events(fixture("stream_ok.sse"))
T = 5  # seconds: upper bound for anything that should take well under one


def assert_openai_error(body: bytes, *, code: str | None = None, param: Any = ...) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`, a real message, no traceback, no upstream secret."""
    assert b"Traceback" not in body and b'File "' not in body, body
    assert b"sk-upstream-" not in body, body
    doc = orjson.loads(body)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), body
    err = doc["error"]
    assert {"message", "type", "param", "code"} <= err.keys(), body
    assert isinstance(err["message"], str) and err["message"].strip(), body
    assert isinstance(err["type"], str) and err["type"], body
    if code is not None:
        assert err["code"] == code, body
    if param is not ...:
        assert err["param"] == param, body
    return err


async def post(
    http: aiohttp.ClientSession, url: str, body: Any = None, *, data: Any = None, headers: Any = AUTH
) -> tuple[int, Any, bytes]:
    async with asyncio.timeout(T):
        kwargs = {"json": body} if data is None else {"data": data}
        async with http.post(url, headers=headers, **kwargs) as r:
            return r.status, r.headers, await r.read()


async def assert_still_serves(http: aiohttp.ClientSession, gw: Any, *fakes: FakeUpstream, model: str = MODEL) -> None:
    """A normal request on the same gateway succeeds: the failure before it wedged nothing."""
    for fake in fakes:
        fake.script(Script())
    before = sum(len(f.requests) for f in fakes)
    status, _, body = await post(http, gw.v1 + "/chat/completions", {**CHAT, "model": model})
    assert status == 200, body
    assert body == fixture("chat_ok.json")
    assert sum(len(f.requests) for f in fakes) == before + 1


def with_timeouts(cfg: Config, provider: str, **changes: float) -> Config:
    """`cfg` with one provider's timeouts changed, so a short timeout meant for a failing provider cannot
    also trip the healthy one when the machine is busy."""
    replace = msgspec.structs.replace
    providers = [
        replace(p, timeouts=replace(p.timeouts, **changes)) if p.name == provider else p for p in cfg.providers
    ]
    return replace(cfg, providers=providers)


def closed_port_url() -> str:
    """A loopback URL nothing listens on: bind, take the port, close."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def second_upstream(aiohttp_server: Any) -> FakeUpstream:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app)
    fake.base_url = str(server.make_url("/v1"))
    return fake


# --- raw sockets -------------------------------------------------------------------------------------------


async def raw_exchange(port: int, data: bytes, *, timeout: float = T) -> bytes:
    """Send `data`, then read until the server closes the connection; fails if it never does."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read(-1)  # to EOF: returns only once the server closed the connection
    finally:
        writer.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert "content-length" in headers, raw
    assert len(body) == int(headers["content-length"]), raw
    return int(status_line.split(" ")[1]), headers, body


def head(method: str, path: str, **extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- 400: the request itself is wrong; nothing goes upstream ----------------------------------------------

BAD_REQUESTS = [
    pytest.param("/chat/completions", b'{"model": "test/gpt-4o-mini", "messages": [', None, id="invalid-json"),
    pytest.param("/chat/completions", b"", None, id="empty-body"),
    pytest.param("/chat/completions", b'[{"model": "test/gpt-4o-mini"}]', None, id="json-array"),
    pytest.param("/chat/completions", b'"just a string"', None, id="json-string"),
    pytest.param("/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', "model", id="no-model"),
    pytest.param("/chat/completions", b'{"model": 4, "messages": [{"role": "user"}]}', "model", id="model-int"),
    pytest.param("/chat/completions", b'{"model": "", "messages": [{"role": "user"}]}', "model", id="model-empty"),
    pytest.param(
        "/chat/completions",
        b'{"model": "test/gpt-4o-mini", "messages": [{"role": "user"}], "stream": "yes"}',
        "stream",
        id="stream-str",
    ),
    pytest.param("/chat/completions", b'{"model": "test/gpt-4o-mini"}', "messages", id="no-messages"),
    pytest.param(
        "/chat/completions", b'{"model": "test/gpt-4o-mini", "messages": []}', "messages", id="empty-messages"
    ),
    pytest.param("/chat/completions", b'{"model": "test/gpt-4o-mini", "messages": 3}', "messages", id="messages-int"),
    pytest.param("/embeddings", b'{"model": "test/gpt-4o-mini"}', "input", id="embeddings-no-input"),
    pytest.param("/completions", b'{"model": "test/gpt-4o-mini"}', "prompt", id="completions-no-prompt"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
async def test_malformed_request_body_is_a_400_that_never_reaches_the_upstream(
    fake_upstream, gateway, http, path, body, param
):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    status, headers, got = await post(http, gw.v1 + path, data=body)
    assert status == 400, got
    assert headers["Content-Type"].startswith("application/json")
    err = assert_openai_error(got, param=param)
    assert err["type"] == "invalid_request_error"
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


# --- 401 / 404 / 405 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": f"Basic {KEY}"}, id="wrong-scheme"),
        pytest.param({"Authorization": "Bearer"}, id="no-key"),
        pytest.param({"Authorization": "Bearer sk-test-wrong-key"}, id="wrong-key"),
        pytest.param({"Authorization": "Bearer sk-upstream-fake"}, id="upstream-key"),
    ],
)
async def test_missing_or_bad_api_key_is_a_401_that_never_reaches_the_upstream(fake_upstream, gateway, http, headers):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    status, _, body = await post(http, gw.v1 + "/chat/completions", CHAT, headers=headers)
    assert status == 401, body
    err = assert_openai_error(body, code="invalid_api_key")
    assert err["type"] == "authentication_error"
    async with asyncio.timeout(T), http.get(gw.v1 + "/models", headers=headers) as r:
        assert r.status == 401
        assert_openai_error(await r.read(), code="invalid_api_key")
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


async def test_unknown_model_is_a_404_model_not_found(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    status, _, body = await post(http, gw.v1 + "/chat/completions", {**CHAT, "model": "nope/gpt-9"})
    assert status == 404, body
    err = assert_openai_error(body, code="model_not_found", param="model")
    assert err["type"] == "invalid_request_error"
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_unknown_route_is_a_404_json(fake_upstream, gateway, http, method):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    async with asyncio.timeout(T), http.request(method, gw.v1 + "/no/such/route", headers=AUTH, json=CHAT) as r:
        assert r.status == 404
        assert r.headers["Content-Type"].startswith("application/json")
        assert_openai_error(await r.read(), code="not_found")
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_wrong_method_on_a_known_route_is_a_405_json(fake_upstream, gateway, http, method):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    async with asyncio.timeout(T), http.request(method, gw.v1 + "/chat/completions", headers=AUTH) as r:
        assert r.status == 405
        assert r.headers["Content-Type"].startswith("application/json")
        assert_openai_error(await r.read(), code="method_not_allowed")
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


# --- 413 / 408 / malformed HTTP ----------------------------------------------------------------------------


def _big_chat(size: int) -> bytes:
    body = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * size}]})
    assert len(body) > size
    return body


async def test_body_over_the_limit_with_content_length_is_a_413(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"max-body-bytes": 2048}))
    status, _, body = await post(http, gw.v1 + "/chat/completions", data=_big_chat(4096))
    assert status == 413, body
    assert_openai_error(body, code="payload_too_large")
    assert fake_upstream.requests == []
    # Just under the limit is fine.
    status, _, body = await post(http, gw.v1 + "/chat/completions", data=_big_chat(1900))
    assert status == 200, body
    await assert_still_serves(http, gw, fake_upstream)


async def test_chunked_body_over_the_limit_is_a_413(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"max-body-bytes": 2048}))
    data = _big_chat(4096)

    async def chunks():  # an async iterator body: aiohttp sends it chunked, without Content-Length
        for i in range(0, len(data), 512):
            yield data[i : i + 512]

    async with asyncio.timeout(T), http.post(gw.v1 + "/chat/completions", data=chunks(), headers=AUTH) as r:
        assert r.status == 413
        assert_openai_error(await r.read(), code="payload_too_large")
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


async def test_large_body_is_a_413_even_for_a_client_that_sends_it_all_before_reading(fake_upstream, gateway, http):
    """Like http.client or curl: the gateway must read (and drop) the body rather than reset the connection
    under a client still writing, or that client sees ECONNRESET instead of the 413."""
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"max-body-bytes": 2048}))
    size = 8 << 20
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        async with asyncio.timeout(T):
            writer.write(head("POST", "/v1/chat/completions", Content_Length=str(size)))
            chunk = b"x" * (1 << 20)
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            raw = await reader.read(-1)
    finally:
        writer.close()
    status, _, body = parse_response(raw)
    assert status == 413, raw
    assert_openai_error(body, code="payload_too_large")
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


async def test_chunked_body_under_the_limit_is_forwarded(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"max-body-bytes": 2048}))
    data = _big_chat(1000)

    async def chunks():
        for i in range(0, len(data), 100):
            yield data[i : i + 100]

    status, _, body = await post(http, gw.v1 + "/chat/completions", data=chunks())
    assert status == 200, body
    sent = orjson.loads(fake_upstream.requests[0].body)
    assert sent["messages"] == orjson.loads(data)["messages"]


async def test_body_that_never_fully_arrives_is_a_408_and_the_connection_closes(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"body-timeout-s": 0.3}))
    partial = b'{"model": "test/gpt-4o-mini", '  # 30 of the promised 100 bytes
    loop = asyncio.get_running_loop()
    start = loop.time()
    raw = await raw_exchange(
        gw.port, head("POST", "/v1/chat/completions", Content_Type="application/json", Content_Length="100") + partial
    )
    assert 0.25 < loop.time() - start < 2
    status, headers, body = parse_response(raw)
    assert status == 408, raw
    assert headers["content-type"].startswith("application/json")
    assert_openai_error(body, code="request_timeout")
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


async def test_request_head_that_trickles_is_a_408_and_the_connection_closes(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"header-timeout-s": 0.3}))
    loop = asyncio.get_running_loop()
    start = loop.time()
    raw = await raw_exchange(gw.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    assert 0.25 < loop.time() - start < 2
    status, headers, body = parse_response(raw)  # raw_exchange returned: the server closed the connection
    assert status == 408, raw
    assert headers["connection"].lower() == "close"
    assert_openai_error(body, code="request_timeout")
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


async def test_idle_keepalive_connection_is_not_cut_by_the_head_deadline(fake_upstream, gateway, http):
    """The head deadline runs only while a head is arriving, not while a kept-alive connection is idle."""
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"header-timeout-s": 0.3}))
    body = orjson.dumps(CHAT)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        async with asyncio.timeout(T):
            for i in range(2):
                if i:
                    await asyncio.sleep(0.45)  # idle longer than the head deadline
                writer.write(head("POST", "/v1/chat/completions", Content_Length=str(len(body))) + body)
                status_line = await reader.readline()
                assert status_line.startswith(b"HTTP/1.1 200"), status_line
                length = 0
                while (line := await reader.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                assert await reader.readexactly(length) == fixture("chat_ok.json")
    finally:
        writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="request-line"),
        pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", id="header-line"),
        pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", id="content-length"),
    ],
)
async def test_malformed_http_is_a_400_json_and_the_connection_closes(fake_upstream, gateway, http, garbage):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    raw = await raw_exchange(gw.port, garbage)
    status, headers, body = parse_response(raw)
    assert status == 400, raw
    assert headers["content-type"].startswith("application/json")
    err = assert_openai_error(body)
    assert err["type"] == "invalid_request_error"
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


# --- upstream answers an error --------------------------------------------------------------------------------


async def test_upstream_400_is_relayed_byte_identical(fake_upstream, gateway, http):
    fake_upstream.script(Script(status=400, body=fixture("chat_400.json")))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    status, headers, body = await post(http, gw.v1 + "/chat/completions", CHAT)
    assert status == 400
    assert body == fixture("chat_400.json")
    assert headers["Content-Type"].startswith("application/json")
    assert_openai_error(body, param="temperature")
    assert len(fake_upstream.requests) == 1
    await assert_still_serves(http, gw, fake_upstream)


async def test_upstream_429_is_relayed_with_its_retry_after_and_body(fake_upstream, gateway, http):
    fake_upstream.script(Script(status=429, body=fixture("chat_429.json"), headers={"Retry-After": "7"}))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    status, headers, body = await post(http, gw.v1 + "/chat/completions", CHAT)
    assert status == 429
    assert headers["Retry-After"] == "7"
    assert body == fixture("chat_429.json")
    assert_openai_error(body, code="rate_limit_exceeded")
    await assert_still_serves(http, gw, fake_upstream)


@pytest.mark.parametrize(
    ("upstream_status", "upstream_body", "status", "code"),
    [
        pytest.param(500, fixture("chat_500.json"), 502, "bad_gateway", id="500"),
        pytest.param(502, b"<html>bad gateway</html>", 502, "bad_gateway", id="502-html"),
        pytest.param(503, b'{"error": {"message": "overloaded"}}', 502, "bad_gateway", id="503"),
        pytest.param(504, b"", 504, "upstream_timeout", id="504"),
    ],
)
async def test_upstream_5xx_becomes_a_gateway_error(
    fake_upstream, gateway, http, upstream_status, upstream_body, status, code
):
    fake_upstream.script(Script(status=upstream_status, body=upstream_body))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    status_got, headers, body = await post(http, gw.v1 + "/chat/completions", CHAT)
    assert status_got == status, body
    assert headers["Content-Type"].startswith("application/json")
    assert body != upstream_body  # the gateway's own body, not the upstream's
    assert_openai_error(body, code=code)
    await assert_still_serves(http, gw, fake_upstream)


async def test_upstream_connect_refused_is_a_502(fake_upstream, gateway, http):
    cfg = gateway_config(
        {"dead": closed_port_url(), "fake": fake_upstream.base_url},
        models={MODEL: [("dead", "gpt-4o-mini")], "test/ok": [("fake", "gpt-4o-mini")]},
    )
    gw = await gateway(cfg)
    for kind, body in (("chat/completions", CHAT), ("chat/completions", STREAM_CHAT), ("embeddings", None)):
        req = body or {"model": MODEL, "input": "hi"}
        status, _, got = await post(http, gw.v1 + "/" + kind, req)
        assert status == 502, got
        assert_openai_error(got, code="bad_gateway")
    await assert_still_serves(http, gw, fake_upstream, model="test/ok")


async def test_streamed_request_failing_before_its_first_byte_gets_a_json_status(fake_upstream, gateway, http):
    fake_upstream.script(Script(status=429, body=fixture("chat_429.json"), headers={"Retry-After": "7"}))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    status, headers, body = await post(http, gw.v1 + "/chat/completions", STREAM_CHAT)
    assert status == 429
    assert headers["Retry-After"] == "7"
    assert body == fixture("chat_429.json")
    fake_upstream.script(Script(status=500, body=fixture("chat_500.json")))
    status, headers, body = await post(http, gw.v1 + "/chat/completions", STREAM_CHAT)
    assert status == 502
    assert headers["Content-Type"].startswith("application/json")
    assert_openai_error(body, code="bad_gateway")
    await assert_still_serves(http, gw, fake_upstream)


async def test_upstream_response_over_the_size_limit_is_a_502(fake_upstream, gateway, http):
    fake_upstream.script(Script(body=b'{"pad": "' + b"x" * 4096 + b'"}'))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"max-response-bytes": 1024}))
    status, _, body = await post(http, gw.v1 + "/chat/completions", CHAT)
    assert status == 502, body
    assert_openai_error(body, code="bad_gateway")
    await assert_still_serves(http, gw, fake_upstream)


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"", id="closes-without-answering"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="not-http"),
        pytest.param(b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"id":', id="truncated-body"),
    ],
)
async def test_upstream_speaking_garbage_is_a_502(fake_upstream, gateway, http, reply):
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(broken, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        cfg = gateway_config(
            {"broken": f"http://127.0.0.1:{port}/v1", "fake": fake_upstream.base_url},
            models={MODEL: [("broken", "gpt-4o-mini")], "test/ok": [("fake", "gpt-4o-mini")]},
        )
        gw = await gateway(cfg)
        status, _, body = await post(http, gw.v1 + "/chat/completions", CHAT)
        assert status == 502, body
        err = assert_openai_error(body)
        assert err["type"] == "upstream_error"
        # A body cut short is classed "stream_interrupted" by both upstream clients; the rest "bad_gateway".
        assert err["code"] in ("bad_gateway", "stream_interrupted")
        await assert_still_serves(http, gw, fake_upstream, model="test/ok")
    finally:
        server.close()
        await server.wait_closed()


async def test_upstream_that_never_answers_is_a_504_and_the_attempt_is_cancelled(fake_upstream, gateway, http):
    fake_upstream.script(Script(delay_s=3))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, timeouts={"first-byte-s": 0.3}))
    loop = asyncio.get_running_loop()
    start = loop.time()
    status, _, body = await post(http, gw.v1 + "/chat/completions", CHAT)
    assert status == 504, body
    assert loop.time() - start < 2
    assert_openai_error(body, code="upstream_timeout")
    await fake_upstream.wait_cancelled(1, within=2)
    await assert_still_serves(http, gw, fake_upstream)


async def test_upstream_that_stops_mid_body_is_a_504_and_the_attempt_is_cancelled(fake_upstream, gateway, http):
    """A non-streamed request whose upstream sends a head and then goes silent (an SSE answer, held)."""
    hold = asyncio.Event()
    fake_upstream.script(Script(sse=PIECES, hold=hold))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, timeouts={"idle-s": 0.3}))
    status, _, body = await post(http, gw.v1 + "/chat/completions", CHAT)  # not stream: read whole body
    assert status == 504, body
    assert_openai_error(body, code="upstream_timeout")
    await fake_upstream.wait_cancelled(1, within=2)
    await assert_still_serves(http, gw, fake_upstream)


# --- failures mid-stream -----------------------------------------------------------------------------------------


def split_error_tail(body: bytes, prefix: bytes) -> dict[str, Any]:
    """`body` is `prefix`, then one `data: {"error": …}` event, then `data: [DONE]`; returns the error."""
    assert body.startswith(prefix), body
    tail = body[len(prefix) :]
    assert tail.endswith(b"\n\ndata: [DONE]\n\n"), tail
    events = [e for e in tail.split(b"\n\n") if e]
    assert len(events) == 2 and events[1] == b"data: [DONE]", tail
    assert events[0].startswith(b"data: "), tail
    return assert_openai_error(events[0][len(b"data: ") :])


async def read_at_least(r: aiohttp.ClientResponse, n: int) -> bytes:
    """At least `n` bytes of the body as they arrive; fails (rather than spinning) if the body ends first."""
    got = b""
    async with asyncio.timeout(T):
        while len(got) < n:
            data = await r.content.readany()
            assert data, f"body ended after {len(got)} of {n} bytes: {got!r}"
            got += data
    return got


async def read_stream(r: aiohttp.ClientResponse) -> bytes:
    async with asyncio.timeout(T):
        return await r.read()  # to the end: hangs (and fails) if the gateway never ends the stream


async def test_upstream_idle_mid_stream_ends_the_stream_with_an_error_event(fake_upstream, gateway, http):
    hold = asyncio.Event()  # never set: the upstream sends its role frame and first token, then nothing
    first = PIECES[0] + PIECES[1]
    fake_upstream.script(Script(sse=[first, *PIECES[2:]], hold=hold))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, timeouts={"idle-s": 0.3}))
    async with asyncio.timeout(T), http.post(gw.v1 + "/chat/completions", json=STREAM_CHAT, headers=AUTH) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        body = await read_stream(r)
    err = split_error_tail(body, first)
    assert err["code"] == "upstream_timeout"
    await fake_upstream.wait_cancelled(1, within=2)  # the upstream connection was closed
    await assert_still_serves(http, gw, fake_upstream)


async def test_upstream_dying_mid_stream_ends_the_stream_with_an_error_event(fake_upstream, gateway, http):
    fake_upstream.script(Script(sse=PIECES, drop_after=3))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    async with asyncio.timeout(T), http.post(gw.v1 + "/chat/completions", json=STREAM_CHAT, headers=AUTH) as r:
        assert r.status == 200
        body = await read_stream(r)
    err = split_error_tail(body, b"".join(PIECES[:3]))
    assert err["code"] == "stream_interrupted"
    assert len(fake_upstream.requests) == 1  # never retried once bytes went downstream
    await assert_still_serves(http, gw, fake_upstream)


async def test_stream_over_its_total_time_ends_with_an_error_event(fake_upstream, gateway, http):
    fake_upstream.script(Script(sse=PIECES, gap_s=0.1))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, timeouts={"total-s": 0.35}))
    async with asyncio.timeout(T), http.post(gw.v1 + "/chat/completions", json=STREAM_CHAT, headers=AUTH) as r:
        assert r.status == 200
        body = await read_stream(r)
    events = [e for e in body.split(b"\n\n") if e]
    assert 1 <= len(events) - 2 < len(PIECES) - 1
    prefix = b"".join(p for p in PIECES[: len(events) - 2])
    err = split_error_tail(body, prefix)
    assert err["code"] == "upstream_timeout"
    await fake_upstream.wait_cancelled(1, within=2)
    await assert_still_serves(http, gw, fake_upstream)


# --- failover ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(Script(status=503, body=b'{"error": {"message": "overloaded"}}'), id="503"),
        pytest.param(Script(status=500, body=fixture("chat_500.json")), id="500"),
        pytest.param(Script(status=429, body=fixture("chat_429.json")), id="429"),
        pytest.param(Script(delay_s=3), id="first-byte-timeout"),
    ],
)
async def test_failing_provider_fails_over_to_the_other_for_every_request(
    fake_upstream, aiohttp_server, gateway, http, failure
):
    bad, good = fake_upstream, await second_upstream(aiohttp_server)
    bad.script(failure)
    gw = await gateway(
        with_timeouts(gateway_config({"bad": bad.base_url, "good": good.base_url}), "bad", first_byte_s=0.2)
    )
    n = 20

    async def one() -> None:
        status, headers, body = await post(http, gw.v1 + "/chat/completions", CHAT)
        assert status == 200, body
        assert body == fixture("chat_ok.json")
        assert headers["X-Hedgerow-Provider"] == "good"

    await asyncio.gather(*(one() for _ in range(n)))
    assert len(good.requests) == n
    assert 0 < len(bad.requests) <= n  # it was tried first some of the time (weighted-random order)
    if failure.delay_s:
        await bad.wait_cancelled(len(bad.requests), within=2)
    await assert_still_serves(http, gw, bad, good)


async def test_closed_port_fails_over_to_the_other_provider_for_every_request(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"dead": closed_port_url(), "good": fake_upstream.base_url}))
    for _ in range(20):
        status, headers, body = await post(http, gw.v1 + "/chat/completions", CHAT)
        assert status == 200, body
        assert headers["X-Hedgerow-Provider"] == "good"
    assert len(fake_upstream.requests) == 20
    await assert_still_serves(http, gw, fake_upstream)


async def test_upstream_400_is_not_retried_on_another_provider(fake_upstream, aiohttp_server, gateway, http):
    a, b = fake_upstream, await second_upstream(aiohttp_server)
    for fake in (a, b):
        fake.script(Script(status=400, body=fixture("chat_400.json")))
    gw = await gateway(gateway_config({"a": a.base_url, "b": b.base_url}))
    for _ in range(5):
        status, _, body = await post(http, gw.v1 + "/chat/completions", CHAT)
        assert status == 400
        assert body == fixture("chat_400.json")
    assert len(a.requests) + len(b.requests) == 5  # exactly one upstream request per client request
    await assert_still_serves(http, gw, a, b)


async def test_every_provider_failing_gives_503_naming_the_last_error(fake_upstream, aiohttp_server, gateway, http):
    a, b = fake_upstream, await second_upstream(aiohttp_server)
    for fake in (a, b):
        fake.script(Script(status=503, body=b"overloaded"))
    gw = await gateway(gateway_config({"a": a.base_url, "b": b.base_url}))
    status, headers, body = await post(http, gw.v1 + "/chat/completions", CHAT)
    assert status == 503, body
    assert headers["Retry-After"] == "1"
    assert_openai_error(body, code="service_unavailable")
    assert b"all 2 endpoints failed" in body and b"status 503" in body
    assert len(a.requests) == len(b.requests) == 1  # each tried once, no more
    await assert_still_serves(http, gw, a, b)


async def test_stream_failing_mid_way_is_not_retried_on_another_provider(fake_upstream, aiohttp_server, gateway, http):
    a, b = fake_upstream, await second_upstream(aiohttp_server)
    for fake in (a, b):
        fake.script(Script(sse=PIECES, drop_after=2))
    gw = await gateway(gateway_config({"a": a.base_url, "b": b.base_url}))
    async with asyncio.timeout(T), http.post(gw.v1 + "/chat/completions", json=STREAM_CHAT, headers=AUTH) as r:
        body = await read_stream(r)
    split_error_tail(body, b"".join(PIECES[:2]))
    assert len(a.requests) + len(b.requests) == 1
    await assert_still_serves(http, gw, a, b)


# --- client goes away -------------------------------------------------------------------------------------------


async def test_client_disconnect_while_upstream_is_slow_cancels_the_upstream_request(fake_upstream, gateway, http):
    fake_upstream.script(Script(delay_s=2))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    body = orjson.dumps(CHAT)
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(head("POST", "/v1/chat/completions", Content_Length=str(len(body))) + body)
    async with asyncio.timeout(T):
        while not fake_upstream.requests:
            await asyncio.sleep(0.01)
    writer.close()  # the client gives up
    await writer.wait_closed()
    await fake_upstream.wait_cancelled(1, within=1)
    assert fake_upstream.finished == 0
    await assert_still_serves(http, gw, fake_upstream)


async def test_client_disconnect_mid_stream_cancels_the_upstream_request(fake_upstream, gateway, http):
    hold = asyncio.Event()  # the upstream sends its role frame and first token, then waits
    first = PIECES[0] + PIECES[1]
    fake_upstream.script(Script(sse=[first, *PIECES[2:]], hold=hold))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    async with asyncio.timeout(T), http.post(gw.v1 + "/chat/completions", json=STREAM_CHAT, headers=AUTH) as r:
        assert await read_at_least(r, len(first)) == first
        r.close()  # drop the connection mid-stream
    await fake_upstream.wait_cancelled(1, within=1)
    assert fake_upstream.finished == 0
    await assert_still_serves(http, gw, fake_upstream)


async def test_many_clients_disconnecting_mid_stream_leave_no_upstream_request_behind(fake_upstream, gateway, http):
    hold = asyncio.Event()  # each upstream sends its role frame and first token (the commit point), then waits
    first = PIECES[0] + PIECES[1]
    fake_upstream.script(Script(sse=[first, *PIECES[2:]], hold=hold))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))  # idle-s 2: must not be what ends them

    async def one() -> None:
        async with http.post(gw.v1 + "/chat/completions", json=STREAM_CHAT, headers=AUTH) as r:
            assert await read_at_least(r, len(first)) == first
            r.close()

    async with asyncio.timeout(T):
        await asyncio.gather(*(one() for _ in range(10)))
    await fake_upstream.wait_cancelled(10, within=1)
    assert fake_upstream.finished == 0
    await assert_still_serves(http, gw, fake_upstream)
