"""Hostile and broken clients (issue #9), on both server engines, over raw sockets against a real gateway.

Connection caps, request smuggling, bodies no parser should choke on (bad UTF-8, deep nesting, huge arrays and
numbers, wrong types), clients that trickle or vanish at every phase. Each case checks the answer is an
OpenAI-shaped error with the right status (never a 5xx, a traceback or a hang), that nothing reached the
upstream that should not have, and that the gateway serves normally afterwards. What tests/functional/
test_errors.py and tests/unit/test_lean_server.py already cover is not repeated here.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from proxy.accounting.settings import AccountingConfig, StoreConfig
from proxy.edge import ConnectionCaps, peer_key
from proxy.schema import ChatView
from tests.conftest import KEY, gateway_config
from tests.fakes import FakeUpstream, Script, fixture, sse_events
from tests.functional.test_errors import (
    CHAT,
    STREAM_CHAT,
    assert_openai_error,
    assert_still_serves,
    head,
    parse_response,
    post,
    raw_exchange,
    second_upstream,
)
from tests.functional.test_process import _config_file, _spawn

T = 5  # seconds: a deadline for what should take well under one, never a measurement
PIECES = sse_events(fixture("stream_ok.sse"))


# Both server engines (the upstream client is the lean one: these are the client side's tests).
ENGINES = pytest.mark.parametrize(
    "gateway",
    [pytest.param(("lean", "aiohttp"), id="aiohttp-engine"), pytest.param(("lean", "lean"), id="lean-engine")],
    indirect=True,
)


# --- raw connections ---------------------------------------------------------------------------------------


class Conn:
    """One raw client connection, optionally from another loopback address (Linux routes all of 127/8)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> Conn:
        async with asyncio.timeout(T):
            return cls(*await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)))

    async def request(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send one request and read one response with a Content-Length body; the connection stays open."""
        self.writer.write(data)
        async with asyncio.timeout(T):
            raw = await self.reader.readuntil(b"\r\n\r\n")
            length = int(next(v for k, _, v in _lines(raw) if k == "content-length"))
            raw += await self.reader.readexactly(length)
        return parse_response(raw)

    async def to_eof(self) -> bytes:
        async with asyncio.timeout(T):
            return await self.reader.read(-1)  # returns only once the server closed the connection

    def close(self) -> None:
        self.writer.close()


def _lines(raw: bytes) -> list[tuple[str, str, str]]:
    return [(k.strip().lower(), s, v.strip()) for k, s, v in (ln.partition(":") for ln in raw.decode().split("\r\n"))]


LIVEZ = b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n"


async def admitted(port: int, source: str = "127.0.0.1") -> Conn:
    """A connection the gateway serves: one request answered on it, so the server has surely counted it."""
    conn = await Conn.open(port, source)
    status, _, body = await conn.request(LIVEZ)
    assert status == 200, body
    return conn


def assert_refused(raw: bytes, *, per_address: bool) -> None:
    status, headers, body = parse_response(raw)
    assert status == 503, raw
    assert headers["retry-after"] == "1"
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"]
    err = assert_openai_error(body, code="too_many_connections", param=None)
    assert err["type"] == "service_unavailable"
    assert ("your address" in err["message"]) is per_address


async def admitted_eventually(port: int, source: str = "127.0.0.1") -> Conn:
    """A connection is accepted again once the server saw a closed one go (its connection_lost runs a moment
    after the client's close): retried until then, under the deadline."""
    async with asyncio.timeout(T):
        while True:
            conn = await Conn.open(port, source)
            conn.writer.write(LIVEZ)
            raw = await conn.reader.readuntil(b"\r\n\r\n")
            if raw.startswith(b"HTTP/1.1 200"):
                length = int(next(v for k, _, v in _lines(raw) if k == "content-length"))
                await conn.reader.readexactly(length)
                return conn
            assert raw.startswith(b"HTTP/1.1 503"), raw
            conn.close()
            await asyncio.sleep(0.01)


async def chat_served(port: int, fake: FakeUpstream) -> None:
    """A chat completion is served (the gateway is not wedged), on a connection admitted under any caps."""
    fake.script(Script())
    body = orjson.dumps(CHAT)
    conn = await admitted_eventually(port)
    try:
        status, _, got = await conn.request(head("POST", "/v1/chat/completions", Content_Length=str(len(body))) + body)
    finally:
        conn.close()
    assert (status, got) == (200, fixture("chat_ok.json"))


# --- connection caps -----------------------------------------------------------------------------------------


@ENGINES
async def test_connections_over_the_per_address_cap_get_a_503_then_close_and_other_addresses_do_not_count(
    fake_upstream, gateway
):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"max-connections-per-ip": 3}))
    held = [await admitted(gw.port) for _ in range(3)]
    try:
        # One more from the same address: answered 503 before it asks anything, and closed.
        extra = await Conn.open(gw.port)
        assert_refused(await extra.to_eof(), per_address=True)
        extra.close()
        # A client that sends its request at once still reads the 503 (not a bare reset).
        eager = await Conn.open(gw.port)
        eager.writer.write(head("POST", "/v1/chat/completions", Content_Length="2") + b"{}")
        assert_refused(await eager.to_eof(), per_address=True)
        eager.close()
        # Another address has a cap of its own.
        others = [await admitted(gw.port, "127.0.0.2") for _ in range(3)]
        refused = await Conn.open(gw.port, "127.0.0.2")
        assert_refused(await refused.to_eof(), per_address=True)
        refused.close()
        for conn in others:
            conn.close()
        # A slot freed is a slot taken again; the refusals took none.
        held.pop().close()
        held.append(await admitted_eventually(gw.port))
    finally:
        for conn in held:
            conn.close()
    # Every connection gone: the whole cap is free again (nothing leaked), for each address.
    async with asyncio.timeout(T):
        again = [await admitted_eventually(gw.port) for _ in range(3)]
    for conn in again:
        conn.close()
    assert fake_upstream.requests == []
    await chat_served(gw.port, fake_upstream)


