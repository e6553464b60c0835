"""OpenAI chat completions ⇄ Anthropic Messages API, so Claude serves behind the gateway's OpenAI surface.

Routing, failover, hedging, the stream commit point and usage accounting all work on OpenAI-shaped bytes
(adapters/base.py), so this adapter translates at the edge: requests in adapters/anthropic_request.py;
here the JSON message (`parse_response`), the event stream (`AnthropicTranscoder`) and errors.

Mapping decisions:
- Usage: Anthropic's `input_tokens` leaves out cached prompt tokens, OpenAI's `prompt_tokens` includes them,
  so prompt_tokens = input + cache reads + cache writes; `prompt_tokens_details.cached_tokens` = cache reads
  and `prompt_tokens_details.cache_write_tokens` = cache writes (OpenRouter's field). Each token once.
- Thinking becomes `reasoning` (OpenRouter's field) in the message and in deltas. Signatures and redacted
  thinking are dropped: an OpenAI client has no way to send them back.
- Ids: `chatcmpl-` + the message id without its `msg_`; `model` is the model Anthropic says answered.
- Streams always end with a usage chunk (choices [], as with OpenAI's include_usage): the gateway's
  accounting reads it. An Anthropic `error` event becomes an OpenAI error event (so before the first token
  the attempt fails over, proxy/attempt.py), and so does a stream that ends without `message_stop`.
- Errors: 429, 5xx and 529 (overloaded) fail over; other 4xx are relayed. Either way the body is rewritten
  to OpenAI's `{"error": {message, type, param, code}}`, with Anthropic's message and its error type as code.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

from adapters.anthropic_request import JSON_TOOL, build_request
from adapters.base import DONE, RETRYABLE_STATUSES, completion_choice
from adapters.sse import SseSplitter, data_of
from proxy.config import ProviderConfig
from proxy.errors import UpstreamStatus
from proxy.upstream import Target

API_VERSION = "2023-06-01"  # the Messages API version every current feature is available under

_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",  # a server tool paused a long turn; the client sees an ordinary end
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error type → OpenAI error type (the code keeps Anthropic's type).
_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "not_found_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "billing_error": "insufficient_quota",
    "rate_limit_error": "rate_limit_error",
    "timeout_error": "timeout",
    "api_error": "server_error",
    "overloaded_error": "service_unavailable",
}


class _OutputDetails(msgspec.Struct, gc=False):
    thinking_tokens: int = 0


class _Usage(msgspec.Struct, gc=False):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    output_tokens_details: _OutputDetails | None = None


class _ErrorInfo(msgspec.Struct, gc=False):
    type: str = ""
    message: str = ""


class _ErrorDoc(msgspec.Struct, gc=False):
    error: _ErrorInfo | None = None


class _Block(msgspec.Struct, gc=False):  # a content block, whole (message) or at its start (stream)
    type: str
    text: str = ""
    thinking: str = ""
    id: str = ""
    name: str = ""
    input: dict[str, Any] | None = None


class _Message(msgspec.Struct, gc=False):
    id: str = ""
    model: str = ""
    content: list[_Block] = []
    stop_reason: str | None = None
    usage: _Usage = msgspec.field(default_factory=_Usage)


class _Delta(msgspec.Struct, gc=False):  # content_block_delta's, or message_delta's (which has no type)
    type: str = ""
    text: str = ""
    partial_json: str = ""
    thinking: str = ""
    stop_reason: str | None = None


class _Event(msgspec.Struct, gc=False):
    type: str
    index: int = 0
    delta: _Delta | None = None
    content_block: _Block | None = None
    message: _Message | None = None
    usage: _Usage | None = None
    error: _ErrorInfo | None = None


_decode_event = msgspec.json.Decoder(_Event).decode
_decode_message = msgspec.json.Decoder(_Message).decode
_decode_error = msgspec.json.Decoder(_ErrorDoc).decode
_enc = msgspec.json.Encoder().encode


def openai_usage(u: _Usage) -> dict[str, Any]:
    read = u.cache_read_input_tokens or 0
    write = u.cache_creation_input_tokens or 0
    prompt = (u.input_tokens or 0) + read + write
    completion = u.output_tokens or 0
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
    }
    if u.output_tokens_details is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": u.output_tokens_details.thinking_tokens}
    return usage


def _finish_reason(stop_reason: str | None, tool_calls: bool) -> str:
    if stop_reason == "tool_use" and not tool_calls:
        return "stop"  # only the JSON tool was called: to the client that is an ordinary answer
    return _STOP.get(stop_reason or "", "stop")


def openai_error(status: int, body: bytes) -> dict[str, Any]:
    """An Anthropic error body (or anything else an upstream sent) as OpenAI's error object."""
    try:
        info = _decode_error(body).error
    except msgspec.MsgspecError:
        info = None
    if info is None or not info.message:
        text = body.decode(errors="replace").strip()[:500]
        info = _ErrorInfo("", text or f"upstream answered {status}")
    return _error_object(info.type, info.message, "invalid_request_error" if 400 <= status < 500 else "server_error")


