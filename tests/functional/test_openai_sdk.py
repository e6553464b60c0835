"""The official `openai` SDK works against the gateway unchanged, streamed and not."""

from __future__ import annotations

import openai
import orjson
import pytest

from tests.conftest import KEY, gateway_config
from tests.fakes import Script, fixture, sse_events


async def test_sdk_chat_completion_reaches_upstream_with_its_model_name(fake_upstream, gateway):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="test/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], temperature=0.2
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello! How can I help you today?"
    assert completion.usage is not None and completion.usage.total_tokens == 19
    assert raw.headers["x-hedgerow-provider"] == "fake"
    assert raw.headers["x-hedgerow-generation-id"].startswith("gen-")
    [seen] = fake_upstream.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["Authorization"] == "Bearer sk-upstream-fake"  # ours replaced the client's
    sent = orjson.loads(seen.body)
    assert sent["model"] == "gpt-4o-mini" and sent["temperature"] == 0.2
    await client.close()


async def test_sdk_stream_yields_every_chunk(fake_upstream, gateway):
    fake_upstream.script(Script(sse=sse_events(fixture("stream_ok.sse"))))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)
    stream = await client.chat.completions.create(
        model="test/gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = [], None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(text) == "Hello! How can I help you today?"
    assert usage is not None and usage.completion_tokens == 10
    assert orjson.loads(fake_upstream.requests[0].body)["stream"] is True
    await client.close()


async def test_sdk_sees_the_error_of_a_stream_cut_in_the_middle_of_an_event(fake_upstream, gateway):
    """Three whole chunks, then half of the fourth, then the upstream's connection drops: the SDK yields the three
    and raises the gateway's error. (Relaying the half event would glue it to the error event: one broken JSON
    line, a decode error in the client, the error's message never read.)"""
    pieces = sse_events(fixture("stream_ok.sse"))
    half = pieces[3][: len(pieces[3]) // 2]
    fake_upstream.script(Script(sse=[*pieces[:3], half, pieces[4]], drop_after=4))  # aborts instead of the 5th
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)
    stream = await client.chat.completions.create(
        model="test/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            chunks.append(chunk)
    assert len(chunks) == 3
    assert caught.value.body["code"] == "stream_interrupted" and "upstream connection broke" in caught.value.message
    await client.close()


async def test_sdk_embeddings_and_completions_and_models(fake_upstream, gateway):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=KEY, max_retries=0)
    fake_upstream.script(Script(body=fixture("embeddings_ok.json")))
    emb = await client.embeddings.create(model="test/gpt-4o-mini", input="hello")
    assert len(emb.data[0].embedding) == 8
    fake_upstream.script(Script(body=fixture("completion_ok.json")))
    comp = await client.completions.create(model="test/gpt-4o-mini", prompt="Say this is a test")
    assert comp.choices[0].text == "\n\nThis is indeed a test"
    models = await client.models.list()
    assert [m.id for m in models.data] == ["test/gpt-4o-mini"]
    assert [r.path for r in fake_upstream.requests] == ["/v1/embeddings", "/v1/completions"]
    await client.close()
