"""`POST /v1/messages`: the official `anthropic` SDK against the gateway, with each adapter behind it.

An `anthropic` endpoint is native (the bytes pass through both ways); `openai`, `gemini` and `bedrock`
endpoints are reached through OpenAI chat and translated back. The OpenAI fake's tool and thinking answers are what the
Anthropic adapter makes of the Anthropic fixtures (the gateway's own OpenAI shape of those answers), so the
same tool calls and thinking can be checked on every path.
"""

from __future__ import annotations

from typing import Any

import anthropic
import msgspec
import orjson
import pytest

from adapters.anthropic import AnthropicAdapter, AnthropicTranscoder
from proxy.config import Price, ProviderConfig
from proxy.messages import MessagesFront
from proxy.router import Endpoint
from tests.bedrock_streams import frames_of
from tests.conftest import KEY, gateway_config
from tests.fakes import FakeUpstream, Script, fixture, sse_events

MODEL = "test/assistant"
UPSTREAM = {
    "anthropic": "claude-sonnet-4-20250514",
    "openai": "gpt-4o-mini",
    "gemini": "gemini-2.5-flash",
    "bedrock": "us.anthropic.claude-sonnet-4-20250514-v1:0",
}
ADAPTERS = ("openai", "anthropic", "gemini", "bedrock")
AWS_KEYS = "AKIDEXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # AWS's documentation example keys (SigV4)
EVENTSTREAM = {"Content-Type": "application/vnd.amazon.eventstream"}
WEATHER_TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather for a city",
        "input_schema": {"type": "object", "properties": {"location": {"type": "string"}, "unit": {"type": "string"}}},
    },
    {"name": "get_time", "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}}}},
]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def aws_region(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loopback bedrock endpoint's SigV4 region comes from AWS_REGION (its host names none)."""
    monkeypatch.setenv("AWS_REGION", "us-west-2")


def anth(name: str) -> bytes:
    return fixture(name, "anthropic")


def openai_of(name: str) -> bytes:
    """An Anthropic fixture as an OpenAI upstream would send it (the Anthropic adapter's translation)."""
    if name.endswith(".sse"):
        tx = AnthropicTranscoder(UPSTREAM["openai"], created=1_700_000_000)
        return tx.feed(anth(name)) + tx.finish()
    provider = ProviderConfig(name="claude", adapter="anthropic", base_url="https://api.anthropic.com/v1")
    return AnthropicAdapter(provider, provider.base_url).parse_response(anth(name), UPSTREAM["openai"])


# What each fake serves for: a text answer, a tool-calling answer, a thinking answer (body or stream).
ANSWERS: dict[str, dict[str, tuple[bytes, bytes]]] = {
    "anthropic": {
        "text": (anth("chat_ok.json"), anth("stream_ok.sse")),
        "tools": (anth("chat_tool_use.json"), anth("stream_tools.sse")),
        "thinking": (anth("chat_ok.json"), anth("stream_thinking.sse")),
    },
    "openai": {
        "text": (fixture("chat_ok.json"), fixture("stream_ok.sse")),
        "tools": (openai_of("chat_tool_use.json"), openai_of("stream_tools.sse")),
        "thinking": (fixture("chat_ok.json"), openai_of("stream_thinking.sse")),
    },
    "gemini": {
        "text": (fixture("chat_ok.json", "gemini"), fixture("stream_ok.sse", "gemini")),
        "tools": (fixture("chat_function_call.json", "gemini"), fixture("stream_function_calls.sse", "gemini")),
        "thinking": (fixture("chat_ok.json", "gemini"), fixture("stream_thinking.sse", "gemini")),
    },
    "bedrock": {
        "text": (fixture("chat_ok.json", "bedrock"), fixture("stream_ok.eventstream", "bedrock")),
        "tools": (fixture("chat_tool_use.json", "bedrock"), fixture("stream_tools.eventstream", "bedrock")),
        "thinking": (fixture("chat_ok.json", "bedrock"), fixture("stream_thinking.eventstream", "bedrock")),
    },
}


def script(adapter: str, answer: str, stream: bool) -> Script:
    body, sse = ANSWERS[adapter][answer]
    if not stream:
        return Script(body=body)
    if adapter == "bedrock":  # an AWS event stream, written frame by frame
        return Script(sse=frames_of(sse), headers=EVENTSTREAM)
    return Script(sse=sse_events(sse))


def config(providers: dict[str, str], adapters: dict[str, str], **kw: Any) -> Any:
    """Providers (name → fake URL) with their adapters, all serving MODEL; hedging off (one attempt at a time)."""
    endpoints = [(name, UPSTREAM[adapters[name]]) for name in providers]
    cfg = gateway_config(providers, adapter=adapters, models={MODEL: endpoints}, hedge={"enabled": False}, **kw)
    keys = [msgspec.structs.replace(p, api_key=AWS_KEYS) if p.adapter == "bedrock" else p for p in cfg.providers]
    return msgspec.structs.replace(cfg, providers=keys)


async def start(gateway: Any, fake: FakeUpstream, adapter: str, **kw: Any) -> Any:
    return await gateway(config({adapter: fake.base_url}, {adapter: adapter}, **kw))


def client(gw: Any, **kw: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key=KEY, max_retries=0, **kw)


async def fakes(aiohttp_server: Any, *names: str) -> dict[str, FakeUpstream]:
    out = {}
    for name in names:
        fake = FakeUpstream()
        fake.base_url = str((await aiohttp_server(fake.app)).make_url("/v1"))
        out[name] = fake
    return out


async def create_and_stream(c: anthropic.AsyncAnthropic, fake: FakeUpstream, adapter: str, answer: str, **req: Any):
    """The same request answered whole, then streamed; both messages, and every streamed event type."""
    req = {"model": MODEL, "max_tokens": 1024, "messages": HI, **req}
    fake.script(script(adapter, answer, stream=False))
    whole = await c.messages.create(**req)
    fake.script(script(adapter, answer, stream=True))
    async with c.messages.stream(**req) as s:
        events = [event.type async for event in s]
        streamed = await s.get_final_message()
    return whole, streamed, events


# --- answers: text, tool calls, thinking, for every adapter ---

TEXT_USAGE = {  # (input, cache reads, cache writes, output)
    "anthropic": (12, 2048, 256, 12),
    "openai": (9, 0, 0, 10),
    "gemini": (13, 2048, 0, 34),  # Gemini's prompt count includes its cached tokens; output includes thoughts
    "bedrock": (12, 2048, 256, 12),  # Converse's inputTokens excludes cache reads and writes, as Anthropic's does
}


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_text_answer_whole_and_streamed(fake_upstream, gateway, adapter):
    gw = await start(gateway, fake_upstream, adapter)
    c = client(gw)
    whole, streamed, events = await create_and_stream(c, fake_upstream, adapter, "text")
    for message in (whole, streamed):
        assert [b.type for b in message.content] == ["text"]
        assert message.content[0].text == "Hello! How can I help you today?"  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn" and message.role == "assistant"
        assert message.id.startswith("msg_")
        u = message.usage
        assert (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens) == (
            TEXT_USAGE[adapter]
        )
    assert (streamed.id == whole.id) == (adapter != "bedrock")  # Converse answers carry no id: each gets its own
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_stop" in events
    assert [r.path for r in fake_upstream.requests] == (
        ["/v1/messages"] * 2
        if adapter == "anthropic"
        else ["/v1/chat/completions"] * 2
        if adapter == "openai"
        else ["/v1/models/gemini-2.5-flash:generateContent", "/v1/models/gemini-2.5-flash:streamGenerateContent"]
        if adapter == "gemini"
        else [f"/v1/model/{UPSTREAM['bedrock']}/converse", f"/v1/model/{UPSTREAM['bedrock']}/converse-stream"]
    )
    if adapter == "bedrock":  # signed with the provider's AWS keys, not sent as a bearer token
        assert all(
            r.headers["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
            for r in fake_upstream.requests
        )
    await c.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_tool_use_whole_and_streamed(fake_upstream, gateway, adapter):
    gw = await start(gateway, fake_upstream, adapter)
    c = client(gw)
    whole, streamed, _ = await create_and_stream(
        c, fake_upstream, adapter, "tools", tools=WEATHER_TOOLS, tool_choice={"type": "auto"}
    )
    if adapter == "gemini":
        calls = [("get_weather", {"location": "Boston, MA", "unit": "celsius"})]
        expected_stream = [*calls, ("get_weather", {"location": "Tokyo, Japan", "unit": "celsius"})]
        text = None
    else:
        calls = [
            ("get_weather", {"location": "Paris, France", "unit": "celsius"}),
            ("get_time", {"timezone": "Europe/London"}),
        ]
        expected_stream = calls
        text = "I'll check the weather in Paris and the time in London."
    for message, expected in ((whole, calls), (streamed, expected_stream)):
        uses = [b for b in message.content if b.type == "tool_use"]
        assert [(b.name, b.input) for b in uses] == expected  # complete inputs, parsed
        assert all(b.id for b in uses) and len({b.id for b in uses}) == len(uses)
        texts = [b.text for b in message.content if b.type == "text"]
        assert texts == ([text] if text else [])
        assert message.content[-1].type == "tool_use"  # text first, then the calls
        assert message.stop_reason == "tool_use"
    if adapter != "gemini":  # Gemini makes up call ids (it has none); the others keep theirs
        assert [b.id for b in whole.content if b.type == "tool_use"] == (
            ["tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "tooluse_3ZqHh1YbQzqkP0Ezv1fLbg"]
            if adapter == "bedrock"
            else ["toolu_01T1x1fJ34qAmk2tNTrN7Up6", "toolu_01VpGpFzSXjbj5Q1AHQ3Dgnf"]
        )
        unmatched = {"id"} if adapter == "bedrock" else set()  # Converse answers carry no message id
        assert streamed.model_dump(exclude=unmatched) == whole.model_dump(exclude=unmatched)
    await c.close()


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_thinking_stream(fake_upstream, gateway, adapter):
    gw = await start(gateway, fake_upstream, adapter)
    c = client(gw)
    fake_upstream.script(script(adapter, "thinking", stream=True))
    async with c.messages.stream(
        model=MODEL,
        max_tokens=8192,
        thinking={"type": "enabled", "budget_tokens": 4096},
        messages=[{"role": "user", "content": "gcd(1071, 462)?"}],
    ) as s:
        thinking_deltas = [e.thinking async for e in s if e.type == "thinking"]
        message = await s.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text"]
    thinking, text = message.content
    assert thinking.thinking == "".join(thinking_deltas) and len(thinking_deltas) > 1  # type: ignore[union-attr]
    expected = {
        "anthropic": ("So the GCD is 21.", "**21**.", 197),
        "openai": ("So the GCD is 21.", "**21**.", 197),
        "gemini": ("the total is 391.", "= 391.", 80),
        "bedrock": ("So the GCD is 21.", "**21**.", 197),
    }[adapter]
    assert thinking.thinking.endswith(expected[0]) and text.text.endswith(expected[1])  # type: ignore[union-attr]
    assert message.usage.output_tokens == expected[2] and message.stop_reason == "end_turn"
    sent = orjson.loads(fake_upstream.requests[0].body)
    if adapter == "openai":
        assert sent["reasoning_effort"] == "medium" and sent["max_completion_tokens"] == 8192
    elif adapter == "gemini":
        assert sent["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 8192, "includeThoughts": True}
    elif adapter == "bedrock":
        assert sent["additionalModelRequestFields"] == {"thinking": {"type": "enabled", "budget_tokens": 4096}}
        assert sent["inferenceConfig"] == {"maxTokens": 8192}
    else:
        assert sent["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    await c.close()


# --- passthrough: an anthropic endpoint gets and gives the client's bytes ---


@pytest.mark.parametrize(("stream", "name"), [(False, "chat_tool_use.json"), (True, "stream_tools.sse")])
async def test_anthropic_passthrough_is_byte_identical(fake_upstream, gateway, http, stream, name):
    pieces = sse_events(anth(name)) if stream else None
    fake_upstream.script(Script(body=anth(name), sse=pieces))
    gw = await start(gateway, fake_upstream, "anthropic")
    request = {
        "model": MODEL,
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris, time in London?"}]}],
        "tools": WEATHER_TOOLS,
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": False},
        "context_management": {"edits": []},  # a beta field: passed on as it is, with the beta flag
        "stream": stream,
    }
    body = orjson.dumps(request, option=orjson.OPT_INDENT_2)  # whitespace the rewrite need not keep
    headers = {
        "x-api-key": KEY,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "context-management-2025-06-27",
        "Content-Type": "application/json",
    }
    async with http.post(gw.url + "/v1/messages", data=body, headers=headers) as r:
        got = await r.read()
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream" if stream else "application/json")
        assert r.headers["X-Hedgerow-Provider"] == "anthropic"
    assert got == anth(name)
    [seen] = fake_upstream.requests
    assert seen.path == "/v1/messages"
    assert orjson.loads(seen.body) == {**request, "model": UPSTREAM["anthropic"]}
    assert list(orjson.loads(seen.body)) == list(request)  # key order kept: one top-level rewrite
    assert seen.headers["x-api-key"] == "sk-upstream-anthropic"  # the provider's key, not the client's
    assert seen.headers["anthropic-beta"] == "context-management-2025-06-27"
    assert seen.headers["anthropic-version"] == "2023-06-01"


async def test_passthrough_strips_gateway_fields_and_relays_anthropic_errors_as_they_are(fake_upstream, gateway):
    fake_upstream.script(Script(status=400, body=anth("chat_400.json")))
    gw = await start(gateway, fake_upstream, "anthropic")
    c = client(gw)
    with pytest.raises(anthropic.BadRequestError) as e:
        await c.messages.create(
            model=MODEL, max_tokens=16, messages=HI, extra_body={"provider": {"order": ["anthropic"]}}
        )
    assert e.value.body == orjson.loads(anth("chat_400.json"))  # the upstream's own body, request_id and all
    sent = orjson.loads(fake_upstream.requests[0].body)
    assert "provider" not in sent and sent["model"] == UPSTREAM["anthropic"]
    await c.close()


def test_the_clients_beta_flags_join_the_providers_own():
    provider = ProviderConfig(
        name="claude",
        adapter="anthropic",
        base_url="https://api.anthropic.com/v1",
        headers={"Anthropic-Beta": "context-1m-2025-08-07"},
    )
    ep = Endpoint("claude", "claude-x", AnthropicAdapter(provider, provider.base_url), 1.0, Price(), float)
    body = orjson.dumps({"model": MODEL, "max_tokens": 5, "messages": HI, "provider": {"order": ["claude"]}})
    front = MessagesFront(body, MODEL, "interleaved-thinking-2025-05-14, context-1m-2025-08-07")
    sent, headers = front.request(ep, strip=True)
    assert headers == {"Anthropic-Beta": "context-1m-2025-08-07,interleaved-thinking-2025-05-14"}
    assert orjson.loads(sent) == {"model": "claude-x", "max_tokens": 5, "messages": HI}
    assert MessagesFront(body, MODEL, None).request(ep, strip=True)[1] is None


# --- the request, translated for an OpenAI upstream ---


async def test_a_rich_request_reaches_an_openai_upstream_translated(fake_upstream, gateway):
    fake_upstream.script(Script(body=fixture("chat_ok.json")))
    gw = await start(gateway, fake_upstream, "openai")
    c = client(gw)
    await c.messages.create(
        model=MODEL,
        max_tokens=512,
        system=[{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Use tools."}],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "Let me check.", "signature": "sig"},
                    {"type": "text", "text": "A cat. Checking the weather."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"location": "Paris"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18°C, sunny"},
                    {"type": "text", "text": "Thanks. In Fahrenheit?"},
                ],
            },
        ],
        tools=WEATHER_TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        metadata={"user_id": "user-42"},
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},  # SDK 2.x no longer declares them
    )
    [seen] = fake_upstream.requests
    assert seen.path == "/v1/chat/completions" and seen.headers["Authorization"] == "Bearer sk-upstream-openai"
    assert orjson.loads(seen.body) == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse.\n\nUse tools."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture, and the weather in Paris?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                ],
            },
            {
                "role": "assistant",
                "content": "A cat. Checking the weather.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18°C, sunny"},
            {"role": "user", "content": "Thanks. In Fahrenheit?"},
        ],
        "max_completion_tokens": 512,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["END"],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": WEATHER_TOOLS[0]["input_schema"],
                },
            },
            {"type": "function", "function": {"name": "get_time", "parameters": WEATHER_TOOLS[1]["input_schema"]}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "user": "user-42",
    }
    await c.close()


