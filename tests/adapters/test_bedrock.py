"""The Bedrock adapter: fixtures botocore's own bedrock-runtime client reads, requests its Converse input shape
accepts, SigV4 signatures a fake upstream checks the way AWS does, and through the gateway the official `openai`
SDK gets what an OpenAI upstream would have given it.

Fixtures (tests/fixtures/bedrock/) pair up: stream_ok.eventstream is chat_ok.json streamed, stream_tools is
chat_tool_use.json streamed; the binary streams are built by tests/bedrock_streams.py. Everything stays on
loopback: the credentials are AWS's documentation examples, and the botocore client test fails on any other
name lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import random
import re
import socket
import subprocess
import sys
import time
import timeit
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import botocore.session
import msgspec
import openai
import orjson
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials
from botocore.exceptions import EventStreamError
from botocore.validate import validate_parameters
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from adapters import bedrock_aws
from adapters.bedrock import BedrockAdapter, BedrockTranscoder
from adapters.bedrock_request import build_request
from health.probes import probe_provider
from proxy.config import Config, ConfigError, Price, ProviderConfig
from proxy.errors import BadRequest, UpstreamError, UpstreamStatus
from proxy.router import Endpoint
from tests import bedrock_streams as streams
from tests.conftest import KEY, gateway_config
from tests.fakes import FakeUpstream, Script, fixture
from tests.unit.test_request_validation import accepted, chat_bodies, json_like

MODEL = "aws/claude-sonnet-4"
UPSTREAM = "us.anthropic.claude-sonnet-4-20250514-v1:0"  # a cross-region inference profile: `:` in the path
ARN = "arn:aws:bedrock:us-west-2:123456789012:application-inference-profile/a1b2c3d4e5f6"  # `:` and `/`
REGION = "us-west-2"
AK, SK = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # AWS's documentation example keys
EVENTSTREAM = {"Content-Type": "application/vnd.amazon.eventstream"}
THROTTLED = {"x-amzn-ErrorType": "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"}
STREAMS = ("stream_ok.eventstream", "stream_tools.eventstream", "stream_thinking.eventstream")
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
_CONVERSE = botocore.session.get_session().get_service_model("bedrock-runtime").operation_model("Converse")


def bed(name: str) -> bytes:
    return fixture(name, "bedrock")


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The region for loopback base URLs comes from AWS_REGION; no ambient AWS setting leaks into a test."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_BEARER_TOKEN_BEDROCK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def translate(model: str = UPSTREAM, **req: Any) -> dict[str, Any]:
    req.setdefault("model", MODEL)
    req.setdefault("messages", [{"role": "user", "content": "hi"}])
    out = orjson.loads(build_request(orjson.dumps(req), model))
    assert_valid_converse_request(out)
    return out


def assert_valid_converse_request(body: dict[str, Any]) -> None:
    """Valid per botocore's Converse input shape (unknown keys, unions, required members, types). Blobs are
    base64 strings on the wire and bytes in botocore; its validator accepts both."""
    validate_parameters({"modelId": UPSTREAM, **body}, _CONVERSE.input_shape)


def transcode(data: bytes, cuts: list[int] | None = None) -> bytes:
    """Feed `data` cut at the given offsets, then finish."""
    tx = BedrockTranscoder(UPSTREAM, created=1_700_000_000, response_id="fixed")
    points = [0, *sorted(set(cuts or ())), len(data)]
    return b"".join(tx.feed(data[a:b]) for a, b in itertools.pairwise(points)) + tx.finish()


def chunks_of(stream: bytes) -> list[dict[str, Any]]:
    events = [e.removeprefix(b"data: ") for e in stream.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and b"[DONE]" not in events[:-1]
    return [orjson.loads(e) for e in events[:-1]]


def adapter(api_key: str | None = f"{AK}:{SK}", base_url: str = "http://127.0.0.1:9") -> BedrockAdapter:
    return BedrockAdapter(
        ProviderConfig(name="bedrock", adapter="bedrock", base_url=base_url, api_key=api_key), base_url
    )


# --- SigV4, checked on the upstream's side as AWS checks it ---


def sigv4_problem(
    method: str, raw_path: str, headers: Mapping[str, str], body: bytes, token: str | None = None
) -> str | None:
    """Why AWS would reject this request's signature, or None. Recomputed with botocore from what arrived:
    the raw path as received, the signed headers' received values, the received body."""
    headers = CIMultiDict(headers)
    m = re.fullmatch(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
        r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})",
        headers.get("Authorization", ""),
    )
    if m is None:
        return f"no SigV4 Authorization header: {headers.get('Authorization')!r}"
    access, day, region, service, signed, signature = m.groups()
    if (access, region, service) != (AK, REGION, "bedrock"):
        return f"wrong credential scope {access}/{region}/{service}"
    stamp = headers.get("X-Amz-Date", "")
    try:
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return f"bad X-Amz-Date {stamp!r}"
    if not stamp.startswith(day) or abs((datetime.now(UTC) - when).total_seconds()) > 300:
        return "X-Amz-Date outside the 5-minute window, or not the credential's day"
    claimed = headers.get("X-Amz-Content-SHA256")
    if claimed is not None and claimed != hashlib.sha256(body).hexdigest():
        return "X-Amz-Content-SHA256 is not the hash of the body received"
    names = signed.split(";")
    if "host" not in names or "x-amz-date" not in names:
        return "host and x-amz-date must be signed"
    if token is not None and (headers.get("X-Amz-Security-Token") != token or "x-amz-security-token" not in names):
        return "the session token is missing or unsigned"
    request = AWSRequest(method, f"http://{headers['Host']}{raw_path}", {n: headers[n] for n in names}, body)
    request.context["timestamp"] = stamp
    auth = SigV4Auth(Credentials(AK, SK, token), "bedrock", REGION)
    expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
    return None if hmac.compare_digest(expected, signature) else "signature mismatch"


