"""Google's Gemini API (generativelanguage v1beta) behind the OpenAI chat completions interface.

Gemini puts the model and the stream flag in the URL (`models/{model}:generateContent`,
`:streamGenerateContent?alt=sse`), so targets are built per (model, stream), lazily, once. Requests are rebuilt
by adapters/gemini_request.py; responses and stream events are read through small views and re-emitted as
OpenAI JSON and chunks.

Why these choices:
- Usage, without double counting: Gemini reports thinking (`thoughtsTokenCount`) apart from the answer
  (`candidatesTokenCount`), and its `promptTokenCount` already includes the cached part. So completion_tokens =
  candidates + thoughts (as OpenAI counts reasoning in completion tokens), reasoning_tokens = thoughts,
  prompt_tokens = prompt (+ tool-use prompt tokens, which Gemini bills as input; zero unless built-in tools ran),
  cached_tokens = cachedContentTokenCount, total = prompt + completion (= Gemini's totalTokenCount).
- Streams: every Gemini event is a whole GenerateContentResponse (usage repeated, cumulative), so the last
  usage seen is the final one, sent as a `choices: []` chunk before `[DONE]` (the gateway reads usage from the
  stream's tail). Gemini sends a function call whole, in one part: it becomes one complete tool-call delta.
- Errors in a stream are raised, not relayed as events: before the first token that fails over like an HTTP
  error would, and after it `pipe()` ends the stream with an OpenAI-shaped error event and counts it against
  the endpoint's health.
- Google's error bodies (`{"error": {"code", "message", "status"}}`) become OpenAI-shaped ones, and a
  RetryInfo `retryDelay` becomes the Retry-After header Gemini does not send.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

from adapters.base import DONE, RETRYABLE_STATUSES
from adapters.gemini_request import translate
from adapters.sse import SseSplitter, data_of
from proxy.config import ProviderConfig
from proxy.errors import UpstreamError, UpstreamProtocolError, UpstreamStatus
from proxy.upstream import Target

_FILTERED = "content_filter"
# finishReason → OpenAI; anything else (OTHER, LANGUAGE, MALFORMED_FUNCTION_CALL, …) has no OpenAI name: "stop".
_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"} | dict.fromkeys(
    ("SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT"),
    _FILTERED,
)
_ERROR_TYPE = {  # google.rpc status → OpenAI error type; anything else is a server_error
    "INVALID_ARGUMENT": "invalid_request_error",
    "FAILED_PRECONDITION": "invalid_request_error",
    "OUT_OF_RANGE": "invalid_request_error",
    "NOT_FOUND": "invalid_request_error",
    "UNAUTHENTICATED": "authentication_error",
    "PERMISSION_DENIED": "permission_error",
    "RESOURCE_EXHAUSTED": "rate_limit_error",
}


class _Call(msgspec.Struct, gc=False):
    name: str
    args: msgspec.Raw = msgspec.Raw(b"{}")  # kept as bytes: it becomes the `arguments` string as is
    id: str | None = None


class _Part(msgspec.Struct, gc=False, rename="camel"):
    text: str = ""
    thought: bool = False
    function_call: _Call | None = None
    thought_signature: str | None = None


class _Content(msgspec.Struct, gc=False):
    parts: list[_Part] = []


class _Candidate(msgspec.Struct, gc=False, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None
    index: int = 0


class _Usage(msgspec.Struct, gc=False, rename="camel"):
    prompt_token_count: int = 0
    candidates_token_count: int = 0
    thoughts_token_count: int = 0
    cached_content_token_count: int = 0
    tool_use_prompt_token_count: int = 0


class _Feedback(msgspec.Struct, gc=False, rename="camel"):
    block_reason: str | None = None


class _Error(msgspec.Struct, gc=False):
    code: int = 0
    message: str = ""
    status: str = ""
    details: list[dict[str, Any]] = []


class _Embedding(msgspec.Struct, gc=False):
    values: msgspec.Raw = msgspec.Raw(b"[]")


class _Response(msgspec.Struct, gc=False, rename="camel"):
    candidates: list[_Candidate] = []
    usage_metadata: _Usage | None = None
    prompt_feedback: _Feedback | None = None
    model_version: str = ""
    response_id: str = ""
    error: _Error | None = None
    embeddings: list[_Embedding] | None = None  # batchEmbedContents


class _ErrorDoc(msgspec.Struct, gc=False):
    error: _Error


_decode_response = msgspec.json.Decoder(_Response).decode
_decode_error = msgspec.json.Decoder(_ErrorDoc | list[_ErrorDoc]).decode
_enc = msgspec.json.Encoder()


class GeminiAdapter:
    name: ClassVar[str] = "gemini"
    passthrough: ClassVar[bool] = False

    __slots__ = ("_base", "_chat", "_embed", "_headers", "_models", "_provider", "_stream")

    def __init__(self, provider: ProviderConfig, base_url: str) -> None:
        self._provider = provider
        self._base = base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json", "Accept": "*/*"}
        if provider.api_key:
            self._headers["x-goog-api-key"] = provider.api_key
        self._headers.update(provider.headers)
        # Per upstream model, built on first use; one dict per URL shape, so a lookup allocates nothing.
        self._chat: dict[str, Target] = {}
        self._stream: dict[str, Target] = {}
        self._embed: dict[str, Target] = {}
        self._models = self._build("/models", "GET")

    def _build(self, path: str, method: str = "POST") -> Target:
        p = self._provider
        return Target(self._base + path, self._headers, p.timeouts, method=method, max_connections=p.max_connections)

    def target(self, kind: str, model: str = "", stream: bool = False) -> Target | None:
        if kind == "chat":
            cache, verb = (
                (self._stream, ":streamGenerateContent?alt=sse") if stream else (self._chat, ":generateContent")
            )
        elif kind == "embeddings":
            cache, verb = self._embed, ":batchEmbedContents"
        elif kind == "models":
            return self._models
        else:
            return None  # legacy completions: Gemini has no such endpoint
        t = cache.get(model)
        if t is None:
            # "models/x" or "tunedModels/x" is a full resource name already
            t = cache[model] = self._build(f"/{model if '/' in model else 'models/' + model}{verb}")
        return t

    def request_body(self, body: bytes, public_model: str, upstream_model: str, strip: bool) -> bytes:
        return translate(body, upstream_model)  # rebuilt from scratch: gateway-only fields never get through

    def parse_response(self, body: bytes, model: str) -> bytes:
        r = _decode_response(body)
        if r.embeddings is not None:
            return _embeddings(r.embeddings, model)
        if r.error is not None:
            raise ValueError(f"error in a success body: {r.error.status}: {r.error.message}")
        choices = [_choice(c) for c in r.candidates]
        if not choices:  # the prompt was blocked (promptFeedback.blockReason): an empty, filtered answer
            blocked = r.prompt_feedback is not None and r.prompt_feedback.block_reason
            choices = [_message_choice(0, "", None, None, _FILTERED if blocked else "stop")]
        doc: dict[str, Any] = {
            "id": "chatcmpl-" + (r.response_id or os.urandom(12).hex()),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": r.model_version or model,
            "choices": choices,
        }
        if r.usage_metadata is not None:
            doc["usage"] = _usage(r.usage_metadata)
        return _enc.encode(doc)

    def new_transcoder(self, model: str) -> GeminiTranscoder:
        return GeminiTranscoder(model, self._provider.name)

    def classify(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamStatus | None:
        if status not in RETRYABLE_STATUSES:
            return None  # the client's fault: relayed as error_body() shapes it
        relayed = {"Content-Type": headers.get("Content-Type", "application/json")}
        retry_after = headers.get("Retry-After") or _retry_delay(body)
        if retry_after:
            relayed["Retry-After"] = retry_after
        return UpstreamStatus(status, self.error_body(status, body), relayed, upstream=self._provider.name)

    def error_body(self, status: int, body: bytes) -> bytes:
        """A Google error body as an OpenAI one; anything else unchanged."""
        err = _google_error(body)
        return body if err is None else _openai_error(err)


class GeminiTranscoder:
    """Gemini SSE (each `data:` a GenerateContentResponse) → OpenAI chat.completion.chunk events."""

    __slots__ = ("_calls", "_error", "_head", "_model", "_provider", "_split", "_started", "_usage")

    def __init__(self, model: str, provider: str) -> None:
        self._split = SseSplitter()
        self._model = model
        self._provider = provider
        self._head = b""  # `data: {"id":…,"model":…,"choices":[`: fixed per stream, encoded once
        self._started: set[int] = set()  # candidates whose role chunk went out
        self._calls: dict[int, int] = {}  # candidate → tool calls so far (the next call's index)
        self._usage: _Usage | None = None
        self._error: UpstreamError | None = None

    def feed(self, data: bytes) -> bytes:
        if self._error is not None:
            raise self._error
        out = b""
        for event in self._split.feed(data):
            try:
                out += self._event(_payload(event))
            except UpstreamError as e:
                if not out:
                    raise
                self._error = e  # what came before the error goes out first; the error on the next call
                break
        return out

    def finish(self) -> bytes:
        if self._error is not None:
            raise self._error
        rest = self._split.flush()
        out = self._event(_payload(rest)) if rest else b""
        if self._usage is not None:
            tail = bytearray(self._open(None) + b'],"usage":')
            _enc.encode_into(_usage(self._usage), tail, -1)
            out += bytes(tail + b"}\n\n")
        return out + DONE

    def _open(self, r: _Response | None) -> bytes:
        if not self._head:
            rid = r.response_id if r is not None and r.response_id else os.urandom(12).hex()
            model = r.model_version if r is not None and r.model_version else self._model
            head = {
                "id": "chatcmpl-" + rid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
            }
            self._head = b"data: " + _enc.encode(head)[:-1] + b',"choices":['
        return self._head

    def _chunk(self, choice: dict[str, Any]) -> bytes:
        buf = bytearray(self._head)
        _enc.encode_into(choice, buf, -1)
        buf += b"]}\n\n"
        return bytes(buf)

    def _event(self, payload: bytes) -> bytes:
        if not payload or payload == b"[DONE]":
            return b""
        try:
            r = _decode_response(payload)
        except msgspec.MsgspecError as e:
            raise UpstreamProtocolError(f"upstream {self._provider} sent an unreadable event: {e}") from None
        if r.error is not None:
            raise _stream_error(r.error, self._provider)
        self._open(r)
        if r.usage_metadata is not None:
            self._usage = r.usage_metadata  # cumulative: the last one counts
        out: list[bytes] = []
        if not r.candidates and r.prompt_feedback is not None and r.prompt_feedback.block_reason:
            out.append(self._role(0))
            out.append(self._chunk({"index": 0, "delta": {}, "finish_reason": _FILTERED}))
        for c in r.candidates:
            i = c.index
            if i not in self._started:
                out.append(self._role(i))
            delta: dict[str, Any] = {}
            calls: list[dict[str, Any]] = []
            for p in c.content.parts if c.content is not None else ():
                if p.function_call is not None:
                    n = self._calls.get(i, 0)
                    self._calls[i] = n + 1
                    calls.append(_tool_call(p, n))
                elif p.thought:
                    delta["reasoning"] = delta.get("reasoning", "") + p.text
                elif p.text:
                    delta["content"] = delta.get("content", "") + p.text
            if calls:
                delta["tool_calls"] = calls
            finish = None
            if c.finish_reason:
                finish = "tool_calls" if i in self._calls else _FINISH.get(c.finish_reason, "stop")
            if delta or finish:
                out.append(self._chunk({"index": i, "delta": delta, "finish_reason": finish}))
        return out[0] if len(out) == 1 else b"".join(out)

    def _role(self, i: int) -> bytes:
        self._started.add(i)
        return self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})


def _payload(event: bytes) -> bytes:
    """The data of an event; Gemini's are one `data: ` line, which needs no line splitting."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    return data_of(event)


