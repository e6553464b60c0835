"""The Anthropic adapter: fixtures the official `anthropic` SDK accepts, requests Anthropic's own request types
accept, and through the gateway the official `openai` SDK gets what an OpenAI upstream would have given it.

Fixtures (tests/fixtures/anthropic/) pair up: stream_ok.sse is chat_ok.json streamed, stream_tools.sse is
chat_tool_use.json streamed, so "stream and non-stream give the same completion" is checked on both sides.
"""

from __future__ import annotations

import itertools
import timeit
from typing import Any

import anthropic
import msgspec
import openai
import orjson
import pydantic
import pytest
from anthropic.types import message_create_params
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from adapters.anthropic import AnthropicAdapter, AnthropicTranscoder, openai_error, openai_usage
from adapters.anthropic_request import DEFAULT_MAX_TOKENS, JSON_TOOL, build_request
from adapters.base import DONE
from proxy.config import ProviderConfig
from proxy.errors import BadRequest, UpstreamError, UpstreamStatus
from tests.conftest import KEY, gateway_config
from tests.fakes import FakeUpstream, Script, fixture, sse_events
from tests.unit.test_request_validation import accepted, chat_bodies, json_like

MODEL = "anthropic/claude-sonnet-4"
UPSTREAM = "claude-sonnet-4-20250514"
STREAMS = ("stream_ok.sse", "stream_tools.sse", "stream_thinking.sse")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}, "unit": {"type": "string"}},
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
        },
    },
]


def anth(name: str) -> bytes:
    return fixture(name, "anthropic")


def translate(**req: Any) -> dict[str, Any]:
    req.setdefault("model", MODEL)
    req.setdefault("messages", [{"role": "user", "content": "hi"}])
    return orjson.loads(build_request(orjson.dumps(req), UPSTREAM))


_REQUEST_TYPES = {
    False: pydantic.TypeAdapter(message_create_params.MessageCreateParamsNonStreaming),
    True: pydantic.TypeAdapter(message_create_params.MessageCreateParamsStreaming),
}


def _materialize(v: Any) -> Any:
    """pydantic validates `Iterable` fields lazily; iterating them runs the validation."""
    if isinstance(v, dict):
        return {k: _materialize(x) for k, x in v.items()}
    if isinstance(v, list | tuple) or type(v).__name__ == "ValidatorIterator":
        return [_materialize(x) for x in v]
    return v


def assert_valid_anthropic_request(body: dict[str, Any]) -> None:
    """Valid per the anthropic SDK's own request types; equality also proves no unknown key (they'd be dropped).

    The installed SDK (2.14) no longer declares the sampling parameters, which the API reference still
    documents (numbers), so they are checked apart.
    """
    body = dict(body)
    for name in ("temperature", "top_p", "top_k"):
        assert isinstance(body.pop(name, 0), int | float)
    validated = _REQUEST_TYPES[bool(body.get("stream"))].validate_python(body)
    assert _materialize(validated) == body


def transcode(data: bytes, pieces: list[int] | None = None) -> bytes:
    """Feed `data` cut at the given offsets, then finish."""
    tx = AnthropicTranscoder(UPSTREAM, created=1_700_000_000)
    cuts = [0, *sorted(set(pieces or ())), len(data)]
    return b"".join(tx.feed(data[a:b]) for a, b in itertools.pairwise(cuts)) + tx.finish()


def chunks_of(stream: bytes) -> list[dict[str, Any]]:
    events = [e.removeprefix(b"data: ") for e in stream.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and b"[DONE]" not in events[:-1]
    return [orjson.loads(e) for e in events[:-1]]


def anthropic_client(fake: FakeUpstream) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=fake.base_url.removesuffix("/v1"), api_key="sk-ant-test", max_retries=0)


def openai_client(gw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)


def config(*names: str, **kw: Any) -> Any:
    """Anthropic providers (name → fake URL given as kwargs `urls`), one public model served by all of them."""
    urls: dict[str, str] = kw.pop("urls")
    return gateway_config(
        urls, adapter="anthropic", models={MODEL: [(n, UPSTREAM) for n in names]}, hedge={"enabled": False}, **kw
    )