async def test_a_streamed_request_asks_an_openai_upstream_for_usage(fake_upstream, gateway):
    fake_upstream.script(Script(sse=sse_events(fixture("stream_ok.sse"))))
    gw = await start(gateway, fake_upstream, "openai")
    c = client(gw)
    async with c.messages.stream(model=MODEL, max_tokens=64, messages=HI) as s:
        await s.get_final_message()
    sent = orjson.loads(fake_upstream.requests[0].body)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    await c.close()


# --- errors, in Anthropic's shape ---


async def test_authentication_by_x_api_key_or_bearer_and_401s(fake_upstream, gateway, http):
    gw = await start(gateway, fake_upstream, "openai")
    for c in (client(gw), anthropic.AsyncAnthropic(base_url=gw.url, auth_token=KEY, max_retries=0)):
        message = await c.messages.create(model=MODEL, max_tokens=16, messages=HI)
        assert message.content[0].text  # type: ignore[union-attr]
        await c.close()
    bad = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        await bad.messages.create(model=MODEL, max_tokens=16, messages=HI)
    assert e.value.status_code == 401
    assert e.value.body == {"type": "error", "error": {"type": "authentication_error", "message": "invalid API key"}}
    await bad.close()
    async with http.post(gw.url + "/v1/messages", json={"model": MODEL, "max_tokens": 1, "messages": HI}) as r:
        assert r.status == 401
        doc = await r.json()
        assert doc["type"] == "error" and doc["error"]["type"] == "authentication_error"
        assert "x-api-key" in doc["error"]["message"]
    assert len(fake_upstream.requests) == 2


