"""Gemini adapter quirks: recorded fixtures the official SDK accepts, OpenAI ⇄ Gemini both ways, through the
gateway with the official `openai` SDK, streams cut anywhere, failover on 429."""

from __future__ import annotations

import re
import socket
from typing import Any

import openai
import orjson
import pytest
from google import genai
from google.genai import types
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from openai.types.chat import ChatCompletion

from adapters.base import DONE
from adapters.gemini import GeminiAdapter, GeminiTranscoder
from adapters.gemini_request import SKIP_SIGNATURE, schema, translate
from proxy.attempt import _CONTENT, _NOTHING, classify_event
from proxy.config import ProviderConfig
from proxy.errors import BadRequest, UpstreamError, UpstreamProtocolError, UpstreamStatus
from tests.conftest import KEY, gateway_config
from tests.fakes import FakeUpstream, Script, fixture
from tests.unit.test_request_validation import accepted, chat_bodies, json_like

# The SDK's own aiohttp session subclass warns on every client; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")

MODEL, UPSTREAM_MODEL = "test/gemini", "gemini-2.5-flash"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What's the weather in Boston and Tokyo?"},
]
# What OpenAI would have answered to the same turns: the gateway's Gemini answers must equal these.
OPENAI_TEXT = {
    "id": "chatcmpl-x",
    "object": "chat.completion",
    "created": 0,
    "model": "gemini-2.5-flash",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 2061,
        "completion_tokens": 34,
        "total_tokens": 2095,
        "prompt_tokens_details": {"cached_tokens": 2048},
        "completion_tokens_details": {"reasoning_tokens": 24},
    },
}
BOSTON = {"location": "Boston, MA", "unit": "celsius"}
TOKYO = {"location": "Tokyo, Japan", "unit": "celsius"}
SIGNATURE = "CiIBVKhc7oDmXpKpNbSaxYmVRpvbNvyU1CcqO7vTyRBNZcnV"


def gfix(name: str) -> bytes:
    return fixture(name, "gemini")


def gemini_events(data: bytes) -> list[bytes]:
    """Split a Gemini SSE fixture into its events (Google frames them with CRLF), terminators kept."""
    return [part + b"\r\n\r\n" for part in data.split(b"\r\n\r\n") if part]


def adapter(base_url: str = "https://generativelanguage.googleapis.com/v1beta/") -> GeminiAdapter:
    return GeminiAdapter(ProviderConfig(name="gem", adapter="gemini", base_url=base_url, api_key="sk-g"), base_url)


def req(**body: Any) -> dict[str, Any]:
    """The Gemini body for an OpenAI chat body (model and one user message by default)."""
    body.setdefault("model", MODEL)
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return orjson.loads(translate(orjson.dumps(body), UPSTREAM_MODEL))


def parsed(body: bytes | dict[str, Any]) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    out = adapter().parse_response(raw, UPSTREAM_MODEL)
    ChatCompletion.model_validate_json(out)  # every answer is one the OpenAI SDK accepts
    return orjson.loads(out)


def transcode(pieces: list[bytes]) -> bytes:
    tx = adapter().new_transcoder(UPSTREAM_MODEL)
    return b"".join(tx.feed(p) for p in pieces) + tx.finish()


