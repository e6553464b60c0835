"""OpenAI request "views": only the fields the gateway reads, decoded by module-level decoders, and the types of
the standard parameters checked on the way (a hostile or broken body is a 400 naming its field, never a 5xx).

Everything else in the body stays bytes: it is forwarded as received, or re-emitted by one top-level rewrite
whose untouched values are `msgspec.Raw` copies, never re-encoded.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import msgspec

from proxy.errors import BadRequest

# OpenRouter-style routing fields the gateway consumes; an upstream must not see them (OpenAI rejects
# unknown parameters with a 400).
GATEWAY_FIELDS = ("provider", "models", "route", "transforms", "usage")


class UsageOption(msgspec.Struct, gc=False):
    """OpenRouter's `"usage": {"include": true}`: put the cost in the final usage (accounting/settings.py)."""

    include: bool = False


# The most tokens a request may ask for (`max_tokens`, `max_completion_tokens`): far above any model's output,
# yet small enough that its worst-case cost (accounting/accountant.py) is a finite float. More is a 400.
MAX_TOKENS = 2**31 - 1
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]


class _View(msgspec.Struct, gc=False):
    model: str
    stream: bool = False
    provider: msgspec.Raw = msgspec.Raw()  # empty Raw = absent
    models: msgspec.Raw = msgspec.Raw()
    route: msgspec.Raw = msgspec.Raw()  # OpenRouter's; documented (proxy/openapi.py) as any value, dropped unread
    transforms: msgspec.Raw = msgspec.Raw()
    usage: UsageOption | None = None
    max_tokens: Tokens | None = None  # the worst case a credit reservation must cover (accounting/accountant.py)
    max_completion_tokens: Tokens | None = None

    def has_gateway_fields(self) -> bool:
        return bool(self.provider or self.models or self.route or self.transforms) or self.usage is not None

    def output_cap(self) -> int | None:
        """The most completion tokens the client allows, if it said."""
        return self.max_completion_tokens or self.max_tokens


# Type checks, no more. The decoder passes over every value of the body anyway, so checking the type of
# OpenAI's standard parameters costs next to nothing, and a wrong one is a 400 naming it here rather than a
# failure in a translating adapter or a round trip to the upstream. Values are never used or re-encoded:
# objects decode to an empty `_Object` and arrays to an `_Array` of their first item at most (the decoder skips
# the rest), so an array of a million items is one small object, not a million.


class _Object(msgspec.Struct, gc=False):
    """Any JSON object; its members are skipped."""


class _Array(msgspec.Struct, array_like=True, gc=False):
    """Any JSON array; only its first item is kept (as bytes), to tell an empty one."""

    first: msgspec.Raw = msgspec.Raw()


class _Sampling(_View, gc=False):
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    stop: str | _Array | None = None
    logit_bias: _Object | None = None
    stream_options: _Object | None = None


class ChatView(_Sampling, gc=False):
    messages: _Array | None = None  # required, not empty (checked below)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    tools: _Array | None = None
    tool_choice: str | _Object | None = None
    functions: _Array | None = None
    function_call: str | _Object | None = None
    response_format: _Object | None = None
    modalities: _Array | None = None
    metadata: _Object | None = None


class CompletionView(_Sampling, gc=False):
    prompt: msgspec.Raw = msgspec.Raw()  # required; any JSON (the upstream's to judge), as documented
    logprobs: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class EmbeddingView(_View, gc=False):
    input: msgspec.Raw = msgspec.Raw()  # required; any JSON (the upstream's to judge), as documented
    dimensions: int | None = None
    encoding_format: str | None = None
    user: str | None = None


class MessagesView(_View, gc=False):
    """Anthropic's Messages API (proxy/messages.py): its routing fields are chat's, by the same names. The rest
    is checked where it is translated (adapters/anthropic_front.py)."""

    messages: _Array | None = None  # required, not empty (checked below)
    max_tokens: Annotated[int, msgspec.Meta(le=MAX_TOKENS)] | None = 0  # required by Anthropic; checked by the handler


_decoders = {
    "chat": msgspec.json.Decoder(ChatView),
    "completions": msgspec.json.Decoder(CompletionView),
    "embeddings": msgspec.json.Decoder(EmbeddingView),
    "messages": msgspec.json.Decoder(MessagesView),
}
_required = {"chat": "messages", "completions": "prompt", "embeddings": "input", "messages": "messages"}


def decode_view(kind: str, body: bytes) -> _View:
    """Decode the routing view of a request body, or raise BadRequest naming the bad field.

    Also refused here, before anything else reads the body: bytes that are not UTF-8 (JSON is UTF-8; msgspec
    checks only the strings it decodes, and the rest would reach the upstream), and nesting deeper than the
    decoder's recursion limit (a `RecursionError` otherwise, which is no client's business)."""
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    if not body.isascii():  # ASCII is UTF-8, and isascii() is a fast scan; only other bodies are decoded
        try:
            body.decode()
        except UnicodeDecodeError as e:
            raise BadRequest(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        view = _decoders[kind].decode(body)
    except msgspec.ValidationError as e:
        raise BadRequest(f"invalid request: {e}", param=_param(str(e))) from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    field = _required[kind]
    value = getattr(view, field)
    if not value or (field == "messages" and not value.first):  # None, an empty Raw (absent), or `[]`
        raise BadRequest(f"`{field}` is required and must not be empty", param=field)
    if not view.model:
        raise BadRequest("`model` must not be empty", param="model")
    return view


def _param(text: str) -> str | None:
    """The field a msgspec validation message names: `… - at `$.a.b[0]`` → a.b[0]; a missing required field's
    name is appended to its object's path."""
    path = text.rpartition("`$.")[2].rstrip("`") if "`$." in text else ""
    if text.startswith("Object missing required field"):
        name = text.split("`")[1]
        return f"{path}.{name}" if path else name
    return path or None


_raw_doc = msgspec.json.Decoder(dict[str, msgspec.Raw])
_encode = msgspec.json.Encoder().encode


def rewrite(body: bytes, model: str, drop_gateway_fields: bool, drop: Iterable[str] = ()) -> bytes:
    """One top-level rewrite: set `model`, drop gateway-only fields and `drop` (parameters the upstream does
    not support); every other value copied as bytes."""
    doc = _raw_doc.decode(body)
    doc["model"] = msgspec.Raw(_encode(model))
    if drop_gateway_fields:
        for name in GATEWAY_FIELDS:
            doc.pop(name, None)
    for name in drop:
        doc.pop(name, None)
    return _encode(doc)
