"""Usage → cost: read token counts from answers (OpenAI and Anthropic shapes), price them, splice the cost in.

`Usage` is in OpenAI's semantics, whatever the wire: `prompt_tokens` counts every prompt token, those read from
the provider's prompt cache (`cached_tokens`) and those written to it (`cache_write_tokens`) included;
`completion_tokens` counts every completion token, reasoning (`reasoning_tokens`) included. Anthropic's
`input_tokens` leaves both cache counts out, so they are added back here. Each token is priced once, at its
own rate (`price_usage`).

Hot-path shape: bodies are decoded by module-level msgspec decoders that read only `usage`; a stream is read
from its tail (the usage chunk is the last event before `[DONE]`) by finding the last `"usage": {` and
decoding that object alone; the cost goes back into the answer by a byte splice (`splice_usage`), never a
re-encoding of the answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import msgspec

from proxy.config import Price

_MILLION = 1_000_000.0
_T = TypeVar("_T")


class Usage(msgspec.Struct, gc=False):
    prompt_tokens: int = 0  # all prompt tokens, cache reads and writes included
    completion_tokens: int = 0  # all completion tokens, reasoning included
    cached_tokens: int = 0  # prompt tokens read from the provider's prompt cache
    cache_write_tokens: int = 0  # prompt tokens written to it
    reasoning_tokens: int = 0  # completion tokens spent reasoning


class Cost(msgspec.Struct, gc=False):
    """USD. `upstream` = prompt + completion + request, what the provider bills; `fee` the gateway's share."""

    upstream: float = 0.0
    fee: float = 0.0
    total: float = 0.0
    prompt: float = 0.0
    completion: float = 0.0
    request: float = 0.0


# --- OpenAI shape ------------------------------------------------------------------------------------------


class _PromptDetails(msgspec.Struct, gc=False):
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None  # OpenRouter's name; our translating adapters emit it too


class _CompletionDetails(msgspec.Struct, gc=False):
    reasoning_tokens: int | None = None


class _OpenAIUsage(msgspec.Struct, gc=False):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None
    completion_tokens_details: _CompletionDetails | None = None
    prompt_cache_hit_tokens: int | None = None  # DeepSeek's cached_tokens


class _OpenAIBody(msgspec.Struct, gc=False):
    usage: _OpenAIUsage | None = None


_decode_openai_body = msgspec.json.Decoder(_OpenAIBody).decode
_decode_openai_usage = msgspec.json.Decoder(_OpenAIUsage).decode


def _from_openai(u: _OpenAIUsage) -> Usage:
    pd, cd = u.prompt_tokens_details, u.completion_tokens_details
    cached = pd.cached_tokens if pd is not None else None
    if cached is None:
        cached = u.prompt_cache_hit_tokens
    return Usage(
        prompt_tokens=u.prompt_tokens or 0,
        completion_tokens=u.completion_tokens or 0,
        cached_tokens=cached or 0,
        cache_write_tokens=(pd.cache_write_tokens or 0) if pd is not None else 0,
        reasoning_tokens=(cd.reasoning_tokens or 0) if cd is not None else 0,
    )


def usage_from_body(body: bytes) -> Usage | None:
    """The usage of an OpenAI JSON answer (chat.completion, text_completion, embeddings list), or None."""
    try:
        u = _decode_openai_body(body).usage
    except msgspec.MsgspecError:
        return None
    return None if u is None else _from_openai(u)


def openai_body_usage(body: bytes) -> Usage | None:
    """`usage_from_body` for a body that must be one JSON object: raises msgspec.DecodeError (ValidationError
    included) when it is not one, or when its usage is not of OpenAI's shape, instead of answering None."""
    u = _decode_openai_body(body).usage
    return None if u is None else _from_openai(u)


def usage_from_stream(tail: bytes) -> Usage | None:
    """The last non-null `usage` in the tail of an OpenAI SSE stream (`"usage":null` chunks are skipped)."""
    end = len(tail)
    while True:
        key, start = _last_usage_object(tail, end)
        if key < 0:
            return None
        u = _decode_object(tail, start, _decode_openai_usage)
        if u is not None:
            return _from_openai(u)
        end = key  # cut off by the tail's start or end, or malformed: an earlier one, if any


# --- Anthropic Messages shape ------------------------------------------------------------------------------


