"""OpenAI request bodies → Gemini API (generativelanguage v1beta) request bodies.

Split from adapters/gemini.py because a request is a whole document to rebuild (roles, parts, tools, schemas,
generation config), while the response side is a handful of fields read on the hot path.

Why these choices:
- Roles: Gemini has two, `user` and `model`. System and developer messages become `systemInstruction`
  (wherever they appear); tool results are `functionResponse` parts in a `user` turn, and the results of one
  round of parallel calls share one turn, because Gemini pairs them with the calls of the preceding turn.
- Tool-call ids: Gemini's calls are matched by name, so a tool result's function name is looked up from the
  assistant tool call with its `tool_call_id`.
- Thought signatures: Gemini 3 rejects a replayed `functionCall` without the signature it was sent with. The
  response side hands it out as `extra_content.google.thought_signature` on the tool call (the field Google's
  own OpenAI-compatible endpoint uses); here it goes back. A history without one (another provider wrote it)
  gets Google's documented `skip_thought_signature_validator` on the first call of the turn.
- Schemas: `parameters` and `responseSchema` take an OpenAPI 3.0 subset. Keys outside it (`additionalProperties`,
  `$schema`, `strict`, `$id`, `examples`, `exclusiveMinimum`, …) are dropped; `$ref` is inlined from `$defs`;
  `["string", "null"]` and `null` variants become `nullable`; type names are capitalised as in the reference;
  `oneOf` becomes `anyOf`, `const` a one-value enum; enums are kept for strings only and `format` only where
  Gemini supports it. An object without properties drops its empty `properties` (Gemini rejects it), and a
  function without parameters sends none.
"""

from __future__ import annotations

import base64
import mimetypes
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import msgspec
import orjson

from proxy.errors import BadRequest


class _ImageUrl(msgspec.Struct, gc=False):
    url: str


class _InputAudio(msgspec.Struct, gc=False):
    data: str
    format: str = "wav"


class _File(msgspec.Struct, gc=False):
    file_data: str | None = None
    file_id: str | None = None


class _Part(msgspec.Struct, gc=False):
    type: str
    text: str | None = None
    refusal: str | None = None
    image_url: _ImageUrl | str | None = None
    input_audio: _InputAudio | None = None
    file: _File | None = None


class _Function(msgspec.Struct, gc=False):
    name: str
    arguments: str = "{}"


class _ToolCall(msgspec.Struct, gc=False, kw_only=True):
    id: str = ""
    function: _Function
    extra_content: dict[str, Any] | None = None


class _Message(msgspec.Struct, gc=False, kw_only=True):
    role: str
    content: str | list[_Part] | None = None
    name: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None


class _FunctionDef(msgspec.Struct, gc=False):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(msgspec.Struct, gc=False):
    type: str = "function"
    function: _FunctionDef | None = None


class _Named(msgspec.Struct, gc=False):
    name: str


class _ToolChoice(msgspec.Struct, gc=False):
    type: str = "function"
    function: _Named | None = None


class _JsonSchema(msgspec.Struct, gc=False):
    name: str = ""
    schema: dict[str, Any] | None = None


class _ResponseFormat(msgspec.Struct, gc=False):
    type: str
    json_schema: _JsonSchema | None = None


class _Reasoning(msgspec.Struct, gc=False):  # OpenRouter's unified `reasoning` object
    effort: str | None = None
    max_tokens: int | None = None
    exclude: bool = False
    enabled: bool | None = None


class _Request(msgspec.Struct, gc=False, kw_only=True):
    messages: list[_Message] = []
    input: Any = None  # embeddings: a string or a list of strings
    dimensions: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    tools: list[_Tool] | None = None
    tool_choice: str | _ToolChoice | None = None
    response_format: _ResponseFormat | None = None
    reasoning_effort: str | None = None
    reasoning: _Reasoning | None = None


_decode_request = msgspec.json.Decoder(_Request).decode
_encode = msgspec.json.Encoder().encode

