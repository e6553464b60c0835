"""Anthropic Messages API ⇄ OpenAI chat completions, the other way round from adapters/anthropic.py: an
Anthropic client (the `anthropic` SDK, a coding agent) in front, any adapter behind.

proxy/messages.py serves `POST /v1/messages`. An endpoint whose adapter speaks Anthropic gets the client's
bytes untouched; every other endpoint is reached through OpenAI chat, because that is the format every adapter
takes and returns (adapters/base.py): the request is translated here once (`to_openai_request`), the adapter
takes it from there like any chat request, and its OpenAI-shaped output comes back here: a chat.completion
becomes a `message` (`to_message`), the chunk stream Anthropic's event stream (`MessagesTranscoder`), an
error Anthropic's `{"type": "error", "error": {type, message}}` (`error_body`, `error_event`).

Mapping decisions (the inverse of adapters/anthropic.py's wherever both directions exist):
- Request, built from a whitelist as adapters/anthropic_request.py does, so nothing Anthropic-only reaches an
  OpenAI upstream (OpenAI rejects unknown fields):
  - `system` (a string or text blocks) → one system message, blocks joined by a blank line; `max_tokens` →
    `max_completion_tokens` (OpenAI's current name: its reasoning models refuse `max_tokens`); `stop_sequences`
    → `stop`; `metadata.user_id` → `user`; `thinking.budget_tokens` → `reasoning_effort`, the smallest effort
    whose budget in anthropic_request.THINKING_BUDGETS covers it; streams ask for the usage chunk.
  - Blocks: text → text parts; images (base64 or URL) → `image_url`; PDF documents → `file` parts (text
    documents → text); `tool_use` → the assistant's `tool_calls`; each `tool_result` → a `tool` message,
    placed before the rest of its turn (OpenAI wants a call's results right after it), with images from
    results in a user message after them (tool messages carry text only).
  - Dropped, because the answer does not depend on them: `cache_control`, `top_k`, `service_tier`,
    `context_management`, a tool result's `is_error`, citations, and the assistant's thinking blocks (an
    OpenAI upstream cannot take them back).
  - Refused with a 400 naming the field, because ignoring them would change the answer: server tools (web
    search, code execution, bash …), `mcp_servers`, document URLs, files by id, other block types.
- Response: reasoning (`reasoning` or `reasoning_content`) → a thinking block with an empty signature (there
  is none to give), then the text, then tool calls as `tool_use` blocks. finish_reason → stop_reason
  (tool_calls → tool_use, length → max_tokens, content_filter → refusal, else end_turn; a "stop" beside tool
  calls is tool_use, as some servers say it). OpenAI does not say which stop sequence matched, so
  `stop_sequence` is always null. Usage: input_tokens = prompt − cached − cache writes (Anthropic counts
  them apart); ids: `msg_` + the completion id without `chatcmpl-`.
- Streams: blocks are numbered in the order they start, one open at a time (thinking, text, each tool call),
  which is what Anthropic's SDK relies on when it accumulates. An OpenAI stream reports usage only at its
  end, so `message_start` carries zeros and the final `message_delta` the whole usage (the SDK takes it from
  there). An error chunk becomes an `error` event (before the first content the attempt fails over, see
  proxy/attempt.py), and so does a stream that ends before its finish reason.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
import orjson

from adapters.anthropic import _ERROR_TYPES
from adapters.anthropic_request import THINKING_BUDGETS
from adapters.sse import SseSplitter, data_of
from proxy.errors import BadRequest

Json = dict[str, Any]

_TOOL_CHOICE = {"auto": "auto", "any": "required", "none": "none"}
_STOP_REASON = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# OpenAI error type → Anthropic's: adapters/anthropic.py's map inverted (its first entry wins for a shared
# OpenAI type, so invalid_request_error stays itself).
_FROM_OPENAI_TYPE = {o: a for a, o in reversed(_ERROR_TYPES.items())}
_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_BLOCK_PARAGRAPH = "\n\n"  # between system blocks and between a tool result's text blocks


# --- request: Anthropic Messages → OpenAI chat ---


def to_openai_request(body: bytes) -> bytes:
    """The OpenAI chat body for an Anthropic Messages body; BadRequest names what cannot be expressed."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
        raise BadRequest("`messages` must be a list", param="messages")
    if req.get("mcp_servers"):
        raise BadRequest("MCP servers are run by Anthropic: this model's provider has none", param="mcp_servers")
    messages: list[Json] = []
    system = _system(req.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(req["messages"]):
        messages.extend(_message(m, f"messages[{i}]"))
    out: Json = {"model": req.get("model"), "messages": messages}
    if req.get("max_tokens") is not None:
        out["max_completion_tokens"] = req["max_tokens"]
    for name in ("temperature", "top_p"):
        if req.get(name) is not None:
            out[name] = req[name]
    stop = req.get("stop_sequences")
    if stop:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("`stop_sequences` must be a list of strings", param="stop_sequences")
        out["stop"] = stop
    effort = _effort(req.get("thinking"))
    if effort is not None:
        out["reasoning_effort"] = effort
    _tools(req, out)
    metadata = req.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str) and metadata["user_id"]:
        out["user"] = metadata["user_id"]
    if req.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # the usage the final message_delta reports
    return orjson.dumps(out)