class BedrockFake(FakeUpstream):
    """A fake bedrock-runtime: every request's signature is checked over the bytes received (403 as AWS
    answers a bad one), and the raw request paths are recorded (FakeUpstream records decoded ones)."""

    def __init__(self, token: str | None = None, bearer: str | None = None) -> None:
        super().__init__()
        self.raw_paths: list[str] = []
        self.rejected: list[str] = []

        @web.middleware
        async def check(request: web.Request, handler: Any) -> web.StreamResponse:
            body = await request.read()
            self.raw_paths.append(request.raw_path)
            if bearer is not None:
                ok = request.headers.get("Authorization") == f"Bearer {bearer}"
                problem = None if ok else "not the Bedrock API key"
            else:
                problem = sigv4_problem(request.method, request.raw_path, request.headers, body, token)
            if problem is not None:
                self.rejected.append(problem)
                return web.json_response(
                    {"message": f"The request signature we calculated does not match ({problem})"},
                    status=403,
                    headers={"x-amzn-ErrorType": "InvalidSignatureException"},
                )
            return await handler(request)

        self.app.middlewares.append(check)


async def serve(aiohttp_server: Any, fake: BedrockFake) -> BedrockFake:
    fake.base_url = str((await aiohttp_server(fake.app)).make_url("")).rstrip("/")  # no /v1: bedrock's paths
    return fake


def config(*names: str, urls: dict[str, str], api_key: str = f"{AK}:{SK}", model: str = UPSTREAM, **kw: Any) -> Config:
    """Bedrock providers (name → fake URL), one public model served by all of them, SigV4 keys by default."""
    models = {MODEL: [(n, model) for n in names]}
    cfg = gateway_config(urls, adapter="bedrock", models=models, hedge={"enabled": False}, **kw)
    return msgspec.structs.replace(cfg, providers=[msgspec.structs.replace(p, api_key=api_key) for p in cfg.providers])


def openai_client(gw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)


def test_the_fake_s_check_rejects_a_changed_body_a_wrong_secret_and_another_path():
    a = adapter()
    target = a.target("chat", UPSTREAM, False)
    assert target is not None
    body = b'{"messages":[]}'
    headers = {"Host": "127.0.0.1:9", **(a.sign(target, body) or {})}
    assert sigv4_problem("POST", target.path, headers, body) is None
    assert sigv4_problem("POST", target.path, headers, body + b" ") == (
        "X-Amz-Content-SHA256 is not the hash of the body received"
    )
    assert sigv4_problem("POST", target.path.replace("converse", "converse-stream"), headers, body) is not None
    assert sigv4_problem("POST", target.path, {**headers, "Host": "127.0.0.1:10"}, body) == "signature mismatch"
    wrong = adapter(f"{AK}:not-the-secret").sign(target, body) or {}
    assert sigv4_problem("POST", target.path, {"Host": "127.0.0.1:9", **wrong}, body) == "signature mismatch"


# --- the fixtures are what Bedrock sends: botocore's own bedrock-runtime client reads them ---


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any name lookup other than loopback fails the test: the client must talk to the fake and nothing else."""
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        assert name in ("127.0.0.1", "localhost", "::1"), f"network call to {name}"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


def boto_client(fake: BedrockFake) -> Any:
    return botocore.session.get_session().create_client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=fake.base_url,
        aws_access_key_id=AK,
        aws_secret_access_key=SK,
        config=BotoConfig(retries={"total_max_attempts": 1}),
    )


def _collect(events: Any) -> dict[str, Any]:
    """A ConverseStream's parsed events folded into text, tool inputs, stop reason and usage."""
    out: dict[str, Any] = {"text": "", "tools": {}, "stop": None, "usage": None}
    for ev in events:
        if "contentBlockStart" in ev:
            start = ev["contentBlockStart"]["start"]["toolUse"]
            out["tools"][start["toolUseId"]] = [start["name"], ""]
            current = start["toolUseId"]
        elif "contentBlockDelta" in ev:
            delta = ev["contentBlockDelta"]["delta"]
            if "text" in delta:
                out["text"] += delta["text"]
            elif "toolUse" in delta:
                out["tools"][current][1] += delta["toolUse"]["input"]
        elif "messageStop" in ev:
            out["stop"] = ev["messageStop"]["stopReason"]
        elif "metadata" in ev:
            out["usage"] = ev["metadata"]["usage"]
    out["tools"] = [(name, orjson.loads(args)) for name, args in out["tools"].values()]
    return out


@pytest.mark.parametrize(
    ("body", "stream"), [("chat_ok.json", "stream_ok.eventstream"), ("chat_tool_use.json", "stream_tools.eventstream")]
)
async def test_botocore_reads_each_fixture_and_its_stream_says_the_same(aiohttp_server, loopback_only, body, stream):
    fake = await serve(aiohttp_server, BedrockFake())
    fake.script(Script(body=bed(body)), Script(sse=streams.frames_of(bed(stream)), headers=EVENTSTREAM))
    client = boto_client(fake)
    messages = [{"role": "user", "content": [{"text": "hi"}]}]
    whole = await asyncio.to_thread(client.converse, modelId=UPSTREAM, messages=messages)
    r = await asyncio.to_thread(client.converse_stream, modelId=UPSTREAM, messages=messages)
    streamed = await asyncio.to_thread(_collect, r["stream"])
    content = whole["output"]["message"]["content"]
    assert streamed["text"] == "".join(b.get("text", "") for b in content)
    assert streamed["tools"] == [(b["toolUse"]["name"], b["toolUse"]["input"]) for b in content if "toolUse" in b]
    assert streamed["stop"] == whole["stopReason"]
    usage = {k: v for k, v in whole["usage"].items() if k != "cacheDetails"}
    assert streamed["usage"] == usage and usage["totalTokens"] == sum(v for k, v in usage.items() if k != "totalTokens")
    # botocore sends the model id percent-encoded (`%3A`); the fake's check accepted its signature too
    assert fake.rejected == [] and fake.raw_paths == [
        "/model/us.anthropic.claude-sonnet-4-20250514-v1%3A0/converse",
        "/model/us.anthropic.claude-sonnet-4-20250514-v1%3A0/converse-stream",
    ]


