"""A fake OpenAI-compatible provider: a real aiohttp server on loopback that replays scripted answers.

Each request takes the next `Script` (the last one repeats) and is recorded, so tests assert on what the
upstream saw and how many times it was called. Bodies come from tests/fixtures/openai/, the same recorded
shapes the benchmarks serve.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str, provider: str = "openai") -> bytes:
    return (FIXTURES / provider / name).read_bytes()


def sse_events(data: bytes) -> list[bytes]:
    """Split an SSE fixture into its events, each with its trailing blank line."""
    return [part + b"\n\n" for part in data.split(b"\n\n") if part]


@dataclass
class Script:
    """What the fake provider does for one request."""

    status: int = 200
    body: bytes = field(default_factory=lambda: fixture("chat_ok.json"))
    headers: dict[str, str] = field(default_factory=dict)
    sse: list[bytes] | None = None  # stream these pieces (each written and flushed on its own)
    delay_s: float = 0.0  # before the response head
    gap_s: float = 0.0  # between SSE pieces
    drop_after: int | None = None  # abort the connection after this many SSE pieces
    hold: asyncio.Event | None = None  # wait for this before sending the SSE pieces after the first


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeUpstream:
    def __init__(self) -> None:
        self.scripts: list[Script] = [Script()]
        self.requests: list[Seen] = []
        self.cancelled = 0  # handlers cut short because the gateway closed the connection
        self.finished = 0
        self._cancel_seen = asyncio.Event()
        self.base_url = ""
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._handle)

    def script(self, *scripts: Script) -> None:
        self.scripts = list(scripts)

    def _next(self) -> Script:
        return self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        s = self._next()
        self.requests.append(Seen(request.method, request.path, dict(request.headers), await request.read()))
        try:
            if s.delay_s:
                await asyncio.sleep(s.delay_s)
            if s.sse is None:
                resp = web.Response(status=s.status, body=s.body, headers=s.headers)
                resp.content_type = s.headers.get("Content-Type", "application/json")
                self.finished += 1
                return resp
            resp = web.StreamResponse(status=s.status, headers={"Content-Type": "text/event-stream", **s.headers})
            await resp.prepare(request)
            for i, piece in enumerate(s.sse):
                if s.drop_after is not None and i == s.drop_after:
                    assert request.transport is not None
                    request.transport.abort()  # the provider dies mid-stream
                    return resp
                if i == 1 and s.hold is not None:
                    await s.hold.wait()
                elif i and s.gap_s:
                    await asyncio.sleep(s.gap_s)
                await resp.write(piece)
            await resp.write_eof()
            self.finished += 1
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            self._cancel_seen.set()
            raise

    async def wait_cancelled(self, n: int = 1, within: float = 5.0) -> None:
        """Wait until `n` upstream handlers were cut short by the gateway closing the connection."""
        async with asyncio.timeout(within):
            while self.cancelled < n:
                self._cancel_seen.clear()
                await self._cancel_seen.wait()