@ENGINES
async def test_connections_over_the_global_cap_get_a_503_from_any_address(fake_upstream, gateway):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"max-connections": 3}))
    held = [await admitted(gw.port, f"127.0.0.{i}") for i in (1, 2, 3)]
    try:
        for source in ("127.0.0.1", "127.0.0.4"):
            extra = await Conn.open(gw.port, source)
            assert_refused(await extra.to_eof(), per_address=False)
            extra.close()
        held.pop(0).close()
        held.append(await admitted_eventually(gw.port, "127.0.0.4"))
    finally:
        for conn in held:
            conn.close()
    async with asyncio.timeout(T):
        again = [await admitted_eventually(gw.port) for _ in range(3)]
    for conn in again:
        conn.close()
    await chat_served(gw.port, fake_upstream)


@ENGINES
async def test_refused_connection_that_keeps_talking_is_closed_soon_after_its_answer(fake_upstream, gateway):
    """After the 503 and its FIN, what a refused client sends is dropped, and the server closes the connection
    within `REFUSED_LINGER_S` even if the client never does: writing to it then fails."""
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"max-connections": 1}))
    held = await admitted(gw.port)
    talker = await Conn.open(gw.port)
    try:
        assert_refused(await talker.to_eof(), per_address=False)
        with pytest.raises(ConnectionError):
            async with asyncio.timeout(T):
                while True:
                    talker.writer.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                    await talker.writer.drain()
                    await asyncio.sleep(0.05)
    finally:
        talker.close()
        held.close()
    assert fake_upstream.requests == []


@pytest.mark.parametrize("engine", ["aiohttp", "lean"])
async def test_connection_caps_hold_in_a_served_process_on_uvloop(fake_upstream, tmp_path, engine):
    """`hedgerow serve` runs on uvloop, whose transports are not asyncio's: the same caps, the same 503."""
    config = _config_file(tmp_path, fake_upstream.base_url, engine=engine, **{"max-connections-per-ip": 2})
    proc, port = await _spawn("serve", "--config", config)
    try:
        held = [await admitted(port) for _ in range(2)]
        extra = await Conn.open(port)
        assert_refused(await extra.to_eof(), per_address=True)
        extra.close()
        eager = await Conn.open(port)  # its request is in the server's socket when the 503 goes out
        eager.writer.write(head("POST", "/v1/chat/completions", Content_Length="2") + b"{}")
        assert_refused(await eager.to_eof(), per_address=True)
        eager.close()
        held.pop().close()
        held.append(await admitted_eventually(port))
        for conn in held:
            conn.close()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), T) == 0


