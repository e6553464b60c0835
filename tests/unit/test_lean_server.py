"""The lean server engine at the HTTP level, over raw sockets: the edge cases the functional tests (which run
every gateway behaviour on both engines) do not reach — pipelining, chunked bodies, 100-continue, head
limits, request smuggling, HTTP/1.0, HEAD, upgrades, backpressure, disconnects, drain."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson
import pytest
from aiohttp import web

from proxy.errors import BadRequest
from proxy.lean_server.protocol import MAX_FIELD, Connection
from proxy.lean_server.request import LeanRequest
from proxy.lean_server.server import LeanServer
from proxy.stream import prepare

T = 5  # seconds: bound for anything that should take well under one
MAX_BODY = 4096


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class _Collector:
    """Parses a server's byte stream into responses (httptools, the same llhttp the engine uses)."""

    responses: list[Response] = field(default_factory=list)
    _headers: dict[str, str] = field(default_factory=dict)
    _body: list[bytes] = field(default_factory=list)
    parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.responses.append(Response(self.parser.get_status_code(), self._headers, b"".join(self._body)))
        self._headers, self._body = {}, []


def parse_responses(raw: bytes, *, head_request: bool = False) -> list[Response]:
    c = _Collector()
    if head_request:  # a response to HEAD has a Content-Length but no body: parse the heads only
        out = []
        for part in raw.split(b"\r\n\r\n")[:-1]:
            status_line, *lines = part.decode().split("\r\n")
            out.append(
                Response(
                    int(status_line.split()[1]),
                    {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)},
                )
            )
        return out
    c.parser = httptools.HttpResponseParser(c)
    c.parser.feed_data(raw)
    return c.responses