@pytest.mark.parametrize(
    ("status", "name", "error"),
    [(429, "chat_429.json", "ThrottlingException"), (400, "chat_400.json", "ValidationException"),
     (500, "chat_500.json", "InternalServerException")],
)  # fmt: skip
async def test_botocore_reads_the_error_fixtures(aiohttp_server, loopback_only, status, name, error):
    fake = await serve(aiohttp_server, BedrockFake())
    fake.script(Script(status=status, body=bed(name), headers={"x-amzn-ErrorType": f"{error}:http://internal"}))
    client = boto_client(fake)
    with pytest.raises(getattr(client.exceptions, error)) as e:
        await asyncio.to_thread(
            client.converse, modelId=UPSTREAM, messages=[{"role": "user", "content": [{"text": "x"}]}]
        )
    assert e.value.response["Error"]["Message"] == orjson.loads(bed(name))["message"]


async def test_botocore_raises_a_throttling_exception_frame_mid_stream(aiohttp_server, loopback_only):
    fake = await serve(aiohttp_server, BedrockFake())
    frames = [streams.START, streams.exception("throttlingException", "Too many tokens, please wait.")]
    fake.script(Script(sse=frames, headers=EVENTSTREAM))
    client = boto_client(fake)
    r = await asyncio.to_thread(
        client.converse_stream, modelId=UPSTREAM, messages=[{"role": "user", "content": [{"text": "x"}]}]
    )
    with pytest.raises(EventStreamError, match="Too many tokens") as e:
        await asyncio.to_thread(list, r["stream"])
    assert e.value.response["Error"]["Code"] == "throttlingException"


def test_stream_fixtures_are_exactly_what_their_recipes_encode_to():
    for name in streams.STREAMS:
        assert bed(name) == streams.build(name), f"regenerate with: python -m tests.bedrock_streams ({name})"


# --- through the gateway: the openai SDK sees an OpenAI provider ---


async def test_openai_sdk_non_stream_gets_text_and_usage_from_a_signed_converse_call(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake())
    fake.script(Script(body=bed("chat_ok.json")))
    gw = await gateway(config("bedrock", urls={"bedrock": fake.base_url}))
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
        temperature=0.2,
        stop="END",
        seed=7,
    )
    assert completion.id.startswith("chatcmpl-") and completion.model == UPSTREAM
    choice = completion.choices[0]
    assert choice.message.content == "Hello! How can I help you today?" and choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (2316, 12, 2328)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 2048
    assert usage.prompt_tokens_details.cache_write_tokens == 256
    assert fake.rejected == [] and fake.raw_paths == ["/model/us.anthropic.claude-sonnet-4-20250514-v1:0/converse"]
    [seen] = fake.requests
    assert seen.headers["Content-Type"] == "application/json" and "X-Amz-Security-Token" not in seen.headers
    sent = orjson.loads(seen.body)
    assert_valid_converse_request(sent)
    assert sent == {
        "messages": [
            {"role": "user", "content": [{"text": "hi"}]},
            {"role": "assistant", "content": [{"text": "Hello."}]},
            {"role": "user", "content": [{"text": "again"}]},
        ],
        "system": [{"text": "You are terse."}],
        "inferenceConfig": {"maxTokens": 256, "temperature": 0.2, "stopSequences": ["END"]},
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


async def test_text_stream_matches_the_non_stream_completion(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake())
    fake.script(
        Script(body=bed("chat_ok.json")),
        Script(sse=streams.frames_of(bed("stream_ok.eventstream")), headers=EVENTSTREAM),
    )
    gw = await gateway(config("bedrock", urls={"bedrock": fake.base_url}))
    client = openai_client(gw)
    req: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    whole = await client.chat.completions.create(model=MODEL, **req)
    streamed, chunks = await _stream_final(client, **req, stream_options={"include_usage": True})
    assert streamed.model_dump(include={"model", "usage"}) == whole.model_dump(include={"model", "usage"})
    message = {"role", "content", "refusal", "tool_calls"}
    assert streamed.choices[0].message.model_dump(include=message) == whole.choices[0].message.model_dump(
        include=message
    )
    assert streamed.choices[0].finish_reason == whole.choices[0].finish_reason == "stop"
    assert all(c.id == streamed.id for c in chunks)
    assert fake.rejected == [] and fake.raw_paths[1].endswith("-v1:0/converse-stream")
    await client.close()


async def test_parallel_tool_calls_stream_and_non_stream_give_the_same_completion(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake())
    tools_stream = Script(sse=streams.frames_of(bed("stream_tools.eventstream")), headers=EVENTSTREAM)
    fake.script(Script(body=bed("chat_tool_use.json")), tools_stream)
    gw = await gateway(config("bedrock", urls={"bedrock": fake.base_url}))
    client = openai_client(gw)
    req: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Weather in Paris, time in London?"}],
        "tools": TOOLS,
        "tool_choice": "auto",
    }
    whole = await client.chat.completions.create(model=MODEL, **req)
    streamed, chunks = await _stream_final(client, **req, stream_options={"include_usage": True})
    for completion in (whole, streamed):
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "I'll check the weather in Paris and the time in London."
        calls = [(c.id, c.function.name, orjson.loads(c.function.arguments)) for c in choice.message.tool_calls or ()]
        assert calls == [
            ("tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "get_weather", {"location": "Paris, France", "unit": "celsius"}),
            ("tooluse_3ZqHh1YbQzqkP0Ezv1fLbg", "get_time", {"timezone": "Europe/London"}),
        ]
        usage = completion.usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (2272, 89)
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 1800
    starts = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or () if tc.id]
    assert [(tc.index, tc.id) for tc in starts] == [
        (0, "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q"),
        (1, "tooluse_3ZqHh1YbQzqkP0Ezv1fLbg"),
    ]
    for seen in fake.requests:
        sent = orjson.loads(seen.body)
        assert_valid_converse_request(sent)
        assert sent["toolConfig"] == {
            "tools": [
                {
                    "toolSpec": {
                        "name": "get_weather",
                        "inputSchema": {"json": TOOLS[0]["function"]["parameters"]},
                        "description": "Current weather for a city",
                    }
                },
                {"toolSpec": {"name": "get_time", "inputSchema": {"json": TOOLS[1]["function"]["parameters"]}}},
            ],
            "toolChoice": {"auto": {}},
        }
    assert fake.rejected == []
    await client.close()