SKIP_SIGNATURE = "skip_thought_signature_validator"  # Google's documented stand-in for a missing signature
# reasoning_effort → thinkingBudget: Google's own OpenAI-compatible mapping for low/medium/high; minimal is the
# smallest budget every 2.5 thinking model accepts (Flash-Lite's floor is 512); none turns thinking off.
EFFORT_BUDGET = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576}
_TOOL_MODE = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
_SCHEMA_KEYS = frozenset(  # copied as they are; type, items, properties, anyOf, enum, format are converted
    "title description maxItems minItems minProperties maxProperties minLength maxLength pattern example"
    " propertyOrdering default minimum maximum".split()
)
_FORMATS = {"STRING": {"enum", "date-time"}, "INTEGER": {"int32", "int64"}, "NUMBER": {"float", "double"}}
_MAX_REF_DEPTH = 16  # Gemini schemas cannot recurse: a self-referencing $ref is cut to a free-form object here


def translate(body: bytes, model: str) -> bytes:
    """The Gemini body for an OpenAI chat (or embeddings) body; BadRequest when it cannot be expressed."""
    try:
        req = _decode_request(body)
    except msgspec.MsgspecError as e:
        raise BadRequest(f"invalid request for a Gemini upstream: {e}") from None
    if not req.messages and req.input is not None:
        return _embeddings(req, model)
    out: dict[str, Any] = {"contents": _contents(req.messages)}
    system = [p for m in req.messages if m.role in ("system", "developer") for p in _parts(m.content)]
    if system:
        out["systemInstruction"] = {"parts": system}
    decls = [_declaration(t.function) for t in req.tools or () if t.type == "function" and t.function]
    if decls:
        out["tools"] = [{"functionDeclarations": decls}]
    if req.tool_choice is not None and decls:  # a calling config without functions is meaningless to Gemini
        out["toolConfig"] = {"functionCallingConfig": _tool_choice(req.tool_choice)}
    config = _generation_config(req)
    if config:
        out["generationConfig"] = config
    return _encode(out)


def _contents(messages: list[_Message]) -> list[dict[str, Any]]:
    names: dict[str, str] = {}  # tool_call id → function name: Gemini matches results to calls by name
    contents: list[dict[str, Any]] = []
    last_kind = ""
    for m in messages:
        if m.role in ("system", "developer"):
            continue
        if m.role == "user":
            role, kind, parts = "user", "user", _parts(m.content)
        elif m.role == "assistant":
            role, kind, parts = "model", "model", _parts(m.content)
            for i, tc in enumerate(m.tool_calls or ()):
                names[tc.id] = tc.function.name
                part: dict[str, Any] = {
                    "functionCall": {"name": tc.function.name, "args": _args(tc.function.arguments)}
                }
                sig = _signature(tc) or (SKIP_SIGNATURE if i == 0 else None)  # only a turn's first call carries one
                if sig:
                    part["thoughtSignature"] = sig
                parts.append(part)
        elif m.role in ("tool", "function"):
            name = names.get(m.tool_call_id or "") or m.name
            if not name:
                raise BadRequest(f"tool message `{m.tool_call_id}` answers no earlier tool call", param="messages")
            role, kind = "user", "tool"
            parts = [{"functionResponse": {"name": name, "response": _tool_result(_text(m.content))}}]
        else:
            raise BadRequest(f"message role `{m.role}` is not supported", param="messages")
        if not parts:
            continue  # an empty message: Gemini rejects a turn without parts
        if contents and kind == last_kind:
            contents[-1]["parts"].extend(parts)  # parallel tool results answer one turn of calls together
        else:
            contents.append({"role": role, "parts": parts})
        last_kind = kind
    return contents