def _error_object(anthropic_type: str, message: str, fallback: str) -> dict[str, Any]:
    openai_type = _ERROR_TYPES.get(anthropic_type, fallback)
    return {"message": message, "type": openai_type, "param": None, "code": anthropic_type or None}


def _payload(event: bytes) -> bytes:
    """The event's data. Anthropic sends `event: <type>` then one `data:` line: sliced without a line split."""
    i = event.find(b"data:")
    if i != -1 and (i == 0 or event[i - 1] == 0x0A) and event.find(b"\n", i) == -1:
        return event[i + 5 :].removeprefix(b" ")
    return data_of(event)  # anything else (CRLF, several data lines, a comment) the general way


class AnthropicTranscoder:
    """Anthropic's event stream → OpenAI chat.completion.chunk events, for one stream.

    Chunks are framed from prebuilt bytes: per event only the new text is encoded. Anthropic numbers content
    blocks (text, thinking, tool_use); OpenAI numbers tool calls, so tool_use blocks are counted in order.
    """

    __slots__ = ("_base", "_created", "_done", "_head", "_json_block", "_model", "_split", "_tools", "_usage")

    def __init__(self, model: str, created: int | None = None) -> None:
        self._split = SseSplitter()
        self._created = int(time.time()) if created is None else created
        self._model = model
        self._tools: dict[int, int] = {}  # Anthropic content-block index → OpenAI tool_calls index
        self._json_block = -1  # the block index of the JSON-mode tool call, whose input is content
        self._usage = _Usage()
        self._done = False
        self._frame("unknown", model)

    def _frame(self, message_id: str, model: str) -> None:
        self._base = b"".join(
            (
                b'data: {"id":',
                _enc("chatcmpl-" + message_id.removeprefix("msg_")),
                b',"object":"chat.completion.chunk","created":',
                b"%d" % self._created,
                b',"model":',
                _enc(model),
                b",",
            )
        )
        self._head = self._base + b'"choices":[{"index":0,"delta":'

    def _chunk(self, delta: bytes, finish: bytes = b"null") -> bytes:
        return self._head + delta + b',"finish_reason":' + finish + b"}]}\n\n"

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return b""
        return b"".join([self._event(event) for event in self._split.feed(data)])

    def finish(self) -> bytes:
        if self._done:
            return b""
        rest = self._split.flush()
        out = self._event(rest) if rest else b""
        if self._done:
            return out
        return out + self._error("api_error", "the upstream stream ended before message_stop")

    def _event(self, event: bytes) -> bytes:
        if self._done:
            return b""  # whatever follows message_stop or an error is not part of the answer
        payload = _payload(event)
        if not payload:
            return b""  # a comment, or an event line without data
        try:
            ev = _decode_event(payload)
        except msgspec.MsgspecError:
            return self._error("api_error", "the upstream sent an unreadable stream event")
        kind = ev.type
        if kind == "content_block_delta" and ev.delta is not None:
            return self._delta(ev.index, ev.delta)
        if kind == "content_block_start" and ev.content_block is not None:
            return self._block_start(ev.index, ev.content_block)
        if kind == "message_start" and ev.message is not None:
            self._frame(ev.message.id, ev.message.model or self._model)
            self._usage = ev.message.usage
            return self._chunk(b'{"role":"assistant","content":""}')
        if kind == "message_delta":
            if ev.usage is not None:
                self._merge_usage(ev.usage)
            stop = ev.delta.stop_reason if ev.delta is not None else None
            if stop is None:
                return b""
            return self._chunk(b"{}", b'"%s"' % _finish_reason(stop, bool(self._tools)).encode())
        if kind == "message_stop":
            self._done = True
            return self._base + b'"choices":[],"usage":' + _enc(openai_usage(self._usage)) + b"}\n\n" + DONE
        if kind == "error":
            err = ev.error or _ErrorInfo()
            return self._error(err.type, err.message or "the upstream reported an error")
        return b""  # ping, content_block_stop, and event types newer than this adapter

    def _delta(self, index: int, d: _Delta) -> bytes:
        if d.type == "text_delta":
            return self._chunk(b'{"content":' + _enc(d.text) + b"}")
        if d.type == "input_json_delta" and d.partial_json:
            if index == self._json_block:
                return self._chunk(b'{"content":' + _enc(d.partial_json) + b"}")
            i = self._tools.get(index)
            if i is None:
                return b""  # the input of a server tool (web search …): no OpenAI equivalent
            args = _enc(d.partial_json)
            return self._chunk(b'{"tool_calls":[{"index":%d,"function":{"arguments":%s}}]}' % (i, args))
        if d.type == "thinking_delta":
            return self._chunk(b'{"reasoning":' + _enc(d.thinking) + b"}")
        return b""  # signature_delta, citations_delta

    def _block_start(self, index: int, block: _Block) -> bytes:
        if block.type == "text" and block.text:
            return self._chunk(b'{"content":' + _enc(block.text) + b"}")
        if block.type == "thinking" and block.thinking:
            return self._chunk(b'{"reasoning":' + _enc(block.thinking) + b"}")
        if block.type != "tool_use":
            return b""  # empty text/thinking starts, redacted_thinking, server tool blocks
        if block.name == JSON_TOOL:
            self._json_block = index
            return b""
        i = self._tools[index] = len(self._tools)
        call = {"index": i, "id": block.id, "type": "function", "function": {"name": block.name, "arguments": ""}}
        return self._chunk(_enc({"tool_calls": [call]}))

    def _merge_usage(self, u: _Usage) -> None:
        """message_delta's usage is cumulative; fields it leaves out keep message_start's values."""
        changes = {f: v for f in _Usage.__struct_fields__ if (v := getattr(u, f)) is not None}
        self._usage = msgspec.structs.replace(self._usage, **changes)

    def _error(self, anthropic_type: str, message: str) -> bytes:
        self._done = True
        return b"data: " + _enc({"error": _error_object(anthropic_type, message, "server_error")}) + b"\n\n" + DONE