async def test_reasoning_stream_carries_thinking_as_reasoning(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake())
    fake.script(Script(sse=streams.frames_of(bed("stream_thinking.eventstream")), headers=EVENTSTREAM))
    gw = await gateway(config("bedrock", urls={"bedrock": fake.base_url}))
    client = openai_client(gw)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "gcd(1071, 462)?"}], reasoning_effort="medium", stream=True
    )
    reasoning, text = [], []
    async for chunk in stream:
        if chunk.choices:
            reasoning.append(getattr(chunk.choices[0].delta, "reasoning", None) or "")
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(reasoning).endswith("So the GCD is 21.") and "".join(text).endswith("is **21**.")
    sent = orjson.loads(fake.requests[0].body)
    assert sent["additionalModelRequestFields"] == {"thinking": {"type": "enabled", "budget_tokens": 4096}}
    assert sent["inferenceConfig"] == {"maxTokens": 4096 + 4096}
    await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_throttling_fails_over_to_a_healthy_provider(aiohttp_server, gateway, stream):
    busy, ok = await serve(aiohttp_server, BedrockFake()), await serve(aiohttp_server, BedrockFake())
    if stream:  # ConverseStream throttles with an exception frame once the stream is open
        frames = [streams.START, streams.exception("throttlingException", "Too many requests, please wait.")]
        busy.script(Script(sse=frames, headers=EVENTSTREAM))
        ok.script(Script(sse=streams.frames_of(bed("stream_ok.eventstream")), headers=EVENTSTREAM))
    else:
        busy.script(Script(status=429, body=bed("chat_429.json"), headers=THROTTLED))
        ok.script(Script(body=bed("chat_ok.json")))
    gw = await gateway(config("busy", "ok", urls={"busy": busy.base_url, "ok": ok.base_url}))
    client = openai_client(gw)
    req: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "extra_body": {"provider": {"order": ["busy", "ok"]}},
    }
    if stream:
        pieces = [
            c.choices[0].delta.content or ""
            async for c in await client.chat.completions.create(**req, stream=True)
            if c.choices
        ]
        assert "".join(pieces) == "Hello! How can I help you today?"
    else:
        completion = await client.chat.completions.create(**req)
        assert completion.choices[0].message.content == "Hello! How can I help you today?"
    assert (len(busy.requests), len(ok.requests)) == (1, 1)
    assert busy.rejected == ok.rejected == []
    await client.close()


async def test_throttling_from_the_only_provider_reaches_the_client_in_openai_shape(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake())
    fake.script(Script(status=429, body=bed("chat_429.json"), headers={**THROTTLED, "Retry-After": "3"}))
    gw = await gateway(config("bedrock", urls={"bedrock": fake.base_url}))
    client = openai_client(gw)
    with pytest.raises(openai.RateLimitError) as e:
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.response.headers["Retry-After"] == "3"
    assert e.value.body == {
        "message": "Too many requests, please wait before trying again.",
        "type": "rate_limit_error",
        "param": None,
        "code": "ThrottlingException",
    }
    await client.close()


async def test_400_is_relayed_in_openai_shape_without_failover(aiohttp_server, gateway, http):
    bad, other = await serve(aiohttp_server, BedrockFake()), await serve(aiohttp_server, BedrockFake())
    bad.script(Script(status=400, body=bed("chat_400.json"), headers={"x-amzn-ErrorType": "ValidationException:x"}))
    gw = await gateway(config("bad", "other", urls={"bad": bad.base_url, "other": other.base_url}))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}
    body["provider"] = {"order": ["bad", "other"]}
    async with http.post(gw.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status == 400 and r.headers["Content-Type"].startswith("application/json")
        assert orjson.loads(await r.read()) == {
            "error": {
                "message": orjson.loads(bed("chat_400.json"))["message"],
                "type": "invalid_request_error",
                "param": None,
                "code": "ValidationException",
            }
        }
    assert (len(bad.requests), len(other.requests)) == (1, 0)
    client = openai_client(gw)  # and the SDK surfaces Bedrock's message
    with pytest.raises(openai.BadRequestError, match="maximum allowed number of output tokens"):
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"provider": body["provider"]}
        )
    await client.close()


async def test_an_arn_model_id_is_one_path_segment_and_its_signature_holds(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake())
    fake.script(Script(body=bed("chat_ok.json")))
    gw = await gateway(config("bedrock", urls={"bedrock": fake.base_url}, model=ARN))
    client = openai_client(gw)
    completion = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello! How can I help you today?"
    assert fake.rejected == []
    assert fake.raw_paths == [
        "/model/arn:aws:bedrock:us-west-2:123456789012:application-inference-profile%2Fa1b2c3d4e5f6/converse"
    ]
    await client.close()


async def test_a_session_token_is_sent_and_signed(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake(token="FwoGZXIvYXdzEXAMPLETOKEN"))
    fake.script(Script(body=bed("chat_ok.json")))
    gw = await gateway(
        config("bedrock", urls={"bedrock": fake.base_url}, api_key=f"{AK}:{SK}:FwoGZXIvYXdzEXAMPLETOKEN")
    )
    client = openai_client(gw)
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert fake.rejected == [] and fake.requests[0].headers["X-Amz-Security-Token"] == "FwoGZXIvYXdzEXAMPLETOKEN"
    await client.close()