async def test_unknown_model_is_a_not_found_error(fake_upstream, gateway):
    gw = await start(gateway, fake_upstream, "openai")
    c = client(gw)
    with pytest.raises(anthropic.NotFoundError) as e:
        await c.messages.create(model="no/such-model", max_tokens=16, messages=HI)
    assert e.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert "no/such-model" in e.value.body["error"]["message"]  # type: ignore[index]
    assert fake_upstream.requests == []
    await c.close()


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not valid JSON"),
        (orjson.dumps({"model": MODEL, "messages": HI}), "max_tokens"),  # Anthropic requires it
        (orjson.dumps({"model": MODEL, "max_tokens": 5, "messages": []}), "messages"),
        (orjson.dumps({"model": MODEL, "max_tokens": "5", "messages": HI}), "max_tokens"),
        (  # a server tool cannot run on an OpenAI upstream
            orjson.dumps({"model": MODEL, "max_tokens": 5, "messages": HI, "tools": [{"type": "web_search_20250305"}]}),
            "web_search_20250305",
        ),
    ],
)
async def test_bad_requests_are_invalid_request_errors(fake_upstream, gateway, http, body, words):
    gw = await start(gateway, fake_upstream, "openai")
    async with http.post(gw.url + "/v1/messages", data=body, headers={"x-api-key": KEY}) as r:
        assert r.status == 400 and r.headers["Content-Type"].startswith("application/json")
        doc = await r.json()
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    assert words in doc["error"]["message"]
    assert fake_upstream.requests == []


