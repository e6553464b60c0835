"""Relay a committed upstream SSE stream to the client: bytes as received, chunk by chunk, never re-framed
(a chunk that ends inside an event waits for the rest of that event: see `pipe`).

Backpressure: `write()` drains when the transport's buffer is full (on either server engine), so a slow
client slows our reads from the upstream socket instead of growing memory. Once the first byte went out, an
upstream failure can no longer become an HTTP status: the stream ends with an OpenAI-shaped error event and
`[DONE]`, never a silent cut.
Usage is read from a small tail of the stream at its end, not by parsing every event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from adapters.sse import last_event_end
from health.window import Outcome
from proxy.deadline import Deadline
from proxy.errors import GatewayError, UpstreamTimeout
from proxy.lean_server.request import LeanRequest
from proxy.lean_server.response import LeanStream, PlainAnswer

# The client stream: aiohttp's on its engine, `LeanStream` on the lean one (same prepare/write API).
Downstream = web.StreamResponse | LeanStream

# Proxies in front of us (nginx) must not buffer a stream, and clients must not cache it.
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
KEEPALIVE = b": keep-alive\n\n"  # an SSE comment: clients ignore it, idle timers along the way reset
_TAIL = 4096  # the finish-reason and usage events are the last but [DONE]; a few KiB always hold them
_HOLD_MAX = 1 << 20  # the most of an unfinished event held back (`pipe`); more is relayed as it is
_LF2, _CRLF2 = b"\n\n", b"\r\n\r\n"


async def prepare(request: web.Request | LeanRequest, status: int, headers: dict[str, str]) -> Downstream:
    """Send a stream's head. The one place streams are opened, so the one place the engines differ."""
    if isinstance(request, LeanRequest):
        return request.protocol.start_stream(request, status, headers)
    down = web.StreamResponse(status=status, headers=headers)
    await down.prepare(request)
    return down


def answer(request: web.Request | LeanRequest, status: int, headers: dict[str, str], body: bytes) -> web.Response:
    """A whole (non-streamed) answer: a `web.Response` on aiohttp's engine; on the lean one the status, `headers`
    (the caller's dict, not copied) and body as they are, which the engine serialises itself."""
    if isinstance(request, LeanRequest):
        return PlainAnswer(status, headers, body)  # type: ignore[return-value]  # the lean engine's own answer
    return web.Response(body=body, status=status, headers=headers)


async def pipe(
    down: Downstream,
    prefix: bytes,
    chunks: AsyncIterator[bytes],
    deadline: float,
    collect: list[bytes] | None = None,
    error_event: Callable[[GatewayError], bytes] | None = None,
) -> tuple[Outcome, bytes]:
    """Write `prefix`, then the rest of the stream, until it ends, fails, or the deadline passes.

    Returns the outcome for the endpoint's health and the stream's tail (the last few KiB relayed, where the
    usage event is). Client disconnects propagate (the caller releases the upstream and records a
    cancellation). With `collect`, every relayed chunk is also appended to it (for the response cache; off
    otherwise). Another client API's stream (proxy/messages.py) brings its own `error_event`.
    """
    # A chunk that ends inside an event is relayed up to its last whole event; the rest (`held`) goes out with the
    # chunk that completes it. So a stream cut mid-event ends with whole events and then our error event, never
    # half an event glued to it (which a client parses as one broken event, and never sees the error). Upstreams
    # write whole events nearly always: then each chunk goes out as it came, uncopied.
    tail = bytearray()
    outcome = Outcome.OK
    try:
        with Deadline(deadline):
            data, held = _whole_events(prefix, b"")
            if data:
                await down.write(data)
                tail = _kept(tail, data, collect)
            async for chunk in chunks:
                data, held = _whole_events(chunk, held)
                if data:
                    await down.write(data)
                    tail = _kept(tail, data, collect)
            if held:  # the upstream ended cleanly without closing its last event: relayed as it sent it
                await down.write(held)
                tail = _kept(tail, held, collect)
    except TimeoutError as e:
        err = e if isinstance(e, GatewayError) else UpstreamTimeout("stream exceeded its total time")
        outcome = Outcome.TIMEOUT
        await down.write(err.sse_event() if error_event is None else error_event(err))
    except GatewayError as e:
        outcome = Outcome.PROTOCOL
        await down.write(e.sse_event() if error_event is None else error_event(e))
    return outcome, bytes(tail)


def _whole_events(data: bytes, held: bytes) -> tuple[bytes, bytes]:
    """`held + data` cut after its last whole event: (what to relay now, what to hold). Past `_HOLD_MAX` held
    bytes (an upstream whose events end in bare CRs, say) everything goes out as it is."""
    if held:
        data = held + data
    if data.endswith(_LF2) or data.endswith(_CRLF2):
        return data, b""
    end = last_event_end(data)
    if len(data) - end > _HOLD_MAX:
        return data, b""
    return data[:end], data[end:]


def _kept(tail: bytearray, data: bytes, collect: list[bytes] | None) -> bytearray:
    """The stream's tail window after `data`, and `data` collected if asked. The last few KiB relayed, however
    the upstream cut its writes, hold the usage and finish-reason events; appending a chunk is a small copy, and
    the window is trimmed at twice its size."""
    if collect is not None:
        collect.append(data)
    if len(data) >= _TAIL:
        return bytearray(data[-_TAIL:])
    tail += data
    if len(tail) > 2 * _TAIL:
        del tail[:-_TAIL]
    return tail


async def whole_events(
    prefix: bytes, chunks: AsyncIterator[bytes], edit: Callable[[bytes], bytes]
) -> AsyncIterator[bytes]:
    """The stream re-cut at event boundaries, each run of complete events passed through `edit` (the cost
    splice into the usage event). Used only when the client asked for cost in its usage; `pipe` cuts the same
    way (`_whole_events`) but never edits."""
    carry = b""
    async for chunk in _chain(prefix, chunks):
        data, carry = _whole_events(chunk, carry)
        if data:
            yield edit(data) if b'"usage"' in data else data
    if carry:
        yield carry


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for data in rest:
        yield data