def _tool_call(p: _Part, index: int | None) -> dict[str, Any]:
    """A whole Gemini function call as an OpenAI tool call (with `index` in streams)."""
    fc = p.function_call
    assert fc is not None
    call: dict[str, Any] = {} if index is None else {"index": index}
    call["id"] = fc.id or "call_" + os.urandom(12).hex()  # Gemini rarely names its calls; OpenAI needs an id
    call["type"] = "function"
    # Compact: generateContent pretty-prints its JSON, and arguments are usually shown or logged as is.
    call["function"] = {"name": fc.name, "arguments": msgspec.json.format(bytes(fc.args), indent=-1).decode()}
    if p.thought_signature:
        call["extra_content"] = {"google": {"thought_signature": p.thought_signature}}
    return call


def _choice(c: _Candidate) -> dict[str, Any]:
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[dict[str, Any]] = []
    for p in c.content.parts if c.content is not None else ():
        if p.function_call is not None:
            calls.append(_tool_call(p, None))
        elif p.thought:
            thoughts.append(p.text)
        elif p.text:
            texts.append(p.text)
    content = "".join(texts) if texts or not calls else None  # OpenAI: null content beside tool calls
    finish = "tool_calls" if calls else _FINISH.get(c.finish_reason or "", "stop")
    return _message_choice(c.index, content, "".join(thoughts) if thoughts else None, calls or None, finish)


