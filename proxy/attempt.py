"""One upstream attempt, run to its commit point: the moment its answer may be shown to the client.

A non-streamed attempt commits with its whole body. A stream commits at its first *content* event (text,
tool call, reasoning, refusal, a finish reason or `[DONE]`): role-only and keep-alive frames before it are
held back, so a provider that errors or stalls early can still be failed over or out-hedged. The held bytes
are relayed unchanged once committed.

A `Front` serves a client API other than OpenAI's over the same attempts (proxy/messages.py: Anthropic's
Messages API). Per endpoint it either passes the client's bytes through (the endpoint speaks the client's
format: no translation either way) or reaches it through OpenAI chat and reshapes the adapter's OpenAI output
for the client; the commit point is then judged on what the client would receive. Without a front (every
OpenAI route) none of this runs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import ClassVar, Protocol

import msgspec

from adapters.base import Transcoder, transcoded
from adapters.sse import event_end
from health.monitor import Monitor
from health.window import OUTCOME_NAMES, Outcome
from proxy.accounting.accountant import Generation
from proxy.accounting.usage import Usage, openai_body_usage
from proxy.deadline import Deadline
from proxy.errors import (
    GatewayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStatus,
    UpstreamTimeout,
)
from proxy.router import Endpoint
from proxy.upstream import UpstreamClient, UpstreamResponse

# Outcome of a failed attempt for the health window, by error kind (errors.py `kind`).
OUTCOME_OF_KIND = {
    "connect": Outcome.CONNECT,
    "timeout": Outcome.TIMEOUT,
    "protocol": Outcome.PROTOCOL,
    "interrupted": Outcome.PROTOCOL,
    "upstream": Outcome.SERVER_ERROR,
}


def outcome_of(err: BaseException) -> Outcome:
    if isinstance(err, UpstreamStatus):
        return Outcome.RATE_LIMITED if err.upstream_status == 429 else Outcome.SERVER_ERROR
    if isinstance(err, GatewayError):
        return OUTCOME_OF_KIND.get(err.kind, Outcome.SERVER_ERROR)
    if isinstance(err, asyncio.CancelledError):
        return Outcome.CANCELLED
    return Outcome.PROTOCOL


class Front(Protocol):
    """A client API served over OpenAI-shaped attempts; see the module docstring. Built per request."""

    kind: ClassVar[str]  # the client's API, e.g. "messages": keeps its cached answers apart from chat's
    tokens: ClassVar[re.Pattern[bytes]]  # finds the output token count in the tail of the client's stream

    def native(self, ep: Endpoint) -> bool:
        """True: the endpoint speaks the client's format; its answer goes back as received."""
        ...

    def request(self, ep: Endpoint, strip: bool) -> tuple[bytes, Mapping[str, str] | None]:
        """The body for this endpoint (`strip`: drop gateway-only fields), and headers to add (or None)."""
        ...

    def response(self, body: bytes) -> bytes:
        """A non-native endpoint's OpenAI chat.completion body in the client's format."""
        ...

    def error_body(self, status: int, body: bytes) -> bytes:
        """A relayed OpenAI-shaped error body (non-native endpoints) in the client's format."""
        ...

    def transcoder(self) -> Transcoder:
        """Per stream: OpenAI chat SSE → the client's SSE (non-native endpoints)."""
        ...

    def classify(self, event: bytes) -> int:
        """`classify_event` for one event of the client's stream format."""
        ...

    def sse_error(self, err: GatewayError) -> bytes:
        """The event that ends the client's stream after a failure (GatewayError.sse_event for OpenAI)."""
        ...