def test_per_address_caps_count_an_ipv6_client_by_its_64():
    class Transport:
        def __init__(self, peer: Any) -> None:
            self.peer = peer

        def get_extra_info(self, name: str) -> Any:
            return self.peer if name == "peername" else None

    def key(peer: Any) -> str:
        return peer_key(Transport(peer))  # type: ignore[arg-type]

    assert key(("2001:db8:1:2::1", 5, 0, 0)) == key(("2001:db8:1:2:ffff::9", 6, 0, 0))
    assert key(("2001:db8:1:2::1", 5, 0, 0)) != key(("2001:db8:1:3::1", 5, 0, 0))
    assert key(("::ffff:10.0.0.1", 5, 0, 0)) != key(("::ffff:10.0.0.2", 5, 0, 0))  # IPv4 on a dual-stack socket
    assert key(("10.0.0.1", 5)) != key(("10.0.0.2", 5))
    assert key(None) == key("/run/sock") == ""
    caps = ConnectionCaps(10, 1)
    assert caps.admit(Transport(("2001:db8::1", 1, 0, 0))) is not None  # type: ignore[arg-type]


# --- request smuggling -------------------------------------------------------------------------------------


def _smuggling_heads() -> list[Any]:
    """Heads two HTTP parsers could frame differently. The body after each hides a whole second chat request:
    if the gateway framed it one way and anything else another, that request would reach the upstream."""
    start = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    cases = {
        "cl-and-te": "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "te-and-cl": "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        "two-content-lengths": "Content-Length: 4\r\nContent-Length: 90\r\n",
        "te-gzip-chunked": "Transfer-Encoding: gzip, chunked\r\n",
        "te-space-before-colon": "Transfer-Encoding : chunked\r\n",
        "te-xchunked": "Transfer-Encoding: xchunked\r\n",
        "te-chunked-then-identity": "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        "cl-plus-sign": "Content-Length: +4\r\n",
    }
    return [pytest.param((start + extra + "\r\n").encode(), id=name) for name, extra in cases.items()]


def _smuggled_body() -> bytes:
    inner = orjson.dumps(CHAT)
    second = head("POST", "/v1/chat/completions", Content_Length=str(len(inner))) + inner
    return b"0\r\n\r\n" + second  # as chunked: an empty body, then a second request


@ENGINES
@pytest.mark.parametrize("request_head", _smuggling_heads())
async def test_ambiguous_request_framing_is_a_400_that_closes_and_never_reaches_the_upstream(
    fake_upstream, gateway, http, request_head
):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    raw = await raw_exchange(gw.port, request_head + _smuggled_body())
    assert len(re.findall(rb"HTTP/1\.[01] \d{3} ", raw)) == 1, raw  # one answer, closed: nothing more read
    status, headers, body = parse_response(raw)
    assert status == 400, raw
    assert headers["connection"].lower() == "close"
    err = assert_openai_error(body)
    assert err["type"] == "invalid_request_error"
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


# --- oversized and trickled requests ---------------------------------------------------------------------------


@ENGINES
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"X_Big": "a" * (17 * 1024)}, id="one-header-over-16k"),
        pytest.param({f"X_H{i}": "a" * 1000 for i in range(100)}, id="100k-of-headers"),
    ],
)
async def test_oversized_request_head_is_a_431_json_that_closes(fake_upstream, gateway, http, extra):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    body = orjson.dumps(CHAT)
    raw = await raw_exchange(gw.port, head("POST", "/v1/chat/completions", Content_Length=str(len(body)), **extra))
    status, _, got = parse_response(raw)  # raw_exchange returned: the connection was closed
    assert status == 431, raw
    assert_openai_error(got, code="request_header_fields_too_large")
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


@ENGINES
async def test_request_head_growing_past_the_limit_in_pieces_is_a_431_before_it_ends(fake_upstream, gateway, http):
    """The head is bounded while it arrives, not only once it is whole: here it never ends."""
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    conn = await Conn.open(gw.port)
    try:
        conn.writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        async with asyncio.timeout(T):
            for i in range(200):  # 200 headers of 1 KiB: three times the 64 KiB bound, if never cut
                if conn.reader.at_eof() or len(conn.reader._buffer):  # type: ignore[attr-defined]
                    break
                conn.writer.write(b"X-H%d: %s\r\n" % (i, b"a" * 1024))
                await asyncio.sleep(0.002)
        raw = await conn.to_eof()
    finally:
        conn.close()
    status, _, body = parse_response(raw)
    assert status == 431, raw
    assert_openai_error(body, code="request_header_fields_too_large")
    await assert_still_serves(http, gw, fake_upstream)


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, gap: float) -> bytes:
    """Send `data` a byte at a time, `gap` apart, until the server answers; then read to the close."""
    async with asyncio.timeout(T):
        for b in data:
            if reader.at_eof() or len(reader._buffer):  # type: ignore[attr-defined]
                break  # answered: stop sending
            writer.write(bytes([b]))
            await asyncio.sleep(gap)
        return await reader.read(-1)