# --- the fixtures are what Anthropic sends: the official SDK reads them ---


@pytest.mark.parametrize(
    ("body", "stream"), [("chat_ok.json", "stream_ok.sse"), ("chat_tool_use.json", "stream_tools.sse")]
)
async def test_sdk_reads_fixtures_and_each_stream_accumulates_to_its_message(fake_upstream, body, stream):
    fake_upstream.script(Script(body=anth(body)), Script(sse=sse_events(anth(stream))))
    client = anthropic_client(fake_upstream)
    whole = await client.messages.create(model=UPSTREAM, max_tokens=1024, messages=[{"role": "user", "content": "hi"}])
    async with client.messages.stream(
        model=UPSTREAM, max_tokens=1024, messages=[{"role": "user", "content": "hi"}]
    ) as s:
        streamed = await s.get_final_message()
    assert streamed.model_dump() == whole.model_dump()
    assert [r.path for r in fake_upstream.requests] == ["/v1/messages", "/v1/messages"]
    await client.close()


async def test_sdk_reads_the_thinking_stream(fake_upstream):
    fake_upstream.script(Script(sse=sse_events(anth("stream_thinking.sse"))))
    client = anthropic_client(fake_upstream)
    async with client.messages.stream(
        model=UPSTREAM,
        max_tokens=8192,
        thinking={"type": "enabled", "budget_tokens": 4096},
        messages=[{"role": "user", "content": "gcd(1071, 462)?"}],
    ) as s:
        message = await s.get_final_message()
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.thinking.endswith("So the GCD is 21.") and thinking.signature
    assert text.type == "text" and text.text.endswith("**21**.")
    assert message.usage.output_tokens == 197
    await client.close()


@pytest.mark.parametrize(
    ("status", "name", "error"),
    [(429, "chat_429.json", anthropic.RateLimitError), (529, "chat_529.json", anthropic.OverloadedError),
     (400, "chat_400.json", anthropic.BadRequestError)],
)  # fmt: skip
async def test_sdk_reads_error_fixtures(fake_upstream, status, name, error):
    fake_upstream.script(Script(status=status, body=anth(name)))
    client = anthropic_client(fake_upstream)
    with pytest.raises(error) as e:
        await client.messages.create(model=UPSTREAM, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == status and e.value.body["error"]["message"]  # type: ignore[index]
    await client.close()


# --- through the gateway: the openai SDK sees an OpenAI provider ---


async def test_openai_sdk_non_stream_gets_text_usage_and_a_valid_anthropic_request(fake_upstream, gateway):
    fake_upstream.script(Script(body=anth("chat_ok.json")))
    gw = await gateway(config("claude", urls={"claude": fake_upstream.base_url}))
    client = openai_client(gw)
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "again"},
        ],
        max_completion_tokens=256,
        stop=["END"],
        user="user-42",
        seed=7,
        frequency_penalty=0.5,
    )
    assert completion.id == "chatcmpl-01XFDUDYJgAACzvnptvVoYEL" and completion.model == UPSTREAM
    choice = completion.choices[0]
    assert choice.message.content == "Hello! How can I help you today?" and choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2316, 12, 2328)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 2048
    assert usage.prompt_tokens_details.cache_write_tokens == 256  # a field of the openai SDK too
    [seen] = fake_upstream.requests
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == "sk-upstream-claude" and seen.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in seen.headers
    sent = orjson.loads(seen.body)
    assert_valid_anthropic_request(sent)
    assert sent == {
        "model": UPSTREAM,
        "max_tokens": 256,
        "system": "You are terse.",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "again"},
        ],
        "stop_sequences": ["END"],
        "metadata": {"user_id": "user-42"},
    }
    await client.close()


async def _stream_final(client: openai.AsyncOpenAI, **req: Any) -> tuple[Any, list[Any]]:
    """The stream helper's final completion, and every chunk it saw."""
    chunks = []
    async with client.chat.completions.stream(model=MODEL, **req) as s:
        async for event in s:
            if event.type == "chunk":
                chunks.append(event.chunk)
        return await s.get_final_completion(), chunks