def _system(system: Any) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if not isinstance(system, list):
        raise BadRequest("`system` must be a string or a list of text blocks", param="system")
    texts = []
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise BadRequest("`system` takes text blocks only", param=f"system[{j}]")
        texts.append(block["text"])
    return _BLOCK_PARAGRAPH.join(t for t in texts if t)


def _message(m: Any, path: str) -> list[Json]:
    """One Anthropic turn as OpenAI messages (a user turn with tool results is several)."""
    if not isinstance(m, dict):
        raise BadRequest("each message must be an object", param=path)
    role, content = m.get("role"), m.get("content")
    if role == "user":
        return _user(content, path)
    if role == "assistant":
        return _assistant(content, path)
    raise BadRequest(f"unsupported message role `{role}`", param=f"{path}.role")


def _blocks(content: Any, path: str) -> list[Json]:
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of blocks", param=f"{path}.content")
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise BadRequest("a content block must be an object", param=f"{path}.content[{j}]")
    return content


def _user(content: Any, path: str) -> list[Json]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[Json] = []  # tool messages first: OpenAI wants a call's results right after it
    media: list[Json] = []  # images from tool results, in the user message after them
    parts: list[Json] = []
    for j, block in enumerate(_blocks(content, path)):
        bpath = f"{path}.content[{j}]"
        if block.get("type") == "tool_result":
            text, images = _tool_result(block, bpath)
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
            media.extend(images)
        else:
            parts.append(_part(block, bpath))
    parts = media + parts
    if parts:
        only_text = len(parts) == 1 and parts[0]["type"] == "text"
        results.append({"role": "user", "content": parts[0]["text"] if only_text else parts})
    return results


def _part(block: Json, path: str) -> Json:
    """A user block as an OpenAI content part."""
    kind = block.get("type")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise BadRequest("a text block needs `text`", param=f"{path}.text")
        return {"type": "text", "text": block["text"]}
    source = block.get("source")
    if not isinstance(source, dict):
        if kind in ("image", "document"):
            raise BadRequest(f"an {kind} block needs a `source` object", param=f"{path}.source")
        raise BadRequest(f"content block type `{kind}` cannot be sent to this model", param=f"{path}.type")
    src = source.get("type")
    if kind == "image":
        if src == "base64":
            return {"type": "image_url", "image_url": {"url": _data_url(source, f"{path}.source")}}
        if src == "url" and isinstance(source.get("url"), str):
            return {"type": "image_url", "image_url": {"url": source["url"]}}
        raise BadRequest(f"image source `{src}` cannot be sent to this model", param=f"{path}.source.type")
    if kind == "document":
        if src == "base64":
            name = block.get("title") if isinstance(block.get("title"), str) else "document.pdf"
            return {"type": "file", "file": {"filename": name, "file_data": _data_url(source, f"{path}.source")}}
        if src == "text" and isinstance(source.get("data"), str):
            return {"type": "text", "text": source["data"]}
        if src == "content" and isinstance(source.get("content"), list | str):
            inner = source["content"]
            text = inner if isinstance(inner, str) else _BLOCK_PARAGRAPH.join(_texts(inner, f"{path}.source"))
            return {"type": "text", "text": text}
        raise BadRequest(f"document source `{src}` cannot be sent to this model", param=f"{path}.source.type")
    raise BadRequest(f"content block type `{kind}` cannot be sent to this model", param=f"{path}.type")