def chunks(stream: bytes) -> list[dict[str, Any]]:
    events = [e.removeprefix(b"data: ") for e in stream.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    return [orjson.loads(e) for e in events[:-1]]


# The Schema fields of the v1beta reference. The SDK's pydantic Schema also has Vertex-only ones (the SDK itself
# refuses `additionalProperties` in Gemini Developer API mode), so schemas are also checked against this list.
SCHEMA_FIELDS = set(
    "type format title description nullable enum maxItems minItems properties required minProperties maxProperties"
    " minLength maxLength pattern example anyOf propertyOrdering default items minimum maximum".split()
)


def assert_gemini_schema(node: dict[str, Any]) -> None:
    assert set(node) <= SCHEMA_FIELDS, set(node) - SCHEMA_FIELDS
    assert node.get("type", "STRING") in {"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT"}
    for sub in [
        *node.get("properties", {}).values(),
        *node.get("anyOf", ()),
        *([node["items"]] if "items" in node else []),
    ]:
        assert_gemini_schema(sub)


def assert_valid_gemini_request(body: bytes) -> dict[str, Any]:
    """Validate with the official SDK's own types, which forbid unknown fields (camelCase, as on the wire)."""
    doc = orjson.loads(body)
    for tool in doc.get("tools", ()):
        for decl in tool["functionDeclarations"]:
            if "parameters" in decl:
                assert_gemini_schema(decl["parameters"])
    if "responseSchema" in doc.get("generationConfig", {}):
        assert_gemini_schema(doc["generationConfig"]["responseSchema"])
    assert set(doc) <= {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig"}
    for content in doc["contents"]:
        types.Content.model_validate_json(orjson.dumps(content))
    if "systemInstruction" in doc:
        types.Content.model_validate_json(orjson.dumps(doc["systemInstruction"]))
    for tool in doc.get("tools", ()):
        types.Tool.model_validate_json(orjson.dumps(tool))
    if "toolConfig" in doc:
        types.ToolConfig.model_validate_json(orjson.dumps(doc["toolConfig"]))
    if "generationConfig" in doc:
        types.GenerationConfig.model_validate_json(orjson.dumps(doc["generationConfig"]))
    return doc


class RecordingUpstream(FakeUpstream):
    """The fake provider, also keeping each request's query string (`alt=sse` is part of Gemini's URL)."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[str] = []
        self.root = ""

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        self.queries.append(request.query_string)
        return await super()._handle(request)


@pytest.fixture
async def gemini_upstream(aiohttp_server: Any) -> RecordingUpstream:
    fake = RecordingUpstream()
    fake.script(Script(body=gfix("chat_ok.json")))
    server = await aiohttp_server(fake.app)
    fake.root = str(server.make_url("/"))
    fake.base_url = str(server.make_url("/v1beta"))
    return fake


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any name lookup other than loopback fails the test: the SDK must talk to the fake and nothing else."""
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        assert name in ("127.0.0.1", "localhost", "::1"), f"network call to {name}"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


def sdk(fake: RecordingUpstream) -> genai.Client:
    options = types.HttpOptions(
        base_url=fake.root, api_version="v1beta", retry_options=types.HttpRetryOptions(attempts=1)
    )
    return genai.Client(api_key="sk-google-sdk", http_options=options)


# --- The fixtures are what Google sends: the official google-genai SDK reads them --------------------------


async def test_google_sdk_reads_the_recorded_responses(gemini_upstream: RecordingUpstream, loopback_only: None):
    client = sdk(gemini_upstream)
    r = await client.aio.models.generate_content(model=UPSTREAM_MODEL, contents="hi")
    assert r.text == "Hello! How can I help you today?"
    assert r.usage_metadata is not None
    assert (r.usage_metadata.cached_content_token_count, r.usage_metadata.thoughts_token_count) == (2048, 24)

    gemini_upstream.script(Script(body=gfix("chat_function_call.json")))
    r = await client.aio.models.generate_content(model=UPSTREAM_MODEL, contents="weather?")
    assert r.function_calls is not None and r.function_calls[0].name == "get_weather"
    assert r.function_calls[0].args == BOSTON
    assert r.candidates and r.candidates[0].content and r.candidates[0].content.parts
    assert r.candidates[0].content.parts[0].thought_signature  # base64 in the fixture, bytes in the SDK

    gemini_upstream.script(Script(body=gfix("chat_blocked.json")))
    r = await client.aio.models.generate_content(model=UPSTREAM_MODEL, contents="…")
    assert r.prompt_feedback is not None and r.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    assert not r.candidates

    assert [s.path for s in gemini_upstream.requests] == [f"/v1beta/models/{UPSTREAM_MODEL}:generateContent"] * 3
    assert all(s.headers["x-goog-api-key"] == "sk-google-sdk" for s in gemini_upstream.requests)
    await client.aio.aclose()


@pytest.mark.parametrize(
    ("name", "text", "thoughts", "calls"),
    [
        ("stream_ok.sse", "Hello! How can I help you today?", "", []),
        ("stream_function_calls.sse", "", "", [BOSTON, TOKYO]),
        ("stream_thinking.sse", "17 × 23 = 391.", "**Calculating the product**", []),
    ],
)
async def test_google_sdk_reads_the_recorded_streams(
    gemini_upstream: RecordingUpstream, loopback_only: None, name: str, text: str, thoughts: str, calls: list[Any]
):
    gemini_upstream.script(Script(sse=gemini_events(gfix(name))))
    client = sdk(gemini_upstream)
    got_text, got_thoughts, got_calls, finish = [], [], [], None
    async for chunk in await client.aio.models.generate_content_stream(model=UPSTREAM_MODEL, contents="hi"):
        assert chunk.candidates
        for part in (chunk.candidates[0].content and chunk.candidates[0].content.parts) or ():
            if part.function_call:
                got_calls.append(part.function_call.args)
            elif part.thought:
                got_thoughts.append(part.text or "")
            else:
                got_text.append(part.text or "")
        finish = chunk.candidates[0].finish_reason or finish
    assert "".join(got_text) == text and "".join(got_thoughts).startswith(thoughts) and got_calls == calls
    assert finish == types.FinishReason.STOP
    assert gemini_upstream.requests[0].path == f"/v1beta/models/{UPSTREAM_MODEL}:streamGenerateContent"
    assert gemini_upstream.queries == ["alt=sse"]
    await client.aio.aclose()


@pytest.mark.parametrize(
    ("status", "name", "rpc"),
    [(429, "chat_429.json", "RESOURCE_EXHAUSTED"), (400, "chat_400.json", "INVALID_ARGUMENT")],
)
async def test_google_sdk_reads_the_recorded_errors(
    gemini_upstream: RecordingUpstream, loopback_only: None, status: int, name: str, rpc: str
):
    gemini_upstream.script(Script(status=status, body=gfix(name)))
    client = sdk(gemini_upstream)
    with pytest.raises(genai.errors.ClientError) as e:
        await client.aio.models.generate_content(model=UPSTREAM_MODEL, contents="hi")
    assert (e.value.code, e.value.status) == (status, rpc)
    assert len(gemini_upstream.requests) == 1
    await client.aio.aclose()


# --- Through the gateway, with the official openai SDK --------------------------------------------------------


def gemini_config(fake: RecordingUpstream, **kw: Any):  # type: ignore[no-untyped-def]
    return gateway_config({"gem": fake.base_url}, models={MODEL: [("gem", UPSTREAM_MODEL)]}, adapter="gemini", **kw)


def openai_client(gw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)


async def test_chat_through_the_gateway_equals_the_openai_answer(gemini_upstream: RecordingUpstream, gateway):
    client = openai_client(await gateway(gemini_config(gemini_upstream)))
    c = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=[WEATHER], temperature=0.2, max_completion_tokens=256, seed=7
    )
    expected = ChatCompletion.model_validate(OPENAI_TEXT)
    assert c.model_dump(exclude={"id", "created"}) == expected.model_dump(exclude={"id", "created"})
    assert c.id == "chatcmpl-Q2vmaOLmC9Tr7M8PqN6nuQ4"  # Gemini's responseId carries over
    [seen] = gemini_upstream.requests
    assert seen.path == f"/v1beta/models/{UPSTREAM_MODEL}:generateContent" and gemini_upstream.queries == [""]
    assert seen.headers["x-goog-api-key"] == "sk-upstream-gem" and "Authorization" not in seen.headers
    sent = assert_valid_gemini_request(seen.body)
    assert sent["contents"] == [{"role": "user", "parts": [{"text": "What's the weather in Boston and Tokyo?"}]}]
    assert sent["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    decl = sent["tools"][0]["functionDeclarations"][0]
    assert decl["name"] == "get_weather" and "additionalProperties" not in decl["parameters"]
    assert sent["generationConfig"] == {"temperature": 0.2, "maxOutputTokens": 256, "seed": 7}
    await client.close()


async def test_tool_calls_through_the_gateway(gemini_upstream: RecordingUpstream, gateway):
    gemini_upstream.script(Script(body=gfix("chat_function_call.json")))
    client = openai_client(await gateway(gemini_config(gemini_upstream)))
    c = await client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER], tool_choice="required")
    choice = c.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and orjson.loads(call.function.arguments) == BOSTON
    assert (call.model_extra or {})["extra_content"] == {"google": {"thought_signature": SIGNATURE}}
    assert c.usage is not None and c.usage.completion_tokens == 22 + 57
    assert c.usage.completion_tokens_details and c.usage.completion_tokens_details.reasoning_tokens == 57
    sent = assert_valid_gemini_request(gemini_upstream.requests[0].body)
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    await client.close()


