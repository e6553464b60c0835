"""The lean upstream pool against real loopback upstreams, side by side with the aiohttp reference client.

Behavioural tests run over both implementations: the lean pool is only a speed-up if it behaves the same.
Well-behaved upstreams are aiohttp servers; misbehaving ones (silent, cut off, garbage) are raw asyncio
servers scripted per connection.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.config import Timeouts
from proxy.errors import StreamInterrupted, UpstreamConnectError, UpstreamProtocolError, UpstreamTimeout
from proxy.upstream import new_client
from proxy.upstream.aiohttp_pool import AiohttpClient
from proxy.upstream.base import Target
from proxy.upstream.lean_pool import LeanClient, LeanResponse

IMPLS: dict[str, type[AiohttpClient] | type[LeanClient]] = {"aiohttp": AiohttpClient, "lean": LeanClient}
JSON = {"Content-Type": "application/json"}
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


@pytest.fixture(params=list(IMPLS))
async def client(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    c = IMPLS[request.param]()
    yield c
    await c.close()


@pytest.fixture
async def lean() -> AsyncIterator[LeanClient]:
    c = LeanClient()
    yield c
    await c.close()


def target(
    url: object,
    *,
    connect: float = 1.0,
    first_byte: float = 2.0,
    idle: float = 2.0,
    max_connections: int = 1024,
    headers: dict[str, str] | None = None,
) -> Target:
    return Target(
        str(url),
        JSON if headers is None else headers,
        Timeouts(connect_s=connect, first_byte_s=first_byte, idle_s=idle),
        max_connections=max_connections,
    )


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head + Content-Length body) off a raw connection, or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


async def wait_eof(reader: asyncio.StreamReader) -> None:
    """Until the client closes its end (anything it sends meanwhile is ignored)."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass


