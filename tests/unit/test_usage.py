"""Usage → cost: reading usage from answers and stream tails, pricing it, splicing the cost back in; and the
OpenAI-family adapters asking streams for their usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters import REGISTRY
from adapters.azure import AzureOpenAIAdapter
from adapters.openai import OpenAIAdapter
from proxy.accounting.usage import (
    Cost,
    Usage,
    price_usage,
    splice_usage,
    usage_cost_fields,
    usage_from_body,
    usage_from_messages_body,
    usage_from_messages_stream,
    usage_from_stream,
)
from proxy.config import Price, ProviderConfig
from tests.conftest import AUTH, gateway_config
from tests.fakes import FakeUpstream, Script, fixture, sse_events

FIXTURES = Path(__file__).parent.parent / "fixtures"


def fx(provider: str, name: str) -> bytes:
    return (FIXTURES / provider / name).read_bytes()


def adapter(name: str, **kw: Any) -> Any:
    provider = ProviderConfig(name=name, adapter=name, base_url="https://upstream.test/v1", api_key="sk-x", **kw)
    return REGISTRY[name](provider, "https://upstream.test/v1")


# --- usage_from_body ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "name", "expected"),
    [
        ("openai", "chat_ok.json", Usage(prompt_tokens=9, completion_tokens=10)),
        ("openai", "completion_ok.json", Usage(prompt_tokens=5, completion_tokens=7)),
        ("openai", "embeddings_ok.json", Usage(prompt_tokens=8)),
        ("azure", "chat_ok.json", Usage(prompt_tokens=9, completion_tokens=10)),
    ],
)
def test_usage_from_recorded_openai_bodies(provider: str, name: str, expected: Usage):
    assert usage_from_body(fx(provider, name)) == expected


def test_usage_from_bodies_the_translating_adapters_emit_counts_each_token_once():
    # Anthropic and Bedrock leave cache reads (2048) and writes (256) out of their input count (12); the
    # adapters add them to prompt_tokens and name them in prompt_tokens_details, which is what we read.
    cached = Usage(prompt_tokens=12 + 2048 + 256, completion_tokens=12, cached_tokens=2048, cache_write_tokens=256)
    for name in ("anthropic", "bedrock"):
        assert usage_from_body(adapter(name).parse_response(fx(name, "chat_ok.json"), "m")) == cached, name
    # Gemini's promptTokenCount already includes the cached part; thoughts are completion tokens.
    gemini = usage_from_body(adapter("gemini").parse_response(fx("gemini", "chat_ok.json"), "m"))
    assert gemini == Usage(prompt_tokens=2061, completion_tokens=10 + 24, cached_tokens=2048, reasoning_tokens=24)


def test_openai_details_and_deepseek_cache_hits():
    body = orjson.dumps(
        {
            "usage": {
                "prompt_tokens": 100,
                "completion_tokens": 50,
                "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 30},
                "completion_tokens_details": {"reasoning_tokens": 20},
            }
        }
    )
    assert usage_from_body(body) == Usage(100, 50, cached_tokens=60, cache_write_tokens=30, reasoning_tokens=20)
    hits = {"prompt_tokens": 100, "completion_tokens": 5, "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 36}
    deepseek = orjson.dumps({"usage": hits})
    assert usage_from_body(deepseek) == Usage(100, 5, cached_tokens=64)
    both = b'{"usage":{"prompt_tokens":100,"prompt_tokens_details":{"cached_tokens":10},"prompt_cache_hit_tokens":64}}'
    assert usage_from_body(both) == Usage(100, 0, cached_tokens=10)  # OpenAI's field wins
    nulls = b'{"usage":{"prompt_tokens":3,"completion_tokens":null,"prompt_tokens_details":null}}'
    assert usage_from_body(nulls) == Usage(3, 0)


@pytest.mark.parametrize("body", [b"", b"not json", b'{"usage":null}', b'{"id":"x"}', b'{"usage":"many"}', b"[1]"])
def test_no_usage_is_none(body: bytes):
    assert usage_from_body(body) is None


# --- usage_from_stream --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [420, 1024, 4096, 1 << 20])
@pytest.mark.parametrize("provider", ["openai", "azure"])
def test_usage_from_the_tail_of_recorded_streams(provider: str, size: int):
    stream = fx(provider, "stream_ok.sse")
    assert b'"usage":null' in stream  # every chunk before the last says so: never taken for the usage
    assert usage_from_stream(stream[-size:]) == Usage(prompt_tokens=9, completion_tokens=10)


def test_usage_from_transcoded_streams_of_every_translating_adapter():
    raw = {"anthropic": fx("anthropic", "stream_ok.sse"), "gemini": fx("gemini", "stream_thinking.sse")}
    tx = adapter("anthropic").new_transcoder("m")
    out = tx.feed(raw["anthropic"]) + tx.finish()
    want = Usage(prompt_tokens=12 + 2048 + 256, completion_tokens=12, cached_tokens=2048, cache_write_tokens=256)
    assert usage_from_stream(out[-4096:]) == want
    tx = adapter("gemini").new_transcoder("m")
    out = tx.feed(raw["gemini"]) + tx.finish()
    assert usage_from_stream(out[-4096:]) == Usage(prompt_tokens=18, completion_tokens=9 + 71, reasoning_tokens=71)


def test_stream_usage_is_not_fooled_by_nulls_strings_or_a_cut_tail():
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}\n\n'
    tricky = b'data: {"choices":[{"delta":{"content":"say \\"usage\\": {\\"prompt_tokens\\": 999}"}}],"usage":null}\n\n'
    done = b"data: [DONE]\n\n"
    assert usage_from_stream(usage + tricky + done) == Usage(4, 2)  # the last *non-null* usage
    assert usage_from_stream(tricky + done) is None
    assert usage_from_stream(usage[20:] + done) == Usage(4, 2)  # the tail may begin mid-event
    assert usage_from_stream(usage[:-8]) is None  # cut before the usage object closes
    assert usage_from_stream(usage + usage[:-8]) == Usage(4, 2)  # …then an earlier complete one counts
    spaced = b'data: {"usage" :\n {"prompt_tokens" : 1 , "completion_tokens": 1}}\n\n'
    assert usage_from_stream(spaced) == Usage(1, 1)
    assert usage_from_stream(b"") is None and usage_from_stream(b": keep-alive\n\n") is None


# --- Anthropic Messages -------------------------------------------------------------------------------------


def test_usage_from_an_anthropic_message_body_adds_the_cache_counts_to_the_prompt():
    got = usage_from_messages_body(fx("anthropic", "chat_ok.json"))
    assert got == Usage(prompt_tokens=12 + 2048 + 256, completion_tokens=12, cached_tokens=2048, cache_write_tokens=256)
    # The same answer through the OpenAI adapter path reads the same: both sides agree on cache writes.
    assert usage_from_body(adapter("anthropic").parse_response(fx("anthropic", "chat_ok.json"), "m")) == got
    thinking = b'{"usage":{"input_tokens":5,"output_tokens":40,"output_tokens_details":{"thinking_tokens":30}}}'
    assert usage_from_messages_body(thinking) == Usage(5, 40, reasoning_tokens=30)
    assert usage_from_messages_body(b'{"type":"error"}') is None and usage_from_messages_body(b"x") is None


@pytest.mark.parametrize("size", [512, 1024, 1 << 20])
def test_usage_from_an_anthropic_stream_merges_message_start_and_the_final_message_delta(size: int):
    stream = fx("anthropic", "stream_ok.sse")
    got = usage_from_messages_stream(stream[:size], stream[-size:])
    # message_start: input 12, cache write 256, read 2048, output 1; message_delta: output 12 (cumulative).
    assert got == Usage(prompt_tokens=12 + 2048 + 256, completion_tokens=12, cached_tokens=2048, cache_write_tokens=256)
    thinking = fx("anthropic", "stream_thinking.sse")
    assert usage_from_messages_stream(thinking[:1024], thinking[-1024:]) == Usage(85, 197)


def test_a_final_message_delta_with_input_counts_wins_over_message_start():
    # What adapters/anthropic_front.py streams for non-Anthropic endpoints: zeros first, everything at the end.
    head = (
        b"event: message_start\n"
        b'data: {"type":"message_start","message":{"usage":{"input_tokens":0,"output_tokens":0}}}\n\n'
    )
    tail = (
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
        b'"usage":{"input_tokens":7,"cache_creation_input_tokens":3,"cache_read_input_tokens":90,"output_tokens":9}}\n\n'
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    )
    assert usage_from_messages_stream(head, tail) == Usage(100, 9, cached_tokens=90, cache_write_tokens=3)
    assert usage_from_messages_stream(head, b"") == Usage(0, 0)  # cut before the end: what is known
    assert usage_from_messages_stream(b"", tail) == Usage(100, 9, cached_tokens=90, cache_write_tokens=3)
    assert usage_from_messages_stream(b"", b"") is None


# --- price_usage: each token once, at its own rate ----------------------------------------------------------


def approx(cost: Cost, **want: float) -> None:
    for name, value in want.items():
        assert getattr(cost, name) == pytest.approx(value, rel=1e-12, abs=1e-15), name


def test_openai_cached_tokens_are_part_of_the_prompt_and_priced_at_the_cache_rate():
    # gpt-4o-mini: 0.15 in, 0.075 cached, 0.60 out. 10,000 prompt tokens of which 8,000 cached; 1,000 out.
    u = usage_from_body(
        b'{"usage":{"prompt_tokens":10000,"completion_tokens":1000,"prompt_tokens_details":{"cached_tokens":8000}}}'
    )
    assert u is not None
    c = price_usage(u, Price(input=0.15, output=0.60, cache_read=0.075), 0.0)
    # 2,000 × 0.15 + 8,000 × 0.075 = 300 + 600 = 900 µ$ ; 1,000 × 0.60 = 600 µ$
    approx(c, prompt=0.0009, completion=0.0006, upstream=0.0015, fee=0.0, total=0.0015)


def test_anthropic_cache_reads_and_writes_each_at_their_rate():
    # claude-sonnet-4: 3 in, 0.30 read, 3.75 write, 15 out; the recorded answer: 12 in, 2048 read, 256 written.
    u = usage_from_messages_body(fx("anthropic", "chat_ok.json"))
    assert u is not None
    c = price_usage(u, Price(input=3, output=15, cache_read=0.30, cache_write=3.75), 0.05)
    prompt = (12 * 3 + 2048 * 0.30 + 256 * 3.75) / 1e6  # 36 + 614.4 + 960 = 1610.4 µ$
    completion = 12 * 15 / 1e6  # 180 µ$
    approx(c, prompt=0.0016104, completion=0.00018, upstream=prompt + completion)
    approx(c, fee=0.05 * 0.0017904, total=1.05 * 0.0017904)


def test_deepseek_cache_hits_at_the_hit_rate():
    u = usage_from_body(b'{"usage":{"prompt_tokens":1000,"completion_tokens":100,"prompt_cache_hit_tokens":600}}')
    assert u is not None
    c = price_usage(u, Price(input=0.28, output=0.42, cache_read=0.028), 0.0)
    # 400 × 0.28 + 600 × 0.028 = 112 + 16.8 = 128.8 µ$ ; 100 × 0.42 = 42 µ$
    approx(c, prompt=0.0001288, completion=0.000042, total=0.0001708)


def test_reasoning_priced_apart_and_the_per_request_price():
    u = Usage(prompt_tokens=1000, completion_tokens=3000, reasoning_tokens=2000)
    c = price_usage(u, Price(input=1, output=2, reasoning=5, request=0.01), 0.1)
    # 1,000 × 1 = 1,000 µ$ ; 1,000 × 2 + 2,000 × 5 = 12,000 µ$ ; + 0.01 $ per request
    approx(c, prompt=0.001, completion=0.012, request=0.01, upstream=0.023, fee=0.0023, total=0.0253)
    same = price_usage(u, Price(input=1, output=2), 0.0)  # no separate reasoning price: all output
    approx(same, completion=0.006, upstream=0.007)


def test_unpriced_cache_rates_are_the_input_rate_and_inconsistent_counts_never_go_negative():
    u = Usage(prompt_tokens=100, completion_tokens=10, cached_tokens=30, cache_write_tokens=20)
    approx(price_usage(u, Price(input=2, output=4), 0), prompt=100 * 2 / 1e6, completion=10 * 4 / 1e6)
    odd = Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=50, reasoning_tokens=9)
    approx(price_usage(odd, Price(input=1, output=1, cache_read=0.5, reasoning=3), 0), prompt=25e-6, completion=15e-6)
    assert price_usage(Usage(), Price(), 0.2) == Cost()


def test_usage_cost_fields_is_openrouters_usage_accounting_shape():
    c = price_usage(Usage(prompt_tokens=1000, completion_tokens=500), Price(input=1, output=2), 0.05)
    fields = usage_cost_fields(c)
    assert not fields.startswith(b"{") and not fields.endswith(b",")
    doc = json.loads(b"{" + fields + b"}")
    assert doc == {
        "cost": pytest.approx(0.0021),
        "is_byok": False,
        "cost_details": {
            "upstream_inference_cost": pytest.approx(0.002),
            "upstream_inference_prompt_cost": pytest.approx(0.001),
            "upstream_inference_completions_cost": pytest.approx(0.001),
            "gateway_fee": pytest.approx(0.0001),
        },
    }
    tiny = usage_cost_fields(price_usage(Usage(prompt_tokens=1), Price(input=0.01), 0))
    assert json.loads(b"{" + tiny + b"}")["cost"] == pytest.approx(1e-8)  # exponent form is valid JSON


# --- splice_usage -------------------------------------------------------------------------------------------

FIELDS = b'"cost":0.5,"is_byok":false'


def test_splice_into_a_body_an_sse_event_and_an_empty_usage():
    body = fixture("chat_ok.json")
    out = splice_usage(body, FIELDS)
    assert out is not None
    doc, orig = orjson.loads(out), orjson.loads(body)
    assert doc["usage"] == {"cost": 0.5, "is_byok": False, **orig["usage"]}
    assert list(doc["usage"])[:2] == ["cost", "is_byok"]  # first members
    assert {k: v for k, v in doc.items() if k != "usage"} == {k: v for k, v in orig.items() if k != "usage"}
    event = sse_events(fixture("stream_ok.sse"))[-2]
    spliced = splice_usage(event, FIELDS)
    assert spliced is not None and spliced.startswith(b"data: {") and spliced.endswith(b"}\n\n")
    assert orjson.loads(spliced[6:])["usage"]["cost"] == 0.5
    assert splice_usage(b'{"usage":{}}', FIELDS) == b'{"usage":{' + FIELDS + b"}}"  # no dangling comma
    assert splice_usage(b'{"usage" : { \n }}', FIELDS) == b'{"usage" : {' + FIELDS + b" \n }}"
    assert splice_usage(b'{"usage":{"a":1}}', b"") == b'{"usage":{"a":1}}'


def test_splice_takes_the_last_non_null_usage_and_never_one_inside_a_string():
    two = b'{"x":{"usage":{"a":1}},"usage":{"b":2},"z":{"usage":null}}'
    out = splice_usage(two, FIELDS)
    assert out is not None
    assert orjson.loads(out) == {
        "x": {"usage": {"a": 1}},
        "usage": {"cost": 0.5, "is_byok": False, "b": 2},
        "z": {"usage": None},
    }
    in_string = orjson.dumps({"content": 'a "usage":{"b":1} here', "usage": None})
    assert b'\\"usage\\":{' in in_string
    assert splice_usage(in_string, FIELDS) is None
    assert splice_usage(b'{"type":"usage","usage":[]}', FIELDS) is None
    assert splice_usage(b"data: [DONE]\n\n", FIELDS) is None
    key_with_quote = b'{"\\"usage":{"a":1}}'  # the key is `"usage`: not ours
    assert splice_usage(key_with_quote, FIELDS) is None


_json_leaf = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=12)
_text = st.text(alphabet=st.sampled_from(list('ab "{}:\\,usage\n')), max_size=24)
_value = st.recursive(
    _json_leaf | _text,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries((st.text(max_size=6) | _text).filter(lambda k: k != "usage"), inner, max_size=3)
    ),
    max_leaves=8,
)
_usage = st.dictionaries(
    st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "x"]),
    st.integers(0, 10**6) | st.dictionaries(st.sampled_from(["cached_tokens", "y"]), st.integers(0, 99), max_size=2),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(
    before=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "usage"), _value, max_size=4),
    after=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "usage"), _value, max_size=3),
    usage=_usage,
    indent=st.sampled_from([None, 1, 2]),
    separators=st.sampled_from([(",", ":"), (", ", ": "), (" , ", " : ")]),
    sse=st.booleans(),
)
def test_splice_output_is_valid_json_with_the_fields_first_and_everything_else_unchanged(
    before: dict[str, Any],
    after: dict[str, Any],
    usage: dict[str, Any],
    indent: int | None,
    separators: Any,
    sse: bool,
):
    doc = {**before, "usage": usage, **{k: v for k, v in after.items() if k not in before}}
    data = json.dumps(doc, indent=indent, separators=separators if indent is None else (",", ": ")).encode()
    if sse and indent is None:  # one complete SSE event
        data = b"data: " + data + b"\n\n"
    fields = b'"cost":1.25e-05,"is_byok":false,"cost_details":{"gateway_fee":0}'
    out = splice_usage(data, fields)
    assert out is not None
    got = json.loads(out.removeprefix(b"data: "))
    assert list(got["usage"])[:3] == ["cost", "is_byok", "cost_details"]
    assert got["usage"] == {"cost": 1.25e-05, "is_byok": False, "cost_details": {"gateway_fee": 0}, **usage}
    assert {k: v for k, v in got.items() if k != "usage"} == {k: v for k, v in doc.items() if k != "usage"}
    assert out.replace(fields + (b"," if usage else b""), b"", 1) == data  # a splice: nothing else moved


# --- the OpenAI family asks streams for their usage ---------------------------------------------------------

STREAMED = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True})


def _openai(preset: str | None = None) -> OpenAIAdapter:
    provider = ProviderConfig(name="p", preset=preset, base_url="https://upstream.test/v1", api_key="k")
    return OpenAIAdapter(provider, "https://upstream.test/v1")


def test_a_stream_without_include_usage_asks_for_it_in_one_top_level_rewrite():
    a = _openai()
    sent = a.request_body(STREAMED, "m", "m", False)
    assert orjson.loads(sent) == {**orjson.loads(STREAMED), "stream_options": {"include_usage": True}}
    spaced = b'{"model":"m", "prompt":"x\\u00e9",  "stream" : true, "stream_options": {"include_obfuscation": false}}'
    doc = orjson.loads(a.request_body(spaced, "m", "m", False))
    assert doc["stream_options"] == {"include_obfuscation": False, "include_usage": True}  # other options kept
    assert doc["prompt"] == "xé"
    off = orjson.dumps({**orjson.loads(STREAMED), "stream_options": {"include_usage": False}})
    assert orjson.loads(a.request_body(off, "m", "m", False))["stream_options"] == {"include_usage": True}
    null = orjson.dumps({**orjson.loads(STREAMED), "stream_options": None})
    assert orjson.loads(a.request_body(null, "m", "m", False))["stream_options"] == {"include_usage": True}
    # The same rewrite renames the model and drops gateway fields.
    routed = orjson.dumps({**orjson.loads(STREAMED), "provider": {"sort": "price"}})
    assert orjson.loads(a.request_body(routed, "pub", "up", True)) == {
        **orjson.loads(STREAMED),
        "model": "up",
        "stream_options": {"include_usage": True},
    }


def test_bodies_that_need_nothing_stay_the_clients_bytes():
    a = _openai()
    plain = b'{ "model":"m", "messages":[{"role":"user","content":"hi"}] }'
    assert a.request_body(plain, "m", "m", False) is plain
    not_streamed = b'{"model":"m","messages":[],"stream":false}'
    assert a.request_body(not_streamed, "m", "m", False) is not_streamed
    mention = b'{"model":"m","messages":[{"role":"user","content":"\\"stream\\""}]}'
    assert a.request_body(mention, "m", "m", False) is mention
    asked = b'{"model":"m","messages":[], "stream": true, "stream_options": {"include_usage": true}}'
    assert a.request_body(asked, "m", "m", False) is asked


def test_a_preset_without_stream_options_is_not_asked():
    mistral = _openai("mistral")
    assert mistral.request_body(STREAMED, "m", "m", False) is STREAMED
    asked = orjson.dumps({**orjson.loads(STREAMED), "stream_options": {"include_usage": True}})
    assert "stream_options" not in orjson.loads(mistral.request_body(asked, "m", "m", False))  # dropped, as before
    groq = _openai("groq")
    assert orjson.loads(groq.request_body(STREAMED, "m", "m", False))["stream_options"] == {"include_usage": True}


def test_azure_asks_streams_for_usage_and_keeps_the_clients_bytes_otherwise():
    provider = ProviderConfig(name="az", adapter="azure", base_url="https://r.openai.azure.com", api_key="k")
    a = AzureOpenAIAdapter(provider, "https://r.openai.azure.com")
    assert orjson.loads(a.request_body(STREAMED, "openai/gpt-4o", "dep", False))["stream_options"] == {
        "include_usage": True
    }
    plain = b'{"model":"openai/gpt-4o","messages":[]}'
    assert a.request_body(plain, "openai/gpt-4o", "dep", False) is plain


async def test_the_gateway_asks_a_streaming_upstream_for_usage(fake_upstream: FakeUpstream, gateway: Any, http: Any):
    fake_upstream.script(Script(sse=sse_events(fixture("stream_ok.sse"))))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, models={"m": [("fake", "m")]}))
    async with http.post(gw.v1 + "/chat/completions", data=STREAMED, headers=AUTH) as r:
        assert r.status == 200
        assert await r.read() == fixture("stream_ok.sse")  # the stream itself is relayed untouched
    sent = orjson.loads(fake_upstream.requests[0].body)
    assert sent == {**orjson.loads(STREAMED), "stream_options": {"include_usage": True}}