@ENGINES
async def test_head_trickled_byte_by_byte_is_cut_at_the_deadline_not_kept_alive_by_each_byte(
    fake_upstream, gateway, http
):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"header-timeout-s": 0.3}))
    conn = await Conn.open(gw.port)
    try:
        raw = await _trickle(conn.reader, conn.writer, head("GET", "/v1/models", X_Pad="p" * 400), 0.02)  # ≈9 s uncut
    finally:
        conn.close()
    status, headers, body = parse_response(raw)
    assert status == 408, raw
    assert headers["connection"].lower() == "close"
    assert_openai_error(body, code="request_timeout")
    await assert_still_serves(http, gw, fake_upstream)


@ENGINES
async def test_body_trickled_byte_by_byte_is_cut_at_the_deadline_not_kept_alive_by_each_byte(
    fake_upstream, gateway, http
):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"body-timeout-s": 0.3}))
    body = orjson.dumps({**CHAT, "pad": "p" * 400})
    request_head = head("POST", "/v1/chat/completions", Content_Length=str(len(body)))
    conn = await Conn.open(gw.port)
    try:
        conn.writer.write(request_head)
        raw = await _trickle(conn.reader, conn.writer, body, 0.02)  # ≈9 s if never cut
    finally:
        conn.close()
    status, _, got = parse_response(raw)
    assert status == 408, raw
    assert_openai_error(got, code="request_timeout")
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


# --- bodies no parser should choke on -------------------------------------------------------------------------

MODEL = CHAT["model"]
DEEP = 100_000


def _chat_with(raw_field: bytes) -> bytes:
    return b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}], ' + raw_field + b"}"


HOSTILE_BODIES = [
    pytest.param(_chat_with(b'"x": "caf\xc3"'), None, id="utf8-truncated-sequence"),
    pytest.param(_chat_with(b'"x": "\xff\xfe"'), None, id="utf8-invalid-bytes"),
    pytest.param(_chat_with(b'"x": "\xed\xa0\x80"'), None, id="utf8-encoded-surrogate"),
    pytest.param(_chat_with(b'"\xc0\xaf": 1'), None, id="utf8-overlong-in-a-key"),
    pytest.param(b'{"model": "test/\xe9", "messages": [{"role": "user"}]}', None, id="latin1-model"),
    pytest.param(_chat_with(b'"x": ' + b"[" * DEEP + b"]" * DEEP), None, id="deep-array"),
    pytest.param(_chat_with(b'"x": ' + b'{"a":' * DEEP + b"1" + b"}" * DEEP), None, id="deep-object"),
    pytest.param(_chat_with(b'"x": ' + b"[" * DEEP), None, id="deep-unclosed"),
    pytest.param(b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}", None,
                 id="deep-messages"),
    pytest.param(b"[" * DEEP + b"]" * DEEP, None, id="deep-top-level"),
    pytest.param(_chat_with(b'"max_tokens": 1e400'), "max_tokens", id="max-tokens-1e400"),
    pytest.param(_chat_with(b'"max_tokens": 99999999999999999999999'), "max_tokens", id="max-tokens-huge-int"),
    pytest.param(_chat_with(b'"max_tokens": 1' + b"0" * 400), "max_tokens", id="max-tokens-400-digits"),
    pytest.param(_chat_with(b'"max_tokens": -1'), "max_tokens", id="max-tokens-negative"),
    pytest.param(_chat_with(b'"max_completion_tokens": 4294967296'), "max_completion_tokens",
                 id="max-completion-tokens-2-to-32"),
    pytest.param(_chat_with(b'"temperature": 1' + b"0" * 400), "temperature", id="temperature-400-digits"),
    pytest.param(_chat_with(b'"temperature": 1e400'), "temperature", id="temperature-1e400"),
    pytest.param(_chat_with(b'"temperature": -1e400'), "temperature", id="temperature-minus-1e400"),
    pytest.param(_chat_with(b'"temperature": NaN'), None, id="temperature-nan"),
    pytest.param(_chat_with(b'"temperature": Infinity'), None, id="temperature-infinity"),
    pytest.param(_chat_with(b'"x": "\\ud800"'), None, id="lone-surrogate-escape"),
]  # fmt: skip