async def test_a_bedrock_api_key_goes_as_a_bearer_token_unsigned(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake(bearer="ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl"))
    fake.script(Script(body=bed("chat_ok.json")))
    gw = await gateway(config("bedrock", urls={"bedrock": fake.base_url}, api_key="ABSKQmVkcm9ja0FQSUtleS1leGFtcGxl"))
    client = openai_client(gw)
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert fake.rejected == [] and not any(h.startswith("X-Amz-") for h in fake.requests[0].headers)
    await client.close()


async def test_an_unsigned_request_is_what_the_fake_rejects(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake())  # expects SigV4, gets a Bearer key
    gw = await gateway(config("bedrock", urls={"bedrock": fake.base_url}, api_key="ABSKnot-sigv4"))
    client = openai_client(gw)
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert fake.rejected and fake.rejected[0].startswith("no SigV4 Authorization header")
    await client.close()


async def test_chat_health_probes_are_signed_too(aiohttp_server, gateway):
    fake = await serve(aiohttp_server, BedrockFake())
    fake.script(Script(body=bed("chat_ok.json")))
    probe = {"interval-s": 0.05, "kind": "chat", "jitter": 0}
    await gateway(config("bedrock", urls={"bedrock": fake.base_url}, probe=probe))
    async with asyncio.timeout(5):
        while not fake.requests:
            await asyncio.sleep(0.02)
    assert fake.rejected == [] and fake.raw_paths[0].endswith("-v1:0/converse")
    assert orjson.loads(fake.requests[0].body)["inferenceConfig"] == {"maxTokens": 1}


async def test_models_probes_stand_down_instead_of_reporting_an_unchecked_ok():
    provider = ProviderConfig(name="bedrock", adapter="bedrock", base_url="http://127.0.0.1:9", api_key="ABSKbearer")
    ep = Endpoint("bedrock", UPSTREAM, adapter("ABSKbearer"), 1.0, Price(), time.monotonic)
    # returns at once, before any sleep or report: a client or monitor is never touched
    await asyncio.wait_for(probe_provider(provider, [ep], None, None, random.Random(0)), 1)  # type: ignore[arg-type]


# --- request translation ---


def test_system_developer_and_merged_turns():
    out = translate(
        messages=[
            {"role": "system", "content": "Be terse."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "there"}, {"type": "text", "text": ""}]},
            {"role": "assistant", "content": ""},
        ]
    )
    assert out == {
        "messages": [{"role": "user", "content": [{"text": "hi"}, {"text": "there"}]}],
        "system": [{"text": "Be terse."}, {"text": "Answer in French."}],
    }


def test_images_documents_and_cache_points():
    out = translate(
        messages=[
            {
                "role": "system",
                "content": [{"type": "text", "text": "Style guide.", "cache_control": {"type": "ephemeral"}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral", "ttl": "1h"}},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ", "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "s3://bucket/cats/tabby.PNG"}},
                    {
                        "type": "file",
                        "file": {
                            "filename": "Q3 report (final).pdf",
                            "file_data": "data:application/pdf;base64,JVBERi0=",
                        },
                    },
                    {"type": "file", "file": {"file_data": "data:text/csv;base64,YSxi"}},
                ],
            },
        ],
        tools=[{**TOOLS[0], "cache_control": {"type": "ephemeral"}}],
    )
    assert out["system"] == [{"text": "Style guide."}, {"cachePoint": {"type": "default"}}]
    assert out["messages"][0]["content"] == [
        {"text": "What is this?"},
        {"cachePoint": {"type": "default", "ttl": "1h"}},
        {"image": {"format": "jpeg", "source": {"bytes": "/9j/4AAQ"}}},
        {"image": {"format": "png", "source": {"s3Location": {"uri": "s3://bucket/cats/tabby.PNG"}}}},
        {"document": {"format": "pdf", "name": "Q3 report (final)", "source": {"bytes": "JVBERi0="}}},
        {"document": {"format": "csv", "name": "document 5", "source": {"bytes": "YSxi"}}},
    ]
    assert out["toolConfig"]["tools"][1] == {"cachePoint": {"type": "default"}}


def test_tool_calls_and_tool_results_make_one_user_turn():
    out = translate(
        messages=[
            {"role": "user", "content": "Weather in Paris, time in London?"},
            {
                "role": "assistant",
                "content": "Checking.",
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
                {"text": "Checking."},
                {"toolUse": {"toolUseId": "call_1", "name": "get_weather", "input": {"location": "Paris"}}},
                {"toolUse": {"toolUseId": "call_2", "name": "get_time", "input": {}}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"toolResult": {"toolUseId": "call_1", "content": [{"text": "18°C"}]}},
                {"toolResult": {"toolUseId": "call_2", "content": [{"text": "14:05"}]}},
                {"text": "And tomorrow?"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "history", "expected"),
    [
        (None, False, None),
        ("auto", False, {"auto": {}}),
        ("required", False, {"any": {}}),
        ({"type": "function", "function": {"name": "get_time"}}, False, {"tool": {"name": "get_time"}}),
        ("none", False, "no toolConfig"),
        ("none", True, None),  # tool blocks in the conversation: Bedrock requires the tools, choice left out
    ],
)
def test_tool_choice(choice, history, expected):
    messages: list[dict[str, Any]] = [{"role": "user", "content": "time?"}]
    if history:
        call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
        messages += [
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "9"},
        ]
    out = translate(messages=messages, tools=TOOLS, **({"tool_choice": choice} if choice is not None else {}))
    if expected == "no toolConfig":
        assert "toolConfig" not in out
    else:
        assert len(out["toolConfig"]["tools"]) == 2 and out["toolConfig"].get("toolChoice") == expected


@pytest.mark.parametrize(
    ("model", "req", "inference", "extra"),
    [
        (
            UPSTREAM,
            {"max_tokens": 100, "top_p": 0.9, "stop": ["a", "b"]},
            {"maxTokens": 100, "topP": 0.9, "stopSequences": ["a", "b"]},
            None,
        ),
        (UPSTREAM, {"max_completion_tokens": 50, "max_tokens": 99}, {"maxTokens": 50}, None),
        (
            UPSTREAM,
            {"reasoning_effort": "high", "top_k": 5},
            {"maxTokens": 4096 + 16384},
            {"thinking": {"type": "enabled", "budget_tokens": 16384}, "top_k": 5},
        ),
        (
            UPSTREAM,
            {"reasoning": {"max_tokens": 2000}, "max_tokens": 8000},
            {"maxTokens": 8000},
            {"thinking": {"type": "enabled", "budget_tokens": 2000}},
        ),
        (UPSTREAM, {"reasoning_effort": "none"}, None, None),
        ("amazon.nova-pro-v1:0", {"reasoning_effort": "high", "top_k": 5}, None, None),  # not Claude: dropped
        (ARN, {"reasoning_effort": "low"}, None, None),  # an application profile does not name its model
    ],
)
def test_inference_config_and_reasoning(model, req, inference, extra):
    out = translate(model, **req)
    assert out.get("inferenceConfig") == inference
    assert out.get("additionalModelRequestFields") == extra


def test_json_schema_becomes_output_config():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "description": "A city", "schema": schema}}
    out = translate(response_format=fmt)
    json_schema = out["outputConfig"]["textFormat"]["structure"]["jsonSchema"]
    assert out["outputConfig"]["textFormat"]["type"] == "json_schema"
    assert orjson.loads(json_schema.pop("schema")) == schema and json_schema == {
        "name": "place",
        "description": "A city",
    }
    assert "outputConfig" not in translate(response_format={"type": "text"})