class Committed:
    """A successful attempt, ready to be relayed. For streams, `prefix` holds the bytes already read."""

    __slots__ = ("body", "chunks", "ctype", "ep", "prefix", "resp", "started", "status", "ttfb", "usage", "usage_read")

    def __init__(self, ep: Endpoint, resp: UpstreamResponse, started: float) -> None:
        self.ep = ep
        self.resp = resp
        self.status = resp.status
        self.ctype: str = resp.headers.get("Content-Type", "application/json")
        self.started = started
        self.ttfb = 0.0
        self.body: bytes | None = None  # non-stream: the whole body
        self.prefix = b""  # stream: bytes read up to and including the first content event
        self.chunks: AsyncIterator[bytes] | None = None  # stream: the rest
        self.usage: Usage | None = None  # an OpenAI passthrough body's usage, read with its check (`usage_read`)
        self.usage_read = False


class Relay(Exception):
    """An upstream's client-fault answer (4xx): relayed as received, never failed over."""

    def __init__(self, committed: Committed) -> None:
        self.committed = committed


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    tool_calls: msgspec.Raw = msgspec.Raw()
    reasoning: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct, gc=False):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_Choice] = []
    error: msgspec.Raw = msgspec.Raw()


_decode_chunk = msgspec.json.Decoder(_Chunk).decode

_NOTHING, _CONTENT, _ERROR = 0, 1, 2


def classify_event(event: bytes) -> int:
    """Is this SSE event content (commit), an error (fail over), or nothing yet (role, comment, ping)?"""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue  # comments (": keep-alive"), `event:`, `id:`, `retry:`
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return _CONTENT
        try:
            chunk = _decode_chunk(payload)
        except msgspec.DecodeError:
            return _ERROR  # garbage before the first token: let another endpoint answer
        if chunk.error:
            return _ERROR
        for c in chunk.choices:
            d = c.delta
            if c.finish_reason or (
                d is not None and (d.content or d.tool_calls or d.reasoning or d.reasoning_content or d.refusal)
            ):
                return _CONTENT
    return _NOTHING


class _MessagesDelta(msgspec.Struct, gc=False):
    stop_reason: str | None = None  # message_delta's; content_block_delta's other fields are not needed


class _MessagesBlock(msgspec.Struct, gc=False):
    type: str = ""
    text: str = ""
    thinking: str = ""


class _MessagesEvent(msgspec.Struct, gc=False):
    type: str = ""
    delta: _MessagesDelta | None = None
    content_block: _MessagesBlock | None = None


_decode_messages_event = msgspec.json.Decoder(_MessagesEvent).decode
_EMPTY_BLOCKS = ("text", "thinking")  # a block start of these types carries no content unless it has text