@ENGINES
@pytest.mark.parametrize(("body", "param"), HOSTILE_BODIES)
async def test_hostile_json_is_a_400_naming_its_field_that_never_reaches_the_upstream(
    fake_upstream, gateway, http, body, param
):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    status, headers, got = await post(http, gw.v1 + "/chat/completions", data=body)
    assert status == 400, got
    assert headers["Content-Type"].startswith("application/json")
    err = assert_openai_error(got, param=param)
    assert err["type"] == "invalid_request_error"
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


@ENGINES
async def test_json_nested_to_any_depth_around_the_parsers_limits_is_never_a_5xx(
    fake_upstream, aiohttp_server, gateway, http
):
    """The decoder's recursion limit depends on how deep in the stack it runs, and the body is read again deeper
    down (the adapter's rewrite, prompt affinity with two endpoints): around those limits every depth is
    either served or a 400, whichever parser hits it first."""
    other = await second_upstream(aiohttp_server)
    gw = await gateway(gateway_config({"a": fake_upstream.base_url, "b": other.base_url}))
    seen = set()
    for depth in range(850, 1100, 2):
        deep = b"[" * depth + b"]" * depth
        body = _chat_with(b'"x": ' + deep).replace(b'"content": "hi"', b'"content": ' + deep)
        status, _, got = await post(http, gw.v1 + "/chat/completions", data=body)
        seen.add(status)
        if status != 200:
            assert status == 400, (depth, got)
            assert assert_openai_error(got)["type"] == "invalid_request_error"
    assert seen == {200, 400}  # the sweep crossed the limit
    await assert_still_serves(http, gw, fake_upstream, other)


@ENGINES
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"x": [0] * 400_000}, id="400k-item-array"),
        pytest.param({"messages": [{"role": "user", "content": "hi"}] * 25_000}, id="25k-messages"),
        pytest.param({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(20_000)]},
                     id="20k-tools"),
        pytest.param({"x": {f"k{i}": i for i in range(60_000)}}, id="60k-key-object"),
        pytest.param({"x": 1.5e308, "seed": 2**63 - 1, "y": -(2**63)}, id="extreme-but-valid-numbers"),
        pytest.param({"messages": [{"role": "user", "content": "h\u00e9llo \u4e16\u754c \U0001f600"}]}, id="utf8-text"),
    ],
)  # fmt: skip
async def test_huge_or_extreme_but_valid_json_under_the_limit_is_forwarded_unchanged(
    fake_upstream, gateway, http, extra
):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    body = orjson.dumps({**CHAT, **extra})
    assert len(body) < 1 << 20  # under the fake upstream's own limit (aiohttp's default)
    status, _, got = await post(http, gw.v1 + "/chat/completions", data=body)
    assert status == 200, got[:500]
    [seen] = fake_upstream.requests
    sent = orjson.loads(seen.body)
    assert {k: v for k, v in sent.items() if k != "model"} == {
        k: v for k, v in orjson.loads(body).items() if k != "model"
    }


def _wrong_values(annotation: Any) -> list[Any]:
    """JSON values of a type the field does not take, for every field type of the chat view."""
    text = repr(annotation)
    candidates: list[Any] = [True, 7, 2.5, "text", [1], {"a": 1}]
    ok = set()
    if "str" in text:
        ok.add(str)
    if "bool" in text:
        ok.add(bool)
    if "int" in text:
        ok.add(int)
    if "float" in text:
        ok |= {int, float}
    if "_Array" in text:
        ok.add(list)
    if "_Object" in text or "UsageOption" in text:
        ok.add(dict)
    assert "Raw" not in text, f"a Raw field needs its own cases in _EXPECTED_RAW: {text}"
    return [v for v in candidates if type(v) not in ok]


# `provider` and `models` are decoded when routing, with their own messages; `route` and `transforms` are
# documented as taking any value (proxy/openapi.py) and are dropped unread, so no type is wrong for them.
_FIELDS = msgspec.structs.fields(ChatView)
_EXPECTED_RAW = {"provider": [7, "text", [1]], "models": [7, "text", {"a": 1}]}
_ANY_VALUE = {"route", "transforms"}


def _wrong_type_cases() -> list[tuple[str, Any]]:
    cases = []
    for f in _FIELDS:
        if f.name in _ANY_VALUE:
            continue
        values = _EXPECTED_RAW.get(f.name) or _wrong_values(f.type)
        assert values, f.name
        cases += [(f.name, v) for v in values]
    return cases