async def _stream(client: openai.AsyncOpenAI, **kw: Any) -> dict[str, Any]:
    """A stream accumulated the way a client does: text, reasoning, tool calls by index, finish, usage."""
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **kw
    )
    text, reasoning, calls, finish, usage = [], [], {}, None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            text.append(d.content or "")
            reasoning.append((d.model_extra or {}).get("reasoning") or "")
            for tc in d.tool_calls or ():
                calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                assert tc.function is not None
                calls[tc.index]["name"] += tc.function.name or ""
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return {"text": "".join(text), "reasoning": "".join(reasoning), "calls": calls, "finish": finish, "usage": usage}


async def test_stream_through_the_gateway_equals_the_openai_answer(gemini_upstream: RecordingUpstream, gateway):
    gemini_upstream.script(Script(sse=gemini_events(gfix("stream_ok.sse"))))
    client = openai_client(await gateway(gemini_config(gemini_upstream)))
    got = await _stream(client, tools=[WEATHER], max_tokens=64)
    expected = ChatCompletion.model_validate(OPENAI_TEXT)
    assert got["text"] == expected.choices[0].message.content and got["finish"] == "stop"
    assert got["usage"] == expected.usage
    [seen] = gemini_upstream.requests
    assert seen.path == f"/v1beta/models/{UPSTREAM_MODEL}:streamGenerateContent"
    assert gemini_upstream.queries == ["alt=sse"]
    sent = assert_valid_gemini_request(seen.body)
    assert sent["generationConfig"] == {"maxOutputTokens": 64} and "stream" not in sent
    await client.close()


async def test_parallel_tool_calls_stream_through_the_gateway(gemini_upstream: RecordingUpstream, gateway):
    gemini_upstream.script(Script(sse=gemini_events(gfix("stream_function_calls.sse"))))
    client = openai_client(await gateway(gemini_config(gemini_upstream)))
    got = await _stream(client, tools=[WEATHER])
    assert got["finish"] == "tool_calls" and got["text"] == ""
    assert [c["name"] for c in got["calls"].values()] == ["get_weather", "get_weather"]
    assert [orjson.loads(c["arguments"]) for c in got["calls"].values()] == [BOSTON, TOKYO]
    assert len({c["id"] for c in got["calls"].values()}) == 2
    assert got["usage"].completion_tokens == 44 + 57
    await client.close()


async def test_thinking_streams_as_reasoning(gemini_upstream: RecordingUpstream, gateway):
    gemini_upstream.script(Script(sse=gemini_events(gfix("stream_thinking.sse"))))
    client = openai_client(await gateway(gemini_config(gemini_upstream)))
    got = await _stream(client, reasoning_effort="low")
    assert got["text"] == "17 × 23 = 391." and got["reasoning"].startswith("**Calculating the product**")
    assert got["usage"].completion_tokens == 9 + 71 and got["usage"].completion_tokens_details.reasoning_tokens == 71
    sent = orjson.loads(gemini_upstream.requests[0].body)
    assert sent["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 1024, "includeThoughts": True}
    await client.close()


async def test_safety_block_is_a_content_filter_finish(gemini_upstream: RecordingUpstream, gateway):
    gemini_upstream.script(Script(body=gfix("chat_blocked.json")))
    client = openai_client(await gateway(gemini_config(gemini_upstream)))
    c = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert c.choices[0].finish_reason == "content_filter" and c.choices[0].message.content == ""
    blocked = b"data: " + orjson.dumps(orjson.loads(gfix("chat_blocked.json"))) + b"\r\n\r\n"
    gemini_upstream.script(Script(sse=[blocked]))
    got = await _stream(client)
    assert got["finish"] == "content_filter" and got["text"] == "" and got["usage"].prompt_tokens == 12
    await client.close()


async def test_429_fails_over_to_a_healthy_provider(gemini_upstream: RecordingUpstream, fake_upstream, gateway):
    gemini_upstream.script(Script(status=429, body=gfix("chat_429.json")))
    cfg = gateway_config(
        {"gem": gemini_upstream.base_url, "backup": fake_upstream.base_url},
        models={MODEL: [("gem", UPSTREAM_MODEL), ("backup", "gpt-4o-mini")]},
        adapter={"gem": "gemini"},
    )
    client = openai_client(await gateway(cfg))
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_body={"provider": {"order": ["gem", "backup"]}}
    )
    assert raw.headers["x-hedgerow-provider"] == "backup" and raw.headers["x-hedgerow-attempts"] == "2"
    assert raw.parse().choices[0].message.content == "Hello! How can I help you today?"
    assert len(gemini_upstream.requests) == 1 and len(fake_upstream.requests) == 1
    await client.close()


