"""Routing intelligence end to end: ejection and readmission, failover, the stream commit point, hedging,
panic mode, request preferences, SSE keep-alives and the first-token timeout — against real fake upstreams
on loopback.

Timing rules: everything that could hang runs under a generous `asyncio.timeout`; "nothing happened before
X" is checked by what an upstream had received at a point in time, never by measuring latency tightly.
Where a request must go to one provider first, it says so with `provider.order` (the router's P2C choice is
random, and an endpoint that never answered keeps the default cost, so order is the deterministic lever).
"""

from __future__ import annotations

import asyncio
import email.utils
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import AUTH, gateway_config
from tests.fakes import FakeUpstream, Script, fixture, sse_events

MODEL = "test/gpt-4o-mini"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
STREAM_CHAT = {**CHAT, "stream": True}
STREAM = fixture("stream_ok.sse")
PIECES = sse_events(STREAM)
KEEPALIVE = b": keep-alive\n\n"
T = 10  # seconds: upper bound for anything that should take well under one

# A stream whose bytes can be told apart from the fixture's: the one that must never reach the client.
OTHER_STREAM = STREAM.replace(b"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", b"chatcmpl-NEVER-SHOWN-TO-THE-CLIENT")
OTHER_PIECES = sse_events(OTHER_STREAM)
ERROR_EVENT = b'data: {"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}\n\n'

Make = Callable[..., Awaitable[dict[str, FakeUpstream]]]


@pytest.fixture
async def upstreams(aiohttp_server: Any) -> Make:
    """`await upstreams("a", "b")` → {"a": FakeUpstream, "b": FakeUpstream}, each a real server on loopback."""

    async def make(*names: str) -> dict[str, FakeUpstream]:
        out = {}
        for name in names:
            fake = FakeUpstream()
            server = await aiohttp_server(fake.app)
            fake.base_url = str(server.make_url("/v1"))
            out[name] = fake
        return out

    return make


def urls(fakes: dict[str, FakeUpstream]) -> dict[str, str]:
    return {name: f.base_url for name, f in fakes.items()}


