"""adapters/anthropic_front.py: Anthropic Messages requests → OpenAI chat, OpenAI answers → Anthropic messages
and event streams, and the commit-point check on Anthropic events (proxy/attempt.py).

The stream translation is checked at every cut point (each single cut exhaustively, many cuts by hypothesis):
the events out must not depend on how the OpenAI stream was split into reads. Its output is also read by the
`anthropic` SDK's own accumulator, so "well-formed" means what Anthropic's clients need.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from adapters.anthropic import AnthropicTranscoder
from adapters.anthropic_front import (
    MessagesTranscoder,
    error_body,
    error_doc,
    error_event,
    to_message,
    to_openai_request,
)
from adapters.gemini import GeminiTranscoder
from proxy.attempt import _CONTENT, _ERROR, _NOTHING, classify_messages_event
from proxy.errors import BadRequest, Unauthorized, Unavailable, UnknownModel, UpstreamTimeout
from tests.fakes import fixture
from tests.unit.test_request_validation import accepted, json_like, messages_bodies


def anth(name: str) -> bytes:
    return fixture(name, "anthropic")


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **top: Any) -> bytes:
    choices = [] if delta is None and finish is None else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    doc = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "model": "gpt-x", "choices": choices, **top}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def call(index: int, id: str | None = None, name: str | None = None, args: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"index": index}
    if id is not None:
        out |= {"id": id, "type": "function"}
    fn = {k: v for k, v in (("name", name), ("arguments", args)) if v is not None}
    if fn:
        out["function"] = fn
    return out


USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "prompt_tokens_details": {"cached_tokens": 100}}
DONE = b"data: [DONE]\n\n"

# Interleaved: thinking, text, two tool calls (the second one's start and arguments in one delta), text again.
INTERLEAVED = b"".join(
    [
        chunk({"role": "assistant", "content": ""}),
        chunk({"reasoning": "Think"}),
        chunk({"reasoning_content": "ing."}),
        chunk({"content": "Sure, "}),
        chunk({"content": "calling."}),
        chunk({"tool_calls": [call(0, "call_a", "get_weather", "")]}),
        chunk({"tool_calls": [call(0, args='{"location":')]}),
        chunk({"tool_calls": [call(0, args=' "Paris"}')]}),
        chunk({"tool_calls": [call(1, "call_b", "get_time", '{"tz": "UTC"}')]}),
        chunk({"content": "Done."}),
        chunk({}, "tool_calls"),
        chunk(usage=USAGE),
        DONE,
    ]
)
# Two parallel calls started in one delta (as some servers send them), then no [DONE]: a finished stream anyway.
PARALLEL_NO_DONE = b"".join(
    [
        chunk({"role": "assistant"}),
        chunk({"tool_calls": [call(0, "call_1", "a", "{}"), call(1, "call_2", "b", '{"k": 1}')]}),
        chunk({}, "tool_calls", usage=USAGE),
    ]
)
ERROR_BEFORE_CONTENT = chunk({"role": "assistant", "content": ""}) + (
    b'data: {"error":{"message":"upstream overloaded","type":"service_unavailable","code":null}}\n\n'
)
CUT_SHORT = chunk({"role": "assistant"}) + chunk({"content": "Hel"})


def _openai(anthropic_fixture: str) -> bytes:
    tx = AnthropicTranscoder("claude-sonnet-4-20250514", created=1_700_000_000)
    return tx.feed(anth(anthropic_fixture)) + tx.finish()


def _from_gemini(name: str) -> bytes:
    tx = GeminiTranscoder("gemini-2.5-flash", "gem")
    return tx.feed(fixture(name, "gemini")) + tx.finish()


STREAMS = {
    "openai": fixture("stream_ok.sse"),
    "anthropic-text": _openai("stream_ok.sse"),
    "anthropic-tools": _openai("stream_tools.sse"),
    "anthropic-thinking": _openai("stream_thinking.sse"),
    "gemini-calls": _from_gemini("stream_function_calls.sse"),
    "gemini-thinking": _from_gemini("stream_thinking.sse"),
    "interleaved": INTERLEAVED,
    "parallel-no-done": PARALLEL_NO_DONE,
    "error": ERROR_BEFORE_CONTENT,
    "cut-short": CUT_SHORT,
}


def transcode(data: bytes, cuts: list[int] | None = None) -> bytes:
    tx = MessagesTranscoder()
    bounds = [0, *sorted(set(cuts or ())), len(data)]
    return b"".join(tx.feed(data[a:b]) for a, b in itertools.pairwise(bounds)) + tx.finish()


def events_of(stream: bytes) -> list[dict[str, Any]]:
    """Each event as its data, checking the framing Anthropic uses: `event: <type>` then one `data:` line."""
    out = []
    for event in stream.split(b"\n\n")[:-1]:
        name, data = event.split(b"\n")
        doc = orjson.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + doc["type"].encode()
        out.append(doc)
    assert stream.endswith(b"\n\n")
    return out


_event_type = TypeAdapter(RawMessageStreamEvent)


def accumulate(stream: bytes) -> dict[str, Any]:
    """The message the anthropic SDK builds from the stream, validating every event against its types."""
    snapshot = None
    bufs: dict[int, bytes] = {}
    for doc in events_of(stream):
        if doc["type"] == "ping":
            continue  # Anthropic's keep-alive (in its fixtures; the SDK skips it)
        snapshot = accumulate_event(event=_event_type.validate_python(doc), current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    return snapshot.model_dump(exclude_none=True)


def check_well_formed(stream: bytes) -> None:
    """message_start first; blocks numbered in start order, one open at a time, each stopped once; deltas only
    to started blocks; ending with message_delta + message_stop, or an error."""
    events = events_of(stream)
    kinds = [e["type"] for e in events]
    if kinds[-1] == "error":
        assert kinds.count("error") == 1 and "message_stop" not in kinds
    else:
        assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    started, stopped, open_block = 0, set(), None
    for e in events:
        if e["type"] == "content_block_start":
            assert e["index"] == started and open_block is None
            open_block, started = started, started + 1
        elif e["type"] == "content_block_stop":
            assert e["index"] == open_block and e["index"] not in stopped
            stopped.add(e["index"])
            open_block = None
        elif e["type"] == "content_block_delta":
            assert e["index"] < started
    if kinds[-1] != "error":
        assert stopped == set(range(started))


# --- streams ---


@pytest.mark.parametrize("name", STREAMS)
def test_every_single_cut_gives_the_same_events(name):
    data = STREAMS[name]
    whole = transcode(data)
    check_well_formed(whole)
    for cut in range(1, len(data)):
        assert transcode(data, [cut]) == whole, cut


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(STREAMS)), data=st.data())
def test_any_cuts_give_the_same_events(name, data):
    stream = STREAMS[name]
    cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=40))
    assert transcode(stream, cuts) == transcode(stream)


@pytest.mark.parametrize("name", ["stream_ok.sse", "stream_tools.sse", "stream_thinking.sse"])
def test_anthropic_to_openai_and_back_gives_the_message_anthropic_sent(name):
    original = accumulate(anth(name))
    back = accumulate(transcode(_openai(name)))
    for block in original["content"]:
        if block["type"] == "thinking":
            block["signature"] = ""  # an OpenAI client gets no signature, so there is none to give back
    original["usage"] = {k: v for k, v in original["usage"].items() if k in back["usage"]}  # tiers, details
    assert back == original


def test_interleaved_blocks_are_numbered_in_order_and_accumulate():
    out = transcode(INTERLEAVED)
    starts = [(e["index"], e["content_block"]["type"]) for e in events_of(out) if e["type"] == "content_block_start"]
    assert starts == [(0, "thinking"), (1, "text"), (2, "tool_use"), (3, "tool_use"), (4, "text")]
    message = accumulate(out)
    assert message["id"] == "msg_abc" and message["model"] == "gpt-x"
    assert [b.get("text") or b.get("thinking") or b.get("input") for b in message["content"]] == [
        "Thinking.",
        "Sure, calling.",
        {"location": "Paris"},
        {"tz": "UTC"},
        "Done.",
    ]
    assert message["stop_reason"] == "tool_use" and message.get("stop_sequence") is None
    assert message["usage"] == {
        "input_tokens": 20,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 100,
        "output_tokens": 30,
    }


def test_parallel_calls_in_one_delta_and_a_stream_without_done():
    message = accumulate(transcode(PARALLEL_NO_DONE))
    assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == [
        ("call_1", "a", {}),
        ("call_2", "b", {"k": 1}),
    ]
    assert message["stop_reason"] == "tool_use" and message["usage"]["output_tokens"] == 30


def test_errors_end_the_stream_with_an_error_event():
    [start, error] = events_of(transcode(ERROR_BEFORE_CONTENT))
    assert start["type"] == "message_start"
    assert error == {"type": "error", "error": {"type": "overloaded_error", "message": "upstream overloaded"}}
    *_, cut = events_of(transcode(CUT_SHORT))  # the upstream's stream ended mid-answer
    assert cut["type"] == "error" and cut["error"]["type"] == "api_error"
    [garbage] = events_of(transcode(b"data: {not json\n\n"))
    assert garbage["error"]["type"] == "api_error"


@pytest.mark.parametrize(
    ("finish", "tools", "stop"),
    [("stop", False, "end_turn"), ("length", False, "max_tokens"), ("content_filter", False, "refusal"),
     ("tool_calls", True, "tool_use"), ("stop", True, "tool_use"), (None, False, "end_turn")],
)  # fmt: skip
def test_stop_reasons(finish, tools, stop):
    delta = {"tool_calls": [call(0, "c", "f", "{}")]} if tools else {"content": "x"}
    stream = chunk(delta) + (chunk({}, finish) if finish else b"") + DONE
    assert accumulate(transcode(stream))["stop_reason"] == stop


def test_only_the_new_text_is_encoded_and_escapes_survive():
    text = 'a "quoted" \\ line\nand ünïcode 🦔'
    message = accumulate(transcode(chunk({"content": text}) + chunk({}, "stop") + DONE))
    assert message["content"] == [{"type": "text", "text": text}]


# --- whole answers ---


def test_a_completion_becomes_a_message():
    message = orjson.loads(to_message(fixture("chat_ok.json")))
    assert message == {
        "id": "msg_B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "type": "message",
        "role": "assistant",
        "model": "gpt-4o-mini-2024-07-18",
        "content": [{"type": "text", "text": "Hello! How can I help you today?"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 9,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 10,
        },
    }


def test_reasoning_and_tool_calls_become_blocks_in_anthropic_order():
    body = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "model": "m",
            "choices": [
                {
                    "message": {
                        "role": "assistant",
                        "content": None,
                        "reasoning_content": "Hmm.",
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
                            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                        ],
                    },
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {
                "prompt_tokens": 50,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 30},
            },
        }
    )
    message = orjson.loads(to_message(body))
    assert message["content"] == [
        {"type": "thinking", "thinking": "Hmm.", "signature": ""},
        {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
        {"type": "tool_use", "id": "c2", "name": "g", "input": {"arguments": "not json"}},  # kept, not lost
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {
        "input_tokens": 10,
        "cache_creation_input_tokens": 30,
        "cache_read_input_tokens": 10,
        "output_tokens": 5,
    }


def test_an_error_in_a_success_body_is_not_a_message():
    with pytest.raises(ValueError, match="boom"):
        to_message(b'{"error": {"message": "boom", "type": "server_error"}}')


# --- requests ---


def translate(**req: Any) -> dict[str, Any]:
    req.setdefault("model", "test/m")
    req.setdefault("max_tokens", 100)
    req.setdefault("messages", [{"role": "user", "content": "hi"}])
    return orjson.loads(to_openai_request(orjson.dumps(req)))


def test_minimal_request():
    assert translate() == {
        "model": "test/m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 100,
    }
    assert translate(stream=True)["stream_options"] == {"include_usage": True}


def test_tool_results_come_first_with_their_images_in_the_user_turn_after():
    image = {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}
    pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}
    msgs = translate(
        messages=[
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "a"}, image]},
                    {"type": "tool_result", "tool_use_id": "t2", "is_error": True},
                    pdf,
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
                ],
            },
        ]
    )["messages"]
    assert msgs[1:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "a"},
        {"role": "tool", "tool_call_id": "t2", "content": ""},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                {"type": "file", "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBE"}},
                {"type": "text", "text": "notes"},
            ],
        },
    ]


def test_a_thinking_only_assistant_turn_is_left_out():
    msgs = translate(
        messages=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "x"}]},
            {"role": "user", "content": "b"},
        ]
    )["messages"]
    assert msgs == [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [(None, None), ({"type": "disabled"}, None), ({"type": "enabled", "budget_tokens": 1024}, "low"),
     ({"type": "enabled", "budget_tokens": 4096}, "medium"), ({"type": "enabled", "budget_tokens": 5000}, "high"),
     ({"type": "enabled", "budget_tokens": 40000}, "high"), ({"type": "adaptive"}, "medium")],
)  # fmt: skip
def test_thinking_budget_becomes_the_smallest_effort_that_covers_it(thinking, effort):
    assert translate(thinking=thinking).get("reasoning_effort") == effort


@pytest.mark.parametrize(
    ("choice", "expected"),
    [({"type": "auto"}, {"tool_choice": "auto"}), ({"type": "any"}, {"tool_choice": "required"}),
     ({"type": "none"}, {"tool_choice": "none"}),
     ({"type": "any", "disable_parallel_tool_use": True}, {"tool_choice": "required", "parallel_tool_calls": False})],
)  # fmt: skip
def test_tool_choice(choice, expected):
    req = translate(tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice=choice)
    assert {k: req[k] for k in ("tool_choice", "parallel_tool_calls") if k in req} == expected
    assert "tool_choice" not in translate(tool_choice=choice)  # no tools: nothing to choose (OpenAI refuses it)


@pytest.mark.parametrize(
    ("req", "param"),
    [
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type"),
        ({"mcp_servers": [{"type": "url", "url": "https://mcp.test", "name": "x"}]}, "mcp_servers"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "search_result"}]}]}, "messages[0].content[0].type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "u"}}]}]},
            "messages[0].content[0].source.type",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}, "messages[0].content[0].tool_use_id"),
        ({"thinking": {"type": "enabled", "budget_tokens": "lots"}}, "thinking.budget_tokens"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ({"system": [{"type": "image"}]}, "system[0]"),
        (  # was a TypeError: a 500
            {"messages": [{"role": "assistant", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text",
        ),
    ],
)
def test_what_an_openai_upstream_cannot_do_is_a_400_naming_the_field(req, param):
    with pytest.raises(BadRequest) as e:
        translate(**req)
    assert e.value.param == param


# --- errors ---


@pytest.mark.parametrize(
    ("err", "kind"),
    [(BadRequest("x"), "invalid_request_error"), (Unauthorized("x"), "authentication_error"),
     (UnknownModel("x"), "not_found_error"), (Unavailable("x"), "overloaded_error"),
     (UpstreamTimeout("x"), "timeout_error")],
)  # fmt: skip
def test_gateway_errors_in_anthropic_shape(err, kind):
    assert orjson.loads(error_body(err.status, err.body())) == {
        "type": "error",
        "error": {"type": kind, "message": "x"},
    }
    name, data = error_event(err.status, err.body()).removesuffix(b"\n\n").split(b"\n")
    assert name == b"event: error" and orjson.loads(data.removeprefix(b"data: ")) == orjson.loads(
        error_body(err.status, err.body())
    )


def test_upstream_error_bodies_keep_anthropic_types_and_messages():
    # adapters/anthropic.py keeps Anthropic's type as the OpenAI code: it comes back as it was
    relayed = b'{"error":{"message":"Overloaded","type":"service_unavailable","param":null,"code":"overloaded_error"}}'
    assert error_doc(502, relayed)["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    assert error_doc(500, b"<html>oops</html>")["error"] == {"type": "api_error", "message": "<html>oops</html>"}
    assert error_doc(429, fixture("chat_429.json"))["error"]["type"] == "rate_limit_error"


# --- the commit point on Anthropic events ---


def ev(kind: str, **fields: Any) -> bytes:
    """An Anthropic event as Anthropic frames it."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields})