def _data_url(source: Json, path: str) -> str:
    media, data = source.get("media_type"), source.get("data")
    if not isinstance(media, str) or not isinstance(data, str) or not media or not data:
        raise BadRequest("a base64 source needs `media_type` and `data`", param=path)
    return f"data:{media};base64,{data}"


def _texts(blocks: list[Any], path: str) -> list[str]:
    out = []
    for j, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise BadRequest("only text blocks can be sent here", param=f"{path}.content[{j}]")
        out.append(b["text"])
    return out


def _tool_result(block: Json, path: str) -> tuple[str, list[Json]]:
    """A tool result's text, and its images (which an OpenAI tool message cannot carry)."""
    if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
        raise BadRequest("a tool_result needs `tool_use_id`", param=f"{path}.tool_use_id")
    content = block.get("content")
    if content is None or isinstance(content, str):
        return content or "", []
    texts: list[str] = []
    media: list[Json] = []
    for j, inner in enumerate(_blocks(content, path)):
        part = _part(inner, f"{path}.content[{j}]")
        if part["type"] == "text":
            texts.append(part["text"])
        else:
            media.append(part)
    return _BLOCK_PARAGRAPH.join(texts), media


def _assistant(content: Any, path: str) -> list[Json]:
    if isinstance(content, str):
        return [{"role": "assistant", "content": content}]
    texts: list[str] = []
    calls: list[Json] = []
    for j, block in enumerate(_blocks(content, path)):
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if text is not None and not isinstance(text, str):
                raise BadRequest("a text block's `text` must be a string", param=f"{path}.content[{j}].text")
            texts.append(text or "")
        elif kind == "tool_use":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("id"), str):
                raise BadRequest("a tool_use block needs `id` and `name`", param=f"{path}.content[{j}]")
            fn = {"name": block["name"], "arguments": orjson.dumps(block.get("input") or {}).decode()}
            calls.append({"id": block["id"], "type": "function", "function": fn})
        elif kind not in ("thinking", "redacted_thinking"):
            raise BadRequest(f"content block type `{kind}` cannot be sent to this model", param=f"{path}.content[{j}]")
    if not texts and not calls:
        return []  # thinking only: nothing an OpenAI upstream can take back (and it rejects an empty turn)
    # Text blocks are pieces of one text (Anthropic splits it at citations): joined as they are.
    msg: Json = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        msg["tool_calls"] = calls
    return [msg]


