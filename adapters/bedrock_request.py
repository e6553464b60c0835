"""OpenAI chat completions request → AWS Bedrock Converse request body, for adapters/bedrock.py.

The body is rebuilt from a whitelist, so gateway-only fields (`provider`, `models`, …) never reach Bedrock. The
model and the stream flag are not in the body: Converse puts both in the URL (adapters/bedrock.py).

What maps, and how:
- system/developer messages → `system` text blocks; user/assistant turns → `messages` with content blocks;
  consecutive turns of one role are merged (Converse wants user and assistant to alternate), and tool
  messages become `toolResult` blocks in the user turn that follows the assistant's `toolUse` blocks.
- Images: data: URLs → `image.source.bytes` (the base64 is passed through, never decoded: JSON blobs are
  base64 on the wire); s3:// URLs → `image.source.s3Location`. Files (data: URLs) → `document` blocks.
- tools → `toolConfig.tools[].toolSpec`; tool_choice auto/required/function → toolChoice auto/any/tool.
- max_tokens, temperature, top_p, stop → `inferenceConfig`; response_format json_schema → `outputConfig`.
- cache_control on a content part, system part or tool (Anthropic's marker, as OpenRouter clients send it)
  → a `cachePoint` block right after it, its ttl kept when it is one Bedrock knows.
- Claude models only (the model id names Anthropic): reasoning / reasoning_effort →
  `additionalModelRequestFields.thinking` with the same budgets as the Anthropic adapter, and top_k →
  `additionalModelRequestFields.top_k`. Other models take neither field under these names, so both are
  dropped for them; an application inference profile ARN does not name its model, so it counts as "other".

Refused with a 400 naming the field, because dropping them would change the answer: `n` > 1, audio output,
http(s) image URLs (Converse only takes inline bytes or S3), content parts it has no block for, JSON mode
without a schema (`json_object`), non-function tools.

Known gaps: Converse has no tool_choice "none". When the conversation holds no tool blocks the tools are left
out (the model then cannot call one, which is what "none" means); when it does, Bedrock requires the tool
config, so it is sent with tool choice left to the model. `parallel_tool_calls`, `user`, `seed`, penalties and
logprobs have no Converse field and are dropped.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

# The Anthropic API's rules for reasoning budgets and data URLs apply unchanged: Claude on Bedrock takes the
# same `thinking` object, and a data URL is a data URL.
from adapters.anthropic_request import DEFAULT_MAX_TOKENS, _data_url, _thinking_budget
from adapters.base import load_chat_request
from proxy.errors import BadRequest

Json = dict[str, Any]

_EXTENSION_FORMATS = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "gif": "gif", "webp": "webp"}
_IMAGE_FORMATS = {f"image/{ext}": fmt for ext, fmt in _EXTENSION_FORMATS.items()}  # image/jpg: seen in the wild
_DOCUMENT_FORMATS = {
    "application/pdf": "pdf",
    "text/csv": "csv",
    "text/html": "html",
    "text/plain": "txt",
    "text/markdown": "md",
    "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
}
# A document name may hold letters, digits, single spaces, hyphens, parentheses and square brackets only.
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9\-()\[\] ]+")
_CACHE_TTLS = frozenset({"5m", "1h"})
_TOOL_CHOICE = {"auto": {"auto": {}}, "required": {"any": {}}}
_EMPTY_SCHEMA = {"type": "object", "properties": {}}


def is_claude(model: str) -> bool:
    """Does this model id (base model, inference profile or ARN) name an Anthropic model?"""
    return "anthropic." in model or "claude" in model


def build_request(body: bytes, model: str) -> bytes:
    """The Converse body for an OpenAI chat completions body; BadRequest names what cannot map."""
    req = load_chat_request(body, "Bedrock Converse")
    system, messages, tool_blocks = _messages(req["messages"])
    out: Json = {"messages": messages}
    if system:
        out["system"] = system
    claude = is_claude(model)
    budget = _thinking_budget(req) if claude else None
    extra: Json = {}
    if budget is not None:
        extra["thinking"] = {"type": "enabled", "budget_tokens": budget}
    if claude and req.get("top_k") is not None:
        extra["top_k"] = req["top_k"]
    config = _inference_config(req, budget)
    if config:
        out["inferenceConfig"] = config
    tools = _tool_config(req, tool_blocks)
    if tools is not None:
        out["toolConfig"] = tools
    output = _output_config(req.get("response_format"))
    if output is not None:
        out["outputConfig"] = output
    if extra:
        out["additionalModelRequestFields"] = extra
    return orjson.dumps(out)


def _inference_config(req: Json, budget: int | None) -> Json:
    config: Json = {}
    max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
    if max_tokens is None and budget is not None:
        max_tokens = DEFAULT_MAX_TOKENS + budget  # Claude counts thinking inside maxTokens, wants budget < max
    if max_tokens is not None:
        config["maxTokens"] = max_tokens
    if req.get("temperature") is not None:
        config["temperature"] = req["temperature"]
    if req.get("top_p") is not None:
        config["topP"] = req["top_p"]
    stop = req.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    return config


def _messages(msgs: list[Any]) -> tuple[list[Json], list[Json], bool]:
    """System blocks, the alternating turns, and whether any turn holds toolUse/toolResult blocks."""
    system: list[Json] = []
    turns: list[Json] = []
    tool_blocks = False
    for i, m in enumerate(msgs):
        path = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest("each message must be an object", param=path)
        role = m.get("role")
        if role in ("system", "developer"):
            system.extend(_blocks(m.get("content"), path, text_only=True))
            continue
        if role == "user":
            blocks = _blocks(m.get("content"), path)
        elif role == "assistant":
            blocks = _assistant(m, path)
            tool_blocks = tool_blocks or bool(m.get("tool_calls"))
        elif role == "tool":
            role, blocks, tool_blocks = "user", [_tool_result(m, path)], True
        else:
            raise BadRequest(f"unsupported message role `{role}`", param=f"{path}.role")
        if not blocks:
            continue  # Converse rejects a turn without content (and a blank text block)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns, tool_blocks


def _blocks(content: Any, path: str, text_only: bool = False) -> list[Json]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if content is None:
        return []
    if not isinstance(content, list):
        raise BadRequest("message content must be a string or a list of parts", param=f"{path}.content")
    blocks: list[Json] = []
    for j, part in enumerate(content):
        where = f"{path}.content[{j}]"
        if not isinstance(part, dict):
            raise BadRequest("a content part must be an object", param=where)
        kind = part.get("type")
        if kind in ("text", "refusal"):  # refusal: an assistant part, carried as the text it was
            if part.get(kind):
                blocks.append({"text": part[kind]})
        elif text_only:
            raise BadRequest("system messages take text parts only", param=where)
        elif kind == "image_url":
            blocks.append({"image": _image(part.get("image_url"), f"{where}.image_url")})
        elif kind == "file":
            blocks.append({"document": _document(part.get("file"), f"{where}.file", j)})
        else:
            raise BadRequest(f"content part type `{kind}` is not supported by Bedrock Converse", param=f"{where}.type")
        if "cache_control" in part:
            blocks.append(_cache_point(part["cache_control"]))
    return blocks


def _cache_point(cache_control: Any) -> Json:
    point: Json = {"type": "default"}
    ttl = cache_control.get("ttl") if isinstance(cache_control, dict) else None
    if ttl in _CACHE_TTLS:
        point["ttl"] = ttl
    return {"cachePoint": point}


def _image(image: Any, path: str) -> Json:
    url = image.get("url") if isinstance(image, dict) else image  # `detail` has no Converse equivalent
    if not isinstance(url, str):
        raise BadRequest("image_url.url must be a string", param=f"{path}.url")
    if url.startswith("data:"):
        media, data = _data_url(url, f"{path}.url")
        fmt = _IMAGE_FORMATS.get(media)
        if fmt is None:
            raise BadRequest(f"image type `{media}` is not supported (png, jpeg, gif, webp)", param=f"{path}.url")
        return {"format": fmt, "source": {"bytes": data}}
    if url.startswith("s3://"):
        fmt = _EXTENSION_FORMATS.get(url.rpartition(".")[2].lower())
        if fmt is None:
            raise BadRequest("an s3:// image URL must end in .png, .jpg, .jpeg, .gif or .webp", param=f"{path}.url")
        return {"format": fmt, "source": {"s3Location": {"uri": url}}}
    raise BadRequest(
        "Bedrock Converse cannot fetch image URLs: send the image inline as a data: URL (or an s3:// URL)",
        param=f"{path}.url",
    )


def _document(file: Any, path: str, n: int) -> Json:
    data_url = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise BadRequest("only inline files (file_data as a data: URL) reach Bedrock Converse", param=path)
    media, data = _data_url(data_url, f"{path}.file_data")
    fmt = _DOCUMENT_FORMATS.get(media)
    if fmt is None:
        raise BadRequest(f"file type `{media}` is not supported by Bedrock Converse", param=f"{path}.file_data")
    assert isinstance(file, dict)
    stem = str(file.get("filename") or "").rpartition(".")[0] or str(file.get("filename") or "")
    name = " ".join(_NAME_UNSAFE.sub(" ", stem).split())[:200] or f"document {n + 1}"  # n: the part's index
    return {"format": fmt, "name": name, "source": {"bytes": data}}


def _assistant(m: Json, path: str) -> list[Json]:
    blocks = _blocks(m.get("content"), path)
    for j, call in enumerate(m.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not fn.get("name") or not call.get("id"):
            raise BadRequest("a tool call needs an id and function.name", param=f"{path}.tool_calls[{j}]")
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            args = None
        if not isinstance(args, dict):  # toolUse.input is a JSON object
            raise BadRequest("tool call arguments must be a JSON object", param=f"{path}.tool_calls[{j}].function")
        blocks.append({"toolUse": {"toolUseId": call["id"], "name": fn["name"], "input": args}})
    return blocks


def _tool_result(m: Json, path: str) -> Json:
    if not m.get("tool_call_id"):
        raise BadRequest("a tool message needs tool_call_id", param=f"{path}.tool_call_id")
    content = m.get("content")
    blocks = [{"text": content}] if isinstance(content, str) else _blocks(content, path)
    blocks = [b for b in blocks if "cachePoint" not in b]  # a tool result takes no cache point
    return {"toolResult": {"toolUseId": m["tool_call_id"], "content": blocks or [{"text": ""}]}}


def _tool_config(req: Json, tool_blocks: bool) -> Json | None:
    """toolConfig from tools and tool_choice; None when there are no tools (or "none" allows leaving them out)."""
    tools: list[Json] = []
    for i, t in enumerate(req.get("tools") or ()):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise BadRequest("only function tools are supported by Bedrock Converse", param=f"tools[{i}]")
        fn = t["function"]
        spec: Json = {"name": fn.get("name"), "inputSchema": {"json": fn.get("parameters") or _EMPTY_SCHEMA}}
        if fn.get("description"):
            spec["description"] = fn["description"]
        if fn.get("strict") is not None:
            spec["strict"] = fn["strict"]
        tools.append({"toolSpec": spec})
        if "cache_control" in t:
            tools.append(_cache_point(t["cache_control"]))
    choice = req.get("tool_choice")
    if not tools or (choice == "none" and not tool_blocks):
        return None
    config: Json = {"tools": tools}
    if choice is None or choice == "none":
        return config
    if isinstance(choice, str) and choice in _TOOL_CHOICE:
        config["toolChoice"] = _TOOL_CHOICE[choice]
    elif isinstance(choice, dict) and choice.get("type") == "function" and (choice.get("function") or {}).get("name"):
        config["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
    else:
        raise BadRequest("tool_choice must be auto, none, required or a named function", param="tool_choice")
    return config


def _output_config(fmt: Any) -> Json | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        raise BadRequest(
            "Bedrock Converse has no JSON mode without a schema: use response_format json_schema",
            param="response_format.type",
        )
    if kind != "json_schema":
        raise BadRequest(f"response_format type `{kind}` is not supported", param="response_format.type")
    assert isinstance(fmt, dict)
    spec = fmt.get("json_schema") or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise BadRequest("response_format.json_schema.schema must be an object", param="response_format.json_schema")
    schema: Json = {"schema": orjson.dumps(spec["schema"]).decode()}  # Converse takes the schema as a string
    for name in ("name", "description"):
        if spec.get(name):
            schema[name] = spec[name]
    return {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": schema}}}