async def test_parallel_tool_calls_stream_and_non_stream_give_the_same_completion(fake_upstream, gateway):
    fake_upstream.script(Script(body=anth("chat_tool_use.json")), Script(sse=sse_events(anth("stream_tools.sse"))))
    gw = await gateway(config("claude", urls={"claude": fake_upstream.base_url}))
    client = openai_client(gw)
    req: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Weather in Paris, time in London?"}],
        "tools": TOOLS,
        "tool_choice": "auto",
    }
    whole = await client.chat.completions.create(model=MODEL, **req)
    streamed, chunks = await _stream_final(client, **req)
    for completion in (whole, streamed):
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "I'll check the weather in Paris and the time in London."
        calls = [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in choice.message.tool_calls or ()]
        assert calls == [
            ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", {"location": "Paris, France", "unit": "celsius"}),
            ("toolu_01VpGpFzSXjbj5Q1AHQ3Dgnf", "get_time", {"timezone": "Europe/London"}),
        ]
        usage = completion.usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2272, 89)
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 1800
    starts = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or () if tc.id]
    assert [(tc.index, tc.id) for tc in starts] == [
        (0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6"),
        (1, "toolu_01VpGpFzSXjbj5Q1AHQ3Dgnf"),
    ]
    assert all(c.id == streamed.id for c in chunks) and streamed.id == whole.id
    sent = [orjson.loads(r.body) for r in fake_upstream.requests]
    for body in sent:
        assert_valid_anthropic_request(body)
        assert body["tools"][0] == {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": TOOLS[0]["function"]["parameters"],
        }
        assert body["tool_choice"] == {"type": "auto"} and body["max_tokens"] == DEFAULT_MAX_TOKENS
    assert sent[1]["stream"] is True and "stream" not in sent[0]
    await client.close()


async def test_text_stream_matches_the_non_stream_completion(fake_upstream, gateway):
    fake_upstream.script(Script(body=anth("chat_ok.json")), Script(sse=sse_events(anth("stream_ok.sse"))))
    gw = await gateway(config("claude", urls={"claude": fake_upstream.base_url}))
    client = openai_client(gw)
    req: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    whole = await client.chat.completions.create(model=MODEL, **req)
    streamed, _ = await _stream_final(client, **req)
    keep = {"id", "model", "usage"}
    assert streamed.model_dump(include=keep) == whole.model_dump(include=keep)
    message = {"role", "content", "refusal", "tool_calls"}  # the helper's message also has `parsed`
    for a, b in zip(streamed.choices, whole.choices, strict=True):
        assert (a.index, a.finish_reason) == (b.index, b.finish_reason)
        assert a.message.model_dump(include=message) == b.message.model_dump(include=message)
    await client.close()


async def test_reasoning_stream_carries_thinking_as_reasoning(fake_upstream, gateway):
    fake_upstream.script(Script(sse=sse_events(anth("stream_thinking.sse"))))
    gw = await gateway(config("claude", urls={"claude": fake_upstream.base_url}))
    client = openai_client(gw)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "gcd(1071, 462)?"}],
        reasoning_effort="medium",
        stream=True,
        stream_options={"include_usage": True},
    )
    reasoning, text, finish, usage = [], [], None, None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning.append(getattr(delta, "reasoning", None) or "")
            text.append(delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(reasoning).endswith("So the GCD is 21.") and "".join(text).endswith("is **21**.")
    assert finish == "stop" and usage is not None and usage.completion_tokens == 197
    sent = orjson.loads(fake_upstream.requests[0].body)
    assert_valid_anthropic_request(sent)
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert sent["max_tokens"] == DEFAULT_MAX_TOKENS + 4096
    await client.close()


@pytest.mark.parametrize(("status", "name"), [(429, "chat_429.json"), (529, "chat_529.json")])
@pytest.mark.parametrize("stream", [False, True])
async def test_429_and_529_fail_over_to_a_healthy_provider(aiohttp_server, gateway, status, name, stream):
    fakes = {n: FakeUpstream() for n in ("busy", "ok")}
    for fake in fakes.values():
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    fakes["busy"].script(Script(status=status, body=anth(name)))
    fakes["ok"].script(Script(body=anth("chat_ok.json"), sse=sse_events(anth("stream_ok.sse")) if stream else None))
    gw = await gateway(config("busy", "ok", urls={n: f.base_url for n, f in fakes.items()}))
    client = openai_client(gw)
    req: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "extra_body": {"provider": {"order": ["busy", "ok"]}},
    }
    if stream:
        text = [
            c.choices[0].delta.content or ""
            async for c in await client.chat.completions.create(**req, stream=True)
            if c.choices
        ]
        assert "".join(text) == "Hello! How can I help you today?"
    else:
        completion = await client.chat.completions.create(**req)
        assert completion.choices[0].message.content == "Hello! How can I help you today?"
    assert (len(fakes["busy"].requests), len(fakes["ok"].requests)) == (1, 1)
    await client.close()