def closed_port_url() -> str:
    """A loopback URL nothing listens on: bind, take the port, close."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def posts(fake: FakeUpstream) -> int:
    """Real requests (probes are GETs to /v1/models)."""
    return sum(1 for r in fake.requests if r.method == "POST")


def probes(fake: FakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.method == "GET" and r.path.endswith("/models"))


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, Any, bytes]:
    async with asyncio.timeout(T), http.post(url, json=body, headers={**AUTH, **(headers or {})}) as r:
        return r.status, r.headers, await r.read()


def ordered(*providers: str, **prefs: Any) -> dict[str, Any]:
    return {**CHAT, "provider": {"order": list(providers), **prefs}}


async def endpoint_state(http: aiohttp.ClientSession, gw: Any, provider: str) -> dict[str, Any]:
    async with asyncio.timeout(T), http.get(gw.url + "/api/v1/providers", headers=AUTH) as r:
        assert r.status == 200
        data = orjson.loads(await r.read())["data"]
    return next(e for e in data if e["provider"] == provider)


def assert_openai_error(body: bytes) -> dict[str, Any]:
    doc = orjson.loads(body)
    err = doc["error"]
    assert {"message", "type", "param", "code"} <= err.keys(), body
    assert isinstance(err["message"], str) and err["message"].strip(), body
    assert b"sk-upstream-" not in body
    return err


# --- ejection and readmission -----------------------------------------------------------------------------

FAST_PROBES = {"interval-s": 0.05, "ejected-interval-s": 0.05, "kind": "models", "jitter": 0}


async def _eject_bad(http: aiohttp.ClientSession, gw: Any, bad: FakeUpstream) -> None:
    """Send requests that try `bad` first until the gateway reports it ejected; each still succeeds."""
    async with asyncio.timeout(T):
        while True:
            status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("bad", "good"))
            assert status == 200  # failed over to `good`
            assert headers["X-Hedgerow-Provider"] == "good"
            if (await endpoint_state(http, gw, "bad"))["ejected"]:
                return


async def test_5xx_endpoint_is_ejected_then_readmitted_after_probes(upstreams, gateway, http):
    f = await upstreams("good", "bad")
    bad = f["bad"]
    cfg = gateway_config(
        urls(f),
        routing={"ejection": {"consecutive-failures": 3, "base-s": 0.3, "jitter": 0}},
        probe=FAST_PROBES,
    )
    gw = await gateway(cfg)
    bad.script(Script(status=500, body=fixture("chat_500.json")))
    await _eject_bad(http, gw, bad)
    assert posts(bad) >= 1  # requests found it failing (probes may have helped)
    state = await endpoint_state(http, gw, "bad")
    assert state["ejected"] is True and state["ejections"] >= 1 and state["ejected_for_s"] > 0

    # While it is out, requests that would try it first go to the other provider, and it sees only probes.
    before, probes_before = posts(bad), probes(bad)
    for _ in range(10):
        status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("bad", "good"))
        assert status == 200 and headers["X-Hedgerow-Provider"] == "good"
        assert headers["X-Hedgerow-Attempts"] == "1"  # not even tried: no failover was needed
    assert posts(bad) == before

    # Recovered: a probe succeeds (or the ejection runs out) and it is back in rotation.
    bad.script(Script())
    async with asyncio.timeout(T):
        while True:
            status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("bad", "good"))
            assert status == 200
            if headers["X-Hedgerow-Provider"] == "bad":
                break
            await asyncio.sleep(0.02)
    assert probes(bad) > probes_before
    assert posts(bad) == before + 1
    assert (await endpoint_state(http, gw, "bad"))["ejected"] is False


async def test_successful_probe_readmits_before_the_ejection_ends(upstreams, gateway, http):
    """With a 30 s ejection, only a probe can bring the endpoint back within a few seconds."""
    f = await upstreams("good", "bad")
    bad = f["bad"]
    cfg = gateway_config(
        urls(f),
        routing={"ejection": {"consecutive-failures": 3, "base-s": 30, "jitter": 0}},
        probe=FAST_PROBES,
    )
    gw = await gateway(cfg)
    bad.script(Script(status=500, body=fixture("chat_500.json")))
    await _eject_bad(http, gw, bad)
    before = posts(bad)
    bad.script(Script())
    async with asyncio.timeout(5):
        while (await endpoint_state(http, gw, "bad"))["ejected"]:
            await asyncio.sleep(0.02)
    status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("bad", "good"))
    assert status == 200 and headers["X-Hedgerow-Provider"] == "bad"
    assert posts(bad) == before + 1


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_429_with_retry_after_ejects_for_that_long(upstreams, gateway, http, form):
    f = await upstreams("good", "bad")
    bad = f["bad"]
    gw = await gateway(gateway_config(urls(f), probe=FAST_PROBES))
    # An HTTP-date has whole seconds: two seconds ahead is an ejection of between one and two.
    retry_after = "1" if form == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
    least_s = 1.0
    bad.script(Script(status=429, body=fixture("chat_429.json"), headers={"Retry-After": retry_after}))
    t0 = time.monotonic()  # the ejection starts after this, so it lasts at least until t0 + least_s
    status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("bad", "good"))
    assert status == 200 and headers["X-Hedgerow-Provider"] == "good"
    assert posts(bad) == 1
    bad.script(Script())  # the rate limit is over at once: probes succeed, but the server asked for time
    state = await endpoint_state(http, gw, "bad")
    assert state["ejected"] is True

    probes_before = probes(bad)
    while time.monotonic() < t0 + least_s - 0.2:
        status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("bad", "good"))
        assert status == 200 and headers["X-Hedgerow-Provider"] == "good"
        await asyncio.sleep(0.05)
    assert posts(bad) == 1  # no request reached it during the Retry-After time...
    assert probes(bad) > probes_before  # ...although its probes kept succeeding

    async with asyncio.timeout(T):
        while True:
            status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("bad", "good"))
            assert status == 200
            if headers["X-Hedgerow-Provider"] == "bad":
                break
            await asyncio.sleep(0.05)
    back_after = time.monotonic() - t0
    assert least_s - 0.2 <= back_after < least_s + 3.0  # back soon after the server's time, not much later
    assert posts(bad) == 2


@pytest.mark.parametrize("failure", ["503", "closed-port"])
async def test_one_of_three_failing_every_request_all_1000_succeed(upstreams, gateway, http, failure):
    f = await upstreams("a", "b", "bad")
    targets = urls(f)
    if failure == "503":
        f["bad"].script(Script(status=503, body=fixture("chat_500.json")))
    else:
        targets["bad"] = closed_port_url()
    gw = await gateway(gateway_config(targets))
    statuses: list[int] = []
    served: dict[str, int] = {}
    hedged = 0
    sem = asyncio.Semaphore(20)

    async def one() -> None:
        nonlocal hedged
        async with sem:
            status, headers, _ = await post(http, gw.v1 + "/chat/completions", CHAT)
            statuses.append(status)
            name = headers.get("X-Hedgerow-Provider")
            served[name] = served.get(name, 0) + 1
            hedged += "X-Hedgerow-Hedged" in headers  # a stall past the rolling p95 may hedge (5 % budget)

    async with asyncio.timeout(60):
        await asyncio.gather(*(one() for _ in range(1000)))
    assert statuses == [200] * 1000
    assert "bad" not in served
    assert 1000 <= posts(f["a"]) + posts(f["b"]) <= 1000 + hedged
    tried = (await endpoint_state(http, gw, "bad"))["error_rate_60s"]
    assert tried["failures"] == tried["total"]
    assert tried["total"] < 50  # far fewer than a third: ejected after a few failures
    if failure == "503":
        assert posts(f["bad"]) == tried["total"]


# --- streams: the commit point -----------------------------------------------------------------------------


async def test_stream_is_never_retried_after_first_content(upstreams, gateway, http):
    f = await upstreams("a", "b")
    f["a"].script(Script(sse=OTHER_PIECES, drop_after=2))  # role frame, first token, then the connection dies
    f["b"].script(Script(sse=PIECES))
    gw = await gateway(gateway_config(urls(f)))
    body = {**STREAM_CHAT, "provider": {"order": ["a", "b"]}}
    status, headers, data = await post(http, gw.v1 + "/chat/completions", body)
    assert status == 200 and headers["X-Hedgerow-Provider"] == "a"
    first = OTHER_PIECES[0] + OTHER_PIECES[1]
    assert data.startswith(first)  # a's bytes, as received
    events = sse_events(data[len(first) :])
    assert len(events) == 2 and events[1] == b"data: [DONE]\n\n", data
    assert_openai_error(events[0].removeprefix(b"data: ").strip())
    assert posts(f["b"]) == 0


@pytest.mark.parametrize("how", ["connection-dies", "error-event"])
async def test_stream_error_before_first_token_fails_over(upstreams, gateway, http, how):
    f = await upstreams("a", "b")
    if how == "connection-dies":
        f["a"].script(Script(sse=OTHER_PIECES, drop_after=1))  # only the role frame, then dead
    else:
        f["a"].script(Script(sse=[OTHER_PIECES[0], ERROR_EVENT]))
    f["b"].script(Script(sse=PIECES))
    gw = await gateway(gateway_config(urls(f)))
    body = {**STREAM_CHAT, "provider": {"order": ["a", "b"]}}
    status, headers, data = await post(http, gw.v1 + "/chat/completions", body)
    assert status == 200
    assert headers["X-Hedgerow-Provider"] == "b" and headers["X-Hedgerow-Attempts"] == "2"
    assert data == STREAM  # entirely b's stream
    assert b"NEVER-SHOWN" not in data and b"overloaded" not in data
    assert posts(f["a"]) == 1 and posts(f["b"]) == 1


# --- hedging --------------------------------------------------------------------------------------------------

HEDGE = {"delay-s": 0.2, "budget": 1.0, "non-streamed": True}


async def test_hedge_fires_only_after_the_delay(upstreams, gateway, http):
    f = await upstreams("slow", "fast")
    slow, fast = f["slow"], f["fast"]
    slow.script(Script(delay_s=2))
    gw = await gateway(gateway_config(urls(f), hedge=HEDGE))
    t0 = time.monotonic()
    task = asyncio.create_task(post(http, gw.v1 + "/chat/completions", ordered("slow", "fast")))
    async with asyncio.timeout(T):
        while posts(slow) == 0:
            await asyncio.sleep(0.005)
    await asyncio.sleep(max(0.0, t0 + 0.1 - time.monotonic()))
    assert posts(fast) == 0  # half the hedge delay in: no hedge yet
    status, headers, data = await task
    assert status == 200 and data == fixture("chat_ok.json")
    assert headers["X-Hedgerow-Provider"] == "fast"
    assert headers["X-Hedgerow-Hedged"] == "won" and headers["X-Hedgerow-Attempts"] == "2"
    assert time.monotonic() - t0 < 1.5  # served by the hedge, not after the slow provider's 2 s
    await slow.wait_cancelled()  # the loser's connection was closed
    assert posts(fast) == 1


async def test_hedge_loser_connection_is_closed(upstreams, gateway, http):
    """Stream variant: the first attempt sent its role frame and stalls; the hedge's stream wins."""
    f = await upstreams("slow", "fast")
    slow, fast = f["slow"], f["fast"]
    never = asyncio.Event()
    slow.script(Script(sse=OTHER_PIECES, hold=never))
    fast.script(Script(sse=PIECES))
    gw = await gateway(gateway_config(urls(f), hedge=HEDGE))
    body = {**STREAM_CHAT, "provider": {"order": ["slow", "fast"]}}
    status, headers, data = await post(http, gw.v1 + "/chat/completions", body)
    assert status == 200
    assert headers["X-Hedgerow-Provider"] == "fast" and headers["X-Hedgerow-Hedged"] == "won"
    assert data == STREAM and b"NEVER-SHOWN" not in data
    await slow.wait_cancelled()
    assert slow.finished == 0


