"""OpenAI request "views": only the fields the gateway reads, decoded by module-level decoders.

Everything else in the body stays bytes: it is forwarded as received, or re-emitted by one top-level rewrite
whose untouched values are `msgspec.Raw` copies, never re-encoded.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from proxy.errors import BadRequest

# OpenRouter-style routing fields the gateway consumes; an upstream must not see them (OpenAI rejects
# unknown parameters with a 400).
GATEWAY_FIELDS = ("provider", "models", "route", "transforms", "usage")


class UsageOption(msgspec.Struct, gc=False):
    """OpenRouter's `"usage": {"include": true}`: put the cost in the final usage (accounting/settings.py)."""

    include: bool = False


class _View(msgspec.Struct, gc=False):
    model: str
    stream: bool = False
    provider: msgspec.Raw = msgspec.Raw()  # empty Raw = absent
    models: msgspec.Raw = msgspec.Raw()
    route: msgspec.Raw = msgspec.Raw()
    transforms: msgspec.Raw = msgspec.Raw()
    usage: UsageOption | None = None
    max_tokens: int | None = None  # the worst case a credit reservation must cover (accounting/accountant.py)
    max_completion_tokens: int | None = None

    def has_gateway_fields(self) -> bool:
        return bool(self.provider or self.models or self.route or self.transforms) or self.usage is not None

    def output_cap(self) -> int | None:
        """The most completion tokens the client allows, if it said."""
        return self.max_completion_tokens or self.max_tokens


class ChatView(_View, gc=False):
    messages: list[msgspec.Raw] = msgspec.field(default_factory=list)  # required; checked below


class CompletionView(_View, gc=False):
    prompt: msgspec.Raw = msgspec.Raw()


class EmbeddingView(_View, gc=False):
    input: msgspec.Raw = msgspec.Raw()


class MessagesView(_View, gc=False):
    """Anthropic's Messages API (proxy/messages.py): its routing fields are chat's, by the same names."""

    messages: list[msgspec.Raw] = msgspec.field(default_factory=list)  # required; checked below
    max_tokens: int | None = 0  # required by Anthropic; checked by the handler


_decoders = {
    "chat": msgspec.json.Decoder(ChatView),
    "completions": msgspec.json.Decoder(CompletionView),
    "embeddings": msgspec.json.Decoder(EmbeddingView),
    "messages": msgspec.json.Decoder(MessagesView),
}
_required = {"chat": "messages", "completions": "prompt", "embeddings": "input", "messages": "messages"}


def decode_view(kind: str, body: bytes) -> _View:
    """Decode the routing view of a request body, or raise BadRequest naming the bad field."""
    if not body:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        view = _decoders[kind].decode(body)
    except msgspec.ValidationError as e:
        text = str(e)
        param = text.rpartition("`$.")[2].rstrip("`") if "`$." in text else None
        if "Object missing required field" in text:
            param = text.split("`")[1]
        raise BadRequest(f"invalid request: {text}", param=param) from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    field = _required[kind]
    value = getattr(view, field)
    if not value:
        raise BadRequest(f"`{field}` is required and must not be empty", param=field)
    if not view.model:
        raise BadRequest("`model` must not be empty", param="model")
    return view


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
