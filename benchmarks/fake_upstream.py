"""A fake OpenAI provider that is never the bottleneck.

Benchmarks measure what a proxy adds on top of its upstream, so the upstream must cost next to nothing: a bare
asyncio.Protocol with httptools (llhttp) parsing requests on uvloop, answering with bytes prebuilt at start.
It serves the very fixture files the tests use (tests/fixtures/openai/): one source of truth for what an
OpenAI response looks like, and the bytes a relayed stream is checked against.

Run: python -m benchmarks.fake_upstream --port 18001 [--ttft-ms 0] [--chunk-gap-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import cast

import httptools
import uvloop

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "openai"
CHAT_PATH = b"/v1/chat/completions"


def sse_events(raw: bytes) -> list[bytes]:
    """Split an SSE body into its events, each keeping its blank-line terminator."""
    events = [event + b"\n\n" for event in raw.split(b"\n\n") if event]
    if b"".join(events) != raw:
        raise ValueError("SSE fixture must be events each ending in a blank line")
    return events


def _response(body: bytes, content_type: bytes = b"application/json", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (status, content_type, len(body), body)


class Routes:
    """Every response as wire bytes, built once, so serving one is a dict lookup and a write."""

    def __init__(self, fixtures: Path = FIXTURES) -> None:
        def fixture(name: str) -> bytes:
            return _response((fixtures / name).read_bytes())

        self.fixed: dict[tuple[bytes, bytes], bytes] = {
            (b"POST", CHAT_PATH): fixture("chat_ok.json"),
            (b"POST", b"/v1/completions"): fixture("completion_ok.json"),
            (b"POST", b"/v1/embeddings"): fixture("embeddings_ok.json"),
            (b"GET", b"/v1/models"): fixture("models_ok.json"),
        }
        self.not_found = _response(
            b'{"error":{"message":"no such route","type":"invalid_request_error"}}', status=b"404 Not Found"
        )
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        events = sse_events((fixtures / "stream_ok.sse").read_bytes())
        # One HTTP chunk per SSE event, as a provider flushes each token; then the terminating chunk.
        self.stream_chunks = [b"%x\r\n%s\r\n" % (len(event), event) for event in events] + [b"0\r\n\r\n"]


class FakeOpenAI(asyncio.Protocol):
    """One keep-alive connection. Responses with no delay are written inline from the parser callback;
    delayed ones run in a task chained to the previous one, so pipelined requests still answer in order."""

    def __init__(self, routes: Routes, ttft_s: float, gap_s: float) -> None:
        self._routes = routes
        self._ttft_s = ttft_s
        self._gap_s = gap_s
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._tail: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tail is not None:
            self._tail.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.close()

    # httptools parser callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        path = self._url.split(b"?", 1)[0]
        method = self._parser.get_method()
        keep_alive = self._parser.should_keep_alive()
        if method == b"POST" and path == CHAT_PATH and _wants_stream(b"".join(self._body)):
            parts = [self._routes.stream_head, *self._routes.stream_chunks]
        else:
            parts = [self._routes.fixed.get((method, path), self._routes.not_found)]
        if self._ttft_s or self._gap_s or self._tail is not None:
            self._tail = asyncio.ensure_future(self._write_delayed(self._tail, parts, keep_alive))
            return
        transport = self._transport
        assert transport is not None
        for part in parts:
            transport.write(part)
        if not keep_alive:
            transport.close()

    async def _write_delayed(self, previous: asyncio.Task[None] | None, parts: list[bytes], keep_alive: bool) -> None:
        if previous is not None:
            await previous
        transport = self._transport
        assert transport is not None
        head, *chunks = parts  # for a stream: one chunk per event, then the terminating chunk
        await asyncio.sleep(self._ttft_s)
        # The head goes out with the first event: a provider answers once its first token exists.
        transport.write(head + chunks[0] if chunks else head)
        for chunk in chunks[1:-1]:
            await asyncio.sleep(self._gap_s)
            transport.write(chunk)
        if len(chunks) > 1:
            transport.write(chunks[-1])  # the stream ends right after its last event
        if not keep_alive:
            transport.close()
        if self._tail is asyncio.current_task():
            self._tail = None


def _wants_stream(body: bytes) -> bool:
    return b'"stream":true' in body or b'"stream": true' in body


async def serve(host: str, port: int, ttft_ms: float, gap_ms: float) -> None:
    loop = asyncio.get_running_loop()
    routes = Routes()
    server = await loop.create_server(
        lambda: FakeOpenAI(routes, ttft_ms / 1000, gap_ms / 1000), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"fake upstream on http://{host}:{bound}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fake_upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port (printed on stderr)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the response head and first event")
    parser.add_argument("--chunk-gap-ms", type=float, default=0.0, help="delay between stream events")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.ttft_ms, args.chunk_gap_ms))


if __name__ == "__main__":
    main()