async def test_first_attempt_answering_first_wins_the_race_and_the_hedge_is_closed(upstreams, gateway, http):
    f = await upstreams("slow", "slower")
    f["slow"].script(Script(delay_s=0.4))
    f["slower"].script(Script(delay_s=3))
    gw = await gateway(gateway_config(urls(f), hedge=HEDGE))
    status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("slow", "slower"))
    assert status == 200
    assert headers["X-Hedgerow-Provider"] == "slow" and headers["X-Hedgerow-Hedged"] == "lost"
    await f["slower"].wait_cancelled()
    assert posts(f["slower"]) == 1


async def test_hedges_stay_within_budget(upstreams, gateway, http):
    f = await upstreams("slow", "fast")
    f["slow"].script(Script(delay_s=0.25))
    gw = await gateway(gateway_config(urls(f), hedge={"delay-s": 0.05, "budget": 0.1, "non-streamed": True}))
    n, hedged = 50, 0
    for _ in range(n // 10):  # waves of 10 concurrent requests: the budget holds under concurrency too
        results = await asyncio.gather(
            *(post(http, gw.v1 + "/chat/completions", ordered("slow", "fast")) for _ in range(10))
        )
        assert [s for s, _, _ in results] == [200] * 10
        hedged += sum(1 for _, h, _ in results if "X-Hedgerow-Hedged" in h)
    assert posts(f["fast"]) == hedged  # every request to the second provider was a hedge
    assert 0 < hedged <= 0.1 * n + 1


async def test_no_hedge_when_header_says_off(upstreams, gateway, http):
    f = await upstreams("slow", "fast")
    f["slow"].script(Script(delay_s=0.4))
    gw = await gateway(gateway_config(urls(f), hedge={"delay-s": 0.05, "budget": 1.0, "non-streamed": True}))
    status, headers, _ = await post(
        http, gw.v1 + "/chat/completions", ordered("slow", "fast"), {"X-Hedgerow-Hedge": "off"}
    )
    assert status == 200 and headers["X-Hedgerow-Provider"] == "slow"
    assert "X-Hedgerow-Hedged" not in headers and headers["X-Hedgerow-Attempts"] == "1"
    assert posts(f["fast"]) == 0


async def test_hedge_header_sets_the_delay(upstreams, gateway, http):
    """No fixed delay in config (and no TTFB history: the configured maximum, 10 s); the header asks 0.1 s."""
    f = await upstreams("slow", "fast")
    f["slow"].script(Script(delay_s=2))
    gw = await gateway(gateway_config(urls(f), hedge={"budget": 1.0}))
    status, headers, _ = await post(
        http, gw.v1 + "/chat/completions", ordered("slow", "fast"), {"X-Hedgerow-Hedge": "0.1"}
    )
    assert status == 200 and headers["X-Hedgerow-Provider"] == "fast" and headers["X-Hedgerow-Hedged"] == "won"
    await f["slow"].wait_cancelled()


async def test_model_with_hedging_disabled_is_never_hedged(upstreams, gateway, http):
    f = await upstreams("slow", "fast")
    f["slow"].script(Script(delay_s=0.4))
    gw = await gateway(gateway_config(urls(f), hedge={"enabled": False, "delay-s": 0.05, "budget": 1.0}))
    for extra in ({}, {"X-Hedgerow-Hedge": "0.05"}):  # a request cannot turn it on either
        status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("slow", "fast"), extra)
        assert status == 200 and headers["X-Hedgerow-Provider"] == "slow"
        assert "X-Hedgerow-Hedged" not in headers
    assert posts(f["fast"]) == 0


