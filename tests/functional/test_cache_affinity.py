"""Response cache (exact match, opt-in) and prompt-cache affinity, end to end."""

from __future__ import annotations

import orjson

from tests.conftest import AUTH, gateway_config
from tests.fakes import Script, fixture, sse_events

DETERMINISTIC = {"model": "test/gpt-4o-mini", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}


def _cached_models(upstreams: dict[str, str]):
    cfg = gateway_config(upstreams)
    import msgspec

    return msgspec.structs.replace(cfg, models=[msgspec.structs.replace(m, cache=True) for m in cfg.models])


async def test_repeated_deterministic_request_is_served_from_cache(fake_upstream, gateway, http):
    gw = await gateway(_cached_models({"fake": fake_upstream.base_url}))
    url = gw.v1 + "/chat/completions"
    async with http.post(url, json=DETERMINISTIC, headers=AUTH) as r:
        assert r.headers["X-Hedgerow-Cache"] == "miss"
        first = await r.read()
    # Key order and spacing differ: still the same request.
    same = b'{"messages": [{"content": "hi", "role": "user"}], "temperature": 0, "model": "test/gpt-4o-mini"}'
    for _ in range(3):
        async with http.post(url, data=same, headers=AUTH) as r:
            assert r.status == 200
            assert r.headers["X-Hedgerow-Cache"] == "hit"
            assert await r.read() == first
    assert len(fake_upstream.requests) == 1


async def test_streamed_hit_is_replayed_byte_identical_and_kept_apart_from_plain(fake_upstream, gateway, http):
    fake_upstream.script(Script(sse=sse_events(fixture("stream_ok.sse"))))
    gw = await gateway(_cached_models({"fake": fake_upstream.base_url}))
    url = gw.v1 + "/chat/completions"
    streamed = {**DETERMINISTIC, "stream": True}
    bodies = []
    for expect in ("miss", "hit"):
        async with http.post(url, json=streamed, headers=AUTH) as r:
            assert r.headers["X-Hedgerow-Cache"] == expect
            assert r.headers["Content-Type"] == "text/event-stream"
            bodies.append(await r.read())
    assert bodies[0] == bodies[1] == fixture("stream_ok.sse")
    fake_upstream.script(Script())
    async with http.post(url, json=DETERMINISTIC, headers=AUTH) as r:
        assert r.headers["X-Hedgerow-Cache"] == "miss"  # the plain request has its own entry
        assert orjson.loads(await r.read())["object"] == "chat.completion"
    assert len(fake_upstream.requests) == 2


async def test_cache_control_no_cache_and_no_store(fake_upstream, gateway, http):
    gw = await gateway(_cached_models({"fake": fake_upstream.base_url}))
    url = gw.v1 + "/chat/completions"
    async with http.post(url, json=DETERMINISTIC, headers={**AUTH, "Cache-Control": "no-store"}) as r:
        assert r.headers["X-Hedgerow-Cache"] == "miss"
    async with http.post(url, json=DETERMINISTIC, headers=AUTH) as r:
        assert r.headers["X-Hedgerow-Cache"] == "miss"  # nothing was stored by the no-store request
    async with http.post(url, json=DETERMINISTIC, headers={**AUTH, "Cache-Control": "no-cache"}) as r:
        assert r.headers["X-Hedgerow-Cache"] == "miss"  # stored, but lookup skipped
    async with http.post(url, json=DETERMINISTIC, headers=AUTH) as r:
        assert r.headers["X-Hedgerow-Cache"] == "hit"
    assert len(fake_upstream.requests) == 3


async def test_sampling_requests_bypass_the_cache(fake_upstream, gateway, http):
    gw = await gateway(_cached_models({"fake": fake_upstream.base_url}))
    body = {**DETERMINISTIC, "temperature": 0.7}
    for _ in range(2):
        async with http.post(gw.v1 + "/chat/completions", json=body, headers=AUTH) as r:
            assert r.headers["X-Hedgerow-Cache"] == "bypass"
    assert len(fake_upstream.requests) == 2


async def test_cache_is_opt_in_per_model_and_per_request(fake_upstream, gateway, http):
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}))  # model without `cache: true`
    url = gw.v1 + "/chat/completions"
    for _ in range(2):
        async with http.post(url, json=DETERMINISTIC, headers=AUTH) as r:
            assert "X-Hedgerow-Cache" not in r.headers
    opt_in = {**AUTH, "X-Hedgerow-Cache": "on"}
    for expect in ("miss", "hit"):
        async with http.post(url, json=DETERMINISTIC, headers=opt_in) as r:
            assert r.headers["X-Hedgerow-Cache"] == expect
    assert len(fake_upstream.requests) == 3


async def test_shared_prompt_prefix_sticks_to_the_endpoint_that_served_it(fake_upstream, aiohttp_server, gateway, http):
    from tests.fakes import FakeUpstream

    fast, slow = fake_upstream, FakeUpstream()
    slow.base_url = str((await aiohttp_server(slow.app)).make_url("/v1"))
    slow.script(Script(delay_s=0.03))  # the load balancer prefers `fast` once it has seen both
    gw = await gateway(gateway_config({"fast": fast.base_url, "slow": slow.base_url}))
    url = gw.v1 + "/chat/completions"

    async def ask(messages: list, **extra: object) -> str:
        async with http.post(url, json={"model": "test/gpt-4o-mini", "messages": messages, **extra}, headers=AUTH) as r:
            assert r.status == 200
            return r.headers["X-Hedgerow-Provider"]

    for i in range(10):  # both get latency samples; then P2C sends plain requests to `fast`
        await ask([{"role": "user", "content": f"warm {i}"}], provider={"order": ["fast" if i % 2 else "slow"]})
    assert {await ask([{"role": "user", "content": f"plain {i}"}]) for i in range(10)} == {"fast"}
    system = {"role": "system", "content": "You are a careful assistant. " * 80}  # ≈ 2.3 KB: cacheable
    assert await ask([system, {"role": "user", "content": "first"}], provider={"order": ["slow"]}) == "slow"
    turns = {await ask([system, {"role": "user", "content": f"question {i}"}]) for i in range(10)}
    assert turns == {"slow"}  # where the prefix is cached, although the balancer would pick `fast`