async def test_429_everywhere_is_relayed_openai_shaped_with_retry_after(gemini_upstream: RecordingUpstream, gateway):
    gemini_upstream.script(Script(status=429, body=gfix("chat_429.json")))
    client = openai_client(await gateway(gemini_config(gemini_upstream)))
    with pytest.raises(openai.RateLimitError) as e:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert e.value.body == {  # the SDK hands out the `error` object
        "message": orjson.loads(gfix("chat_429.json"))["error"]["message"],
        "type": "rate_limit_error",
        "param": None,
        "code": "RESOURCE_EXHAUSTED",
    }
    assert e.value.response.headers["retry-after"] == "41"  # from RetryInfo: Gemini sends no Retry-After
    await client.close()


async def test_400_is_relayed_openai_shaped_not_failed_over(gemini_upstream: RecordingUpstream, fake_upstream, gateway):
    gemini_upstream.script(Script(status=400, body=gfix("chat_400.json")))
    cfg = gateway_config(
        {"gem": gemini_upstream.base_url, "backup": fake_upstream.base_url},
        models={MODEL: [("gem", UPSTREAM_MODEL), ("backup", "gpt-4o-mini")]},
        adapter={"gem": "gemini"},
    )
    client = openai_client(await gateway(cfg))
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, extra_body={"provider": {"order": ["gem", "backup"]}}
        )
    assert e.value.body == {  # relayed in OpenAI's shape through the adapter's error_body hook
        "message": orjson.loads(gfix("chat_400.json"))["error"]["message"],
        "type": "invalid_request_error",
        "param": None,
        "code": "INVALID_ARGUMENT",
    }
    assert e.value.response.headers["content-type"].startswith("application/json")
    assert len(gemini_upstream.requests) == 1 and not fake_upstream.requests
    await client.close()


async def test_stream_error_before_the_first_token_fails_over(
    gemini_upstream: RecordingUpstream, fake_upstream, gateway
):
    error = b'data: {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}\r\n\r\n'
    gemini_upstream.script(Script(sse=[error]))
    fake_upstream.script(Script(sse=[fixture("stream_ok.sse")]))
    cfg = gateway_config(
        {"gem": gemini_upstream.base_url, "backup": fake_upstream.base_url},
        models={MODEL: [("gem", UPSTREAM_MODEL), ("backup", "gpt-4o-mini")]},
        adapter={"gem": "gemini"},
    )
    client = openai_client(await gateway(cfg))
    got = await _stream(client, extra_body={"provider": {"order": ["gem", "backup"]}})
    assert got["text"] == "Hello! How can I help you today?" and len(gemini_upstream.requests) == 1
    await client.close()


async def test_stream_error_after_the_first_token_ends_the_stream_with_an_error(
    gemini_upstream: RecordingUpstream, gateway
):
    first = gemini_events(gfix("stream_ok.sse"))[0]
    error = (
        b'data: {"error": {"code": 500, "message": "An internal error has occurred.", "status": "INTERNAL"}}\r\n\r\n'
    )
    gemini_upstream.script(Script(sse=[first, error]))
    client = openai_client(await gateway(gemini_config(gemini_upstream)))
    with pytest.raises(openai.APIError, match="An internal error has occurred"):
        await _stream(client)
    await client.close()


# --- Targets -------------------------------------------------------------------------------------------------


def test_targets_put_model_and_stream_in_the_url_and_are_built_once():
    a = adapter()
    chat, stream = a.target("chat", UPSTREAM_MODEL, False), a.target("chat", UPSTREAM_MODEL, True)
    assert chat is not None and stream is not None
    assert chat.url == "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
    assert stream.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert chat.headers["x-goog-api-key"] == "sk-g" and "Authorization" not in chat.headers
    assert a.target("chat", UPSTREAM_MODEL, False) is chat and a.target("chat", UPSTREAM_MODEL, True) is stream
    embed = a.target("embeddings", "text-embedding-004")
    assert embed is not None and embed.path.endswith("/models/text-embedding-004:batchEmbedContents")
    models = a.target("models")
    assert models is not None and models.method == "GET" and models.path == "/v1beta/models"
    assert a.target("completions", UPSTREAM_MODEL) is None
    tuned = a.target("chat", "tunedModels/my-model", False)
    assert tuned is not None and tuned.path == "/v1beta/tunedModels/my-model:generateContent"


# --- Request translation -------------------------------------------------------------------------------------


def test_roles_system_and_developer_messages():
    sent = req(
        messages=[
            {"role": "system", "content": "S1"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "developer", "content": [{"type": "text", "text": "S2"}]},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "u3"},
        ]
    )
    assert sent["systemInstruction"] == {"parts": [{"text": "S1"}, {"text": "S2"}]}
    assert sent["contents"] == [
        {"role": "user", "parts": [{"text": "u1"}]},
        {"role": "model", "parts": [{"text": "a1"}]},
        {"role": "user", "parts": [{"text": "u2"}, {"text": "u3"}]},  # the empty turn between them is dropped
    ]
    assert "generationConfig" not in sent and "tools" not in sent