async def test_error_event_before_the_first_token_fails_over(aiohttp_server, gateway):
    fakes = {n: FakeUpstream() for n in ("flaky", "ok")}
    for fake in fakes.values():
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    events = sse_events(anth("stream_ok.sse"))
    overloaded = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    fakes["flaky"].script(Script(sse=[events[0], events[1], overloaded]))
    fakes["ok"].script(Script(sse=events))
    gw = await gateway(config("flaky", "ok", urls={n: f.base_url for n, f in fakes.items()}))
    client = openai_client(gw)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"provider": {"order": ["flaky", "ok"]}},
    )
    text = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(text) == "Hello! How can I help you today?"
    assert (len(fakes["flaky"].requests), len(fakes["ok"].requests)) == (1, 1)
    await client.close()


async def test_400_is_relayed_in_openai_shape_without_failover(aiohttp_server, gateway, http):
    fakes = {n: FakeUpstream() for n in ("claude", "other")}
    for fake in fakes.values():
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
    fakes["claude"].script(Script(status=400, body=anth("chat_400.json")))
    gw = await gateway(config("claude", "other", urls={n: f.base_url for n, f in fakes.items()}))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}
    body["provider"] = {"order": ["claude", "other"]}
    async with http.post(gw.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status == 400 and r.headers["Content-Type"].startswith("application/json")
        assert orjson.loads(await r.read()) == {
            "error": {
                "message": orjson.loads(anth("chat_400.json"))["error"]["message"],
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_request_error",
            }
        }
    assert (len(fakes["claude"].requests), len(fakes["other"].requests)) == (1, 0)
    client = openai_client(gw)  # and the SDK surfaces Anthropic's message
    with pytest.raises(openai.BadRequestError, match="maximum allowed number of output tokens"):
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"provider": body["provider"]}
        )
    await client.close()


async def test_429_from_the_only_provider_reaches_the_client_in_openai_shape(fake_upstream, gateway):
    fake_upstream.script(Script(status=429, body=anth("chat_429.json"), headers={"Retry-After": "7"}))
    gw = await gateway(config("claude", urls={"claude": fake_upstream.base_url}))
    client = openai_client(gw)
    with pytest.raises(openai.RateLimitError) as e:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.headers["Retry-After"] == "7"
    err = e.value.body
    assert isinstance(err, dict) and err["type"] == "rate_limit_error" and err["code"] == "rate_limit_error"
    assert err["message"].startswith("This request would exceed the rate limit")
    await client.close()


async def test_n_above_1_is_refused_before_any_upstream_call(fake_upstream, gateway):
    gw = await gateway(config("claude", urls={"claude": fake_upstream.base_url}))
    client = openai_client(gw)
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "n"
    assert fake_upstream.requests == []
    await client.close()


# --- request translation ---


def test_system_and_developer_messages_join_into_system():
    out = translate(
        messages=[
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "hi"},
        ]
    )
    assert out["system"] == "Be terse.\n\nAnswer in French."
    assert out["messages"] == [{"role": "user", "content": "hi"}]
    assert_valid_anthropic_request(out)


def test_system_with_cache_control_stays_blocks():
    long = {"type": "text", "text": "A long style guide.", "cache_control": {"type": "ephemeral"}}
    out = translate(messages=[{"role": "system", "content": [long]}, {"role": "system", "content": "x"}])
    assert out["system"] == [long, {"type": "text", "text": "x"}]
    assert_valid_anthropic_request(out)


