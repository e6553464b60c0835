"""Request validation, fuzzed: whatever a client sends as a chat, completions, embeddings or messages body, the
gateway either accepts it or answers its own 400 in OpenAI's error shape — never another exception (a 500).

What is validated is what the handlers run before routing: `decode_view` (proxy/schema.py) for the body, then
the routing preferences the forwarder decodes from it (`provider_prefs`, `fallback_models`, the model suffix,
the parameter names `require_parameters` reads), and, for an accepted body, the one rewrite an OpenAI-compatible
upstream gets (adapters/openai.py `request_body`).
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.openai import OpenAIAdapter
from proxy.config import ProviderConfig
from proxy.errors import BadRequest
from proxy.preferences import fallback_models, provider_prefs, request_params, split_suffix
from proxy.schema import GATEWAY_FIELDS, _View, decode_view

KINDS = ("chat", "completions", "embeddings", "messages")
REQUIRED = {"chat": "messages", "completions": "prompt", "embeddings": "input", "messages": "messages"}


def validate(kind: str, body: bytes) -> _View:
    """What a handler and the forwarder parse from a body before the first upstream byte is sent."""
    view = decode_view(kind, body)
    provider_prefs(view.provider)
    fallback_models(view.models)
    split_suffix(view.model)
    request_params(body)  # read under `provider.require_parameters`
    return view


def accepts_or_400(kind: str, body: bytes) -> _View | None:
    """The property every body must have: a view (of a UTF-8 JSON object, which upstreams get as is), or
    BadRequest with an OpenAI-shaped body."""
    try:
        view = validate(kind, body)
    except BadRequest as e:
        assert e.status == 400
        doc = orjson.loads(e.body())
        assert list(doc) == ["error"]
        error = doc["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and error["message"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
        assert error["param"] is None or isinstance(error["param"], str)
        assert e.sse_event().startswith(b"data: {") and e.sse_event().endswith(b"data: [DONE]\n\n")
        return None
    assert isinstance(json.loads(body.decode("utf-8")), dict)  # what is accepted is what an upstream can read
    return view


# Any JSON value: big integers, non-finite floats (which json.dumps spells NaN/Infinity: not JSON), any text.
scalars = st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)
# Objects with the fields the gateway reads, holding any values: reach past the "not an object" answer.
FIELDS = (
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "provider",
    "models",
    "usage",
    "route",
    "transforms",
    "stream_options",
    "temperature",
    "n",
    "stop",
    "tools",
    "user",
)
field_objects = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@given(kind=st.sampled_from(KINDS), value=json_values | field_objects)
def test_any_json_value_is_accepted_or_a_400(kind, value):
    accepts_or_400(kind, _dumps(value))


# Bytes: random, framing-heavy fragments, deep nesting, invalid UTF-8 inside and outside strings.
JSONISH = [b"{", b"}", b"[", b"]", b'"', b":", b",", b'"model"', b'"messages"', b'"x"', b"1", b"-1e999", b"null"]
ODD = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\u", b"\\ud800", b"\x00", b" "]  # not UTF-8, bad escapes, NUL
fragments = st.sampled_from([*JSONISH, *ODD])
raw_bodies = (
    st.binary(max_size=64)
    | st.lists(fragments, max_size=30).map(b"".join)
    | st.integers(1, 20_000).map(lambda n: b'{"model":"m","messages":[' + b"[" * n + b"]" * n + b"]}")
    | st.integers(1, 20_000).map(lambda n: b"[" * n)
    | st.binary(max_size=16).map(lambda b: b'{"model":"m","messages":["' + b + b'"]}')
    | st.binary(max_size=16).map(lambda b: b'{"model":"m","messages":[1]}' + b)
)


@given(kind=st.sampled_from(KINDS), body=raw_bodies)
def test_any_bytes_are_accepted_or_a_400(kind, body):
    accepts_or_400(kind, body)


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_body_and_a_missing_required_field_are_400s_naming_it(kind):
    assert accepts_or_400(kind, b"") is None
    with pytest.raises(BadRequest) as e:
        validate(kind, b'{"model": "m"}')
    assert e.value.param == REQUIRED[kind]


# --- well-formed requests: accepted, and the fields the gateway extracts are the ones sent ---

names = st.text(min_size=1, max_size=8)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(max_size=20)},
        optional={"name": names},
    ),
    min_size=1,
    max_size=3,
)
prices = st.floats(0, 100, allow_nan=False)
preferences = st.fixed_dictionaries(
    {},
    optional={
        "order": st.lists(names, max_size=3),
        "only": st.lists(names, max_size=3),
        "ignore": st.lists(names, max_size=3),
        "allow_fallbacks": st.booleans(),
        "sort": st.sampled_from(["price", "latency", "throughput"]),
        "max_price": st.fixed_dictionaries({}, optional={"prompt": prices, "completion": prices}),
        "require_parameters": st.booleans(),
    },
)
tokens = st.integers(1, 2**31 - 1)
common = {
    "stream": st.booleans(),
    "max_tokens": tokens | st.none(),
    "temperature": st.floats(0, 2) | st.none(),
    "top_p": st.floats(0, 1),
    "n": st.just(1),
    "seed": st.integers(-(2**31), 2**31),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=4),
    "user": st.text(max_size=10),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "provider": preferences,
    "models": st.lists(names, max_size=3),
    "usage": st.fixed_dictionaries({}, optional={"include": st.booleans()}),
    "vendor_extension": st.recursive(  # unknown fields pass through untouched
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8,
    ),
}
REQUESTS = {
    "chat": st.fixed_dictionaries(
        {"model": names, "messages": messages},
        optional={
            **common,
            "max_completion_tokens": tokens,
            "tools": st.just([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
            "tool_choice": st.sampled_from(["auto", "none", {"type": "function", "function": {"name": "f"}}]),
            "response_format": st.just({"type": "json_object"}),
            "logprobs": st.booleans(),
            "parallel_tool_calls": st.booleans(),
        },
    ),
    "completions": st.fixed_dictionaries(
        {"model": names, "prompt": st.text(max_size=20) | st.lists(st.text(max_size=8), min_size=1, max_size=3)},
        optional={**common, "echo": st.booleans(), "suffix": st.text(max_size=4)},
    ),
    "embeddings": st.fixed_dictionaries(
        {"model": names, "input": st.text(max_size=20) | st.lists(st.text(max_size=8), min_size=1, max_size=3)},
        optional={"user": st.text(max_size=10), "dimensions": st.integers(1, 4096), "encoding_format": names},
    ),
    "messages": st.fixed_dictionaries(
        {"model": names, "messages": messages, "max_tokens": tokens},
        optional={"stream": st.booleans(), "system": st.text(max_size=10), "provider": preferences},
    ),
}


@st.composite
def requests(draw: st.DrawFn, kinds: tuple[str, ...] = KINDS) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(kinds))
    return kind, draw(REQUESTS[kind])


@given(request=requests())
def test_well_formed_requests_are_accepted_with_the_fields_sent(request):
    kind, req = request
    view = accepts_or_400(kind, _dumps(req))
    assert view is not None, req
    assert view.model == req["model"]
    assert view.stream == req.get("stream", False)
    assert view.max_tokens == req.get("max_tokens", 0 if kind == "messages" else None)
    assert view.output_cap() == (req.get("max_completion_tokens") or req.get("max_tokens"))
    sent_gateway_fields = {"provider", "models", "usage"} & req.keys()
    assert view.has_gateway_fields() == bool(sent_gateway_fields)
    prefs = provider_prefs(view.provider)
    for name, value in req.get("provider", {}).items():
        got = getattr(prefs, name)
        assert (got if name != "max_price" else {k: getattr(got, k) for k in value}) == value
    assert fallback_models(view.models) == req.get("models", [])
    if "usage" in req:
        assert view.usage is not None and view.usage.include == req["usage"].get("include", False)


ADAPTER = OpenAIAdapter(ProviderConfig(name="up", preset="groq", api_key="sk-x"), "https://upstream.test/v1")


@given(request=requests(KINDS[:3]), upstream_model=names)
def test_the_openai_rewrite_of_an_accepted_body_changes_only_what_it_must(request, upstream_model):
    """A preset that drops parameters (groq), the model renamed, gateway fields stripped, usage asked for."""
    kind, req = request
    body = _dumps(req)
    view = validate(kind, body)
    strip = view.has_gateway_fields()
    out = json.loads(ADAPTER.request_body(body, view.model, upstream_model, strip))
    if out == req:
        assert upstream_model == req["model"] and not strip  # the client's bytes went as they came
        return
    assert out["model"] == upstream_model
    dropped = (set(GATEWAY_FIELDS) if strip else set()) | ADAPTER.unsupported
    assert not dropped & out.keys()
    expected = {k: v for k, v in req.items() if k not in dropped and k != "model"}
    if req.get("stream") is True and "stream_options" not in ADAPTER.unsupported:
        expected["stream_options"] = {**req.get("stream_options", {}), "include_usage": True}  # usage asked for
    assert {k: v for k, v in out.items() if k != "model"} == expected


# --- bodies shaped like requests, with anything inside: for the translating adapters' property tests ---


def json_like(keys: list[str], words: list[str], max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """JSON values whose objects use `keys` and whose strings are often `words`: shapes a translator recognises,
    holding anything (wrong types, missing members, nulls)."""
    leaf = (
        st.none()
        | st.booleans()
        | st.integers(-3, 3)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=6)
        | st.sampled_from(words)
    )
    return st.recursive(
        leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(keys), inner, max_size=4),
        max_leaves=max_leaves,
    )


_PART_KEYS = ["role", "content", "type", "text", "name", "id", "tool_calls", "tool_call_id", "function", "arguments"]
_PART_KEYS += ["image_url", "url", "detail", "input_audio", "data", "format", "file", "file_data", "filename"]
_PART_KEYS += ["refusal", "reasoning", "parameters", "description", "strict", "json_schema", "schema", "properties"]
_PART_KEYS += ["required", "items", "enum", "source", "media_type", "input", "tool_use_id", "is_error", "thinking"]
_PART_KEYS += ["budget_tokens", "cache_control", "signature", "include_usage", "effort", "x"]
_WORDS = ["user", "assistant", "system", "developer", "tool", "function", "text", "image_url", "input_audio"]
_WORDS += ["file", "json_object", "json_schema", "auto", "none", "required", "object", "string", "image", "base64"]
_WORDS += ["url", "tool_use", "tool_result", "thinking", "enabled", "disabled", "high", "low", "ephemeral"]
_WORDS += ["data:image/png;base64,iVBORw0KGgo=", "https://example.test/a.png", "wav", "{}", '{"a":1}']
_inner = json_like(_PART_KEYS, _WORDS, max_leaves=10)
_object = st.dictionaries(st.sampled_from(_PART_KEYS), _inner, max_size=4)
_objects = st.lists(_object, min_size=1, max_size=3)
# Chat parameters the gateway type-checks (proxy/schema.py) get their types, with anything inside the structured
# ones: a body the gateway refuses itself never reaches an adapter, so it would be a wasted example here.
_CHAT_PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "messages": _objects,
    "tools": _objects,
    "functions": _objects,
    "tool_choice": st.sampled_from(_WORDS) | _object,
    "function_call": st.sampled_from(_WORDS) | _object,
    "response_format": _object,
    "stream_options": _object,
    "metadata": _object,
    "stop": st.text(max_size=4) | st.lists(_inner, min_size=1, max_size=3),
    "modalities": st.lists(st.sampled_from(["text", "audio", "image"]), max_size=2),
    "prediction": _inner,
    "audio": _inner,
    "reasoning": _inner,
    "max_tokens": st.integers(1, 4096),
    "max_completion_tokens": st.integers(1, 4096),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "n": st.integers(1, 2),
    "stream": st.booleans(),
    "seed": st.integers(0, 9),
    "user": st.text(max_size=4),
    "parallel_tool_calls": st.booleans(),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "reasoning_effort": st.sampled_from(["minimal", "low", "medium", "high"]),
    "top_k": _inner,
}
# The Messages API's body is checked where it is translated (adapters/anthropic_front.py): anything anywhere.
_MESSAGES_PARAMS = ["system", "tools", "tool_choice", "max_tokens", "stop_sequences", "temperature", "top_p"]
_MESSAGES_PARAMS += ["top_k", "stream", "thinking", "metadata", "service_tier", "container", "mcp_servers"]


@st.composite
def _chat_body(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.sampled_from(sorted(_CHAT_PARAMS)), unique=True, max_size=6))
    return _dumps({"model": "m", "messages": _HI, **{n: draw(_CHAT_PARAMS[n]) for n in names}})


_HI = [{"role": "user", "content": "hi"}]
chat_bodies = _chat_body()
_blocks = st.lists(
    st.builds(dict, _object, type=st.sampled_from(["text", "image", "tool_use", "tool_result", "thinking", "x"])),
    max_size=3,
)
_turns = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"])}, optional={"content": st.text(max_size=4) | _blocks}
    ),
    min_size=1,
    max_size=3,
)
messages_bodies = st.builds(
    lambda turns, rest: _dumps({"model": "m", "max_tokens": 16, "messages": turns, **rest}),
    _turns,
    st.dictionaries(st.sampled_from(_MESSAGES_PARAMS), json_like(_PART_KEYS, _WORDS), max_size=3),
)


def accepted(kind: str, body: bytes) -> bool:
    """Would the gateway pass this body on to an adapter (rather than answer 400 itself)?"""
    try:
        decode_view(kind, body)
    except BadRequest:
        return False
    return True


@given(body=chat_bodies)
def test_chat_shaped_bodies_are_accepted_or_a_400(body):
    accepts_or_400("chat", body)