def classify_messages_event(event: bytes) -> int:
    """classify_event for Anthropic's Messages stream. Content: any content_block_delta, a content block start
    that is not an empty text or thinking block (a tool_use start already names the tool), a message_delta
    with a stop reason, message_stop. An `error` event before then fails over, as OpenAI's error chunk does;
    message_start and ping are held like OpenAI's role chunk."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue  # `event:` (the data repeats the type), comments
        try:
            ev = _decode_messages_event(line[5:].strip())
        except msgspec.DecodeError:
            return _ERROR
        kind = ev.type
        if kind == "content_block_delta" or kind == "message_stop":
            return _CONTENT
        if kind == "content_block_start":
            b = ev.content_block
            if b is not None and (b.type not in _EMPTY_BLOCKS or b.text or b.thinking):
                return _CONTENT
        elif kind == "message_delta":
            if ev.delta is not None and ev.delta.stop_reason:
                return _CONTENT
        elif kind == "error":
            return _ERROR
    return _NOTHING


def _is_stream(ctype: str) -> bool:
    # text/event-stream for SSE; AWS's binary event stream for Bedrock's ConverseStream
    return ctype.startswith(("text/event-stream", "application/vnd.amazon.eventstream"))


def _parse(parse: Callable[..., bytes], data: bytes, ep: Endpoint, *args: str) -> bytes:
    """`parse(data, *args)`: an adapter's (or a front's) reading of a success body; garbage fails over."""
    try:
        return parse(data, *args)
    except (msgspec.MsgspecError, ValueError, KeyError, TypeError) as e:
        raise UpstreamProtocolError(
            f"upstream {ep.provider} sent a body its adapter cannot read ({type(e).__name__}: {e})",
            upstream=ep.provider,
        ) from None


class _Object(msgspec.Struct, gc=False):
    pass  # no fields: decoding only checks that the body is one well-formed JSON object


_decode_object = msgspec.json.Decoder(_Object).decode


def _check_json(data: bytes, ep: Endpoint, committed: Committed, openai: bool = False) -> None:
    """A passthrough success body must be a JSON object (an OpenAI answer): a truncated body, an HTML page from a
    proxy in front of the provider or a stream under the wrong content type is the upstream's failure (retryable:
    nothing reached the client yet), not a 200 for the client to choke on. A JSON object under another content
    type is relayed as `application/json`. `openai`: the body is OpenAI's, and the one decode that checks it
    also reads its usage (`committed.usage`), which the relay would otherwise decode the body again for."""
    try:
        if openai:
            try:
                committed.usage, committed.usage_read = openai_body_usage(data), True
            except msgspec.DecodeError:  # not an object, or an object whose usage is not OpenAI's: look again
                _decode_object(data)
        else:
            _decode_object(data)
    except msgspec.DecodeError:
        raise UpstreamProtocolError(
            f"upstream {ep.provider} answered {committed.status} with a body that is not a JSON object "
            f"({committed.ctype or 'no content type'}, {len(data)} bytes)",
            upstream=ep.provider,
        ) from None
    if "json" not in committed.ctype:
        committed.ctype = "application/json"


async def _first_content(
    chunks: AsyncIterator[bytes], committed: Committed, classify: Callable[[bytes], int] = classify_event
) -> None:
    """Read the stream until its first content event; keep what was read in `committed.prefix`."""
    it = chunks.__aiter__()
    buf = bytearray()
    scanned = 0
    while True:
        try:
            data = await anext(it)
        except StopAsyncIteration:
            break  # ended before any content: relay what there is (the client sees the upstream's own end)
        buf += data
        while (bounds := event_end(buf, scanned))[0] != -1:  # `\n\n`, or `\r\n\r\n` as the SSE spec allows
            verdict = classify(bytes(buf[scanned : bounds[0]]))
            scanned = bounds[1]
            if verdict == _CONTENT:
                committed.prefix = bytes(buf)
                committed.chunks = it
                return
            if verdict == _ERROR:
                raise UpstreamProtocolError(
                    f"upstream {committed.ep.provider} sent an error before the first token: "
                    f"{bytes(buf[:200]).decode(errors='replace')}",
                    upstream=committed.ep.provider,
                )
    committed.prefix = bytes(buf)
    committed.chunks = it


async def run_attempt(
    client: UpstreamClient,
    monitor: Monitor,
    ep: Endpoint,
    kind: str,
    body: bytes,
    public_model: str,
    strip: bool,
    stream: bool,
    deadline: float,
    max_response_bytes: int,
    front: Front | None = None,
    gen: Generation | None = None,
) -> Committed:
    """Send one attempt and run it to its commit point, recording its start in the endpoint's health.

    Raises an UpstreamError on failure (after recording it), Relay for a client-fault answer. On success the
    caller owns the response and records the outcome in the monitor (and `gen`) once the relay is over.
    """
    adapter = ep.adapter
    target = adapter.target(kind, ep.model, stream)
    assert target is not None
    # Timings by time.monotonic, not loop.time(): uvloop's loop clock counts whole milliseconds. (Deadlines
    # are on the loop's clock, which reads the same monotonic clock, so they compare with these.)
    clock = time.monotonic
    started = clock()
    ep.health.start()
    resp: UpstreamResponse | None = None
    translate = not adapter.passthrough  # the adapter's own translation, provider format ⇄ OpenAI
    reshape: Front | None = None  # a front's translation, OpenAI → the client's format
    extra: Mapping[str, str] | None = None
    try:
        with Deadline(deadline):
            if front is None:
                payload = adapter.request_body(body, public_model, ep.model, strip)
            else:
                payload, extra = front.request(ep, strip)
                if front.native(ep):
                    translate = False
                else:
                    reshape = front
            # An optional `sign` (Bedrock's SigV4) makes per-request auth headers over these exact bytes.
            sign = getattr(adapter, "sign", None)
            signed = None if sign is None else sign(target, payload)  # None: nothing to sign (a Bearer key)
            if signed:
                extra = {**extra, **signed} if extra else signed
            resp = await client.send(target, payload, extra)
            committed = Committed(ep, resp, started)
            if resp.status >= 300:
                # An error body may echo the credential sent ("Incorrect API key provided: sk-…"): never relay it.
                data = target.redact(await resp.read(max_response_bytes))
                failure = adapter.classify(resp.status, data, resp.headers)
                if failure is not None:
                    raise failure
                if translate:  # the provider's error shape → OpenAI's
                    data = adapter.error_body(resp.status, data)
                    committed.ctype = "application/json"
                if reshape is not None:
                    data = reshape.error_body(resp.status, data)
                    committed.ctype = "application/json"
                committed.body = data
                committed.ttfb = clock() - started
                raise Relay(committed)
            if stream and _is_stream(committed.ctype):
                first_token = min(deadline, started + target.timeouts.first_token_s)
                chunks = resp.chunks()
                if translate:
                    tx = adapter.new_transcoder(ep.model)
                    if tx is not None:
                        chunks = transcoded(chunks, tx)
                        committed.ctype = "text/event-stream"
                if reshape is not None:
                    chunks = transcoded(chunks, reshape.transcoder())
                    committed.ctype = "text/event-stream"
                try:
                    with Deadline(first_token):
                        if front is None:
                            await _first_content(chunks, committed)
                        else:  # judged on what the client will get, native or reshaped
                            await _first_content(chunks, committed, front.classify)
                except TimeoutError:
                    if clock() >= deadline:
                        raise
                    raise UpstreamTimeout(
                        f"upstream {ep.provider} sent no first token within {target.timeouts.first_token_s:g}s",
                        upstream=ep.provider,
                    ) from None
            else:
                data = await resp.read(max_response_bytes)
                if not translate and reshape is None:
                    _check_json(data, ep, committed, front is None)  # relayed as received: a 2xx must be an answer
                committed.body = _parse(adapter.parse_response, data, ep, ep.model) if translate else data
                if reshape is not None:
                    committed.body = _parse(reshape.response, committed.body, ep)
                if translate or reshape is not None:
                    committed.ctype = "application/json"
            committed.ttfb = clock() - started
            return committed
    except Relay as r:
        monitor.record(ep, Outcome.CLIENT_ERROR, r.committed.ttfb, clock() - started)
        if gen is not None:
            gen.attempt(ep.provider, ep.key, "client_error", r.committed.status, started, clock())
        raise
    except (UpstreamError, TimeoutError) as e:
        if resp is not None:
            resp.release()
        err = (
            e
            if isinstance(e, UpstreamError)
            else UpstreamTimeout(
                f"upstream {ep.provider} exceeded the total time of {target.timeouts.total_s:g}s", upstream=ep.provider
            )
        )
        if err.upstream is None:
            err.upstream = ep.provider
        if target.secrets:  # a message quoting upstream bytes (an error event, a garbled body) may hold the key
            message = target.redact_text(err.message)
            if message != err.message:
                err.message, err.args = message, (message,)
        retry_after = err.upstream_headers.get("Retry-After") if isinstance(err, UpstreamStatus) else None
        outcome = outcome_of(err)
        monitor.record(ep, outcome, None, clock() - started, retry_after=retry_after)
        if gen is not None:
            status = err.upstream_status if isinstance(err, UpstreamStatus) else 0
            gen.attempt(ep.provider, ep.key, OUTCOME_NAMES[outcome], status, started, clock())
        raise err from None
    except BaseException:  # cancelled: a hedge lost, or the client left
        if resp is not None:
            resp.release()
        monitor.record(ep, Outcome.CANCELLED, None, clock() - started)
        if gen is not None:
            gen.attempt(ep.provider, ep.key, "cancelled", 0, started, clock())
        raise