class _OutputDetails(msgspec.Struct, gc=False):
    thinking_tokens: int | None = None  # as adapters/anthropic.py reads it


class _AnthropicUsage(msgspec.Struct, gc=False):
    input_tokens: int | None = None  # excludes cache reads and writes
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    output_tokens_details: _OutputDetails | None = None


class _AnthropicBody(msgspec.Struct, gc=False):
    usage: _AnthropicUsage | None = None


_decode_anthropic_body = msgspec.json.Decoder(_AnthropicBody).decode
_decode_anthropic_usage = msgspec.json.Decoder(_AnthropicUsage).decode


def _from_anthropic(u: _AnthropicUsage) -> Usage:
    read = u.cache_read_input_tokens or 0
    write = u.cache_creation_input_tokens or 0
    return Usage(
        prompt_tokens=(u.input_tokens or 0) + read + write,
        completion_tokens=u.output_tokens or 0,
        cached_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=(d.thinking_tokens or 0) if (d := u.output_tokens_details) is not None else 0,
    )


def usage_from_messages_body(body: bytes) -> Usage | None:
    """The usage of an Anthropic `message` body, in OpenAI semantics, or None."""
    try:
        u = _decode_anthropic_body(body).usage
    except msgspec.MsgspecError:
        return None
    return None if u is None else _from_anthropic(u)


def usage_from_messages_stream(head: bytes, tail: bytes) -> Usage | None:
    """An Anthropic event stream's usage, in OpenAI semantics: `message_start` (the first usage in `head`)
    carries the input and cache counts, the final `message_delta` (the last usage in `tail`) the cumulative
    output count and, sometimes, input and cache counts too, which then win."""
    first = _first_usage_object(head)
    start = _decode_object(head, first, _decode_anthropic_usage) if first >= 0 else None
    last = _last_usage_object(tail, len(tail))[1]
    final = _decode_object(tail, last, _decode_anthropic_usage) if last >= 0 else None
    if start is None and final is None:
        return None
    if start is None or final is None:
        return _from_anthropic(start or final)  # type: ignore[arg-type]
    merged = _AnthropicUsage(
        input_tokens=final.input_tokens if final.input_tokens is not None else start.input_tokens,
        output_tokens=final.output_tokens if final.output_tokens is not None else start.output_tokens,
        cache_creation_input_tokens=final.cache_creation_input_tokens
        if final.cache_creation_input_tokens is not None
        else start.cache_creation_input_tokens,
        cache_read_input_tokens=final.cache_read_input_tokens
        if final.cache_read_input_tokens is not None
        else start.cache_read_input_tokens,
        output_tokens_details=final.output_tokens_details or start.output_tokens_details,
    )
    return _from_anthropic(merged)


# --- Cost --------------------------------------------------------------------------------------------------


def price_usage(u: Usage, p: Price, fee: float) -> Cost:
    """What `u` costs at `p` (USD per million tokens), each token once at its own rate; `fee` is the gateway's
    share of the upstream cost (0.055 = 5.5 %)."""
    cached, written = u.cached_tokens, u.cache_write_tokens
    uncached = max(u.prompt_tokens - cached - written, 0)
    reasoning = min(u.reasoning_tokens, u.completion_tokens)
    read_rate = p.input if p.cache_read is None else p.cache_read
    write_rate = p.input if p.cache_write is None else p.cache_write
    reasoning_rate = p.output if p.reasoning is None else p.reasoning
    # round() to 12 places costs ≈ 0.6 µs a call here; a zero needs none, and without a fee the total is the
    # upstream cost, already rounded.
    prompt = (uncached * p.input + cached * read_rate + written * write_rate) / _MILLION
    if prompt:
        prompt = round(prompt, 12)
    completion = ((u.completion_tokens - reasoning) * p.output + reasoning * reasoning_rate) / _MILLION
    if completion:
        completion = round(completion, 12)
    upstream = round(prompt + completion + p.request, 12)
    if fee:
        gateway_fee = round(upstream * fee, 12)
        total = round(upstream + gateway_fee, 12)
    else:
        gateway_fee, total = 0.0, upstream
    return Cost(upstream, gateway_fee, total, prompt, completion, p.request)