async def test_the_sdk_raises_bad_request_for_a_400(fake_upstream, gateway):
    gw = await start(gateway, fake_upstream, "openai")
    c = client(gw)
    with pytest.raises(anthropic.BadRequestError) as e:
        await c.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "system", "content": "x"}])  # type: ignore[list-item]
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    await c.close()


async def test_an_openai_upstreams_400_is_relayed_in_anthropic_shape(fake_upstream, gateway):
    fake_upstream.script(Script(status=400, body=fixture("chat_400.json")))
    gw = await start(gateway, fake_upstream, "openai")
    c = client(gw)
    with pytest.raises(anthropic.BadRequestError) as e:
        await c.messages.create(model=MODEL, max_tokens=16, messages=HI, extra_body={"temperature": 1})
    message = orjson.loads(fixture("chat_400.json"))["error"]["message"]
    assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    await c.close()


@pytest.mark.parametrize("adapter", ["openai", "anthropic"])
async def test_a_429_from_the_only_provider_is_a_rate_limit_error(fake_upstream, gateway, adapter):
    body = fixture("chat_429.json") if adapter == "openai" else anth("chat_429.json")
    fake_upstream.script(Script(status=429, body=body, headers={"Retry-After": "7"}))
    gw = await start(gateway, fake_upstream, adapter)
    c = client(gw)
    with pytest.raises(anthropic.RateLimitError) as e:
        await c.messages.create(model=MODEL, max_tokens=16, messages=HI)
    assert e.value.response.headers["retry-after"] == "7"
    assert e.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "rate limit" in e.value.body["error"]["message"].lower()  # type: ignore[index]
    await c.close()