@pytest.mark.parametrize(
    ("event", "verdict"),
    [
        (ev("message_start", message={"id": "m", "content": []}), _NOTHING),
        (ev("ping"), _NOTHING),
        (b": keep-alive", _NOTHING),
        (ev("content_block_start", index=0, content_block={"type": "text", "text": ""}), _NOTHING),
        (ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}), _NOTHING),
        (ev("content_block_start", index=1, content_block={"type": "tool_use", "id": "t", "name": "f"}), _CONTENT),
        (ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"}), _CONTENT),
        (ev("message_delta", delta={"stop_reason": "end_turn"}, usage={}), _CONTENT),
        (ev("message_delta", delta={}, usage={"output_tokens": 1}), _NOTHING),
        (ev("message_stop"), _CONTENT),
        (ev("error", error={"type": "overloaded_error", "message": "Overloaded"}), _ERROR),
        (b"data: {garbage", _ERROR),
    ],
)
def test_classify_messages_event(event, verdict):
    assert classify_messages_event(event) == verdict


def test_every_event_of_the_fixtures_is_judged_as_expected():
    for name in ("stream_ok.sse", "stream_tools.sse", "stream_thinking.sse"):
        verdicts = [classify_messages_event(e) for e in anth(name).split(b"\n\n") if e]
        first = verdicts.index(_CONTENT)
        assert verdicts[:first] == [_NOTHING] * first and _ERROR not in verdicts
        assert b"content_block_delta" in anth(name).split(b"\n\n")[first]