@ENGINES
async def test_wrong_type_in_any_top_level_chat_field_is_a_400_naming_it(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    wrong = []
    cases = _wrong_type_cases()
    assert len(cases) > 100  # every field of the view, several values each
    for field, value in cases:
        status, _, got = await post(http, gw.v1 + "/chat/completions", {**CHAT, field: value})
        err = assert_openai_error(got)
        if (status, err["type"], err["param"]) != (400, "invalid_request_error", field):
            wrong.append((field, value, status, got))
    assert wrong == []
    assert fake_upstream.requests == []
    await assert_still_serves(http, gw, fake_upstream)


# --- disconnects at every phase --------------------------------------------------------------------------------


# Each phase on a connection the gateway admitted (one request served on it), so that a per-address cap can
# show a connection left behind without racing the closes of the ones before.


async def _leave_mid_head(conn: Conn, fake: FakeUpstream) -> None:
    conn.writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthori")
    await conn.writer.drain()


async def _leave_mid_body(conn: Conn, fake: FakeUpstream) -> None:
    conn.writer.write(head("POST", "/v1/chat/completions", Content_Length="1000") + b'{"model": "test/gpt-4o-mini"')
    await conn.writer.drain()


async def _leave_while_waiting(conn: Conn, fake: FakeUpstream) -> None:
    fake.script(Script(delay_s=3))
    body = orjson.dumps(CHAT)
    before = len(fake.requests)
    conn.writer.write(head("POST", "/v1/chat/completions", Content_Length=str(len(body))) + body)
    async with asyncio.timeout(T):
        while len(fake.requests) == before:
            await asyncio.sleep(0.01)


async def _leave_mid_stream(conn: Conn, fake: FakeUpstream) -> None:
    first = PIECES[0] + PIECES[1]
    fake.script(Script(sse=[first, *PIECES[2:]], hold=asyncio.Event()))  # the rest never comes
    body = orjson.dumps(STREAM_CHAT)
    conn.writer.write(head("POST", "/v1/chat/completions", Content_Length=str(len(body))) + body)
    got = b""
    async with asyncio.timeout(T):
        while first not in got:
            data = await conn.reader.read(65536)
            assert data, got
            got += data


@ENGINES
@pytest.mark.parametrize(
    "leave",
    [
        pytest.param(_leave_mid_head, id="mid-head"),
        pytest.param(_leave_mid_body, id="mid-body"),
        pytest.param(_leave_while_waiting, id="waiting-for-the-upstream"),
        pytest.param(_leave_mid_stream, id="mid-stream"),
    ],
)
async def test_clients_vanishing_at_any_phase_leave_no_connection_or_upstream_request_behind(
    fake_upstream, gateway, leave
):
    """A per-address cap of 2 makes a leaked connection visible: after 5 disconnects, 2 connections must
    still be accepted (each upstream request cut short is checked by the phase itself)."""
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, server={"max-connections-per-ip": 2}))
    upstream_requests = 0 if leave in (_leave_mid_head, _leave_mid_body) else 5
    for i in range(5):
        conn = await admitted_eventually(gw.port)
        await leave(conn, fake_upstream)
        conn.close()
        if upstream_requests:
            await fake_upstream.wait_cancelled(i + 1, within=T)  # the gateway closed its upstream connection
    assert len(fake_upstream.requests) == upstream_requests
    assert fake_upstream.finished == 0  # no upstream request ran to its end
    conns = [await admitted_eventually(gw.port) for _ in range(2)]
    for conn in conns:
        conn.close()
    await chat_served(gw.port, fake_upstream)


@ENGINES
async def test_client_vanishing_while_the_upstream_thinks_is_recorded_as_cancelled(fake_upstream, gateway, tmp_path):
    db = tmp_path / "ledger.db"
    cfg = gateway_config({"fake": fake_upstream.base_url})
    acct = AccountingConfig(store=StoreConfig(path=str(db)), flush_interval_s=0.05)
    gw = await gateway(msgspec.structs.replace(cfg, accounting=acct))
    conn = await admitted(gw.port)
    await _leave_while_waiting(conn, fake_upstream)
    conn.close()
    await fake_upstream.wait_cancelled(1, within=T)
    rows: list[Any] = []
    async with asyncio.timeout(T):
        while not rows:
            await asyncio.sleep(0.05)
            rows = _generations(db)
    [(model, status, cancelled, cost)] = rows
    assert (model, status, cancelled, cost) == (MODEL, 499, 1, 0.0)


def _generations(db: Path) -> list[Any]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT model, status, cancelled, cost FROM generations").fetchall()
        except sqlite3.OperationalError:  # not created yet
            return []