def test_openai_only_and_gateway_fields_are_dropped():
    out = translate(
        user="u-1", seed=3, frequency_penalty=0.1, logprobs=True, parallel_tool_calls=False, stream=True,
        stream_options={"include_usage": True}, provider={"order": ["x"]}, metadata={"a": "b"},
    )  # fmt: skip
    assert out == {"messages": [{"role": "user", "content": [{"text": "hi"}]}]}


def _user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.parametrize(
    ("req", "param"),
    [
        ({"n": 2}, "n"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        (
            {"messages": _user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})},
            "messages[0].content[0].image_url.url",
        ),
        (
            {"messages": _user({"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}})},
            "messages[0].content[0].image_url.url",
        ),
        (
            {"messages": _user({"type": "image_url", "image_url": {"url": "s3://b/a.tiff"}})},
            "messages[0].content[0].image_url.url",
        ),
        ({"messages": _user({"type": "input_audio", "input_audio": {}})}, "messages[0].content[0].type"),
        ({"messages": _user({"type": "file", "file": {"file_id": "file-1"}})}, "messages[0].content[0].file"),
        (
            {"messages": _user({"type": "file", "file": {"file_data": "data:image/png;base64,iVBO"}})},
            "messages[0].content[0].file.file_data",
        ),
        (
            {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "critic", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}
                ]
            },
            "messages[0].tool_calls[0].function",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        ({"messages": "hi"}, "messages"),
    ],
)
def test_what_cannot_map_is_a_400_naming_the_field(req, param):
    with pytest.raises(BadRequest) as e:
        build_request(orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **req}), UPSTREAM)
    assert e.value.param == param


# --- targets and auth ---


def test_targets_are_per_model_and_stream_and_only_for_chat():
    a = adapter()
    t = a.target("chat", UPSTREAM, False)
    assert t is not None and t is a.target("chat", UPSTREAM, False)  # built once
    assert t.path == "/model/us.anthropic.claude-sonnet-4-20250514-v1:0/converse"
    s = a.target("chat", ARN, True)
    assert s is not None and s.path.endswith("application-inference-profile%2Fa1b2c3d4e5f6/converse-stream")
    assert s.method == "POST" and s.headers["Content-Type"] == "application/json"
    assert "Authorization" not in s.headers  # SigV4: made per request by sign()
    assert all(a.target(kind, UPSTREAM, False) is None for kind in ("models", "embeddings", "completions"))


def test_sign_gives_sigv4_headers_over_the_exact_body():
    a = adapter(f"{AK}:{SK}:TOKEN")
    t = a.target("chat", UPSTREAM, False)
    assert t is not None
    headers = a.sign(t, b"{}") or {}
    assert set(headers) == {"Authorization", "X-Amz-Date", "X-Amz-Content-SHA256", "X-Amz-Security-Token"}
    assert headers["X-Amz-Content-SHA256"] == hashlib.sha256(b"{}").hexdigest()
    assert "SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token," in headers["Authorization"]
    assert (
        f"Credential={AK}/" in headers["Authorization"]
        and f"/{REGION}/bedrock/aws4_request" in headers["Authorization"]
    )


@pytest.mark.parametrize(
    ("host", "region"),
    [
        ("bedrock-runtime.us-east-1.amazonaws.com", "us-east-1"),
        ("bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "us-gov-west-1"),
        ("bedrock-runtime.cn-north-1.amazonaws.com.cn", "cn-north-1"),
        ("vpce-0a1b2c3d4e5f-abcdefgh.bedrock-runtime.eu-central-1.vpce.amazonaws.com", "eu-central-1"),
        ("127.0.0.1", REGION),  # not an AWS host: AWS_REGION
    ],
)
def test_region_comes_from_the_host_else_aws_region(host, region):
    assert bedrock_aws.region_of(host, {"AWS_REGION": REGION}) == region


def test_credentials_from_api_key_or_environment(monkeypatch: pytest.MonkeyPatch):
    bearer = adapter("ABSKbearer")
    t = bearer.target("chat", UPSTREAM)
    assert t is not None and t.headers["Authorization"] == "Bearer ABSKbearer" and bearer.sign(t, b"") is None
    monkeypatch.setenv("AWS_BEARER_TOKEN_BEDROCK", "ABSKfromenv")
    t = adapter(None).target("chat", UPSTREAM)
    assert t is not None and t.headers["Authorization"] == "Bearer ABSKfromenv"
    monkeypatch.delenv("AWS_BEARER_TOKEN_BEDROCK")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AK)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SK)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "TOKEN")
    a = adapter(None)
    t = a.target("chat", UPSTREAM)
    assert t is not None and (a.sign(t, b"") or {})["X-Amz-Security-Token"] == "TOKEN"