# --- properties: any Messages body the gateway passes on, any OpenAI stream ---


@settings(max_examples=100)
@given(body=messages_bodies)
def test_any_accepted_messages_body_is_translated_or_refused_with_a_400(body):
    """Never another exception: that would be a 500 for what is the client's mistake."""
    if not accepted("messages", body):
        return
    try:
        out = orjson.loads(to_openai_request(body))
    except BadRequest:
        return
    assert out["model"] == "m" and isinstance(out["messages"], list)


# A list or object `type` is unhashable: `kind in _TOOL_CHOICE` raised TypeError, a 500, before the check.
@pytest.mark.parametrize("kind", [[], {}])
def test_a_tool_choice_type_that_is_not_a_string_is_a_400(kind):
    body = {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(BadRequest):
        to_openai_request(orjson.dumps({**body, "tool_choice": {"type": kind}}))


_O_KEYS = ["id", "model", "choices", "index", "delta", "role", "content", "reasoning", "reasoning_content"]
_O_KEYS += ["refusal", "tool_calls", "function", "name", "arguments", "type", "finish_reason", "usage"]
_O_KEYS += ["prompt_tokens", "completion_tokens", "prompt_tokens_details", "cached_tokens", "error", "message", "code"]
_O_WORDS = ["assistant", "stop", "length", "tool_calls", "content_filter", "function", "call_1", "{", "}", '{"a":1}']
openai_chunks = st.builds(
    lambda data: b"data: " + orjson.dumps(data) + b"\n\n",
    st.dictionaries(st.sampled_from(_O_KEYS), json_like(_O_KEYS, _O_WORDS), max_size=4),
)


@settings(max_examples=100)
@given(events=st.lists(openai_chunks | st.just(b"data: [DONE]\n\n") | st.binary(max_size=8), max_size=8))
def test_any_openai_stream_gives_a_well_formed_messages_stream(events):
    check_well_formed(transcode(b"".join(events)))
