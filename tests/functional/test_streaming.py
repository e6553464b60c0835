"""SSE passthrough: relayed byte for byte, chunk by chunk as it arrives, whatever the chunk boundaries."""

from __future__ import annotations

import asyncio
import random

import orjson

from tests.conftest import AUTH, gateway_config
from tests.fakes import Script, fixture

STREAM = fixture("stream_ok.sse")
CHAT = {"model": "test/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def _random_cuts(data: bytes, rng: random.Random) -> list[bytes]:
    """Cut anywhere: inside `data:`, inside JSON, between the two newlines, one byte at a time."""
    pieces, i = [], 0
    while i < len(data):
        n = rng.choice((1, 2, 3, 7, 50, 300))
        pieces.append(data[i : i + n])
        i += n
    return pieces


async def test_relayed_stream_is_byte_identical_across_arbitrary_chunk_boundaries(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    for seed in range(5):
        fake_upstream.script(Script(sse=_random_cuts(STREAM, random.Random(seed)), gap_s=0.0005))
        async with http.post(gw.v1 + "/chat/completions", json=CHAT, headers=AUTH) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream"
            assert r.headers["Cache-Control"] == "no-cache"
            assert r.headers["X-Accel-Buffering"] == "no"
            assert r.headers["X-Hedgerow-Provider"] == "fake"
            body = await r.read()
        assert body == STREAM, f"seed {seed}"


async def test_stream_chunks_reach_the_client_before_the_upstream_finishes(fake_upstream, gateway, http):
    release = asyncio.Event()
    cut = STREAM.index(b"\n\n", STREAM.index(b"\n\n") + 2) + 2  # the role frame and the first token
    first, rest = STREAM[:cut], STREAM[cut:]
    fake_upstream.script(Script(sse=[first, rest], hold=release))
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    async with asyncio.timeout(5), http.post(gw.v1 + "/chat/completions", json=CHAT, headers=AUTH) as r:
        got = b""
        while len(got) < len(first):
            got += await r.content.readany()  # would hang here if the gateway buffered the stream
        assert got == first
        release.set()
        got += await r.read()
    assert got == STREAM


async def test_request_bytes_pass_through_unchanged_when_nothing_must_change(fake_upstream, gateway, http):
    cfg = gateway_config({"fake": fake_upstream.base_url}, models={"gpt-4o-mini": [("fake", "gpt-4o-mini")]})
    gw = await gateway(cfg)
    # Odd spacing, key order and unicode escapes survive only if the gateway forwards the client's bytes.
    body = b'{ "messages" : [{"role":"user","content":"h\\u00e9"}],  "model":"gpt-4o-mini", "n": 1 }'
    async with http.post(gw.v1 + "/chat/completions", data=body, headers=AUTH) as r:
        assert r.status == 200
        assert await r.read() == fixture("chat_ok.json")  # and the response bytes too
    assert fake_upstream.requests[0].body == body


async def test_rewrite_changes_only_the_model_and_drops_routing_fields(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))
    body = (
        b'{"model":"test/gpt-4o-mini","messages":[{"role":"user","content":"h\\u00e9 1.50"}],'
        b'"provider":{"order":["fake"]},"temperature":1.50,"tools":[{"type":"function"}]}'
    )
    async with http.post(gw.v1 + "/chat/completions", data=body, headers=AUTH) as r:
        assert r.status == 200
    sent = fake_upstream.requests[0].body
    # Untouched values keep their exact bytes (no re-encoding of 1.50 or \u00e9).
    assert sent == (
        b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"h\\u00e9 1.50"}],'
        b'"temperature":1.50,"tools":[{"type":"function"}]}'
    )
    assert "provider" not in orjson.loads(sent)