def respond(body: bytes, *extra: bytes) -> bytes:
    return OK_HEAD + b"".join(h + b"\r\n" for h in extra) + b"Content-Length: %d\r\n\r\n" % len(body) + body


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """A scripted loopback upstream: `script(reader, writer, n)` runs for the n-th connection (1-based)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.disconnected = asyncio.Event()  # set when a script's wait_eof() returned
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.connections += 1
        try:
            await self.script(reader, writer, self.connections)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def wait_disconnect(self, reader: asyncio.StreamReader) -> None:
        await wait_eof(reader)
        self.disconnected.set()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(script: Script) -> RawServer:
        server = await RawServer(script).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        await s.stop()


def peer(request: web.Request) -> object:
    assert request.transport is not None
    return request.transport.get_extra_info("peername")


# -- well-behaved upstreams --


async def test_json_round_trip_and_connection_reuse(client: Any, aiohttp_server: Any) -> None:
    peers: set[object] = set()

    async def handler(request: web.Request) -> web.Response:
        peers.add(peer(request))
        return web.json_response({"echo": await request.json(), "ct": request.headers["Content-Type"]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = await aiohttp_server(app)
    t = target(server.make_url("/v1/chat/completions"))
    for i in range(3):
        resp = await client.send(t, orjson.dumps({"i": i}))
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("application/json")  # case-insensitive
        assert orjson.loads(await resp.read(1 << 20)) == {"echo": {"i": i}, "ct": "application/json"}
    assert len(peers) == 1


async def test_chunked_stream_yields_chunks_as_sent(client: Any, aiohttp_server: Any) -> None:
    go_on = asyncio.Event()
    peers: set[object] = set()

    async def handler(request: web.Request) -> web.StreamResponse:
        peers.add(peer(request))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await go_on.wait()
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/s", handler)
    server = await aiohttp_server(app)
    t = target(server.make_url("/s"))
    resp = await client.send(t, b"{}")
    assert resp.headers["Transfer-Encoding"] == "chunked"
    it = resp.chunks()
    assert await anext(it) == b"data: first\n\n"  # decoded chunk payload, while the server is still blocked
    go_on.set()
    assert b"".join([c async for c in it]) == b"data: second\n\n"
    # A stream read to its end gives its connection back to the pool.
    go_on.set()
    resp = await client.send(t, b"{}")
    assert b"".join([c async for c in resp.chunks()]) == b"data: first\n\ndata: second\n\n"
    assert len(peers) == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_limit_is_protocol_error(client: Any, aiohttp_server: Any, chunked: bool) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(body=b"x" * 10_000)
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(40):
            await resp.write(b"y" * 10_000)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/big", handler)
    server = await aiohttp_server(app)
    resp = await client.send(target(server.make_url("/big")), b"{}")
    with pytest.raises(UpstreamProtocolError):
        await resp.read(1000)
    resp.release()  # idempotent after read() released it


async def test_extra_headers_override_target_headers(client: Any, aiohttp_server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(
            {k: request.headers.getall(k) for k in ("Authorization", "X-Extra") if k in request.headers}
        )

    app = web.Application()
    app.router.add_post("/h", handler)
    server = await aiohttp_server(app)
    t = target(server.make_url("/h"), headers={**JSON, "Authorization": "Bearer a"})
    resp = await client.send(t, b"{}", {"Authorization": "Bearer b", "X-Extra": "1"})
    assert orjson.loads(await resp.read(1000)) == {"Authorization": ["Bearer b"], "X-Extra": ["1"]}
    resp = await client.send(t, b"{}")  # the prebuilt head is untouched by the extras
    assert orjson.loads(await resp.read(1000)) == {"Authorization": ["Bearer a"]}


async def test_interim_1xx_answer_is_skipped(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + respond(b'{"ok":1}'))
        await wait_eof(reader)

    server = await raw_server(script)
    resp = await client.send(target(server.url), b"{}")
    assert resp.status == 200
    assert "link" not in resp.headers
    assert await resp.read(1000) == b'{"ok":1}'


async def test_close_delimited_body(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + b"Connection: close\r\n\r\nhello ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"world")

    server = await raw_server(script)
    resp = await client.send(target(server.url), b"{}")
    assert await resp.read(1000) == b"hello world"


async def test_connection_close_response_is_not_reused(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(respond(b"{}", b"Connection: close"))
        await server.wait_disconnect(reader)  # the client must close it, not keep it

    server = await raw_server(script)
    t = target(server.url)
    for _ in range(2):
        resp = await client.send(t, b"{}")
        assert await resp.read(1000) == b"{}"
    await asyncio.wait_for(server.disconnected.wait(), 1)
    assert server.connections == 2


async def test_close_closes_pooled_connections(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(respond(b"{}"))
        await server.wait_disconnect(reader)

    server = await raw_server(script)
    resp = await client.send(target(server.url), b"{}")
    assert await resp.read(1000) == b"{}"
    await asyncio.sleep(0.02)
    assert not server.disconnected.is_set()  # pooled, kept alive
    await client.close()
    await asyncio.wait_for(server.disconnected.wait(), 1)


# -- failures --


async def test_connection_refused_is_connect_error(client: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    with pytest.raises(UpstreamConnectError):
        await client.send(target(f"http://127.0.0.1:{port}/x"), b"{}")


async def test_connect_timeout(client: Any) -> None:
    # A listener that never accepts, with its backlog filled: Linux drops further SYNs, so connect hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await client.send(target(f"http://127.0.0.1:{port}/x", connect=0.2), b"{}")
        assert time.monotonic() - started < 1.0
    finally:
        for s in fillers:
            s.close()
        listener.close()


async def test_silent_upstream_times_out_after_first_byte_s(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        await server.wait_disconnect(reader)  # never answers

    server = await raw_server(script)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await client.send(target(server.url, first_byte=0.2), b"{}")
    assert 0.15 < time.monotonic() - started < 1.0
    await asyncio.wait_for(server.disconnected.wait(), 1)  # the attempt's connection is dropped


@pytest.mark.parametrize("consume", ["chunks", "read"])
async def test_idle_mid_stream_times_out(client: Any, raw_server: Any, consume: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + b"Content-Length: 100\r\n\r\n0123456789")
        await server.wait_disconnect(reader)  # then silence

    server = await raw_server(script)
    resp = await client.send(target(server.url, idle=0.2), b"{}")
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        if consume == "chunks":
            it = resp.chunks()
            assert await anext(it) == b"0123456789"
            await anext(it)
        else:
            await resp.read(1000)
    assert 0.15 < time.monotonic() - started < 1.0
    await asyncio.wait_for(server.disconnected.wait(), 1)


@pytest.mark.parametrize("consume", ["chunks", "read"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_close_mid_body_is_stream_interrupted(client: Any, raw_server: Any, consume: str, chunked: bool) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if chunked:
            writer.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
        else:
            writer.write(OK_HEAD + b"Content-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.02)  # then hang up mid-body

    server = await raw_server(script)
    resp = await client.send(target(server.url), b"{}")
    got = []
    with pytest.raises(StreamInterrupted):
        if consume == "chunks":
            async for chunk in resp.chunks():
                got.append(chunk)
        else:
            await resp.read(1000)
    if consume == "chunks":
        assert b"".join(got) == b"0123456789"  # what did arrive is delivered before the error


@pytest.mark.parametrize(
    "client",
    [
        pytest.param(
            "aiohttp",
            marks=pytest.mark.xfail(
                strict=True, raises=UpstreamTimeout, reason="aiohttp stalls on a bad chunk size until idle_s"
            ),
        ),
        "lean",
    ],
    indirect=True,
)
async def test_malformed_chunk_is_stream_interrupted(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)  # a valid head first, so both clients fail on the body, not in send()
        writer.write(b"ZZZ\r\n")
        await wait_eof(reader)

    server = await raw_server(script)
    resp = await client.send(target(server.url, idle=0.3), b"{}")
    with pytest.raises(StreamInterrupted):
        await resp.read(1000)


async def test_garbage_head_is_protocol_error(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await wait_eof(reader)

    server = await raw_server(script)
    with pytest.raises(UpstreamProtocolError):
        await client.send(target(server.url), b"{}")


async def test_fresh_connection_closed_before_head_is_not_retried(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)  # then hang up without a byte

    server = await raw_server(script)
    with pytest.raises(UpstreamProtocolError):
        await client.send(target(server.url), b"{}")
    assert server.connections == 1


# -- cancellation and release --


async def test_release_before_body_end_closes_upstream_connection(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(OK_HEAD + b"Content-Length: 1000\r\n\r\n0123456789")
        await server.wait_disconnect(reader)

    server = await raw_server(script)
    resp = await client.send(target(server.url), b"{}")
    resp.release()
    resp.release()  # idempotent
    await asyncio.wait_for(server.disconnected.wait(), 1)


async def test_cancelling_send_closes_connection(client: Any, raw_server: Any) -> None:
    got_request = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        got_request.set()
        await server.wait_disconnect(reader)

    server = await raw_server(script)
    task = asyncio.create_task(client.send(target(server.url), b"{}"))
    await asyncio.wait_for(got_request.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.disconnected.wait(), 1)


# -- pooling --


async def test_idle_connection_closed_by_server_is_discarded(client: Any, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(respond(b'{"n":%d}' % n))  # keep-alive by default...
        await writer.drain()  # ...but the server closes the idle connection anyway

    server = await raw_server(script)
    t = target(server.url)
    resp = await client.send(t, b"{}")
    assert await resp.read(1000) == b'{"n":1}'
    await asyncio.sleep(0.05)  # the FIN reaches the pooled connection
    resp = await client.send(t, b"{}")
    assert await resp.read(1000) == b'{"n":2}'
    assert server.connections == 2


async def test_stale_keepalive_race_is_retried_once_on_fresh_connection(lean: LeanClient, raw_server: Any) -> None:
    """The server closes a kept-alive connection just as the next request goes out on it (it never answers).

    Lean only: aiohttp retries this solely for idempotent methods, and upstream requests are POSTs.
    """

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(respond(b'{"n":%d}' % n))
        if n == 1:
            await read_request(reader)  # the reused connection's request: hang up without a byte
            return
        await wait_eof(reader)

    server = await raw_server(script)
    t = target(server.url)
    for expected in (b'{"n":1}', b'{"n":2}'):
        resp = await lean.send(t, b"{}")
        assert await resp.read(1000) == expected
    assert server.connections == 2


async def test_stale_retry_happens_only_once(lean: LeanClient, raw_server: Any) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 1:
            writer.write(respond(b"{}"))
            await read_request(reader)  # reused: hang up; the retry's fresh connection hangs up too

    server = await raw_server(script)
    t = target(server.url)
    resp = await lean.send(t, b"{}")
    await resp.read(1000)
    with pytest.raises(UpstreamProtocolError):
        await lean.send(t, b"{}")
    assert server.connections == 2


@pytest.mark.parametrize(
    "client",
    [
        pytest.param(
            "aiohttp",
            marks=pytest.mark.xfail(strict=True, reason="AiohttpClient ignores target.max_connections"),
        ),
        "lean",
    ],
    indirect=True,
)
async def test_pool_bound_is_respected(client: Any, aiohttp_server: Any) -> None:
    peers: set[object] = set()
    active = peak = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal active, peak
        peers.add(peer(request))
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.05)
        active -= 1
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/p", handler)
    server = await aiohttp_server(app)
    t = target(server.make_url("/p"), max_connections=2)

    async def one() -> bytes:
        resp = await client.send(t, b"{}")
        return bytes(await resp.read(1000))

    assert await asyncio.gather(*(one() for _ in range(5))) == [b"{}"] * 5
    assert peak <= 2
    assert len(peers) <= 2


# -- lean internals: backpressure, pool accounting, TLS fallback --


async def test_slow_consumer_pauses_reading(lean: LeanClient, aiohttp_server: Any) -> None:
    size = 4 * 1024 * 1024

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(size // 65536):
            await resp.write(b"z" * 65536)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/big", handler)
    server = await aiohttp_server(app)
    t = target(server.make_url("/big"))
    resp = await lean.send(t, b"{}")
    assert isinstance(resp, LeanResponse)
    conn = resp._conn
    assert conn is not None
    await asyncio.sleep(0.1)  # consumer busy: the pool must not buffer all 4 MiB
    assert conn.paused
    assert resp._queued < 1024 * 1024
    total = 0
    async for chunk in resp.chunks():
        total += len(chunk)
    assert total == size
    assert not conn.paused
    resp = await lean.send(t, b"{}")
    assert resp._conn is conn  # fully read: reused
    assert len(await resp.read(size)) == size


async def test_pool_waiter_cancel_and_timeout_leak_no_slot(lean: LeanClient, aiohttp_server: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/w", handler)
    server = await aiohttp_server(app)
    t = target(server.make_url("/w"), max_connections=1, first_byte=0.2)
    held = await lean.send(t, b"{}")  # holds the only slot until released
    waiting = asyncio.create_task(lean.send(t, b"{}"))
    await asyncio.sleep(0.02)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    with pytest.raises(UpstreamTimeout):
        await lean.send(t, b"{}")  # waits for the slot past first_byte_s
    assert await held.read(1000) == b"{}"
    resp = await lean.send(t, b"{}")
    assert await resp.read(1000) == b"{}"
    pool = next(iter(lean._pools.values()))
    assert (pool.size, len(pool.idle), len(pool.waiters)) == (1, 1, 0)


async def test_https_targets_use_lazy_aiohttp_fallback(lean: LeanClient) -> None:
    assert lean._tls is None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamConnectError):
        await lean.send(target(f"https://127.0.0.1:{port}/x"), b"{}")
    assert isinstance(lean._tls, AiohttpClient)


def test_new_client_lean() -> None:
    assert isinstance(new_client("lean"), LeanClient)