class AnthropicAdapter:
    name: ClassVar[str] = "anthropic"
    passthrough: ClassVar[bool] = False

    __slots__ = ("_provider", "_targets")

    def __init__(self, provider: ProviderConfig, base_url: str) -> None:
        self._provider = provider
        headers = {"Content-Type": "application/json", "Accept": "*/*", "anthropic-version": API_VERSION}
        if provider.api_key:
            headers["x-api-key"] = provider.api_key
        headers.update(provider.headers)  # e.g. anthropic-beta, or another anthropic-version
        base = base_url.rstrip("/")  # https://api.anthropic.com/v1
        t, mc = provider.timeouts, provider.max_connections
        self._targets = {
            "chat": Target(base + "/messages", headers, t, max_connections=mc),
            "models": Target(base + "/models", headers, t, method="GET", max_connections=mc),
        }

    def target(self, kind: str, model: str = "", stream: bool = False) -> Target | None:
        return self._targets.get(kind)  # no completions or embeddings API at Anthropic

    def request_body(self, body: bytes, public_model: str, upstream_model: str, strip: bool) -> bytes:
        return build_request(body, upstream_model)  # a whitelist: gateway fields never reach Anthropic

    def parse_response(self, body: bytes, model: str) -> bytes:
        msg = _decode_message(body)
        text: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for b in msg.content:
            if b.type == "text":
                text.append(b.text)
            elif b.type == "thinking":
                reasoning.append(b.thinking)
            elif b.type == "tool_use":
                args = _enc(b.input or {}).decode()
                if b.name == JSON_TOOL:
                    text.append(args)
                else:
                    calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": args}})
        choice = completion_choice(text, calls, reasoning, _finish_reason(msg.stop_reason, bool(calls)))
        return _enc(
            {
                "id": "chatcmpl-" + msg.id.removeprefix("msg_"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": msg.model or model,
                "choices": [choice],
                "usage": openai_usage(msg.usage),
            }
        )

    def new_transcoder(self, model: str) -> AnthropicTranscoder:
        return AnthropicTranscoder(model)

    def classify(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamStatus | None:
        if status in RETRYABLE_STATUSES or status >= 500:
            relayed = {"Content-Type": "application/json"}
            retry_after = headers.get("Retry-After")
            if retry_after is not None:
                relayed["Retry-After"] = retry_after
            return UpstreamStatus(status, self.error_body(status, body), relayed, upstream=self._provider.name)
        return None

    def error_body(self, status: int, body: bytes) -> bytes:
        return _enc({"error": openai_error(status, body)})
