"""OpenAI chat request → Anthropic Messages request: the request half of adapters/anthropic.py.

The Anthropic body is built from a whitelist: it holds only the fields mapped here, so no OpenAI-only field
can reach Anthropic, which rejects unknown fields with a 400.

- Dropped silently, because ignoring them changes nothing a client relies on: `n` = 1, `logprobs`,
  `top_logprobs`, `logit_bias`, `frequency_penalty`, `presence_penalty`, `seed`, `stream_options` (the usage
  chunk is always sent), `store`, `metadata` (OpenAI's stored-completion tags), `service_tier`,
  `prediction`, `modalities` without audio, `verbosity`, `prompt_cache_key`, `safety_identifier`,
  `web_search_options`, a message's `name`, an assistant turn's `reasoning`, and the gateway's routing fields.
- Refused with a 400 naming the field, because ignoring them would change the answer: `n` > 1, audio
  output, content parts other than text / image / PDF, files by id, non-function tools, JSON mode together
  with reasoning (Anthropic cannot force a tool while thinking).
- Anthropic requires `max_tokens`; when the client gives none it is DEFAULT_MAX_TOKENS, plus the thinking
  budget when reasoning is on (Anthropic counts thinking inside max_tokens and wants budget < max_tokens).
- `temperature` is passed unchanged: Anthropic's range is 0–1, so a value above 1 comes back as Anthropic's
  own 400, relayed, rather than being silently rescaled.
- JSON mode: the Messages API (2023-06-01) has no native JSON output, so `response_format` json_schema /
  json_object becomes a tool, JSON_TOOL, whose input schema is the client's schema, and Anthropic is made to
  call it; the response side turns that call back into message content.
"""

from __future__ import annotations

from typing import Any

import orjson

from adapters.base import load_chat_request
from proxy.errors import BadRequest

Json = dict[str, Any]

# Every current Claude model allows at least this many output tokens; enough for a long answer, small
# enough not to reserve a model's whole output limit against the rate limit.
DEFAULT_MAX_TOKENS = 4096

# reasoning_effort → thinking budget in tokens. 1024 is Anthropic's minimum budget.
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 4096, "high": 16384}

# The tool that carries JSON-mode answers. Reserved: a client tool of this name is refused, so a call to it
# in a response can only be a JSON-mode answer.
JSON_TOOL = "hedgerow_json_response"
_JSON_TOOL_DESCRIPTION = "Give your final answer by calling this tool; its input is the answer."

_TOOL_CHOICE = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
_EMPTY_SCHEMA = {"type": "object", "properties": {}}
_ANY_OBJECT = {"type": "object", "additionalProperties": True}  # json_object: any JSON object will do


def build_request(body: bytes, model: str) -> bytes:
    """The Anthropic Messages body for an OpenAI chat completions body; BadRequest names what cannot map."""
    req = load_chat_request(body, "Anthropic models")
    system, messages = _messages(req["messages"])
    budget = _thinking_budget(req)
    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
    out: Json = {
        "model": model,
        "max_tokens": max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS + (budget or 0),
    }
    if system:
        out["system"] = system
    out["messages"] = messages
    if budget is not None:
        out["thinking"] = {"type": "enabled", "budget_tokens": budget}
    for name in ("temperature", "top_p", "top_k"):  # top_k: not OpenAI's, but OpenRouter clients send it
        if req.get(name) is not None:
            out[name] = req[name]
    stop = req.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    _tools(req, out, thinking=budget is not None)
    if req.get("user"):
        out["metadata"] = {"user_id": req["user"]}
    if req.get("stream"):
        out["stream"] = True
    return orjson.dumps(out)


