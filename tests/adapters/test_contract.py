"""The adapter contract: every registered adapter, run through the same cases on its recorded fixtures.

Parametrized over `adapters.REGISTRY`, so a new adapter is picked up as soon as it is registered; its fixtures
come from `tests/fixtures/<name>/` (chat_ok.json, chat_429.json, chat_400.json, and stream_ok.sse or, for a
provider that does not stream SSE, stream_ok.eventstream). Validation uses the official OpenAI SDK's pydantic
types: what a client's SDK would accept is the contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from multidict import CIMultiDict
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from adapters import REGISTRY, Adapter
from adapters.base import DONE
from proxy.config import ProviderConfig
from proxy.errors import UpstreamStatus

FIXTURES = Path(__file__).parent.parent / "fixtures"
KEY = "sk-contract-0123456789"
PUBLIC, UPSTREAM = "contract/model", "upstream-model"
STREAM_FIXTURES = ("stream_ok.sse", "stream_ok.eventstream")
CHAT = orjson.dumps(
    {"model": PUBLIC, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "stream": False}
)


@dataclass
class Subject:
    name: str
    adapter: Adapter
    fixtures: Path

    def fixture(self, name: str) -> bytes:
        return (self.fixtures / name).read_bytes()

    def stream_ok(self) -> bytes:
        """The recorded text stream: SSE, or the provider's own stream framing (Bedrock: AWS event stream)."""
        for name in STREAM_FIXTURES:
            if (self.fixtures / name).is_file():
                return self.fixture(name)
        raise FileNotFoundError(f"no {' or '.join(STREAM_FIXTURES)} in {self.fixtures}")


@pytest.fixture(params=sorted(REGISTRY))
def subject(request: pytest.FixtureRequest) -> Subject:
    name: str = request.param
    fixtures = FIXTURES / name
    if not fixtures.is_dir():
        pytest.skip(f"adapter `{name}` has no recorded fixtures: add tests/fixtures/{name}/ to run its contract")
    provider = ProviderConfig(name=f"contract-{name}", adapter=name, base_url="https://upstream.test/v1", api_key=KEY)
    return Subject(name, REGISTRY[name](provider, "https://upstream.test/v1"), fixtures)


def _events(stream: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE stream, in order (comments and blank events skipped)."""
    out = []
    for event in stream.split(b"\n\n"):
        data = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
        if data:
            out.append(b"\n".join(data))
    return out


def _transcode(subject: Subject, raw: bytes, piece: int) -> bytes:
    """The adapter's client-side stream for `raw` arriving in `piece`-byte reads (0: in one read)."""
    tx = subject.adapter.new_transcoder(UPSTREAM)
    if subject.adapter.passthrough:
        assert tx is None, "a passthrough adapter relays stream bytes as they are: no transcoder"
        return raw
    assert tx is not None, "an adapter that is not passthrough must transcode its streams"
    step = piece or len(raw)
    return b"".join(tx.feed(raw[i : i + step]) for i in range(0, len(raw), step)) + tx.finish()


def test_name_matches_the_registry_key(subject: Subject) -> None:
    assert subject.adapter.name == subject.name


@pytest.mark.parametrize("stream", [False, True])
def test_builds_a_chat_request_with_its_auth(subject: Subject, stream: bool) -> None:
    target = subject.adapter.target("chat", UPSTREAM, stream)
    assert target is not None
    assert target.method == "POST" and target.host == "upstream.test"
    assert any(KEY in value for value in target.headers.values()), "the key belongs in a header, not the URL"
    assert KEY not in target.url
    body = subject.adapter.request_body(CHAT, PUBLIC, UPSTREAM, False)
    assert isinstance(body, bytes) and body
    if subject.adapter.passthrough:
        assert subject.adapter.request_body(CHAT, UPSTREAM, UPSTREAM, False) is CHAT  # zero-copy


def test_gateway_fields_never_reach_the_upstream(subject: Subject) -> None:
    doc = orjson.loads(CHAT)
    doc["provider"] = {"order": ["x"]}
    doc["models"] = ["a/b"]
    body = subject.adapter.request_body(orjson.dumps(doc), PUBLIC, UPSTREAM, True)
    assert b'"provider"' not in body and b'"models"' not in body


def test_parses_chat_ok_into_an_openai_chat_completion(subject: Subject) -> None:
    out = subject.adapter.parse_response(subject.fixture("chat_ok.json"), UPSTREAM)
    completion = ChatCompletion.model_validate_json(out)
    assert completion.choices
    message = completion.choices[0].message
    assert message.content or message.tool_calls
    assert completion.usage is not None and completion.usage.total_tokens > 0


def test_transcodes_stream_ok_into_openai_chunks_ending_in_done(subject: Subject) -> None:
    raw = subject.stream_ok()
    out = _transcode(subject, raw, 0)
    if subject.adapter.passthrough:
        assert out is raw  # relayed byte for byte
    assert out.endswith(DONE)
    events = _events(out)
    assert events[-1] == b"[DONE]" and b"[DONE]" not in events[:-1]
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert chunks, "a stream with content has chunks before [DONE]"
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0, "usage rides the last chunk"


@pytest.mark.parametrize("piece", [1, 7, 64])
def test_stream_cut_anywhere_transcodes_the_same(subject: Subject, piece: int) -> None:
    raw = subject.stream_ok()

    def shape(stream: bytes) -> list[object]:
        # ids and `created` may be minted per stream; what a client reads must not depend on read sizes
        chunks = [orjson.loads(e) for e in _events(stream) if e != b"[DONE]"]
        return [(c.get("choices"), c.get("usage")) for c in chunks]

    assert shape(_transcode(subject, raw, piece)) == shape(_transcode(subject, raw, 0))


@pytest.mark.parametrize(
    ("status", "fixture", "retryable"),
    [(429, "chat_429.json", True), (503, None, True), (500, None, True), (400, "chat_400.json", False)],
)
def test_classifies_errors(subject: Subject, status: int, fixture: str | None, retryable: bool) -> None:
    # A 5xx body is often a load balancer's HTML page, not the provider's JSON: classify by status.
    body = subject.fixture(fixture) if fixture else b"<html><body>503 Service Unavailable</body></html>"
    headers = CIMultiDict({"Content-Type": "application/json", "Retry-After": "2"})
    err = subject.adapter.classify(status, body, headers)
    if not retryable:
        assert err is None, "a client-fault 4xx is relayed to the client, never failed over"
        return
    assert isinstance(err, UpstreamStatus) and err.retryable
    assert err.upstream_status == status and err.upstream == f"contract-{subject.name}"