async def test_every_endpoint_failing_is_an_anthropic_shaped_5xx(aiohttp_server, gateway):
    fs = await fakes(aiohttp_server, "a", "b")
    for fake in fs.values():
        fake.script(Script(status=500, body=fixture("chat_500.json")))
    gw = await gateway(config({n: f.base_url for n, f in fs.items()}, {"a": "openai", "b": "anthropic"}))
    c = client(gw)
    with pytest.raises(anthropic.ServiceUnavailableError) as e:
        await c.messages.create(model=MODEL, max_tokens=16, messages=HI)
    assert e.value.status_code == 503 and e.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    await c.close()


async def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(fake_upstream, gateway, http):
    fake_upstream.script(Script(sse=sse_events(fixture("stream_ok.sse")), drop_after=4))
    gw = await start(gateway, fake_upstream, "openai")
    body = {"model": MODEL, "max_tokens": 64, "messages": HI, "stream": True}
    async with http.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": KEY}) as r:
        assert r.status == 200
        raw = await r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[0].startswith(b"event: message_start\n")
    assert b"text_delta" in raw and b"message_stop" not in raw
    name, data = events[-1].split(b"\n")
    assert name == b"event: error"
    doc = orjson.loads(data.removeprefix(b"data: "))
    assert doc["type"] == "error" and doc["error"]["type"] == "api_error" and doc["error"]["message"]
    c = client(gw)  # the SDK surfaces it as an error, not a silently short answer
    fake_upstream.script(Script(sse=sse_events(fixture("stream_ok.sse")), drop_after=4))
    with pytest.raises(anthropic.APIStatusError):
        async with c.messages.stream(model=MODEL, max_tokens=64, messages=HI) as s:
            await s.get_final_message()
    await c.close()