def _parts(content: str | list[_Part] | None) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []  # Gemini rejects an empty text part
    out: list[dict[str, Any]] = []
    for p in content:
        if p.type == "text" and p.text:
            out.append({"text": p.text})
        elif p.type == "refusal" and p.refusal:
            out.append({"text": p.refusal})
        elif p.type == "image_url" and p.image_url is not None:
            url = p.image_url if isinstance(p.image_url, str) else p.image_url.url
            out.append(_media(url, "image/jpeg"))
        elif p.type == "input_audio" and p.input_audio is not None:
            out.append({"inlineData": {"mimeType": f"audio/{p.input_audio.format}", "data": p.input_audio.data}})
        elif p.type == "file" and p.file is not None and p.file.file_data:
            out.append(_media(p.file.file_data, "application/pdf"))
        elif p.type not in ("text", "refusal"):
            raise BadRequest(f"content part `{p.type}` cannot be sent to a Gemini upstream", param="messages")
    return out


def _media(url: str, default_mime: str) -> dict[str, Any]:
    """data: URLs travel inline; other URLs by reference, with the MIME type guessed from the path."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        mime = head[5:].split(";", 1)[0] or default_mime
        if ";base64" not in head:
            data = base64.b64encode(unquote_to_bytes(data)).decode()
        return {"inlineData": {"mimeType": mime, "data": data}}
    mime = mimetypes.guess_type(urlsplit(url).path)[0] or default_mime
    return {"fileData": {"mimeType": mime, "fileUri": url}}


def _text(content: str | list[_Part] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.text or "" for p in content)


def _args(arguments: str) -> dict[str, Any]:
    """Tool-call arguments as an object. OpenAI accepts any string in history; a non-object is wrapped rather
    than refused, so a conversation another provider wrote can still fail over here."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def _tool_result(text: str) -> dict[str, Any]:
    """Gemini wants an object: a JSON object is the output itself, anything else goes under `output`."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"output": text}
    return value if isinstance(value, dict) else {"output": value}


def _signature(tc: _ToolCall) -> str | None:
    google = (tc.extra_content or {}).get("google")
    sig = google.get("thought_signature") if isinstance(google, dict) else None
    return sig if isinstance(sig, str) and sig else None


def _declaration(f: _FunctionDef) -> dict[str, Any]:
    out: dict[str, Any] = {"name": f.name}
    if f.description:
        out["description"] = f.description
    if f.parameters:
        params = schema(f.parameters)
        if params.get("properties"):  # an empty parameter object is an error in Gemini; none is fine
            out["parameters"] = params
    return out


def _tool_choice(choice: str | _ToolChoice) -> dict[str, Any]:
    if isinstance(choice, str):
        mode = _TOOL_MODE.get(choice)
        if mode is None:
            raise BadRequest(f"tool_choice `{choice}` is not supported", param="tool_choice")
        return {"mode": mode}
    if choice.function is None:
        raise BadRequest("tool_choice names no function", param="tool_choice")
    return {"mode": "ANY", "allowedFunctionNames": [choice.function.name]}


def _generation_config(req: _Request) -> dict[str, Any]:
    c: dict[str, Any] = {}
    for key, value in (
        ("temperature", req.temperature),
        ("topP", req.top_p),
        ("topK", req.top_k),
        ("maxOutputTokens", req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens),
        ("candidateCount", req.n),
        ("seed", req.seed),
        ("presencePenalty", req.presence_penalty),
        ("frequencyPenalty", req.frequency_penalty),
    ):
        if value is not None:
            c[key] = value
    if req.stop:
        c["stopSequences"] = [req.stop] if isinstance(req.stop, str) else req.stop
    rf = req.response_format
    if rf is not None and rf.type in ("json_object", "json_schema"):
        c["responseMimeType"] = "application/json"
        if rf.type == "json_schema" and rf.json_schema is not None and rf.json_schema.schema:
            c["responseSchema"] = schema(rf.json_schema.schema)
    thinking = _thinking(req)
    if thinking:
        c["thinkingConfig"] = thinking
    return c


def _thinking(req: _Request) -> dict[str, Any] | None:
    """reasoning_effort or OpenRouter's `reasoning` → thinkingConfig (budget -1: Gemini decides)."""
    r = req.reasoning
    if r is not None:
        if r.enabled is False:
            budget = 0
        elif r.max_tokens is not None:
            budget = r.max_tokens
        else:
            budget = _effort(r.effort) if r.effort else -1
        return {"thinkingBudget": budget, "includeThoughts": budget != 0 and not r.exclude}
    if req.reasoning_effort:
        budget = _effort(req.reasoning_effort)
        return {"thinkingBudget": budget, "includeThoughts": budget != 0}
    return None