def test_images_data_url_and_https_url_and_cache_control_on_parts():
    out = translate(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                    {
                        "type": "file",
                        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="},
                    },
                ],
            }
        ]
    )
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
    ]
    assert_valid_anthropic_request(out)


def test_tool_calls_and_consecutive_tool_results_make_one_user_turn():
    out = translate(
        messages=[
            {"role": "user", "content": "Weather in Paris, time in London?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
                    },
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
            {"role": "user", "content": "And tomorrow?"},
        ],
        tools=TOOLS,
    )
    assert out["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"location": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18°C"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    assert_valid_anthropic_request(out)


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ({"type": "function", "function": {"name": "get_time"}}, None, {"type": "tool", "name": "get_time"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, None, None),
    ],
)
def test_tool_choice(choice, parallel, expected):
    req: dict[str, Any] = {"tools": TOOLS}
    if choice is not None:
        req["tool_choice"] = choice
    if parallel is not None:
        req["parallel_tool_calls"] = parallel
    out = translate(**req)
    assert out.get("tool_choice") == expected
    assert [t["name"] for t in out["tools"]] == ["get_weather", "get_time"]
    assert out["tools"][1]["input_schema"] == TOOLS[1]["function"]["parameters"]
    assert_valid_anthropic_request(out)


@pytest.mark.parametrize(
    ("req", "max_tokens", "thinking"),
    [
        ({}, DEFAULT_MAX_TOKENS, None),
        ({"max_tokens": 100}, 100, None),
        ({"max_completion_tokens": 200, "max_tokens": 100}, 200, None),
        ({"reasoning_effort": "low"}, DEFAULT_MAX_TOKENS + 1024, 1024),
        ({"reasoning_effort": "medium"}, DEFAULT_MAX_TOKENS + 4096, 4096),
        ({"reasoning_effort": "high", "max_tokens": 32000}, 32000, 16384),
        ({"reasoning_effort": "none"}, DEFAULT_MAX_TOKENS, None),
        ({"reasoning": {"max_tokens": 2000}}, DEFAULT_MAX_TOKENS + 2000, 2000),
        ({"reasoning": {"effort": "high"}}, DEFAULT_MAX_TOKENS + 16384, 16384),
        ({"reasoning": {"enabled": False}, "reasoning_effort": "high"}, DEFAULT_MAX_TOKENS, None),
    ],
)
def test_max_tokens_and_thinking_budget(req, max_tokens, thinking):
    out = translate(**req)
    assert out["max_tokens"] == max_tokens
    assert out.get("thinking") == (None if thinking is None else {"type": "enabled", "budget_tokens": thinking})
    assert_valid_anthropic_request(out)


def test_sampling_stop_stream_and_user():
    out = translate(temperature=0.3, top_p=0.9, top_k=40, stop="###", stream=True, user="u-1")
    assert (out["temperature"], out["top_p"], out["top_k"]) == (0.3, 0.9, 40)
    assert out["stop_sequences"] == ["###"] and out["stream"] is True and out["metadata"] == {"user_id": "u-1"}
    assert translate(stop=["a", "b"])["stop_sequences"] == ["a", "b"]
    assert_valid_anthropic_request(out)


def test_openai_only_fields_are_dropped():
    dropped = {
        "n": 1,
        "logprobs": True,
        "top_logprobs": 2,
        "logit_bias": {"50256": -100},
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "seed": 1,
        "stream_options": {"include_usage": True},
        "store": True,
        "metadata": {"tag": "x"},
        "service_tier": "default",
        "modalities": ["text"],
        "prediction": {"type": "content", "content": "x"},
        "provider": {"order": ["a"]},
        "models": ["x/y"],
    }
    out = translate(**dropped)
    assert out == {"model": UPSTREAM, "max_tokens": DEFAULT_MAX_TOKENS, "messages": [{"role": "user", "content": "hi"}]}