async def test_non_streamed_requests_are_not_hedged_unless_configured(upstreams, gateway, http):
    f = await upstreams("slow", "fast")
    f["slow"].script(Script(delay_s=0.3))
    gw = await gateway(gateway_config(urls(f), hedge={"delay-s": 0.05, "budget": 1.0}))  # non-streamed: false
    status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("slow", "fast"))
    assert status == 200 and headers["X-Hedgerow-Provider"] == "slow" and "X-Hedgerow-Hedged" not in headers
    assert posts(f["fast"]) == 0


# --- everything down -------------------------------------------------------------------------------------------


async def test_all_endpoints_down_is_a_clear_503_quickly(gateway, http):
    targets = {"a": closed_port_url(), "b": closed_port_url()}
    # One failure ejects, and both may be out at once: the repeats run in panic mode.
    cfg = gateway_config(targets, routing={"ejection": {"consecutive-failures": 1, "max-ejected-share": 1.0}})
    gw = await gateway(cfg)
    for i in range(3):
        t0 = time.monotonic()
        status, headers, data = await post(http, gw.v1 + "/chat/completions", CHAT)
        assert time.monotonic() - t0 < 2.0
        assert status == 503, (i, data)
        err = assert_openai_error(data)
        assert err["type"] == "service_unavailable"
        assert headers["Retry-After"]
    states = [await endpoint_state(http, gw, p) for p in targets]
    assert all(s["ejected"] for s in states)