class Recorder:
    """Handlers for the test server; records what they saw and when they were cancelled."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes]] = []
        self.cancelled = 0
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.written = 0

    async def echo(self, request: LeanRequest) -> web.Response:
        body = await request.read()
        self.seen.append((request.method, request.path, body))
        return web.Response(
            body=orjson.dumps({"len": len(body), "path": request.path}), content_type="application/json"
        )

    async def hello(self, request: LeanRequest) -> web.Response:
        self.seen.append((request.method, request.path, b""))
        return web.Response(body=b"hello", content_type="text/plain")

    async def slow(self, request: LeanRequest) -> web.Response:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.seen.append((request.method, request.path, b""))
        return web.Response(body=b"slow", content_type="text/plain")

    async def stream(self, request: LeanRequest) -> Any:
        down = await prepare(request, 200, {"Content-Type": "text/event-stream"})  # type: ignore[arg-type]
        for i in range(3):
            await down.write(b"data: %d\n\n" % i)
        await down.write(b"")  # an empty write must not end a chunked body
        return down

    async def flood(self, request: LeanRequest) -> Any:
        """Writes until cancelled: the client never reads, so backpressure must stop it."""
        down = await prepare(request, 200, {"Content-Type": "text/event-stream"})  # type: ignore[arg-type]
        chunk = b"x" * 65536
        self.started.set()
        try:
            while True:
                await down.write(chunk)
                self.written += len(chunk)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def bad_header(self, request: LeanRequest) -> web.Response:
        return web.Response(body=b"x", headers={"X-Evil": "a\r\nSet-Cookie: pwned=1"})

    async def fails(self, request: LeanRequest) -> web.Response:
        raise BadRequest("no", param="x")


@dataclass
class Running:
    server: LeanServer
    port: int
    rec: Recorder


@pytest.fixture
async def lean() -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    servers: list[LeanServer] = []

    async def start(**limits: float) -> Running:
        rec = Recorder()
        routes = [
            ("POST", "/echo", rec.echo),
            ("GET", "/hello", rec.hello),
            ("GET", "/slow", rec.slow),
            ("GET", "/stream", rec.stream),
            ("GET", "/flood", rec.flood),
            ("GET", "/bad-header", rec.bad_header),
            ("GET", "/fails", rec.fails),
        ]
        server = LeanServer(
            routes,  # type: ignore[arg-type]
            max_body=MAX_BODY,
            header_timeout=limits.get("header_timeout", 5.0),
            keepalive_timeout=limits.get("keepalive_timeout", 30.0),
        )
        port = await server.start("127.0.0.1", 0)
        servers.append(server)
        return Running(server, port, rec)

    yield start
    for server in servers:
        await server.shutdown(1.0)


async def exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send `parts` (with `pause` between them), then read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        async with asyncio.timeout(T):
            for i, part in enumerate(parts):
                if i and pause:
                    await asyncio.sleep(pause)
                writer.write(part)
                await writer.drain()
            return await reader.read(-1)
    finally:
        writer.close()


async def read_responses(reader: asyncio.StreamReader, n: int) -> list[Response]:
    """Read from a connection that stays open until `n` complete responses arrived."""
    c = _Collector()
    c.parser = httptools.HttpResponseParser(c)
    async with asyncio.timeout(T):
        while len(c.responses) < n:
            data = await reader.read(65536)
            assert data, f"connection closed after {len(c.responses)} of {n} responses"
            c.parser.feed_data(data)
    return c.responses


def post(path: str, body: bytes, *extra: str, close: bool = False) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/{version}", "Host: x", *extra]) + "\r\n\r\n").encode()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# --- keep-alive and pipelining -------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_one_at_a_time(lean):
    gw = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        # One write: a slow request, then two more behind it; they must wait for it, not overtake it.
        writer.write(get("/slow") + post("/echo", b"abc") + get("/hello"))
        await asyncio.wait_for(gw.rec.started.wait(), T)
        await asyncio.sleep(0.05)
        assert gw.rec.seen == []  # the two behind the slow one have not run
        gw.rec.release.set()
        responses = await read_responses(reader, 3)
    finally:
        writer.close()
    assert [r.body for r in responses] == [b"slow", b'{"len":3,"path":"/echo"}', b"hello"]
    assert [s[1] for s in gw.rec.seen] == ["/slow", "/echo", "/hello"]


async def test_keep_alive_serves_many_requests_on_one_connection_and_connection_close_ends_it(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/hello"), post("/echo", b"x" * 100), get("/hello", "Connection: close"))
    responses = parse_responses(raw)
    assert [r.status for r in responses] == [200, 200, 200]
    assert "connection" not in responses[0].headers
    assert responses[2].headers["connection"] == "close"
    assert "date" in responses[0].headers


async def test_a_closed_connection_is_freed_without_the_cycle_collector(lean):
    """Its parser holds the protocol's bound callbacks; dropped at connection_lost, nothing of the connection
    waits for a full collection (which the server makes rare: proxy/server.py `_YOUNG_PER_FULL`)."""
    gw = await lean()
    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            raw = await exchange(gw.port, get("/hello", "Connection: close"))
            assert parse_responses(raw)[0].body == b"hello"
        async with asyncio.timeout(T):
            while gw.server.connections:  # the server's side of the last one may still be closing
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # transports are released a loop turn after connection_lost
        left = [o for o in gc.get_objects() if type(o) is Connection]
    finally:
        gc.enable()
    assert left == []


async def test_idle_keep_alive_connection_is_closed_after_the_timeout(lean):
    gw = await lean(keepalive_timeout=0.2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    raw = await exchange(gw.port, get("/hello"))  # returns when the server closes the idle connection
    assert 0.15 < loop.time() - start < 2
    assert [r.status for r in parse_responses(raw)] == [200]


# --- bodies ----------------------------------------------------------------------------------------------------


async def test_chunked_body_is_reassembled_and_trailers_are_ignored(lean):
    gw = await lean()
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    body = chunked(b"hello ", b"chunked ", b"world")
    body = body[: -len(b"\r\n")] + b"X-Trailer: 1\r\n\r\n"  # a trailer field after the last chunk
    raw = await exchange(gw.port, head, body[:7], body[7:], pause=0.02)
    [r] = parse_responses(raw)
    assert r.status == 200
    assert gw.rec.seen == [("POST", "/echo", b"hello chunked world")]


async def test_chunked_body_over_the_limit_is_a_413(lean):
    gw = await lean()
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = await exchange(gw.port, head + chunked(*[b"x" * 1000] * 6))
    [r] = parse_responses(raw)
    assert r.status == 413
    assert orjson.loads(r.body)["error"]["code"] == "payload_too_large"
    assert r.headers["connection"] == "close"


async def test_malformed_chunk_is_a_400_and_the_connection_closes(lean):
    gw = await lean()
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = await exchange(gw.port, head + b"zz\r\nhello\r\n")
    [r] = parse_responses(raw)
    assert r.status == 400
    assert orjson.loads(r.body)["error"]["type"] == "invalid_request_error"


async def test_unread_body_is_drained_so_the_connection_stays_usable(lean):
    """A handler that answers without reading (here: unknown route) leaves the body in flight; it is read
    and dropped, and the next request on the connection is served."""
    gw = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        body = b"y" * 3000
        writer.write(post("/nope", body)[: -len(body) + 10])  # the head and a little of the body
        [r] = await read_responses(reader, 1)
        assert r.status == 404
        writer.write(body[10:] + get("/hello"))
        [r] = await read_responses(reader, 1)
        assert r.status == 200 and r.body == b"hello"
    finally:
        writer.close()


# --- Expect: 100-continue ------------------------------------------------------------------------------------------


async def test_expect_100_continue_gets_a_100_before_the_body_is_sent(lean):
    gw = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(post("/echo", b"", "Expect: 100-continue").replace(b"Content-Length: 0", b"Content-Length: 5"))
        async with asyncio.timeout(T):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        [r] = await read_responses(reader, 1)
        assert r.status == 200 and orjson.loads(r.body)["len"] == 5
    finally:
        writer.close()


async def test_expect_100_continue_over_the_limit_gets_a_413_without_a_100_and_a_close(lean):
    gw = await lean()
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    raw = await exchange(gw.port, head)  # the body never comes; the server must not wait for it
    assert not raw.startswith(b"HTTP/1.1 100")
    [r] = parse_responses(raw)
    assert r.status == 413


# --- head limits, malformed heads, smuggling ------------------------------------------------------------------


async def test_header_over_the_field_limit_is_a_431(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/hello", "X-Big: " + "a" * (MAX_FIELD + 1)))
    [r] = parse_responses(raw)
    assert r.status == 431
    assert orjson.loads(r.body)["error"]["code"] == "request_header_fields_too_large"
    assert r.headers["connection"] == "close"


async def test_head_over_the_total_limit_is_a_431(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/hello", *(f"X-H{i}: {'a' * 1000}" for i in range(80))))
    assert [r.status for r in parse_responses(raw)] == [431]


async def test_header_value_trickling_past_the_limit_is_a_431_before_it_completes(lean):
    """httptools buffers a partial header value itself; the engine counts the bytes of an incomplete head."""
    gw = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /hello HTTP/1.1\r\nX-Endless: ")
        async with asyncio.timeout(T):
            for _ in range(100):
                writer.write(b"a" * 4096)
                await writer.drain()
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.005)
            raw = await reader.read(-1)
    finally:
        writer.close()
    assert [r.status for r in parse_responses(raw)] == [431]


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", id="cl-te"),
        pytest.param(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", id="te-cl"),
        pytest.param(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", id="cl-cl"),
        pytest.param(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n", id="te-not-last"),
        pytest.param(b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\n X: folded\r\n\r\n", id="obs-fold"),
        pytest.param(b"POST /echo HTTP/1.1\r\nContent-Length : 5\r\n\r\n", id="space-before-colon"),
    ],
)
async def test_ambiguous_framing_is_a_400_and_the_connection_closes(lean, head):
    """Request smuggling: a head two parsers could frame differently is refused, never guessed at."""
    gw = await lean()
    raw = await exchange(gw.port, head + b"5\r\nhello\r\n0\r\n\r\n" + get("/hello"))
    assert [r.status for r in parse_responses(raw)] == [400]
    assert gw.rec.seen == []


async def test_malformed_request_after_a_good_one_is_answered_after_it(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/hello") + b"NOT HTTP AT ALL\r\n\r\n")
    assert [r.status for r in parse_responses(raw)] == [200, 400]


async def test_head_that_trickles_is_a_408(lean):
    gw = await lean(header_timeout=0.2)
    raw = await exchange(gw.port, b"GET /hello HTTP/1.1\r\nHost: x\r\n")
    [r] = parse_responses(raw)
    assert r.status == 408 and r.headers["connection"] == "close"


# --- HTTP/1.0, HEAD, upgrade, routes --------------------------------------------------------------------------


async def test_http_1_0_closes_after_the_response_unless_keep_alive(lean):
    gw = await lean()
    [r] = parse_responses(await exchange(gw.port, get("/hello", version="1.0")))
    assert r.status == 200 and r.headers["connection"] == "close"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        for _ in range(2):
            writer.write(get("/hello", "Connection: keep-alive", version="1.0"))
            [r] = await read_responses(reader, 1)
            assert r.headers["connection"] == "keep-alive"
    finally:
        writer.close()


async def test_http_1_0_stream_is_not_chunked_and_ends_with_the_connection(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/stream", "Connection: keep-alive", version="1.0"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_stream_is_chunked_and_the_connection_is_kept(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/stream"), get("/hello", "Connection: close"))
    responses = parse_responses(raw)
    assert responses[0].headers["transfer-encoding"] == "chunked"
    assert responses[0].body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert responses[1].body == b"hello"


async def test_head_request_gets_the_headers_without_the_body(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/hello").replace(b"GET", b"HEAD", 1) + get("/hello", "Connection: close"))
    assert raw.count(b"hello") == 1  # only the GET's body
    [r, _] = parse_responses(raw, head_request=True)
    assert r.status == 200 and r.headers["content-length"] == "5"


async def test_unknown_route_is_404_and_wrong_method_405_as_json(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/nope"), post("/hello", b"", close=True))
    assert [(r.status, orjson.loads(r.body)["error"]["code"]) for r in parse_responses(raw)] == [
        (404, "not_found"),
        (405, "method_not_allowed"),
    ]


async def test_handler_error_is_rendered_as_openai_json(lean):
    gw = await lean()
    [r] = parse_responses(await exchange(gw.port, get("/fails", "Connection: close")))
    assert r.status == 400 and orjson.loads(r.body)["error"]["param"] == "x"


async def test_upgrade_without_a_body_is_answered_then_closed_and_with_a_body_refused(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/hello", "Connection: Upgrade", "Upgrade: h2c") + get("/hello"))
    [r] = parse_responses(raw)
    assert r.status == 200 and r.headers["connection"] == "close"
    raw = await exchange(gw.port, post("/echo", b"hi", "Connection: Upgrade", "Upgrade: h2c"))
    assert [r.status for r in parse_responses(raw)] == [400]


async def test_response_header_with_crlf_is_never_sent(lean):
    gw = await lean()
    raw = await exchange(gw.port, get("/bad-header"))
    assert b"pwned" not in raw  # no response splitting: the connection is closed instead


# --- disconnects, backpressure, drain ------------------------------------------------------------------------


async def test_client_disconnect_cancels_the_handler_at_once(lean):
    gw = await lean()
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(get("/slow"))
    await asyncio.wait_for(gw.rec.started.wait(), T)
    writer.close()
    async with asyncio.timeout(1):
        while not gw.rec.cancelled:
            await asyncio.sleep(0.01)


async def test_stream_to_a_client_that_does_not_read_is_held_by_backpressure(lean):
    gw = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(get("/flood"))
        await asyncio.wait_for(gw.rec.started.wait(), T)
        await asyncio.sleep(0.3)
        written = gw.rec.written
        await asyncio.sleep(0.2)
        assert gw.rec.written == written  # stalled: not growing the buffer
        assert written < 64 << 20  # bounded by socket buffers and the transport's high-water mark
        async with asyncio.timeout(T):
            while gw.rec.written == written:  # the client reads: the stream moves on
                await reader.read(1 << 20)
    finally:
        writer.close()
    async with asyncio.timeout(1):
        while not gw.rec.cancelled:
            await asyncio.sleep(0.01)


async def test_drain_closes_idle_connections_and_waits_for_requests_in_flight(lean):
    gw = await lean()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", gw.port)
    busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", gw.port)
    busy_writer.write(get("/slow"))
    await asyncio.wait_for(gw.rec.started.wait(), T)
    drain = asyncio.create_task(gw.server.shutdown(5.0))
    async with asyncio.timeout(T):
        assert await idle_reader.read(-1) == b""  # the idle one is closed at once
    assert not drain.done()
    gw.rec.release.set()  # the one in flight finishes, with Connection: close
    async with asyncio.timeout(T):
        [r] = parse_responses(await busy_reader.read(-1))
        await drain
    assert r.status == 200 and r.headers["connection"] == "close"
    for w in (idle_writer, busy_writer):
        w.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", gw.port)


async def test_drain_cancels_requests_that_outlive_the_grace(lean):
    gw = await lean()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(get("/slow"))
    await asyncio.wait_for(gw.rec.started.wait(), T)
    async with asyncio.timeout(T):
        await gw.server.shutdown(0.1)
        assert await reader.read(-1) == b""
    assert gw.rec.cancelled == 1
    writer.close()