def _messages(msgs: list[Any]) -> tuple[str | list[Json], list[Json]]:
    """System text (from every system/developer message) and the alternating user/assistant turns.

    Consecutive turns of one role are merged into one (tool results join the user turn after them), which is
    what Anthropic does itself, and keeps tool_result blocks first in the turn that answers a tool call.
    """
    system: list[Json] = []
    turns: list[Json] = []
    for i, m in enumerate(msgs):
        path = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest("each message must be an object", param=path)
        role = m.get("role")
        content: str | list[Json]
        if role in ("system", "developer"):
            system.extend(_text_blocks(m.get("content"), path))
            continue
        if role == "user":
            content = _user_content(m.get("content"), path)
        elif role == "assistant":
            content = _assistant_content(m, path)
        elif role == "tool":
            role, content = "user", [_tool_result(m, path)]
        else:
            raise BadRequest(f"unsupported message role `{role}`", param=f"{path}.role")
        if not content:
            continue  # an assistant turn with neither text nor tool calls: Anthropic rejects empty turns
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = _as_blocks(turns[-1]["content"]) + _as_blocks(content)
        else:
            turns.append({"role": role, "content": content})
    if any("cache_control" in b for b in system):
        return system, turns  # blocks: a cache breakpoint needs one
    return "\n\n".join(b["text"] for b in system), turns


def _as_blocks(content: str | list[Json]) -> list[Json]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _text_blocks(content: Any, path: str) -> list[Json]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts", param=f"{path}.content")
    blocks = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise BadRequest("system messages take text parts only", param=f"{path}.content[{j}]")
        block = _part(part, f"{path}.content[{j}]")
        if block is not None:
            blocks.append(block)
    return blocks


def _user_content(content: Any, path: str) -> str | list[Json]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts", param=f"{path}.content")
    return [b for j, p in enumerate(content) if (b := _part(p, f"{path}.content[{j}]")) is not None]


def _part(part: Any, path: str) -> Json | None:
    """One OpenAI content part as an Anthropic block (None for an empty text, which Anthropic rejects)."""
    if not isinstance(part, dict):
        raise BadRequest("a content part must be an object", param=path)
    kind = part.get("type")
    if kind in ("text", "refusal"):  # refusal: an assistant part, carried as the text it was
        text = part.get(kind) or ""
        if not text and "cache_control" not in part:
            return None
        block: Json = {"type": "text", "text": text}
    elif kind == "image_url":
        block = _image(part.get("image_url"), f"{path}.image_url")
    elif kind == "file":
        block = _document(part.get("file"), f"{path}.file")
    else:
        raise BadRequest(f"content part type `{kind}` is not supported by Anthropic models", param=f"{path}.type")
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _data_url(url: str, path: str) -> tuple[str, str]:
    """(media type, base64 data) of a `data:<type>;base64,<data>` URL."""
    head, _, data = url[5:].partition(",")
    media, _, encoding = head.partition(";")
    if encoding != "base64" or not media or not data:
        raise BadRequest("data URLs must be base64: data:<media type>;base64,<data>", param=path)
    return media, data


def _image(image: Any, path: str) -> Json:
    url = image.get("url") if isinstance(image, dict) else image  # `detail` has no Anthropic equivalent
    if not isinstance(url, str):
        raise BadRequest("image_url.url must be a string", param=f"{path}.url")
    if url.startswith("data:"):
        media, data = _data_url(url, f"{path}.url")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise BadRequest("image URLs must be https:// or data: URLs", param=f"{path}.url")


def _document(file: Any, path: str) -> Json:
    data_url = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise BadRequest("only inline files (file_data as a data: URL) reach Anthropic models", param=path)
    media, data = _data_url(data_url, f"{path}.file_data")
    if media != "application/pdf":
        raise BadRequest(f"file type `{media}` is not supported by Anthropic models", param=f"{path}.file_data")
    return {"type": "document", "source": {"type": "base64", "media_type": media, "data": data}}


def _assistant_content(m: Json, path: str) -> str | list[Json]:
    content = m.get("content")
    calls = m.get("tool_calls") or ()
    if isinstance(content, str) and not calls:
        return content
    blocks: list[Json] = []
    if isinstance(content, str) and content:
        blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        blocks.extend(b for j, p in enumerate(content) if (b := _part(p, f"{path}.content[{j}]")) is not None)
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name"):
            raise BadRequest("a tool call needs function.name", param=f"{path}.tool_calls[{j}]")
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):  # Anthropic's tool_use.input is an object
            raise BadRequest("tool call arguments must be a JSON object", param=f"{path}.tool_calls[{j}].function")
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn["name"], "input": args})
    return blocks