async def test_all_endpoints_down_with_the_ejection_cap_reached_is_still_503(gateway, http):
    targets = {"a": closed_port_url(), "b": closed_port_url()}
    gw = await gateway(gateway_config(targets, routing={"ejection": {"consecutive-failures": 1}}))
    for i in range(3):  # the first ejects one of the two; the cap (one of two) keeps the other in
        status, _, data = await post(http, gw.v1 + "/chat/completions", CHAT)
        assert status == 503, (i, data)


# --- request preferences ---------------------------------------------------------------------------------------

PRICES = {"a": {"input": 3.0, "output": 6.0}, "b": {"input": 1.0, "output": 2.0}, "c": {"input": 2.0, "output": 4.0}}


def priced(fakes: dict[str, FakeUpstream]) -> Any:
    return gateway_config(urls(fakes), models={MODEL: [(p, "gpt-4o-mini", PRICES[p]) for p in fakes]})


def served_by(headers: Any) -> str:
    return headers["X-Hedgerow-Provider"]


async def test_provider_order_is_honoured_and_failover_follows_it(upstreams, gateway, http):
    f = await upstreams("a", "b", "c")
    gw = await gateway(gateway_config(urls(f)))
    for _ in range(5):
        status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("c", "a"))
        assert status == 200 and served_by(headers) == "c"
    f["c"].script(Script(status=500, body=fixture("chat_500.json")))
    status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("c", "a"))
    assert status == 200 and served_by(headers) == "a" and headers["X-Hedgerow-Attempts"] == "2"
    assert posts(f["b"]) == 0


async def test_provider_only_and_ignore_filter_the_candidates(upstreams, gateway, http):
    f = await upstreams("a", "b", "c")
    gw = await gateway(gateway_config(urls(f)))
    for _ in range(10):
        status, headers, _ = await post(http, gw.v1 + "/chat/completions", {**CHAT, "provider": {"only": ["b"]}})
        assert status == 200 and served_by(headers) == "b"
    for _ in range(10):
        body = {**CHAT, "provider": {"ignore": ["a", "b"]}}
        status, headers, _ = await post(http, gw.v1 + "/chat/completions", body)
        assert status == 200 and served_by(headers) == "c"
    assert posts(f["a"]) == 0
    # `only` also bounds failover: the only provider failing is the answer, the others are not tried.
    f["b"].script(Script(status=500, body=fixture("chat_500.json")))
    status, _, data = await post(http, gw.v1 + "/chat/completions", {**CHAT, "provider": {"only": ["b"]}})
    assert status == 502
    assert_openai_error(data)
    assert posts(f["a"]) == 0 and posts(f["c"]) == 10