def test_json_schema_becomes_a_forced_tool_and_comes_back_as_content():
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    out = translate(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert out["tools"] == [{"name": JSON_TOOL, "description": out["tools"][0]["description"], "input_schema": schema}]
    assert out["tool_choice"] == {"type": "tool", "name": JSON_TOOL}
    assert_valid_anthropic_request(out)
    with_tools = translate(tools=TOOLS, response_format={"type": "json_object"})
    assert with_tools["tool_choice"] == {"type": "any"} and len(with_tools["tools"]) == 3
    message = orjson.loads(anth("chat_tool_use.json"))
    message["content"] = [{"type": "tool_use", "id": "toolu_1", "name": JSON_TOOL, "input": {"answer": 21}}]
    completion = orjson.loads(adapter().parse_response(orjson.dumps(message), UPSTREAM))
    choice = completion["choices"][0]
    assert choice["message"]["content"] == '{"answer":21}' and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"
    stream = anth("stream_tools.sse").replace(b'"name":"get_weather"', b'"name":"%s"' % JSON_TOOL.encode())
    chunks = chunks_of(transcode(stream))
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content.endswith('London.{"location": "Paris, France", "unit": "celsius"}')
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", ())]
    assert {tc["index"] for tc in calls} == {0}  # get_time is tool call 0 now
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


def _user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


_BAD_CALL = {"id": "c", "function": {"name": "f", "arguments": "[1]"}}


@pytest.mark.parametrize(
    ("req", "param"),
    [
        ({"n": 2}, "n"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"reasoning": {"max_tokens": "lots"}}, "reasoning.max_tokens"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
        ({"tool_choice": "sometimes", "tools": TOOLS}, "tool_choice"),
        ({"response_format": {"type": "json_object"}, "reasoning_effort": "low"}, "response_format"),
        ({"response_format": {"type": "grammar"}}, "response_format.type"),
        ({"messages": _user({"type": "input_audio", "input_audio": {}})}, "messages[0].content[0].type"),
        (
            {"messages": _user({"type": "image_url", "image_url": {"url": "ftp://x"}})},
            "messages[0].content[0].image_url.url",
        ),
        ({"messages": _user({"type": "file", "file": {"file_id": "file-1"}})}, "messages[0].content[0].file"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "tool_calls": [_BAD_CALL]}]}, "messages[0].tool_calls[0].function"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
        ({"tools": [{"type": "function", "function": {"name": JSON_TOOL}}]}, "tools[0].function.name"),
    ],
)
def test_what_cannot_map_is_a_400_naming_the_field(req, param):
    with pytest.raises(BadRequest) as e:
        translate(**req)
    assert e.value.param == param


# --- responses, streams and errors ---


def adapter() -> AnthropicAdapter:
    provider = ProviderConfig(name="claude", adapter="anthropic", base_url="https://api.anthropic.com/v1", api_key="k")
    return AnthropicAdapter(provider, "https://api.anthropic.com/v1")


def test_targets_and_headers():
    a = adapter()
    chat, models = a.target("chat", UPSTREAM, True), a.target("models")
    assert chat is not None and chat.url == "https://api.anthropic.com/v1/messages" and chat.method == "POST"
    assert models is not None and models.url == "https://api.anthropic.com/v1/models" and models.method == "GET"
    assert chat.headers["x-api-key"] == "k" and chat.headers["anthropic-version"] == "2023-06-01"
    assert a.target("completions") is None and a.target("embeddings") is None


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("refusal", "content_filter"), ("pause_turn", "stop"), ("model_context_window_exceeded", "length")],
)  # fmt: skip
def test_stop_reasons(stop_reason, finish):
    message = orjson.loads(anth("chat_tool_use.json"))
    message["stop_reason"] = stop_reason
    completion = orjson.loads(adapter().parse_response(orjson.dumps(message), UPSTREAM))
    assert completion["choices"][0]["finish_reason"] == finish
    stream = anth("stream_tools.sse").replace(b'"stop_reason":"tool_use"', b'"stop_reason":"%s"' % stop_reason.encode())
    finishes = [c["choices"][0]["finish_reason"] for c in chunks_of(transcode(stream)) if c["choices"]]
    assert finishes[-1] == finish and finishes.count(None) == len(finishes) - 1