def test_images_audio_and_files():
    parts = req(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp?size=2", "detail": "low"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/image"}},
                    {"type": "image_url", "image_url": {"url": "data:text/plain,hi%20there"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "mp3"}},
                    {
                        "type": "file",
                        "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
                    },
                ],
            }
        ]
    )["contents"][0]["parts"]
    assert parts == [
        {"text": "what is this?"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp?size=2"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/image"}},
        {"inlineData": {"mimeType": "text/plain", "data": "aGkgdGhlcmU="}},
        {"inlineData": {"mimeType": "audio/mp3", "data": "UklGRg=="}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
    ]
    with pytest.raises(BadRequest, match="content part `video_url`"):
        req(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}])


def test_tool_calls_and_results_round_trip():
    calls = [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location": "Boston, MA"}'},
            "extra_content": {"google": {"thought_signature": SIGNATURE}},
        },
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "not json"}},
    ]
    sent = req(
        messages=[
            {"role": "user", "content": "weather and time?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c": 21}'},
            {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "09:30"}]},
            {"role": "user", "content": "thanks"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "c3", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
            },
        ]
    )
    assert sent["contents"] == [
        {"role": "user", "parts": [{"text": "weather and time?"}]},
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"location": "Boston, MA"}},
                    "thoughtSignature": SIGNATURE,
                },
                {"functionCall": {"name": "get_time", "args": {"arguments": "not json"}}},  # no signature: not first
            ],
        },
        {  # parallel results answer one turn together; names come from the calls' ids
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp_c": 21}}},
                {"functionResponse": {"name": "get_time", "response": {"output": "09:30"}}},
            ],
        },
        {"role": "user", "parts": [{"text": "thanks"}]},  # not merged into the tool results' turn
        {  # another provider's history has no signature: Google's documented stand-in
            "role": "model",
            "parts": [{"functionCall": {"name": "f", "args": {"arguments": [1]}}, "thoughtSignature": SKIP_SIGNATURE}],
        },
    ]
    assert_valid_gemini_request(orjson.dumps(sent))
    with pytest.raises(BadRequest, match="answers no earlier tool call"):
        req(messages=[{"role": "tool", "tool_call_id": "nope", "content": "x"}])
    legacy = req(messages=[{"role": "tool", "tool_call_id": "nope", "name": "f", "content": "[1, 2]"}])
    assert legacy["contents"][0]["parts"][0]["functionResponse"] == {"name": "f", "response": {"output": [1, 2]}}


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_tool_choice(choice: Any, config: dict[str, Any]):
    sent = req(tools=[WEATHER], tool_choice=choice)
    assert sent["toolConfig"] == {"functionCallingConfig": config}
    assert_valid_gemini_request(orjson.dumps(sent))


def test_unknown_tool_choice_and_role_and_body_are_bad_requests():
    with pytest.raises(BadRequest, match="tool_choice"):
        req(tools=[WEATHER], tool_choice="sometimes")
    assert "toolConfig" not in req(tool_choice="none")  # no functions: nothing to configure
    with pytest.raises(BadRequest, match="role `critic`"):
        req(messages=[{"role": "critic", "content": "x"}])
    with pytest.raises(BadRequest, match="invalid request"):
        translate(b'{"messages": "nope"}', UPSTREAM_MODEL)


def test_function_declarations_strip_what_gemini_rejects():
    sent = req(
        tools=[
            WEATHER,
            {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
        ]
    )
    weather, now = sent["tools"][0]["functionDeclarations"]
    assert weather == {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "OBJECT",
            "properties": {
                "location": {"type": "STRING"},
                "unit": {"type": "STRING", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["location"],
        },
    }
    assert now == {"name": "now"}  # an empty parameter object is an error in Gemini; none is fine
    assert_valid_gemini_request(orjson.dumps(sent))


def test_schema_conversion():
    converted = schema(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number", "format": "double"}}}},
            "properties": {
                "p": {"$ref": "#/$defs/Point", "description": "where"},
                "maybe": {"type": ["string", "null"], "format": "email", "minLength": 1},
                "either": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
                "opt": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "kind": {"const": "point"},
                "level": {"type": "integer", "enum": [1, 2, 3], "exclusiveMinimum": 0},
                "when": {"type": "string", "format": "date-time"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                "free": {"type": "object", "properties": {}, "additionalProperties": True},
                "both": {"allOf": [{"type": "object", "properties": {"a": {"type": "boolean"}}}, {"required": ["a"]}]},
            },
            "required": ["p", "ghost"],
            "additionalProperties": False,
        }
    )
    assert converted == {
        "type": "OBJECT",
        "properties": {
            "p": {
                "type": "OBJECT",
                "properties": {"x": {"type": "NUMBER", "format": "double"}},
                "description": "where",
            },
            "maybe": {"type": "STRING", "nullable": True, "minLength": 1},
            "either": {"anyOf": [{"type": "INTEGER"}, {"type": "STRING"}]},
            "opt": {"type": "INTEGER", "nullable": True},
            "kind": {"type": "STRING", "enum": ["point"]},
            "level": {"type": "INTEGER"},
            "when": {"type": "STRING", "format": "date-time"},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}, "maxItems": 3},
            "free": {"type": "OBJECT"},
            "both": {"type": "OBJECT", "properties": {"a": {"type": "BOOLEAN"}}},
        },
        "required": ["p"],
    }
    types.Schema.model_validate_json(orjson.dumps(converted))
    assert_gemini_schema(converted)
    recursive = schema(
        {"$defs": {"N": {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}}}, "$ref": "#/$defs/N"}
    )
    depth = 0
    while "properties" in recursive:
        recursive, depth = recursive["properties"]["next"], depth + 1
    assert recursive == {"type": "OBJECT"} and depth == 16  # cut: Gemini schemas cannot recurse