async def test_no_fallbacks_returns_the_first_choice_failure(upstreams, gateway, http):
    f = await upstreams("a", "b")
    f["a"].script(Script(status=500, body=fixture("chat_500.json")))
    gw = await gateway(gateway_config(urls(f)))
    status, _, data = await post(http, gw.v1 + "/chat/completions", ordered("a", allow_fallbacks=False))
    assert status == 502
    assert "500" in assert_openai_error(data)["message"]
    assert posts(f["a"]) == 1 and posts(f["b"]) == 0
    # The same request allowing fallbacks is served by b.
    status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("a"))
    assert status == 200 and served_by(headers) == "b"


async def test_models_fallback_list_is_used_when_the_primary_model_fails(upstreams, gateway, http):
    f = await upstreams("a", "b")
    f["a"].script(Script(status=500, body=fixture("chat_500.json")))
    models = {"test/primary": [("a", "model-a")], "test/backup": [("b", "model-b")]}
    gw = await gateway(gateway_config(urls(f), models=models))
    body = {**CHAT, "model": "test/primary", "models": ["test/unknown", "test/backup"]}
    status, headers, _ = await post(http, gw.v1 + "/chat/completions", body)
    assert status == 200 and served_by(headers) == "b"
    sent = orjson.loads(f["b"].requests[-1].body)
    assert sent["model"] == "model-b" and "models" not in sent
    assert orjson.loads(f["a"].requests[-1].body)["model"] == "model-a"
    # Without the list, the primary's failure is the answer.
    status, _, _ = await post(http, gw.v1 + "/chat/completions", {**CHAT, "model": "test/primary"})
    assert status == 502


async def test_floor_suffix_and_price_sort_pick_the_cheapest(upstreams, gateway, http):
    f = await upstreams("a", "b", "c")
    gw = await gateway(priced(f))
    for _ in range(5):
        status, headers, _ = await post(http, gw.v1 + "/chat/completions", {**CHAT, "model": MODEL + ":floor"})
        assert status == 200 and served_by(headers) == "b"
        body = {**CHAT, "provider": {"sort": "price"}}
        status, headers, _ = await post(http, gw.v1 + "/chat/completions", body)
        assert status == 200 and served_by(headers) == "b"
    assert orjson.loads(f["b"].requests[0].body)["model"] == "gpt-4o-mini"  # the suffix never goes upstream
    # Failover follows price order too: b fails → c (next cheapest), never a.
    f["b"].script(Script(status=500, body=fixture("chat_500.json")))
    status, headers, _ = await post(http, gw.v1 + "/chat/completions", {**CHAT, "model": MODEL + ":floor"})
    assert status == 200 and served_by(headers) == "c"
    assert posts(f["a"]) == 0


async def test_max_price_filters_endpoints(upstreams, gateway, http):
    f = await upstreams("a", "b", "c")
    gw = await gateway(priced(f))
    for _ in range(10):
        body = {**CHAT, "provider": {"max_price": {"prompt": 2.0, "completion": 4.0}}}
        status, headers, _ = await post(http, gw.v1 + "/chat/completions", body)
        assert status == 200 and served_by(headers) in ("b", "c")
    assert posts(f["a"]) == 0
    body = {**CHAT, "provider": {"max_price": {"prompt": 0.5}}}
    status, _, data = await post(http, gw.v1 + "/chat/completions", body)
    assert status == 404  # the request's own filter left no endpoint (as OpenRouter): a retry cannot help
    assert "preferences" in assert_openai_error(data)["message"]
    assert sum(posts(x) for x in f.values()) == 10


@pytest.mark.parametrize(
    "prefs",
    [
        pytest.param({"only": ["nope"]}, id="only-unknown"),
        pytest.param({"order": ["nope"], "allow_fallbacks": False}, id="order-unknown-no-fallbacks"),
        pytest.param({"ignore": ["a", "b"]}, id="ignore-all"),
    ],
)
async def test_preferences_matching_no_provider_are_a_clear_error(upstreams, gateway, http, prefs):
    f = await upstreams("a", "b")
    gw = await gateway(gateway_config(urls(f)))
    status, _, data = await post(http, gw.v1 + "/chat/completions", {**CHAT, "provider": prefs})
    assert status == 404
    err = assert_openai_error(data)
    assert MODEL in err["message"] and "preferences" in err["message"] and err["param"] == "provider"
    assert posts(f["a"]) == posts(f["b"]) == 0


