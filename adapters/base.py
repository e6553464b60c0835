"""What every adapter provides: one wire format's request building, response translation and error
classification.

An adapter is built once per provider at startup; everything static (URLs, auth headers) is prebuilt into
`Target`s, so per request it only decides the body bytes and how to read the answer. Passthrough adapters
(the OpenAI family) hand bytes through untouched; the others translate bodies with `parse_response` and
streams with a per-stream `Transcoder`, whose output is OpenAI-shaped SSE, so everything downstream (commit
point, relay, usage) is the same for every provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar, Protocol

import msgspec
import orjson

from proxy.config import ProviderConfig
from proxy.errors import BadRequest, UpstreamStatus
from proxy.upstream import Target

# Request kinds the gateway serves; an adapter maps each to an upstream target.
KINDS = ("chat", "completions", "embeddings", "models")

# Statuses that mean "try elsewhere": the request may succeed on another endpoint. Other 4xx are the
# client's fault and are relayed as the upstream sent them. 529: Anthropic's "overloaded".
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class Transcoder(Protocol):
    """Per-stream state: provider stream bytes in (cut anywhere), framed OpenAI SSE chunks out."""

    def feed(self, data: bytes) -> bytes:
        """OpenAI `data: …\\n\\n` events for this piece of the provider's stream (b"" when none yet)."""
        ...

    def finish(self) -> bytes:
        """What ends the stream: any last chunks (usage) and `data: [DONE]\\n\\n`."""
        ...


class Adapter(Protocol):
    name: ClassVar[str]  # == REGISTRY key == `adapter:` in config
    passthrough: ClassVar[bool]  # True: responses and streams are already OpenAI-shaped bytes

    def __init__(self, provider: ProviderConfig, base_url: str) -> None: ...

    def target(self, kind: str, model: str, stream: bool) -> Target | None:
        """The prebuilt target for a request kind and upstream model, or None if the wire format has no such
        endpoint (some put the model or the stream flag in the URL)."""
        ...

    def request_body(self, body: bytes, public_model: str, upstream_model: str, strip: bool) -> bytes:
        """Bytes to send upstream for an OpenAI-shaped client body. `strip`: it has gateway-only fields."""
        ...

    def parse_response(self, body: bytes, model: str) -> bytes:
        """A provider's non-streamed success body as an OpenAI JSON body (identity for passthrough)."""
        ...

    def new_transcoder(self, model: str) -> Transcoder | None:
        """Per-stream translator, or None: the stream is OpenAI SSE already and passes through."""
        ...

    def classify(self, status: int, body: bytes, headers: Mapping[str, str]) -> UpstreamStatus | None:
        """For a non-2xx answer: an UpstreamStatus to fail over on, or None to relay it to the client."""
        ...

    def error_body(self, status: int, body: bytes) -> bytes:
        """A relayed non-2xx body as OpenAI's `{"error": {message, type, param, code}}` (identity for passthrough;
        only called for adapters that are not)."""
        ...


async def transcoded(chunks: AsyncIterator[bytes], tx: Transcoder) -> AsyncIterator[bytes]:
    """The provider's stream as OpenAI SSE; pieces that yield no OpenAI event are skipped, not sent empty."""
    async for data in chunks:
        out = tx.feed(data)
        if out:
            yield out
    yield tx.finish()


_enc = msgspec.json.Encoder()


def sse(obj: object) -> bytes:
    """One framed SSE event, encoded straight into the frame (no intermediate copy)."""
    buf = bytearray(b"data: ")
    _enc.encode_into(obj, buf, -1)
    buf += b"\n\n"
    return bytes(buf)


DONE = b"data: [DONE]\n\n"


def load_chat_request(body: bytes, vendor: str) -> dict[str, Any]:
    """An OpenAI chat body as a dict, for adapters that rebuild the request; BadRequest for what no
    translating adapter can serve (several choices, audio output)."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list):
        raise BadRequest("`messages` must be a list", param="messages")
    if req.get("n") not in (None, 1):
        raise BadRequest(f"`n` > 1 is not supported by {vendor}", param="n")
    if "audio" in (req.get("modalities") or ()):
        raise BadRequest(f"audio output is not supported by {vendor}", param="modalities")
    return req


def completion_choice(
    text: list[str], calls: list[dict[str, Any]], reasoning: list[str], finish: str
) -> dict[str, Any]:
    """The one choice of a translated chat.completion: joined text, tool calls and reasoning when present."""
    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning"] = "".join(reasoning)
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