def test_thinking_blocks_become_reasoning_and_usage_is_counted_once():
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": UPSTREAM,
        "content": [
            {"type": "thinking", "thinking": "Let me think.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "xyz"},
            {"type": "text", "text": "Twenty"},
            {"type": "text", "text": "-one."},
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 1000,
            "output_tokens": 50,
            "output_tokens_details": {"thinking_tokens": 30},
        },
    }
    out = orjson.loads(adapter().parse_response(orjson.dumps(message), "fallback"))
    assert out["id"] == "chatcmpl-1" and out["object"] == "chat.completion" and out["model"] == UPSTREAM
    assert out["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Twenty-one.",
        "refusal": None,
        "reasoning": "Let me think.",
    }
    assert out["usage"] == {
        "prompt_tokens": 1110,
        "completion_tokens": 50,
        "total_tokens": 1160,
        "prompt_tokens_details": {"cached_tokens": 1000, "cache_write_tokens": 100},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }


def test_stream_chunks_are_valid_openai_chunks_with_one_id():
    from openai.types.chat import ChatCompletionChunk

    for name in STREAMS:
        chunks = chunks_of(transcode(anth(name)))
        for c in chunks:
            ChatCompletionChunk.model_validate(c)
            assert c["object"] == "chat.completion.chunk" and c["created"] == 1_700_000_000 and c["model"] == UPSTREAM
        assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_stream_error_event_becomes_an_openai_error_and_ends_the_stream():
    events = sse_events(anth("stream_ok.sse"))
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
    out = transcode(b"".join([*events[:4], error, *events[4:]]))
    tail = out.split(b"\n\n")[-3:]
    assert tail[-2:] == [b"data: [DONE]", b""]
    assert orjson.loads(tail[0].removeprefix(b"data: ")) == {
        "error": {"message": "Overloaded", "type": "service_unavailable", "param": None, "code": "overloaded_error"}
    }
    assert out.count(b"[DONE]") == 1 and b" today?" not in out  # nothing after the error


def test_a_stream_cut_before_message_stop_ends_with_an_error_not_a_clean_done():
    events = sse_events(anth("stream_ok.sse"))
    out = transcode(b"".join(events[:5]))
    assert b'"code":"api_error"' in out and out.endswith(DONE) and b'"usage"' not in out
    garbage = transcode(events[0] + b"data: {not json\n\n")
    assert b"unreadable" in garbage and garbage.endswith(DONE)
    assert transcode(b"") == b'data: {"error":{"message":"the upstream stream ended before message_stop",' \
        b'"type":"server_error","param":null,"code":"api_error"}}\n\n' + DONE  # fmt: skip


def test_pings_unknown_events_and_anything_after_message_stop_are_dropped():
    events = sse_events(anth("stream_ok.sse"))
    noisy = [
        events[0],
        b": comment\n\n",
        b'event: future_event\ndata: {"type":"future_event","x":1}\n\n',
        *events[1:],
        events[3],
    ]
    assert transcode(b"".join(noisy)) == transcode(anth("stream_ok.sse"))
    crlf = anth("stream_ok.sse").replace(b"\n", b"\r\n")
    assert transcode(crlf) == transcode(anth("stream_ok.sse"))


@pytest.mark.parametrize(
    ("status", "name", "retryable", "type_"),
    [(429, "chat_429.json", True, "rate_limit_error"), (529, "chat_529.json", True, "service_unavailable"),
     (500, None, True, "server_error"), (503, None, True, "server_error"), (400, "chat_400.json", False, ""),
     (404, None, False, "")],
)  # fmt: skip
def test_classify_keeps_the_message_in_openai_shape(status, name, retryable, type_):
    body = anth(name) if name else b"<html>upstream trouble</html>"
    err = adapter().classify(status, body, CIMultiDict({"Retry-After": "3"}))
    if not retryable:
        assert err is None
        return
    assert isinstance(err, UpstreamStatus) and err.retryable and err.upstream == "claude"
    assert err.upstream_headers == {"Content-Type": "application/json", "Retry-After": "3"}
    doc = orjson.loads(err.upstream_body)["error"]
    assert doc["type"] == type_ and doc["message"]
    if name:
        assert doc["message"] == orjson.loads(body)["error"]["message"]
    else:
        assert doc["message"] == "<html>upstream trouble</html>" and doc["code"] is None


