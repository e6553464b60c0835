"""Relay an upstream SSE stream to the client: bytes as received, chunk by chunk, never re-framed.

Backpressure: `write()` drains when aiohttp's buffer is full, so a slow client slows our reads from the
upstream socket instead of growing memory. Once the first byte went out, an upstream failure can no longer
become an HTTP status: the stream ends with an OpenAI-shaped error event and `[DONE]`, never a silent cut.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from proxy.errors import GatewayError, UpstreamTimeout
from proxy.upstream import UpstreamResponse

# Proxies in front of us (nginx) must not buffer a stream, and clients must not cache it.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def pipe(
    request: web.Request,
    upstream: UpstreamResponse,
    headers: dict[str, str],
    deadline: float,
) -> web.StreamResponse:
    """Stream the upstream body to the client until it ends, fails, or the attempt's deadline passes."""
    down = web.StreamResponse(status=upstream.status, headers=headers)
    try:
        await down.prepare(request)
        try:
            async with asyncio.timeout_at(deadline):
                async for data in upstream.chunks():
                    await down.write(data)
        except TimeoutError as e:
            err = e if isinstance(e, GatewayError) else UpstreamTimeout("stream exceeded its total time")
            await down.write(err.sse_event())
        except GatewayError as e:
            await down.write(e.sse_event())
    finally:
        upstream.release()  # no-op after a clean end; closes the upstream connection otherwise
    return down