def test_generation_config():
    sent = req(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        max_tokens=10,
        max_completion_tokens=20,
        stop="END",
        n=2,
        seed=1,
        presence_penalty=0.1,
        frequency_penalty=0.2,
        user="u-1",
        logit_bias={"1": 2},
    )
    assert sent["generationConfig"] == {
        "temperature": 0.5,
        "topP": 0.9,
        "topK": 40,
        "maxOutputTokens": 20,  # max_completion_tokens wins over the older max_tokens
        "candidateCount": 2,
        "seed": 1,
        "presencePenalty": 0.1,
        "frequencyPenalty": 0.2,
        "stopSequences": ["END"],
    }
    assert req(stop=["a", "b"])["generationConfig"] == {"stopSequences": ["a", "b"]}
    assert_valid_gemini_request(orjson.dumps(sent))


def test_response_format():
    js = {
        "type": "json_schema",
        "json_schema": {"name": "p", "strict": True, "schema": WEATHER["function"]["parameters"]},
    }
    sent = req(response_format=js)
    assert_valid_gemini_request(orjson.dumps(sent))
    config = sent["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"]["properties"]["location"] == {"type": "STRING"}
    assert "additionalProperties" not in config["responseSchema"]
    assert req(response_format={"type": "json_object"})["generationConfig"] == {"responseMimeType": "application/json"}
    assert "generationConfig" not in req(response_format={"type": "text"})
    types.GenerationConfig.model_validate_json(orjson.dumps(config))


@pytest.mark.parametrize(
    ("body", "thinking"),
    [
        ({"reasoning_effort": "low"}, {"thinkingBudget": 1024, "includeThoughts": True}),
        ({"reasoning_effort": "high"}, {"thinkingBudget": 24576, "includeThoughts": True}),
        ({"reasoning_effort": "none"}, {"thinkingBudget": 0, "includeThoughts": False}),
        ({"reasoning": {"max_tokens": 2000}}, {"thinkingBudget": 2000, "includeThoughts": True}),
        ({"reasoning": {"effort": "medium", "exclude": True}}, {"thinkingBudget": 8192, "includeThoughts": False}),
        ({"reasoning": {"enabled": True}}, {"thinkingBudget": -1, "includeThoughts": True}),
        ({"reasoning": {"enabled": False}}, {"thinkingBudget": 0, "includeThoughts": False}),
    ],
)
def test_reasoning_becomes_a_thinking_config(body: dict[str, Any], thinking: dict[str, Any]):
    assert req(**body)["generationConfig"]["thinkingConfig"] == thinking


def test_unknown_reasoning_effort_is_a_bad_request():
    with pytest.raises(BadRequest, match="reasoning effort `extreme`"):
        req(reasoning_effort="extreme")


def test_embeddings_both_ways():
    a = adapter()
    body = a.request_body(
        orjson.dumps({"model": MODEL, "input": ["a", "b"], "dimensions": 8}), MODEL, "text-embedding-004", False
    )
    assert orjson.loads(body) == {
        "requests": [
            {"model": "models/text-embedding-004", "content": {"parts": [{"text": t}]}, "outputDimensionality": 8}
            for t in ("a", "b")
        ]
    }
    one = orjson.loads(a.request_body(orjson.dumps({"model": MODEL, "input": "a"}), MODEL, "m", False))
    assert len(one["requests"]) == 1
    with pytest.raises(BadRequest, match="token arrays"):
        a.request_body(orjson.dumps({"model": MODEL, "input": [[1, 2]]}), MODEL, "m", False)
    out = orjson.loads(a.parse_response(b'{"embeddings": [{"values": [0.1, -0.2]}, {"values": [0.3, 0.4]}]}', "m"))
    assert out == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, -0.2]},
            {"object": "embedding", "index": 1, "embedding": [0.3, 0.4]},
        ],
        "model": "m",
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


# --- Response translation ------------------------------------------------------------------------------------


def test_text_parts_are_joined_and_thoughts_become_reasoning():
    out = parsed(
        {
            "candidates": [
                {
                    "content": {
                        "role": "model",
                        "parts": [{"text": "thinking…", "thought": True}, {"text": "Hel"}, {"text": "lo"}],
                    },
                    "finishReason": "STOP",
                },
                {"content": {"role": "model", "parts": [{"text": "Hi"}]}, "finishReason": "MAX_TOKENS", "index": 1},
            ]
        }
    )
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello", "reasoning": "thinking…"},
            "finish_reason": "stop",
        },
        {"index": 1, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "length"},
    ]
    assert "usage" not in out and out["model"] == UPSTREAM_MODEL and out["id"].startswith("chatcmpl-")


def test_function_calls_become_tool_calls_with_compact_arguments():
    out = parsed(gfix("chat_function_call.json"))
    [call] = out["choices"][0]["message"]["tool_calls"]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
    assert call["function"] == {"name": "get_weather", "arguments": '{"location":"Boston, MA","unit":"celsius"}'}
    assert call["extra_content"] == {"google": {"thought_signature": SIGNATURE}}
    named = parsed({"candidates": [{"content": {"parts": [{"functionCall": {"id": "fc-1", "name": "f"}}]}}]})
    assert named["choices"][0]["message"]["tool_calls"][0]["id"] == "fc-1"  # Gemini's own id when it gives one
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert named["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
    ],
)
def test_finish_reasons(reason: str, finish: str):
    out = parsed({"candidates": [{"finishReason": reason}]})  # a filtered candidate may carry no content
    assert out["choices"][0]["finish_reason"] == finish and out["choices"][0]["message"]["content"] == ""