def test_missing_credentials_or_region_fail_at_startup_naming_the_fix(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ConfigError, match="no AWS credentials"):
        adapter(None)
    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(ConfigError, match="set AWS_REGION"):
        adapter()
    assert adapter(base_url="https://bedrock-runtime.eu-west-3.amazonaws.com") is not None
    assert adapter("ABSKbearer") is not None  # a Bearer key needs no region


def test_without_botocore_the_adapter_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    bedrock_aws._botocore.cache_clear()
    monkeypatch.setitem(sys.modules, "botocore.eventstream", None)  # makes its import fail
    try:
        with pytest.raises(ConfigError, match=r"pip install 'hedgerow\[bedrock\]'"):
            adapter()
    finally:
        bedrock_aws._botocore.cache_clear()


def test_the_gateway_does_not_import_botocore_unless_a_bedrock_provider_is_built():
    code = "import sys, adapters, proxy.server; print('botocore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- responses and errors ---


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
        ("malformed_model_output", "stop"),
        ("tool_use", "stop"),
    ],  # tool_use without a tool call: an ordinary answer to the client
)
def test_stop_reasons(stop_reason, finish):
    body = orjson.loads(bed("chat_ok.json")) | {"stopReason": stop_reason}
    out = orjson.loads(adapter().parse_response(orjson.dumps(body), UPSTREAM))
    assert out["choices"][0]["finish_reason"] == finish


def test_reasoning_blocks_become_reasoning_and_usage_without_cache_fields():
    body = {
        "output": {
            "message": {
                "role": "assistant",
                "content": [
                    {"reasoningContent": {"reasoningText": {"text": "Think.", "signature": "sig"}}},
                    {"reasoningContent": {"redactedContent": "AAAA"}},
                    {"text": "21"},
                ],
            }
        },
        "stopReason": "end_turn",
        "usage": {"inputTokens": 5, "outputTokens": 2, "totalTokens": 7},
    }
    out = orjson.loads(adapter().parse_response(orjson.dumps(body), UPSTREAM))
    assert out["choices"][0]["message"] == {
        "role": "assistant",
        "content": "21",
        "refusal": None,
        "reasoning": "Think.",
    }
    assert out["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 2,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
    }


def test_a_200_without_an_answer_is_a_protocol_error_not_an_empty_completion():
    body = b'{"Output":{"__type":"com.amazon.coral.service#UnknownOperationException"},"Version":"1.0"}'
    with pytest.raises(ValueError, match=r"no output\.message"):
        adapter().parse_response(body, UPSTREAM)


@pytest.mark.parametrize(
    ("status", "body", "error_type", "retryable", "code", "type_"),
    [
        (429, bed("chat_429.json"), "ThrottlingException", True, "ThrottlingException", "rate_limit_error"),
        (
            429,
            b'{"message":"Model is not ready"}',
            "ModelNotReadyException",
            True,
            "ModelNotReadyException",
            "service_unavailable",
        ),
        (
            400,
            b'{"message":"quota"}',
            "ServiceQuotaExceededException",
            True,
            "ServiceQuotaExceededException",
            "rate_limit_error",
        ),
        (
            503,
            b'{"message":"busy"}',
            "ServiceUnavailableException",
            True,
            "ServiceUnavailableException",
            "service_unavailable",
        ),
        (500, bed("chat_500.json"), None, True, "InternalServerException", "server_error"),
        (408, b'{"message":"slow"}', "ModelTimeoutException", True, "ModelTimeoutException", "timeout"),
        (400, bed("chat_400.json"), "ValidationException", False, "ValidationException", "invalid_request_error"),
        (
            403,
            b'{"Message":"User is not authorized"}',
            "AccessDeniedException",
            False,
            "AccessDeniedException",
            "permission_error",
        ),
        (424, b'{"message":"model failed"}', "ModelErrorException", False, "ModelErrorException", "server_error"),
    ],
)
def test_classify_by_status_and_exception_name(status, body, error_type, retryable, code, type_):
    headers = CIMultiDict({"Content-Type": "application/json"})
    if error_type:
        headers["x-amzn-ErrorType"] = f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"
    err = adapter().classify(status, body, headers)
    if not retryable:
        assert err is None
        return
    assert isinstance(err, UpstreamStatus) and err.retryable and err.upstream == "bedrock"
    assert orjson.loads(err.upstream_body)["error"] | {"message": ""} == {
        "message": "",
        "type": type_,
        "param": None,
        "code": code,
    }


def test_error_body_uses_the_body_s_type_else_the_status():
    a = adapter()
    typed = b'{"__type":"com.amazon.coral.validate#ValidationException","message":"bad field"}'
    assert orjson.loads(a.error_body(400, typed))["error"]["code"] == "ValidationException"
    assert orjson.loads(a.error_body(404, b'{"message":"no such model"}'))["error"] == {
        "message": "no such model",
        "type": "invalid_request_error",
        "param": None,
        "code": "ResourceNotFoundException",
    }
    assert (
        orjson.loads(a.error_body(502, b"<html>Bad Gateway</html>"))["error"]["message"] == "<html>Bad Gateway</html>"
    )


# --- the event-stream transcoder ---