async def test_unknown_provider_in_order_is_ignored_when_fallbacks_are_allowed(upstreams, gateway, http):
    f = await upstreams("a", "b")
    gw = await gateway(gateway_config(urls(f)))
    status, headers, _ = await post(http, gw.v1 + "/chat/completions", ordered("nope", "b"))
    assert status == 200 and served_by(headers) == "b"


# --- waiting for the first token ---------------------------------------------------------------------------------


async def test_stream_keepalive_comment_while_waiting_for_first_token(fake_upstream, gateway, http):
    release = asyncio.Event()
    fake_upstream.script(Script(sse=PIECES, hold=release))  # the role frame, then nothing until released
    gw = await gateway(gateway_config({"fake": fake_upstream.base_url}, routing={"stream-keepalive-s": 0.1}))
    async with asyncio.timeout(T), http.post(gw.v1 + "/chat/completions", json=STREAM_CHAT, headers=AUTH) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        got = b""
        while got.count(KEEPALIVE) < 2:
            got += await r.content.readany()
        assert got == KEEPALIVE * got.count(KEEPALIVE)  # comments only: the held role frame is not sent
        release.set()
        got += await r.read()
    assert got.startswith(KEEPALIVE * 2)
    assert got.replace(KEEPALIVE, b"") == STREAM  # the upstream's stream, byte for byte
    assert got.endswith(STREAM)  # no comment inside it once data started


async def test_stream_keepalives_go_on_across_a_failover_and_stop_at_the_first_token(upstreams, gateway, http):
    """Without a hedge the attempts run one after the other in the request's task; the keep-alives come from
    a task of their own, across both attempts, and none is written once the answer's stream has begun."""
    f = await upstreams("stall", "good")
    never = asyncio.Event()
    f["stall"].script(Script(sse=OTHER_PIECES, hold=never))  # role frame, then silence
    f["good"].script(Script(sse=PIECES, gap_s=0.06))  # its stream lasts a few keep-alive periods
    routing = {"stream-keepalive-s": 0.1}
    gw = await gateway(gateway_config(urls(f), timeouts={"first-token-s": 0.35}, routing=routing))
    body = {**STREAM_CHAT, "provider": {"order": ["stall", "good"]}}
    status, headers, data = await post(http, gw.v1 + "/chat/completions", body, {"X-Hedgerow-Hedge": "off"})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert "X-Hedgerow-Provider" not in headers  # the head went out with the first keep-alive, before any answer
    comments = data.count(KEEPALIVE)
    assert comments >= 2 and data == KEEPALIVE * comments + STREAM  # the good upstream's stream, whole, after them
    await f["stall"].wait_cancelled()
    await asyncio.sleep(0.3)  # three keep-alive periods: a keep-alive task left running would write meanwhile
    again = STREAM_CHAT | {"provider": {"order": ["good"]}}  # on the same pooled connection: no stray comment
    assert (await post(http, gw.v1 + "/chat/completions", again))[2] == STREAM


async def test_first_token_timeout_fails_over(upstreams, gateway, http):
    f = await upstreams("stall", "good")
    never = asyncio.Event()
    f["stall"].script(Script(sse=OTHER_PIECES, hold=never))  # role frame, then silence
    f["good"].script(Script(sse=PIECES))
    gw = await gateway(gateway_config(urls(f), timeouts={"first-token-s": 0.2, "idle-s": 5.0}))
    body = {**STREAM_CHAT, "provider": {"order": ["stall", "good"]}}
    t0 = time.monotonic()
    status, headers, data = await post(http, gw.v1 + "/chat/completions", body, {"X-Hedgerow-Hedge": "off"})
    assert status == 200
    assert headers["X-Hedgerow-Provider"] == "good" and headers["X-Hedgerow-Attempts"] == "2"
    assert "X-Hedgerow-Hedged" not in headers
    assert data == STREAM
    assert time.monotonic() - t0 < 2.5  # well before idle-s (5 s): the first-token limit acted
    await f["stall"].wait_cancelled()