def test_error_body_normalises_anthropic_errors_and_anything_else():
    assert openai_error(404, b'{"type":"error","error":{"type":"not_found_error","message":"model: x"}}') == {
        "message": "model: x",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found_error",
    }
    assert openai_error(502, b"")["message"] == "upstream answered 502"
    auth = b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}'
    assert orjson.loads(adapter().error_body(401, auth))["error"]["type"] == "authentication_error"


def test_usage_without_cache_fields():
    from adapters.anthropic import _Usage

    assert openai_usage(msgspec.convert({"input_tokens": 5, "output_tokens": 2}, _Usage))["prompt_tokens_details"] == {
        "cached_tokens": 0,
        "cache_write_tokens": 0,
    }


# --- a stream cut anywhere transcodes the same ---


@pytest.mark.parametrize("name", STREAMS)
def test_every_single_cut_point_gives_the_same_output(name):
    data = anth(name)
    whole = transcode(data)
    for i in range(len(data) + 1):
        assert transcode(data, [i]) == whole, i


@pytest.mark.parametrize("name", STREAMS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_set_of_cut_points_gives_the_same_output(name, data):
    raw = anth(name)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=40), label="cuts")
    assert transcode(raw, cuts) == transcode(raw)


def test_transcoding_cost_is_measured():
    raw = anth("stream_ok.sse")
    events = len(sse_events(raw))

    def run_once() -> None:
        tx = AnthropicTranscoder(UPSTREAM)
        for piece in sse_events(raw):  # one network read per event: the worst realistic case
            tx.feed(piece)
        tx.finish()

    runs = 2000
    seconds = min(timeit.repeat(run_once, number=runs, repeat=3))
    rate = events * runs / seconds
    print(f"\nanthropic transcoder: {rate:,.0f} events/s ({seconds / runs / events * 1e6:.2f} µs per event)")
    assert rate > 10_000  # a floor far below any real machine: catches an accidental quadratic, not noise


# --- properties: any chat body the gateway passes on, any event stream ---


@settings(max_examples=100)
@given(body=chat_bodies)
def test_any_accepted_chat_body_is_translated_or_refused_with_a_400(body):
    """Never another exception: that would be a 500 for what is the client's mistake."""
    if not accepted("chat", body):
        return
    try:
        out = orjson.loads(build_request(body, UPSTREAM))
    except BadRequest:
        return
    assert out["model"] == UPSTREAM and isinstance(out["messages"], list) and out["max_tokens"] > 0


_EVENTS = ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta"]
_EVENTS += ["message_stop", "ping", "error"]
_KEYS = ["type", "index", "delta", "content_block", "message", "usage", "text", "partial_json", "thinking", "id"]
_KEYS += ["signature", "stop_reason", "name", "input", "input_tokens", "output_tokens", "cache_read_input_tokens"]
_KEYS += ["error", "model", "role", "content"]
_TYPES = ["text_delta", "input_json_delta", "thinking_delta", "signature_delta", "text", "tool_use", "thinking"]
_TYPES += ["redacted_thinking", "end_turn", "max_tokens", "tool_use", "overloaded_error", *_EVENTS]
anthropic_events = st.builds(
    lambda name, data: b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n",
    st.sampled_from(_EVENTS),
    st.builds(dict, st.dictionaries(st.sampled_from(_KEYS), json_like(_KEYS, _TYPES), max_size=4)),
)


@settings(max_examples=100)
@given(events=st.lists(anthropic_events | st.binary(max_size=8), max_size=8))
def test_any_event_stream_gives_openai_chunks_or_an_upstream_error(events):
    tx = AnthropicTranscoder(UPSTREAM)
    try:
        out = tx.feed(b"".join(events)) + tx.finish()
    except UpstreamError:
        return
    check_openai_sse(out)


def check_openai_sse(out: bytes) -> None:
    """OpenAI chat chunks (or an error object), then [DONE]."""
    assert out.endswith(DONE)
    for event in out.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ")
        if event != DONE.strip():
            assert isinstance(orjson.loads(event[6:]), dict)