def test_stream_chunks_are_valid_openai_chunks_with_one_id():
    from openai.types.chat import ChatCompletionChunk

    for name in STREAMS:
        chunks = chunks_of(transcode(bed(name)))
        assert {c["id"] for c in chunks} == {"chatcmpl-fixed"}
        for c in chunks:
            ChatCompletionChunk.model_validate(c)
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("after_content", [False, True])
def test_an_exception_frame_becomes_an_openai_error_and_ends_the_stream(after_content):
    text = streams.event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hel"}})
    frames = [streams.START, *([text] if after_content else []), streams.exception("modelStreamErrorException", "boom")]
    frames.append(text)  # anything after the error is not part of the answer
    out = transcode(b"".join(frames))
    assert out.endswith(b"data: [DONE]\n\n")
    events = [orjson.loads(e.removeprefix(b"data: ")) for e in out.split(b"\n\n")[:-2] if e]
    assert events[-1] == {
        "error": {"message": "boom", "type": "server_error", "param": None, "code": "ModelStreamErrorException"}
    }
    assert [e["choices"][0]["delta"].get("content") for e in events[:-1]] == ["", *(["Hel"] if after_content else [])]


def test_a_stream_cut_before_message_stop_ends_with_an_error_not_a_clean_done():
    data = bed("stream_ok.eventstream")
    frames = streams.frames_of(data)
    out = transcode(b"".join(frames[:3]))
    assert b'"code":"InternalServerException"' in out and b"before messageStop" in out and out.endswith(b"[DONE]\n\n")


def test_corrupt_framing_is_an_error_after_what_was_readable():
    frames = streams.frames_of(bed("stream_ok.eventstream"))
    broken = bytearray(frames[2])
    broken[-1] ^= 0xFF  # the message CRC no longer matches
    out = transcode(b"".join([frames[0], frames[1], bytes(broken), *frames[3:]]))
    events = [e for e in out.split(b"\n\n") if e]
    assert b'"content":"Hello"' in events[1] and b"unreadable event stream (ChecksumMismatch" in events[2]
    assert events[3:] == [b"data: [DONE]"]


def test_error_frames_and_unknown_events_are_handled():
    error = streams.frame({":message-type": "error", ":error-code": "InternalFailure", ":error-message": "oops"}, b"")
    out = transcode(streams.START + error)
    assert b'"message":"oops"' in out and b'"code":"InternalFailure"' in out
    newer = streams.event("somethingNew", {"x": 1})
    citation = streams.event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"citation": {"title": "t"}}})
    data = bed("stream_ok.eventstream")
    assert transcode(newer + citation + data) == transcode(data)


@pytest.mark.parametrize("name", STREAMS)
def test_every_single_cut_point_gives_the_same_output(name):
    data = bed(name)
    whole = transcode(data)
    for i in range(len(data) + 1):
        assert transcode(data, [i]) == whole, i


@pytest.mark.parametrize("name", STREAMS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_set_of_cut_points_gives_the_same_output(name, data):
    raw = bed(name)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=40), label="cuts")
    assert transcode(raw, cuts) == transcode(raw)


def test_transcoding_and_signing_cost_is_measured():
    frames = streams.frames_of(bed("stream_ok.eventstream"))

    def run_once() -> None:
        tx = BedrockTranscoder(UPSTREAM)
        for frame in frames:  # one network read per event: the worst realistic case
            tx.feed(frame)
        tx.finish()

    runs = 2000
    seconds = min(timeit.repeat(run_once, number=runs, repeat=3))
    rate = len(frames) * runs / seconds
    print(f"\nbedrock transcoder: {rate:,.0f} events/s ({seconds / runs / len(frames) * 1e6:.2f} µs per event)")
    a = adapter()
    target = a.target("chat", UPSTREAM, True)
    assert target is not None
    body = build_request(
        orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi " * 500}]}), UPSTREAM
    )
    signing = min(timeit.repeat(lambda: a.sign(target, body), number=2000, repeat=3)) / 2000
    print(f"bedrock SigV4 signing: {signing * 1e6:.1f} µs per request ({len(body)} byte body)")
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
    assert isinstance(out["messages"], list)


_B_TYPES = ["messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop", "messageStop", "metadata"]
_B_TYPES += ["throttlingException", "validationException", "modelStreamErrorException", "unknownEvent"]
_B_KEYS = ["role", "contentBlockIndex", "delta", "text", "toolUse", "toolUseId", "name", "input", "start"]
_B_KEYS += ["stopReason", "usage", "inputTokens", "outputTokens", "totalTokens", "cacheReadInputTokens", "metrics"]
_B_KEYS += ["latencyMs", "reasoningContent", "signature", "redactedContent", "citation", "message", "p"]
_B_WORDS = ["assistant", "end_turn", "tool_use", "max_tokens", "stop_sequence", "guardrail_intervened"]
_B_WORDS += ["content_filtered", "f", "{}", '{"a": 1}']


def _any_frame(kind: str, message_type: str, data: dict[str, Any]) -> bytes:
    headers = {":event-type": kind, ":exception-type": kind, ":content-type": "application/json"}
    return streams.frame({**headers, ":message-type": message_type}, orjson.dumps(data))


any_bedrock_frames = st.builds(
    _any_frame,
    st.sampled_from(_B_TYPES),
    st.sampled_from(["event", "exception", "error"]),
    st.dictionaries(st.sampled_from(_B_KEYS), json_like(_B_KEYS, _B_WORDS), max_size=4),
)


@settings(max_examples=100)
@given(frames=st.lists(any_bedrock_frames | st.binary(max_size=12), max_size=8))
def test_any_event_stream_gives_openai_chunks_or_an_upstream_error(frames):
    tx = BedrockTranscoder(UPSTREAM)
    try:
        out = tx.feed(b"".join(frames)) + tx.finish()
    except UpstreamError:
        return
    assert out.endswith(b"data: [DONE]\n\n")
    for event in out.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ")
        if event != b"data: [DONE]":
            assert isinstance(orjson.loads(event[6:]), dict)