def test_usage_counts_thoughts_once_and_cached_tokens_inside_the_prompt():
    out = parsed(gfix("chat_ok.json"))
    assert out["usage"] == OPENAI_TEXT["usage"]
    u = orjson.loads(gfix("chat_ok.json"))["usageMetadata"]
    assert out["usage"]["total_tokens"] == u["totalTokenCount"]  # nothing counted twice, nothing lost
    tools = parsed(
        {
            "candidates": [],
            "usageMetadata": {"promptTokenCount": 5, "toolUsePromptTokenCount": 3, "candidatesTokenCount": 2},
        }
    )
    assert tools["usage"]["prompt_tokens"] == 8 and tools["usage"]["total_tokens"] == 10


def test_prompt_block_is_an_empty_filtered_answer():
    out = parsed(gfix("chat_blocked.json"))
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "content_filter"}
    ]
    assert out["usage"]["prompt_tokens"] == 12 and out["usage"]["completion_tokens"] == 0


# --- Errors --------------------------------------------------------------------------------------------------


def test_classify_429_and_5xx_retryable_4xx_relayed():
    a = adapter()
    err = a.classify(429, gfix("chat_429.json"), CIMultiDict({"Content-Type": "application/json; charset=UTF-8"}))
    assert isinstance(err, UpstreamStatus) and err.retryable and err.upstream == "gem"
    assert err.upstream_headers["Retry-After"] == "41"
    assert orjson.loads(err.upstream_body)["error"]["type"] == "rate_limit_error"
    given_after = a.classify(429, gfix("chat_429.json"), CIMultiDict({"Retry-After": "3"}))
    assert given_after is not None and given_after.upstream_headers["Retry-After"] == "3"
    html = b"<html>502 Bad Gateway</html>"
    bad_gateway = a.classify(502, html, CIMultiDict())
    assert (
        bad_gateway is not None
        and bad_gateway.upstream_body == html
        and "Retry-After" not in bad_gateway.upstream_headers
    )
    assert a.classify(400, gfix("chat_400.json"), CIMultiDict()) is None
    assert a.classify(403, b"{}", CIMultiDict()) is None


