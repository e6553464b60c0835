"""Relay a committed upstream SSE stream to the client: bytes as received, chunk by chunk, never re-framed.

Backpressure: `write()` drains when aiohttp's buffer is full, so a slow client slows our reads from the
upstream socket instead of growing memory. Once the first byte went out, an upstream failure can no longer
become an HTTP status: the stream ends with an OpenAI-shaped error event and `[DONE]`, never a silent cut.
Usage is read from a small tail of the stream at its end, not by parsing every event.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from aiohttp import web

from health.window import Outcome
from proxy.errors import GatewayError, UpstreamTimeout

# Proxies in front of us (nginx) must not buffer a stream, and clients must not cache it.
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, idle timers along the way reset
_TAIL = 4096  # the usage chunk is the last event but [DONE]; a few KiB always hold it
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')


async def prepare(request: web.Request, status: int, headers: dict[str, str]) -> web.StreamResponse:
    down = web.StreamResponse(status=status, headers=headers)
    await down.prepare(request)
    return down


async def pipe(
    down: web.StreamResponse,
    prefix: bytes,
    chunks: AsyncIterator[bytes],
    deadline: float,
    collect: list[bytes] | None = None,
) -> tuple[Outcome, int]:
    """Write `prefix`, then the rest of the stream, until it ends, fails, or the deadline passes.

    Returns the outcome for the endpoint's health and the completion tokens the stream reported (0 if none).
    Client disconnects propagate (the caller releases the upstream and records a cancellation). With
    `collect`, every relayed chunk is also appended to it (for the response cache; off otherwise).
    """
    prev, last = b"", prefix  # the last two chunks hold the usage event; no copy per chunk
    outcome = Outcome.OK
    try:
        async with asyncio.timeout_at(deadline):
            if prefix:
                await down.write(prefix)
                if collect is not None:
                    collect.append(prefix)
            async for data in chunks:
                await down.write(data)
                prev, last = last, data
                if collect is not None:
                    collect.append(data)
    except TimeoutError as e:
        err = e if isinstance(e, GatewayError) else UpstreamTimeout("stream exceeded its total time")
        outcome = Outcome.TIMEOUT
        await down.write(err.sse_event())
    except GatewayError as e:
        outcome = Outcome.PROTOCOL
        await down.write(e.sse_event())
    found = _COMPLETION_TOKENS.findall(prev[-_TAIL:] + last[-_TAIL:])
    return outcome, int(found[-1]) if found else 0