def usage_cost_fields(c: Cost) -> bytes:
    """The members to splice into an OpenAI usage object, in OpenRouter's usage-accounting shape (no braces,
    no trailing comma)."""
    return (
        f'"cost":{c.total!r},"is_byok":false,"cost_details":{{"upstream_inference_cost":{c.upstream!r},'
        f'"upstream_inference_prompt_cost":{c.prompt!r},"upstream_inference_completions_cost":{c.completion!r},'
        f'"gateway_fee":{c.fee!r}}}'
    ).encode()


def splice_usage(data: bytes, fields: bytes) -> bytes | None:
    """`data` (a JSON body or one complete SSE event) with `fields` inserted as the first members of its last
    non-null `usage` object; None if it has none. A byte splice: everything else stays as it was."""
    start = _last_usage_object(data, len(data))[1]
    if start < 0:
        return None
    if not fields:
        return data
    i = _skip_ws(data, start + 1)
    sep = b"" if i < len(data) and data[i] == _CLOSE else b","
    return b"".join((data[: start + 1], fields, sep, data[start + 1 :]))


# --- Finding `"usage": {` in bytes ------------------------------------------------------------------------

_KEY = b'"usage"'
_WS = frozenset(b" \t\r\n")
_OPEN, _CLOSE, _BACKSLASH, _COLON = b"{"[0], b"}"[0], b"\\"[0], b":"[0]
_MAX_CLOSES = 64  # a usage object has a few nested objects; more `}` than this and it is not one


def _skip_ws(data: bytes, i: int) -> int:
    n = len(data)
    while i < n and data[i] in _WS:
        i += 1
    return i


def _usage_object_at(data: bytes, pos: int) -> int:
    """If the `"usage"` at `pos` is a key whose value is an object: the index of its `{`; else -1.

    The match is a whole JSON string token unless its opening quote is escaped (an odd run of backslashes
    before it): inside a JSON string every quote is escaped, so `\\"usage\\"` there never matches."""
    b = pos
    while b > 0 and data[b - 1] == _BACKSLASH:
        b -= 1
    if (pos - b) % 2:
        return -1
    i = _skip_ws(data, pos + len(_KEY))
    if i >= len(data) or data[i] != _COLON:
        return -1  # a string value "usage", not the key
    i = _skip_ws(data, i + 1)
    return i if i < len(data) and data[i] == _OPEN else -1  # null or another type: skipped


def _last_usage_object(data: bytes, end: int) -> tuple[int, int]:
    """(key, `{`) of the last `"usage": {` whose key starts before `end`; (-1, -1) if none."""
    while (pos := data.rfind(_KEY, 0, end)) >= 0:
        start = _usage_object_at(data, pos)
        if start >= 0:
            return pos, start
        end = pos + len(_KEY) - 1
    return -1, -1


def _first_usage_object(data: bytes) -> int:
    """The `{` of the first `"usage": {`, or -1."""
    pos = 0
    while (pos := data.find(_KEY, pos)) >= 0:
        start = _usage_object_at(data, pos)
        if start >= 0:
            return start
        pos += 1
    return -1


def _decode_object(data: bytes, start: int, decode: Callable[[bytes], _T]) -> _T | None:
    """Decode the object opening at `start`: it ends at the first `}` where it decodes (an earlier one closes
    a nested object or sits in a string, and the slice is cut short). None if cut off or of the wrong shape.
    Only a `}` that balances the braces before it is tried (counting is C-fast; a failed decode is not).
    First guess: usage is the last member of its event (OpenAI's chunks, ours, Anthropic's message_delta)."""
    line_end = data.find(b"\n", start)
    last = data.rfind(b"}", start, len(data) if line_end < 0 else line_end)  # the event's own `}`
    guess = data.rfind(b"}", start, last) if last > 0 else -1
    if guess > start:
        try:
            return decode(data[start : guess + 1])
        except msgspec.ValidationError:
            return None  # the whole object, but not a usage object
        except msgspec.DecodeError:
            pass  # usage is not the last member
    close = start
    for _ in range(_MAX_CLOSES):
        close = data.find(b"}", close + 1)
        if close < 0:
            return None
        if data.count(b"{", start, close) != data.count(b"}", start, close) + 1:
            continue  # closes a nested object (braces inside strings fall through to the decode)
        try:
            return decode(data[start : close + 1])
        except msgspec.ValidationError:
            return None  # complete, but not a usage object
        except msgspec.DecodeError:
            continue  # not its end yet
    return None