def test_error_bodies_become_openai_shaped():
    a = adapter()
    assert orjson.loads(a.error_body(400, gfix("chat_400.json"))) == {
        "error": {
            "message": orjson.loads(gfix("chat_400.json"))["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "INVALID_ARGUMENT",
        }
    }
    wrapped = b'[{"error": {"code": 403, "message": "denied", "status": "PERMISSION_DENIED"}}]'
    assert orjson.loads(a.error_body(403, wrapped))["error"]["type"] == "permission_error"
    assert a.error_body(404, b"Not Found") == b"Not Found"


# --- Streams -------------------------------------------------------------------------------------------------


def _event(doc: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\r\n\r\n"


def test_first_chunk_has_the_role_and_commits_on_content():
    out = chunks(transcode([gfix("stream_ok.sse")]))
    assert out[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert [c["choices"][0]["delta"].get("content") for c in out[1:4]] == ["Hello", "! How can I help", " you today?"]
    assert [c["choices"][0]["finish_reason"] for c in out[1:4]] == [None, None, "stop"]
    assert out[-1]["choices"] == [] and out[-1]["usage"] == OPENAI_TEXT["usage"]
    assert {c["id"] for c in out} == {"chatcmpl-Q2vmaOLmC9Tr7M8PqN6nuQ4"} and {c["model"] for c in out} == {
        UPSTREAM_MODEL
    }
    tx = adapter().new_transcoder(UPSTREAM_MODEL)
    first = tx.feed(gemini_events(gfix("stream_ok.sse"))[0])
    role, text = first.split(b"\n\n")[:2]
    assert classify_event(role) == _NOTHING and classify_event(text) == _CONTENT  # held back, then committed


def test_parallel_calls_in_one_event_get_consecutive_indices():
    calls = [{"functionCall": {"name": n, "args": {"i": i}}} for i, n in enumerate(("a", "b", "c"))]
    out = chunks(
        transcode(
            [
                _event({"candidates": [{"content": {"parts": calls[:2]}}]}),
                _event({"candidates": [{"content": {"parts": calls[2:]}, "finishReason": "STOP"}]}),
            ]
        )
    )
    deltas = [tc for c in out for ch in c["choices"] for tc in ch["delta"].get("tool_calls", ())]
    assert [(tc["index"], tc["function"]["name"], tc["function"]["arguments"]) for tc in deltas] == [
        (0, "a", '{"i":0}'),
        (1, "b", '{"i":1}'),
        (2, "c", '{"i":2}'),
    ]
    assert out[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_candidates_stream_as_separate_choices():
    out = chunks(
        transcode(
            [
                _event(
                    {
                        "candidates": [
                            {"content": {"parts": [{"text": "A"}]}, "index": 0},
                            {"content": {"parts": [{"text": "B"}]}, "index": 1},
                        ]
                    }
                ),
                _event(
                    {"candidates": [{"finishReason": "STOP", "index": 0}, {"finishReason": "MAX_TOKENS", "index": 1}]}
                ),
            ]
        )
    )
    by_index: dict[int, list[Any]] = {}
    for c in out:
        for ch in c["choices"]:
            by_index.setdefault(ch["index"], []).append((ch["delta"], ch["finish_reason"]))
    assert by_index[0] == [({"role": "assistant", "content": ""}, None), ({"content": "A"}, None), ({}, "stop")]
    assert by_index[1] == [({"role": "assistant", "content": ""}, None), ({"content": "B"}, None), ({}, "length")]


def test_stream_error_event_raises_an_openai_shaped_upstream_error():
    tx = adapter().new_transcoder(UPSTREAM_MODEL)
    tx.feed(gemini_events(gfix("stream_ok.sse"))[0])
    with pytest.raises(UpstreamStatus) as e:
        tx.feed(
            b'data: {"error": {"code": 429, "message": "Resource exhausted.", "status": "RESOURCE_EXHAUSTED"}}\r\n\r\n'
        )
    assert e.value.upstream_status == 429 and e.value.upstream == "gem"
    assert orjson.loads(e.value.upstream_body)["error"]["type"] == "rate_limit_error"
    event = e.value.sse_event()  # what pipe() writes to the client once the stream is under way
    assert event.endswith(DONE)
    assert "Resource exhausted." in orjson.loads(event.split(b"\n\n")[0].removeprefix(b"data: "))["error"]["message"]
    tx = adapter().new_transcoder(UPSTREAM_MODEL)  # content and error in one read: the content goes out first
    error = b'data: {"error": {"code": 500, "message": "Internal.", "status": "INTERNAL"}}\r\n\r\n'
    assert b"Hello" in tx.feed(gemini_events(gfix("stream_ok.sse"))[0] + error)
    with pytest.raises(UpstreamStatus):
        tx.finish()
    with pytest.raises(UpstreamProtocolError, match="unreadable event"):
        adapter().new_transcoder(UPSTREAM_MODEL).feed(b"data: {not json\r\n\r\n")


def test_stream_edges():
    assert transcode([]) == DONE  # nothing came: the stream still ends properly
    unterminated = gemini_events(gfix("stream_ok.sse"))
    unterminated[-1] = unterminated[-1].rstrip()  # the last event without its blank line
    assert chunks(transcode(unterminated))[-2]["choices"][0]["finish_reason"] == "stop"
    lf = gfix("stream_ok.sse").replace(b"\r\n", b"\n")  # LF framing reads the same
    assert _normalised(transcode([lf])) == _normalised(transcode([gfix("stream_ok.sse")]))


STREAMS = ("stream_ok.sse", "stream_function_calls.sse", "stream_thinking.sse")


def _normalised(stream: bytes) -> bytes:
    """Per-stream values (time, generated call ids) masked: everything else must be byte-identical."""
    return re.sub(rb'"call_[0-9a-f]{24}"', b'"call_X"', re.sub(rb'"created":\d+', b'"created":0', stream))


@pytest.mark.parametrize("name", STREAMS)
def test_every_single_cut_point_transcodes_identically(name: str):
    raw = gfix(name)
    whole = _normalised(transcode([raw]))
    for i in range(len(raw) + 1):
        assert _normalised(transcode([raw[:i], raw[i:]])) == whole, i


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(STREAMS), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=40))
def test_streams_split_anywhere_transcode_identically(name: str, cuts: list[int]):
    raw = gfix(name)
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert _normalised(transcode(pieces)) == _normalised(transcode([raw]))


def test_transcoder_is_the_adapters():
    assert isinstance(adapter().new_transcoder(UPSTREAM_MODEL), GeminiTranscoder)


# --- properties: any chat body the gateway passes on, any event stream ---


@settings(max_examples=100)
@given(body=chat_bodies)
def test_any_accepted_chat_body_is_translated_or_refused_with_a_400(body):
    """Never another exception: that would be a 500 for what is the client's mistake."""
    if not accepted("chat", body):
        return
    try:
        out = orjson.loads(translate(body, UPSTREAM_MODEL))
    except BadRequest:
        return
    assert isinstance(out["contents"], list)


_G_KEYS = ["candidates", "content", "parts", "text", "thought", "thoughtSignature", "functionCall", "name", "args"]
_G_KEYS += ["id", "role", "finishReason", "index", "usageMetadata", "promptTokenCount", "candidatesTokenCount"]
_G_KEYS += ["totalTokenCount", "thoughtsTokenCount", "cachedContentTokenCount", "modelVersion", "responseId"]
_G_KEYS += ["promptFeedback", "blockReason", "error", "code", "message", "status", "safetyRatings"]
_G_WORDS = ["model", "STOP", "MAX_TOKENS", "SAFETY", "RECITATION", "MALFORMED_FUNCTION_CALL", "OTHER", "BLOCKLIST"]
_G_WORDS += ["RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "f", "{}"]
any_gemini_events = st.builds(
    lambda data: b"data: " + orjson.dumps(data) + b"\r\n\r\n",
    st.dictionaries(st.sampled_from(_G_KEYS), json_like(_G_KEYS, _G_WORDS), max_size=4),
)


@settings(max_examples=100)
@given(events=st.lists(any_gemini_events | st.binary(max_size=8), max_size=8))
def test_any_event_stream_gives_openai_chunks_or_an_upstream_error(events):
    tx = GeminiTranscoder(UPSTREAM_MODEL, "gemini")
    try:
        out = tx.feed(b"".join(events)) + tx.finish()
    except UpstreamError:
        return
    assert out.endswith(DONE)
    for event in out.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ")
        if event != DONE.strip():
            assert isinstance(orjson.loads(event[6:]), dict)