def _tools(req: Json, out: Json) -> None:
    tools = req.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise BadRequest("`tools` must be a list", param="tools")
        out["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = req.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool" and isinstance(choice.get("name"), str):
        mapped: Any = {"type": "function", "function": {"name": choice["name"]}}
    elif isinstance(kind, str) and kind in _TOOL_CHOICE:  # a list or object `type` is unhashable: a 400, not a 500
        mapped = _TOOL_CHOICE[kind]
    else:
        raise BadRequest("tool_choice must be auto, any, tool (with a name) or none", param="tool_choice")
    if not tools:
        return  # OpenAI refuses a tool_choice without tools; without tools there is nothing to choose
    out["tool_choice"] = mapped
    assert isinstance(choice, dict)
    if choice.get("disable_parallel_tool_use") and mapped != "none":
        out["parallel_tool_calls"] = False


def _tool(t: Any, i: int) -> Json:
    if not isinstance(t, dict):
        raise BadRequest("a tool must be an object", param=f"tools[{i}]")
    kind = t.get("type")
    if kind not in (None, "custom"):
        raise BadRequest(f"tool type `{kind}` runs on Anthropic's servers only", param=f"tools[{i}].type")
    if not isinstance(t.get("name"), str) or not t["name"]:
        raise BadRequest("a tool needs a `name`", param=f"tools[{i}].name")
    fn: Json = {"name": t["name"]}
    if t.get("description"):
        fn["description"] = t["description"]
    fn["parameters"] = t.get("input_schema") or {"type": "object", "properties": {}}
    return {"type": "function", "function": fn}


def _effort(thinking: Any) -> str | None:
    if not isinstance(thinking, dict) or thinking.get("type") in (None, "disabled"):
        return None
    budget = thinking.get("budget_tokens")
    if budget is None:
        return "medium"  # thinking on with no budget (adaptive): the middle effort
    if not isinstance(budget, int) or isinstance(budget, bool):
        raise BadRequest("thinking.budget_tokens must be an integer", param="thinking.budget_tokens")
    for effort in ("low", "medium", "high"):
        if budget <= THINKING_BUDGETS[effort]:
            return effort
    return "high"


# --- response: OpenAI chat → Anthropic Messages ---


class _Fn(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _Call(msgspec.Struct, gc=False):
    index: int | None = None
    id: str | None = None
    function: _Fn | None = None


class _Msg(msgspec.Struct, gc=False):  # a message, or a stream's delta
    content: Any = None  # a string; some servers send text parts
    reasoning: str | None = None
    reasoning_content: str | None = None
    refusal: str | None = None
    tool_calls: list[_Call] | None = None


class _Choice(msgspec.Struct, gc=False):
    index: int = 0
    message: _Msg | None = None
    delta: _Msg | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct, gc=False):
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None


class _Usage(msgspec.Struct, gc=False):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: _PromptDetails | None = None


class _Error(msgspec.Struct, gc=False):
    message: str | None = None
    type: str | None = None
    code: Any = None


class _Completion(msgspec.Struct, gc=False):  # a chat.completion, or one chunk of a stream
    id: str = ""
    model: str = ""
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _Error | None = None


class _ErrorDoc(msgspec.Struct, gc=False):
    error: _Error | None = None


_decode_completion = msgspec.json.Decoder(_Completion).decode
_decode_error = msgspec.json.Decoder(_ErrorDoc).decode
_enc = msgspec.json.Encoder().encode


def anthropic_usage(u: _Usage | None) -> Json:
    """adapters/anthropic.py `openai_usage` inverted: Anthropic counts cached prompt tokens apart."""
    if u is None:
        return {"input_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}
    d = u.prompt_tokens_details
    read = (d.cached_tokens or 0) if d is not None else 0
    write = (d.cache_write_tokens or 0) if d is not None else 0
    return {
        "input_tokens": max((u.prompt_tokens or 0) - read - write, 0),
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "output_tokens": u.completion_tokens or 0,
    }


def _stop_reason(finish: str | None, tools: bool) -> str:
    if tools and finish in (None, "stop"):
        return "tool_use"
    return _STOP_REASON.get(finish or "", "end_turn")


def _message_id(completion_id: str) -> str:
    return "msg_" + (completion_id.removeprefix("chatcmpl-") or os.urandom(12).hex())


def _text_of(content: Any) -> str:
    if isinstance(content, list):  # text parts
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _input_of(arguments: str | None) -> Any:
    """A tool call's arguments as tool_use `input`. Anthropic's is an object; text that is not one (a model's
    malformed JSON) is kept under `arguments` rather than lost."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def to_message(body: bytes) -> bytes:
    """An OpenAI chat.completion as an Anthropic `message` (ValueError for what is not a completion)."""
    c = _decode_completion(body)
    if c.error is not None:
        raise ValueError(f"an error in a success body: {c.error.message}")
    msg = c.choices[0].message if c.choices else None
    content: list[Json] = []
    calls: list[_Call] = []
    finish = c.choices[0].finish_reason if c.choices else None
    if msg is not None:
        reasoning = msg.reasoning or msg.reasoning_content
        if reasoning:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        text = _text_of(msg.content) or msg.refusal
        if text:
            content.append({"type": "text", "text": text})
        calls = msg.tool_calls or []
        for call in calls:
            fn = call.function or _Fn()
            content.append(
                {
                    "type": "tool_use",
                    "id": call.id or "toolu_" + os.urandom(12).hex(),
                    "name": fn.name or "",
                    "input": _input_of(fn.arguments),
                }
            )
    return _enc(
        {
            "id": _message_id(c.id),
            "type": "message",
            "role": "assistant",
            "model": c.model,
            "content": content,
            "stop_reason": _stop_reason(finish, bool(calls)),
            "stop_sequence": None,
            "usage": anthropic_usage(c.usage),
        }
    )


# --- errors ---


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return _BY_STATUS.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_doc(status: int, body: bytes) -> Json:
    """An OpenAI-shaped error body (the gateway's own, or an upstream's) as Anthropic's error document.

    The type: Anthropic's own when the code carries it (adapters/anthropic.py keeps it there), else from the
    status, else (in a stream, where there is no status) from the OpenAI type.
    """
    try:
        err = _decode_error(body).error
    except msgspec.MsgspecError:
        err = None
    if err is None:
        text = body.decode(errors="replace").strip()[:500]
        err = _Error(text or f"the upstream answered {status}")
    return _error_doc(err, status)


def _error_doc(err: _Error, status: int) -> Json:
    code = err.code if isinstance(err.code, str) else ""
    if code in _ERROR_TYPES:
        kind = code
    elif status:
        kind = error_type(status)
    else:
        kind = _FROM_OPENAI_TYPE.get(err.type or "", "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message or f"upstream error ({kind})"}}


def error_body(status: int, body: bytes) -> bytes:
    return _enc(error_doc(status, body))


def error_event(status: int, body: bytes) -> bytes:
    """The `error` event that ends an Anthropic stream (status 0: none known, the type comes from the body)."""
    return _frame(b"error", _enc(error_doc(status, body)))


# --- streams: OpenAI chunks → Anthropic events ---


def _frame(name: bytes, data: bytes) -> bytes:
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


_MESSAGE_STOP = _frame(b"message_stop", b'{"type":"message_stop"}')
_BLOCK_STARTS = {
    "text": b'{"type":"text","text":""}',
    "thinking": b'{"type":"thinking","thinking":"","signature":""}',
}
_DELTA_FIELDS = {"text": b'"text_delta","text":', "thinking": b'"thinking_delta","thinking":'}


class MessagesTranscoder:
    """OpenAI chat.completion.chunk events (cut anywhere) → Anthropic's Messages event stream, for one stream.

    Events are framed from byte templates; per chunk only the new text is encoded. Content blocks open lazily
    (no empty text block for a role chunk) and close when another kind starts or the choice finishes.
    """

    __slots__ = ("_blocks", "_done", "_open", "_open_kind", "_split", "_started", "_stop", "_tools", "_usage")

    def __init__(self) -> None:
        self._split = SseSplitter()
        self._started = False
        self._blocks = 0  # blocks started so far: the next block's index
        self._open = -1  # the open block's index; -1: none
        self._open_kind = ""  # "text", "thinking" or "tool"
        self._tools: dict[int, int] = {}  # OpenAI tool-call index → block index
        self._stop: str | None = None  # the finish reason, once seen
        self._usage: _Usage | None = None
        self._done = False

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
        if self._stop is not None:  # finished but no [DONE] (some servers omit it): a complete answer
            return out + self._end()
        return out + self._error("api_error", "the upstream stream ended before the answer did")

    def _event(self, event: bytes) -> bytes:
        if self._done:
            return b""  # whatever follows [DONE] or an error is not part of the answer
        payload = data_of(event)
        if not payload:
            return b""  # a comment (keep-alive) or an event without data
        if payload == b"[DONE]":
            return self._end()
        try:
            chunk = _decode_completion(payload)
        except msgspec.MsgspecError:
            return self._error("api_error", "the upstream sent an unreadable stream event")
        if chunk.error is not None:
            self._done = True
            return _frame(b"error", _enc(_error_doc(chunk.error, 0)))
        out: list[bytes] = []
        if not self._started:
            out.append(self._message_start(chunk.id, chunk.model))
        if chunk.usage is not None:
            self._usage = chunk.usage  # cumulative where repeated: the last one counts
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # n is never sent, so only choice 0 exists
            d = choice.delta
            if d is not None:
                reasoning = d.reasoning or d.reasoning_content
                if reasoning:
                    out.append(self._text("thinking", reasoning))
                text = _text_of(d.content) or d.refusal
                if text:
                    out.append(self._text("text", text))
                for call in d.tool_calls or ():
                    out.append(self._tool(call))
            if choice.finish_reason:
                self._stop = choice.finish_reason
                out.append(self._close())
        return b"".join(out)

    def _message_start(self, completion_id: str, model: str) -> bytes:
        self._started = True
        message = {
            "id": _message_id(completion_id),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},  # known only at the end (message_delta)
        }
        return _frame(b"message_start", _enc({"type": "message_start", "message": message}))

    def _start(self, kind: str, block: bytes) -> bytes:
        """Close the open block and start one of `kind`."""
        out = self._close()
        self._open, self._open_kind = self._blocks, kind
        self._blocks += 1
        head = b'{"type":"content_block_start","index":%d,"content_block":' % self._open
        return out + _frame(b"content_block_start", head + block + b"}")

    def _close(self) -> bytes:
        if self._open < 0:
            return b""
        index, self._open, self._open_kind = self._open, -1, ""
        return _frame(b"content_block_stop", b'{"type":"content_block_stop","index":%d}' % index)

    def _delta(self, index: int, delta: bytes) -> bytes:
        data = b'{"type":"content_block_delta","index":%d,"delta":{"type":%b}}' % (index, delta)
        return _frame(b"content_block_delta", data)

    def _text(self, kind: str, text: str) -> bytes:
        out = b"" if self._open_kind == kind else self._start(kind, _BLOCK_STARTS[kind])
        return out + self._delta(self._open, _DELTA_FIELDS[kind] + _enc(text))

    def _tool(self, call: _Call) -> bytes:
        i = call.index
        if i is None:  # no index (a few servers): a call with an id is a new one, else the latest continues
            i = len(self._tools) if call.id or not self._tools else max(self._tools)
        fn = call.function or _Fn()
        out = b""
        block = self._tools.get(i)
        if block is None:
            block_id = call.id or "toolu_" + os.urandom(12).hex()
            start = {"type": "tool_use", "id": block_id, "name": fn.name or "", "input": {}}
            out = self._start("tool", _enc(start))
            block = self._tools[i] = self._open
        if fn.arguments:
            # To its own block even if another has started since (no server interleaves calls in practice).
            out += self._delta(block, b'"input_json_delta","partial_json":' + _enc(fn.arguments))
        return out

    def _end(self) -> bytes:
        self._done = True
        out = b"" if self._started else self._message_start("", "")
        out += self._close()
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": _stop_reason(self._stop, bool(self._tools)), "stop_sequence": None},
            "usage": anthropic_usage(self._usage),
        }
        return out + _frame(b"message_delta", _enc(delta)) + _MESSAGE_STOP

    def _error(self, kind: str, message: str) -> bytes:
        self._done = True
        return _frame(b"error", _enc({"type": "error", "error": {"type": kind, "message": message}}))