def _message_choice(
    index: int, content: str | None, reasoning: str | None, calls: list[dict[str, Any]] | None, finish: str
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning"] = reasoning
    if calls is not None:
        message["tool_calls"] = calls
    return {"index": index, "message": message, "finish_reason": finish}


def _usage(u: _Usage) -> dict[str, Any]:
    prompt = u.prompt_token_count + u.tool_use_prompt_token_count
    completion = u.candidates_token_count + u.thoughts_token_count
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": u.cached_content_token_count},
        "completion_tokens_details": {"reasoning_tokens": u.thoughts_token_count},
    }


def _embeddings(items: list[_Embedding], model: str) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": e.values} for i, e in enumerate(items)]
    # batchEmbedContents reports no token counts; zeros keep the OpenAI shape (clients read usage).
    return _enc.encode(
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 0, "total_tokens": 0}}
    )


def _google_error(body: bytes) -> _Error | None:
    try:
        doc = _decode_error(body)
    except msgspec.MsgspecError:
        return None
    if isinstance(doc, list):  # streamGenerateContent without alt=sse wraps it in an array
        return doc[0].error if doc else None
    return doc.error


def _openai_error(e: _Error) -> bytes:
    kind = _ERROR_TYPE.get(e.status, "server_error")
    return _enc.encode({"error": {"message": e.message, "type": kind, "param": None, "code": e.status or None}})


def _retry_delay(body: bytes) -> str | None:
    """RetryInfo's `retryDelay` ("41s", "0.5s") as whole Retry-After seconds."""
    err = _google_error(body)
    for d in err.details if err is not None else ():
        delay = d.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return str(math.ceil(float(delay[:-1])))
            except ValueError:
                return None
    return None


def _stream_error(e: _Error, provider: str) -> UpstreamStatus:
    status = e.code if 400 <= e.code <= 599 else 502
    err = UpstreamStatus(status, _openai_error(e), {"Content-Type": "application/json"}, upstream=provider)
    err.message = f"upstream {provider} failed mid-stream: {e.status or e.code}: {e.message}"
    return err