# --- failover before the first content ---

OVERLOADED = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'


@pytest.mark.parametrize("stream", [False, True])
async def test_failover_from_an_overloaded_anthropic_endpoint_to_an_openai_one(aiohttp_server, gateway, stream):
    fs = await fakes(aiohttp_server, "claude", "gpt")
    if stream:  # the error event comes after message_start: still before the first content
        fs["claude"].script(Script(sse=[*sse_events(anth("stream_ok.sse"))[:2], OVERLOADED]))
    else:
        fs["claude"].script(Script(status=529, body=anth("chat_529.json")))
    fs["gpt"].script(script("openai", "text", stream))
    gw = await gateway(config({n: f.base_url for n, f in fs.items()}, {"claude": "anthropic", "gpt": "openai"}))
    c = client(gw)
    req: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": HI,
        "extra_body": {"provider": {"order": ["claude", "gpt"]}},
    }
    if stream:
        async with c.messages.stream(**req) as s:
            message = await s.get_final_message()
    else:
        message = await c.messages.with_raw_response.create(**req)
        assert message.headers["x-hedgerow-provider"] == "gpt" and message.headers["x-hedgerow-attempts"] == "2"
        message = await message.parse()
    assert message.content[0].text == "Hello! How can I help you today?"  # type: ignore[union-attr]
    assert (len(fs["claude"].requests), len(fs["gpt"].requests)) == (1, 1)
    assert "provider" not in orjson.loads(fs["claude"].requests[0].body)
    await c.close()


