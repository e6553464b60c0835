"""OpenAI chat completions ⇄ AWS Bedrock Converse / ConverseStream: any Bedrock model behind the OpenAI surface.

Converse puts the model and the stream flag in the URL (`/model/{modelId}/converse[-stream]`), so targets are
built per (model, stream), lazily, once. Requests are rebuilt by adapters/bedrock_request.py; credentials,
SigV4 and the binary event-stream framing live in adapters/bedrock_aws.py (botocore, an optional extra).

Why these choices:
- Signing: SigV4 covers the exact body bytes and a timestamp, so it cannot be prebuilt into the Target like
  other providers' keys. The adapter's `sign(target, body)` gives the per-request headers, which
  proxy/attempt.py (and the health probes) send as `extra_headers`; adapters without `sign` cost nothing.
  With a Bedrock API key nothing is signed: `Authorization: Bearer` is static and prebuilt.
- The model id is percent-encoded as one path segment (`:` and `/` in versions and ARNs), then normalised
  the way yarl, and so both upstream clients, put it on the wire (`%3A` → `:`, `%2F` kept): the signature is
  computed over that URL, so what is signed is what is sent.
- Usage, each token once: Bedrock's `inputTokens` leaves out cached prompt tokens (as Anthropic's API does;
  its `totalTokens` = input + output + cache reads + cache writes), OpenAI's `prompt_tokens` includes them. So
  prompt_tokens = input + cacheRead + cacheWrite, `cached_tokens` = cacheRead, `cache_write_tokens` =
  cacheWrite (OpenRouter's field), total = prompt + completion (= Bedrock's totalTokens).
- Reasoning (`reasoningContent`) becomes `reasoning` (OpenRouter's field); signatures and redacted reasoning
  are dropped, an OpenAI client has no way to send them back. Converse returns no id: each response gets one.
- Streams always end with a usage chunk (choices [], as with OpenAI's include_usage) when Bedrock sent its
  `metadata` event. An exception frame (throttlingException, modelStreamErrorException, …), bad framing, or
  a stream that ends before `messageStop` becomes an OpenAI error event: before the first token the attempt
  fails over on it (proxy/attempt.py), after it the client sees the error.
- Errors: 429 (ThrottlingException, ModelNotReadyException), 408, 5xx, and ServiceQuotaExceededException (a
  400, but an account quota another provider does not share) fail over; other 4xx are relayed. Bodies become
  OpenAI's `{"error": {message, type, param, code}}` with Bedrock's message and its exception name as code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import msgspec
from yarl import URL

from adapters.base import DONE, RETRYABLE_STATUSES, completion_choice
from adapters.bedrock_aws import EventFrames, SigV4Signer, auth_for, require_botocore
from adapters.bedrock_request import build_request
from proxy.config import ProviderConfig
from proxy.errors import UpstreamStatus
from proxy.upstream import Target

_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}  # malformed_model_output / malformed_tool_use and anything newer: "stop"

# Bedrock exception → OpenAI error type; anything else by status (4xx invalid_request_error, else server_error).
_ERROR_TYPES = {
    "ValidationException": "invalid_request_error",
    "ResourceNotFoundException": "invalid_request_error",
    "AccessDeniedException": "permission_error",
    "UnrecognizedClientException": "authentication_error",
    "InvalidSignatureException": "authentication_error",
    "IncompleteSignatureException": "authentication_error",
    "ExpiredTokenException": "authentication_error",
    "ThrottlingException": "rate_limit_error",
    "ServiceQuotaExceededException": "rate_limit_error",
    "ModelNotReadyException": "service_unavailable",
    "ServiceUnavailableException": "service_unavailable",
    "ModelTimeoutException": "timeout",
    "ModelErrorException": "server_error",
    "ModelStreamErrorException": "server_error",
    "InternalServerException": "server_error",
}
_RETRYABLE_TYPES = frozenset({"ThrottlingException", "ModelNotReadyException", "ServiceQuotaExceededException"})
# Bedrock names the exception in a header; a body alone (error_body's case) only has the status to go on.
_TYPE_OF_STATUS = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}


class _Usage(msgspec.Struct, gc=False, rename="camel"):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_write_input_tokens: int = 0


class _ToolUse(msgspec.Struct, gc=False, rename="camel"):
    tool_use_id: str = ""
    name: str = ""
    input: msgspec.Raw = msgspec.Raw(b"{}")  # kept as bytes: it becomes the `arguments` string as is


class _ReasoningText(msgspec.Struct, gc=False):
    text: str = ""


class _Reasoning(msgspec.Struct, gc=False, rename="camel"):
    reasoning_text: _ReasoningText | None = None


class _Block(msgspec.Struct, gc=False, rename="camel"):
    text: str | None = None
    tool_use: _ToolUse | None = None
    reasoning_content: _Reasoning | None = None


class _Message(msgspec.Struct, gc=False):
    content: list[_Block] = []


class _Output(msgspec.Struct, gc=False):
    message: _Message | None = None


class _Response(msgspec.Struct, gc=False, rename="camel"):
    output: _Output | None = None
    stop_reason: str = ""
    usage: _Usage | None = None


class _ToolDelta(msgspec.Struct, gc=False):
    input: str = ""


class _ReasoningDelta(msgspec.Struct, gc=False):
    text: str = ""  # `signature` and `redactedContent` are not read


class _Delta(msgspec.Struct, gc=False, rename="camel"):
    text: str | None = None
    tool_use: _ToolDelta | None = None
    reasoning_content: _ReasoningDelta | None = None


class _Start(msgspec.Struct, gc=False, rename="camel"):
    tool_use: _ToolUse | None = None


class _Event(msgspec.Struct, gc=False, rename="camel"):
    """Any stream event's payload (the `:event-type` header says which); also an exception's."""

    content_block_index: int = 0
    delta: _Delta | None = None
    start: _Start | None = None
    stop_reason: str | None = None
    usage: _Usage | None = None
    message: str = ""


class _ErrorDoc(msgspec.Struct, gc=False):
    message: str = ""
    Message: str = ""  # IAM's AccessDenied bodies capitalise it
    type: str = msgspec.field(default="", name="__type")


_decode_response = msgspec.json.Decoder(_Response).decode
_decode_event = msgspec.json.Decoder(_Event).decode
_decode_error = msgspec.json.Decoder(_ErrorDoc).decode
_enc = msgspec.json.Encoder().encode


def openai_usage(u: _Usage) -> dict[str, Any]:
    read, write = u.cache_read_input_tokens, u.cache_write_input_tokens
    prompt = u.input_tokens + read + write
    return {
        "prompt_tokens": prompt,
        "completion_tokens": u.output_tokens,
        "total_tokens": prompt + u.output_tokens,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
    }


def _finish_reason(stop_reason: str | None, tool_calls: bool) -> str:
    if stop_reason == "tool_use" and not tool_calls:
        return "stop"
    return _STOP.get(stop_reason or "", "stop")


def error_object(code: str, message: str, status: int) -> dict[str, Any]:
    fallback = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"message": message, "type": _ERROR_TYPES.get(code, fallback), "param": None, "code": code or None}


def _error_info(status: int, body: bytes, header_type: str = "") -> tuple[str, str]:
    """(exception name, message) of a Bedrock error body, or of anything else an upstream sent."""
    try:
        doc = _decode_error(body)
    except msgspec.MsgspecError:
        doc = _ErrorDoc()
    code = header_type or doc.type.rpartition("#")[2] or _TYPE_OF_STATUS.get(status, "")
    message = doc.message or doc.Message or body.decode(errors="replace").strip()[:500]
    return code, message or f"upstream answered {status}"


class BedrockTranscoder:
    """ConverseStream's binary event stream → OpenAI chat.completion.chunk events, for one stream.

    Chunks are framed from prebuilt bytes: per event only the new text is encoded. Bedrock numbers content
    blocks (text, reasoning, toolUse); OpenAI numbers tool calls, so toolUse blocks are counted in order.
    """

    __slots__ = ("_base", "_done", "_frames", "_head", "_stopped", "_tools", "_usage")

    def __init__(self, model: str, created: int | None = None, response_id: str | None = None) -> None:
        self._frames = EventFrames()
        rid = response_id or os.urandom(12).hex()
        self._base = b"".join(
            (
                b'data: {"id":',
                _enc("chatcmpl-" + rid),
                b',"object":"chat.completion.chunk","created":',
                b"%d" % (int(time.time()) if created is None else created),
                b',"model":',
                _enc(model),
                b",",
            )
        )
        self._head = self._base + b'"choices":[{"index":0,"delta":'
        self._tools: dict[int, int] = {}  # Bedrock content-block index → OpenAI tool_calls index
        self._usage: _Usage | None = None
        self._stopped = False  # messageStop seen: the answer is whole, only metadata may follow
        self._done = False  # an error ended the stream: nothing more goes out

    def _chunk(self, delta: bytes, finish: bytes = b"null") -> bytes:
        return self._head + delta + b',"finish_reason":' + finish + b"}]}\n\n"

    def feed(self, data: bytes) -> bytes:
        if self._done:
            return b""
        frames = self._frames.feed(data)
        out = [self._frame(headers, payload) for headers, payload in frames]
        if self._frames.error is not None and not self._done:
            out.append(self._error("InternalServerException", f"unreadable event stream ({self._frames.error})"))
        return b"".join(out)

    def finish(self) -> bytes:
        if self._done:
            return b""
        if not self._stopped:
            return self._error("InternalServerException", "the upstream stream ended before messageStop")
        self._done = True
        if self._usage is None:
            return DONE
        return self._base + b'"choices":[],"usage":' + _enc(openai_usage(self._usage)) + b"}\n\n" + DONE

    def _frame(self, headers: Mapping[str, Any], payload: bytes) -> bytes:
        if self._done:
            return b""  # whatever follows an error is not part of the answer
        kind = headers.get(":message-type")
        if kind == "error":  # a framing-level error: its details are in headers, not the payload
            return self._error(headers.get(":error-code") or "", headers.get(":error-message") or "stream error")
        try:
            ev = _decode_event(payload)
        except msgspec.MsgspecError:
            return self._error("InternalServerException", "the upstream sent an unreadable stream event")
        if kind == "exception":
            name = str(headers.get(":exception-type") or "")
            return self._error(name[:1].upper() + name[1:], ev.message or "the upstream reported an error")
        event = headers.get(":event-type")
        if event == "contentBlockDelta" and ev.delta is not None:
            return self._delta(ev.content_block_index, ev.delta)
        if event == "contentBlockStart" and ev.start is not None and ev.start.tool_use is not None:
            tool = ev.start.tool_use
            i = self._tools[ev.content_block_index] = len(self._tools)
            fn = {"name": tool.name, "arguments": ""}
            call = {"index": i, "id": tool.tool_use_id, "type": "function", "function": fn}
            return self._chunk(_enc({"tool_calls": [call]}))
        if event == "messageStart":
            return self._chunk(b'{"role":"assistant","content":""}')
        if event == "messageStop":
            self._stopped = True
            return self._chunk(b"{}", b'"%s"' % _finish_reason(ev.stop_reason, bool(self._tools)).encode())
        if event == "metadata" and ev.usage is not None:
            self._usage = ev.usage
        return b""  # contentBlockStop, other starts, event types newer than this adapter

    def _delta(self, index: int, d: _Delta) -> bytes:
        if d.text:
            return self._chunk(b'{"content":' + _enc(d.text) + b"}")
        if d.tool_use is not None and d.tool_use.input:
            i = self._tools.get(index)
            if i is None:
                return b""  # input for a block that never started: nothing to attach it to
            args = _enc(d.tool_use.input)
            return self._chunk(b'{"tool_calls":[{"index":%d,"function":{"arguments":%s}}]}' % (i, args))
        if d.reasoning_content is not None and d.reasoning_content.text:
            return self._chunk(b'{"reasoning":' + _enc(d.reasoning_content.text) + b"}")
        return b""  # reasoning signatures, redacted reasoning, citations, images

    def _error(self, code: str, message: str) -> bytes:
        self._done = True
        err = error_object(code, message, 500)
        return b"data: " + _enc({"error": err}) + b"\n\n" + DONE


class BedrockAdapter:
    name: ClassVar[str] = "bedrock"
    passthrough: ClassVar[bool] = False

    __slots__ = ("_base", "_chat", "_headers", "_provider", "_signer", "_stream")

    def __init__(self, provider: ProviderConfig, base_url: str) -> None:
        require_botocore(provider.name)
        self._provider = provider
        self._base = base_url.rstrip("/")  # https://bedrock-runtime.us-east-1.amazonaws.com
        self._headers = {"Content-Type": "application/json", "Accept": "*/*"}
        auth = auth_for(provider, URL(self._base).host or "")
        self._signer: SigV4Signer | None = None
        if isinstance(auth, SigV4Signer):
            self._signer = auth
        else:
            self._headers["Authorization"] = f"Bearer {auth}"
        self._headers.update(provider.headers)
        # Per upstream model, built on first use; one dict per URL shape, so a lookup allocates nothing.
        self._chat: dict[str, Target] = {}
        self._stream: dict[str, Target] = {}

    def target(self, kind: str, model: str = "", stream: bool = False) -> Target | None:
        if kind != "chat":
            return None  # no completions, embeddings or model list on bedrock-runtime's Converse API
        cache = self._stream if stream else self._chat
        t = cache.get(model)
        if t is None:
            verb = "converse-stream" if stream else "converse"
            url = str(URL(f"{self._base}/model/{quote(model, safe='')}/{verb}"))  # as sent: see the docstring
            p = self._provider
            t = cache[model] = Target(url, self._headers, p.timeouts, max_connections=p.max_connections)
        return t

    def sign(self, target: Target, body: bytes) -> dict[str, str] | None:
        """SigV4 headers over this exact body, or None when a static Bearer key authenticates instead."""
        return None if self._signer is None else self._signer.headers(target.url, body)

    def request_body(self, body: bytes, public_model: str, upstream_model: str, strip: bool) -> bytes:
        return build_request(body, upstream_model)  # a whitelist: gateway fields never reach Bedrock

    def parse_response(self, body: bytes, model: str) -> bytes:
        r = _decode_response(body)
        if r.output is None or r.output.message is None:
            # e.g. a 200 carrying UnknownOperationException: not an answer, so fail over (ValueError → protocol)
            raise ValueError(f"no output.message in the response: {body[:200].decode(errors='replace')}")
        text: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        for b in r.output.message.content:
            if b.text is not None:
                text.append(b.text)
            elif b.tool_use is not None:
                fn = {"name": b.tool_use.name, "arguments": bytes(b.tool_use.input).decode()}
                calls.append({"id": b.tool_use.tool_use_id, "type": "function", "function": fn})
            elif b.reasoning_content is not None and b.reasoning_content.reasoning_text is not None:
                reasoning.append(b.reasoning_content.reasoning_text.text)
        choice = completion_choice(text, calls, reasoning, _finish_reason(r.stop_reason, bool(calls)))
        doc: dict[str, Any] = {
            "id": "chatcmpl-" + os.urandom(12).hex(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
        if r.usage is not None:
            doc["usage"] = openai_usage(r.usage)
        return _enc(doc)

    def new_transcoder(self, model: str) -> BedrockTranscoder:
        return BedrockTranscoder(model)

    def classify(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamStatus | None:
        # x-amzn-ErrorType: "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"
        code, message = _error_info(status, body, (headers.get("x-amzn-ErrorType") or "").partition(":")[0])
        if status not in RETRYABLE_STATUSES and status < 500 and code not in _RETRYABLE_TYPES:
            return None  # the client's fault: relayed as error_body() shapes it
        relayed = {"Content-Type": "application/json"}
        retry_after = headers.get("Retry-After")
        if retry_after is not None:
            relayed["Retry-After"] = retry_after
        body = _enc({"error": error_object(code, message, status)})
        return UpstreamStatus(status, body, relayed, upstream=self._provider.name)

    def error_body(self, status: int, body: bytes) -> bytes:
        return _enc({"error": error_object(*_error_info(status, body), status)})