def _tool_result(m: Json, path: str) -> Json:
    if not m.get("tool_call_id"):
        raise BadRequest("a tool message needs tool_call_id", param=f"{path}.tool_call_id")
    content = m.get("content")
    if isinstance(content, list):
        content = [b for j, p in enumerate(content) if (b := _part(p, f"{path}.content[{j}]")) is not None]
    return {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": content or ""}


def _tools(req: Json, out: Json, thinking: bool) -> None:
    """tools, tool_choice, parallel_tool_calls and response_format (the JSON tool) into `out`."""
    tools = [_tool(t, i) for i, t in enumerate(req.get("tools") or ())]
    choice = _tool_choice(req.get("tool_choice"))
    fmt = req.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("json_schema", "json_object"):
        assert isinstance(fmt, dict)
        if thinking:
            raise BadRequest("JSON mode cannot be combined with reasoning on Anthropic models", param="response_format")
        spec = fmt.get("json_schema") or {}
        description = _JSON_TOOL_DESCRIPTION + (f" {spec['description']}" if spec.get("description") else "")
        tools.append({"name": JSON_TOOL, "description": description, "input_schema": spec.get("schema") or _ANY_OBJECT})
        if choice is None or choice["type"] in ("auto", "none"):
            # Only the JSON tool: call it. With client tools: call one of them or answer through the JSON tool.
            choice = {"type": "tool", "name": JSON_TOOL} if len(tools) == 1 else {"type": "any"}
    elif kind not in (None, "text"):
        raise BadRequest(f"response_format type `{kind}` is not supported", param="response_format.type")
    if not tools:
        return
    out["tools"] = tools
    if req.get("parallel_tool_calls") is False and (choice is None or choice["type"] != "none"):
        choice = {**(choice or _TOOL_CHOICE["auto"]), "disable_parallel_tool_use": True}
    if choice is not None:
        out["tool_choice"] = choice


def _tool(t: Any, i: int) -> Json:
    if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
        raise BadRequest("only function tools are supported by Anthropic models", param=f"tools[{i}]")
    fn = t["function"]
    if fn.get("name") == JSON_TOOL:
        raise BadRequest(f"the tool name `{JSON_TOOL}` is reserved by the gateway", param=f"tools[{i}].function.name")
    tool: Json = {"name": fn.get("name"), "input_schema": fn.get("parameters") or _EMPTY_SCHEMA}
    if fn.get("description"):
        tool["description"] = fn["description"]
    if "cache_control" in t:
        tool["cache_control"] = t["cache_control"]
    return tool


def _tool_choice(choice: Any) -> Json | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _TOOL_CHOICE:
        return dict(_TOOL_CHOICE[choice])
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name:
            return {"type": "tool", "name": name}
    raise BadRequest("tool_choice must be auto, none, required or a named function", param="tool_choice")


def _thinking_budget(req: Json) -> int | None:
    """Thinking budget from OpenRouter's `reasoning` object or OpenAI's `reasoning_effort`; None: off."""
    r = req.get("reasoning")
    if isinstance(r, dict):
        if r.get("enabled") is False or r.get("effort") == "none":
            return None
        if r.get("max_tokens") is not None:
            if not isinstance(r["max_tokens"], int) or isinstance(r["max_tokens"], bool):
                raise BadRequest("reasoning.max_tokens must be an integer", param="reasoning.max_tokens")
            return r["max_tokens"]
        if r.get("effort"):
            return _budget(r["effort"], "reasoning.effort")
        if r.get("enabled"):
            return THINKING_BUDGETS["medium"]
    effort = req.get("reasoning_effort")
    if effort is None or effort == "none":
        return None
    return _budget(effort, "reasoning_effort")


def _budget(effort: Any, param: str) -> int:
    budget = THINKING_BUDGETS.get(effort) if isinstance(effort, str) else None
    if budget is None:
        raise BadRequest(f"reasoning effort must be one of {', '.join(THINKING_BUDGETS)} or none", param=param)
    return budget