async def test_failover_from_an_openai_error_chunk_to_a_native_anthropic_endpoint(aiohttp_server, gateway, http):
    fs = await fakes(aiohttp_server, "gpt", "claude")
    first = sse_events(fixture("stream_ok.sse"))[0]  # the role chunk: no content yet
    error = b'data: {"error":{"message":"overloaded","type":"server_error","code":null}}\n\n'
    fs["gpt"].script(Script(sse=[first, error]))
    fs["claude"].script(Script(sse=sse_events(anth("stream_ok.sse"))))
    gw = await gateway(config({n: f.base_url for n, f in fs.items()}, {"gpt": "openai", "claude": "anthropic"}))
    body = {"model": MODEL, "max_tokens": 64, "messages": HI, "stream": True, "provider": {"order": ["gpt", "claude"]}}
    async with http.post(gw.url + "/v1/messages", json=body, headers={"x-api-key": KEY}) as r:
        raw = await r.read()
        assert r.headers["X-Hedgerow-Provider"] == "claude"
    assert raw == anth("stream_ok.sse")  # nothing of the failed attempt reached the client
    assert (len(fs["gpt"].requests), len(fs["claude"].requests)) == (1, 1)


async def test_messages_and_chat_answers_are_cached_apart(fake_upstream, gateway, http):
    gw = await start(gateway, fake_upstream, "openai")
    body = {"model": MODEL, "max_tokens": 16, "temperature": 0, "messages": HI}  # valid for both APIs
    headers = {"Authorization": f"Bearer {KEY}", "X-Hedgerow-Cache": "on"}
    got = []
    for path in ("/v1/chat/completions", "/v1/messages", "/v1/messages"):
        async with http.post(gw.url + path, json=body, headers=headers) as r:
            got.append((r.headers["X-Hedgerow-Cache"], (await r.json()).get("type")))
    assert got == [("miss", None), ("miss", "message"), ("hit", "message")]
    assert len(fake_upstream.requests) == 2


async def test_text_answer_through_an_azure_deployment(fake_upstream, gateway):
    """Azure speaks OpenAI's format at its own URLs: the front door reaches it through the azure adapter."""
    base = fake_upstream.base_url.removesuffix("/v1")  # like https://<resource>.openai.azure.com
    cfg = gateway_config(
        {"az": base}, adapter="azure", models={MODEL: [("az", "gpt-4o-mini")]}, hedge={"enabled": False}
    )
    gw = await gateway(cfg)
    whole, streamed, events = await create_and_stream(client(gw), fake_upstream, "openai", "text")
    assert whole.content[0].text == streamed.content[0].text == "Hello! How can I help you today?"  # type: ignore[union-attr]
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert [r.path for r in fake_upstream.requests] == ["/openai/deployments/gpt-4o-mini/chat/completions"] * 2
    assert all(r.headers.get("api-key") == "sk-upstream-az" for r in fake_upstream.requests)