def _effort(effort: str) -> int:
    budget = EFFORT_BUDGET.get(effort)
    if budget is None:
        raise BadRequest(f"reasoning effort `{effort}` is not one of {', '.join(EFFORT_BUDGET)}", param="reasoning")
    return budget


def schema(node: Any, defs: dict[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    """A JSON Schema as the OpenAPI subset Gemini accepts (see the module docstring for what changes)."""
    if not isinstance(node, dict):
        return {}
    if defs is None:
        defs = {**node.get("definitions", {}), **node.get("$defs", {})}
    ref = node.get("$ref")
    if isinstance(ref, str):
        target = defs.get(ref.rpartition("/")[2])
        if target is None or depth >= _MAX_REF_DEPTH:
            return {"type": "OBJECT"}
        return schema({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs, depth + 1)
    out: dict[str, Any] = {}
    typ = node.get("type")
    if isinstance(typ, list):
        kinds = [t for t in typ if t != "null"]
        if len(kinds) < len(typ):
            out["nullable"] = True
        if len(kinds) == 1:
            out["type"] = kinds[0].upper()  # the reference spells Type values in capitals
        elif kinds:
            out["anyOf"] = [{"type": t.upper()} for t in kinds]
    elif isinstance(typ, str) and typ != "null":
        out["type"] = typ.upper()
    elif typ == "null":
        out["nullable"] = True
    for key, value in node.items():
        if key in _SCHEMA_KEYS:
            out[key] = value
        elif key == "properties" and isinstance(value, dict) and value:
            out["properties"] = {name: schema(sub, defs, depth) for name, sub in value.items()}
        elif key == "items":
            out["items"] = schema(value[0] if isinstance(value, list) and value else value, defs, depth)
        elif key in ("anyOf", "oneOf") and isinstance(value, list):
            _variants(out, [schema(v, defs, depth) for v in value])
        elif key == "allOf" and isinstance(value, list):
            for v in value:
                out.update(schema(v, defs, depth))
        elif key == "enum" and isinstance(value, list):
            if None in value:
                out["nullable"] = True
            out["enum"] = [v for v in value if v is not None]
        elif key == "const":
            out["enum"] = [value]
        elif key == "nullable" and value:
            out["nullable"] = True
    if "enum" in out:
        if all(isinstance(v, str) for v in out["enum"]) and out.get("type", "STRING") == "STRING":
            out["type"] = "STRING"
        else:
            del out["enum"]  # Gemini enums are string-only; a numeric enum becomes a plain number
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt in _FORMATS.get(out.get("type", ""), ()):
        out["format"] = fmt
    if "required" in node and isinstance(node["required"], list) and "properties" in out:
        required = [r for r in node["required"] if r in out["properties"]]  # naming an absent one is an error
        if required:
            out["required"] = required
    return out


def _variants(out: dict[str, Any], variants: list[dict[str, Any]]) -> None:
    """anyOf/oneOf: `null` variants become `nullable`, a single remaining variant is inlined."""
    kept = [v for v in variants if v and v != {"nullable": True}]
    if len(kept) < len(variants):
        out["nullable"] = True
    if len(kept) == 1:
        out.update(kept[0])
    elif kept:
        out["anyOf"] = kept


def _embeddings(req: _Request, model: str) -> bytes:
    """An OpenAI embeddings body as a batchEmbedContents body: one request per input string."""
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("a Gemini upstream embeds strings only, not token arrays", param="input")
    name = model if "/" in model else f"models/{model}"
    extra = {"outputDimensionality": req.dimensions} if req.dimensions else {}
    return _encode({"requests": [{"model": name, "content": {"parts": [{"text": t}]}, **extra} for t in texts]})
