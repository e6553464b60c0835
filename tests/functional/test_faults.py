"""Upstream fault injection (issue #9): every fault states what the client gets, what the ledger records and what
health records.

The upstreams are chaos fakes (tests/chaos.py): raw HTTP servers on loopback that misbehave as the request's
last message says. The gateway runs with short per-provider timeouts (first byte 0.5 s, idle 0.5 s, total 3 s),
no probes (health counts are the requests' alone) and a ledger flushed every 50 ms, read back from its SQLite
file while it runs and through `/api/v1/generation` (the two must agree).
Every client request is bounded by `T`: a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest

from adapters.sse import last_event_end
from proxy.store.base import GenerationRecord
from proxy.store.sqlite import SQLiteStore
from tests.billing import usage_for
from tests.chaos import ChaosUpstream
from tests.conftest import AUTH, GATEWAY_VARIANTS, gateway_config

MODEL = "chaos/m"
T = 10.0  # seconds: no client request may take longer, whatever the fault
TIMEOUTS = {"connect-s": 0.5, "first-byte-s": 0.5, "idle-s": 0.5, "total-s": 3.0}
PRICE = {"input": 2.0, "output": 8.0}  # USD per million tokens, every endpoint
ONE_VARIANT = [GATEWAY_VARIANTS[0]]  # slow cases: the lean client on aiohttp's server is enough

Chaos = Callable[..., Awaitable[dict[str, ChaosUpstream]]]


# --- fixtures and helpers --------------------------------------------------------------------------------------


@pytest.fixture
async def chaos() -> AsyncIterator[Chaos]:
    """`await chaos("a", "b")` → {"a": ChaosUpstream, "b": ChaosUpstream}, each a raw server on loopback."""
    made: list[ChaosUpstream] = []

    async def make(*names: str) -> dict[str, ChaosUpstream]:
        out = {}
        for i, name in enumerate(names):
            out[name] = await ChaosUpstream(name, seed=i).start()
            made.append(out[name])
        return out

    yield make
    for up in made:
        await up.close()


def config(
    ups: dict[str, ChaosUpstream],
    *,
    timeouts: dict[str, float] | None = None,
    ejection: dict[str, Any] | None = None,
    max_response_bytes: int | None = None,
    routing: dict[str, Any] | None = None,
    hedge: dict[str, Any] | None = None,
) -> Any:
    """One model served by every upstream given (in that order of preference when a request says so)."""
    cfg = gateway_config(
        {name: up.base_url for name, up in ups.items()},
        models={MODEL: [(name, f"m-{name}", PRICE) for name in ups]},
        timeouts={**TIMEOUTS, **(timeouts or {})},
        probe={"enabled": False},
        hedge=hedge or {"enabled": False},
        routing={"retry-budget": 10, "ejection": {"consecutive-failures": 3, **(ejection or {})}, **(routing or {})},
        server={"max-response-bytes": max_response_bytes} if max_response_bytes else None,
    )
    return msgspec.structs.replace(cfg, accounting=msgspec.structs.replace(cfg.accounting, flush_interval_s=0.05))


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes, took: float) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.took = took
        self.gen_id: str = headers.get("X-Hedgerow-Generation-Id", "")

    def error(self, code: str | None = None) -> dict[str, Any]:
        """The OpenAI-shaped error of a JSON error answer."""
        assert self.headers["Content-Type"].startswith("application/json"), self.headers
        return openai_error(self.body, code)


def openai_error(body: bytes, code: str | None = None) -> dict[str, Any]:
    assert b"Traceback" not in body and b"sk-upstream-" not in body, body
    err = orjson.loads(body)["error"]
    assert {"message", "type", "param", "code"} <= err.keys(), body
    assert isinstance(err["message"], str) and err["message"], body
    if code is not None:
        assert err["code"] == code, body
    return err


async def call(
    http: aiohttp.ClientSession, gw: Any, text: str, *, stream: bool = False, order: list[str] | None = None
) -> Answer:
    """One chat request whose last message is `text` (the faults); the whole answer, within `T`."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    if order:
        body["provider"] = {"order": order}
    start = time.monotonic()
    async with asyncio.timeout(T), http.post(gw.v1 + "/chat/completions", json=body, headers=AUTH) as r:
        data = await r.read()
        return Answer(r.status, r.headers, data, time.monotonic() - start)


def sse_error(body: bytes, sent: bytes, *, cut_by_deadline: bool = False) -> dict[str, Any]:
    """A committed stream that failed: the whole events the upstream sent, relayed as sent (never half of one:
    a client would parse it glued to the error event), then one error event, then [DONE]. `cut_by_deadline`:
    bytes the upstream wrote just before the deadline may not have been read, so the relayed events are the
    first of those it sent."""
    done = b"data: [DONE]\n\n"
    assert body.endswith(b"\n\n" + done), body
    head = body[: -len(done)]
    start = last_event_end(head[:-2])  # where the error event begins
    relayed, event = head[:start], head[start:-2]
    whole = sent[: last_event_end(sent)]
    if cut_by_deadline:
        assert whole.startswith(relayed) and last_event_end(relayed) == len(relayed), (relayed, sent)
    else:
        assert relayed == whole, (relayed, sent)
    assert event.startswith(b"data: ") and b"\n" not in event, body
    return openai_error(event[len(b"data: ") :])


def cost_of(text: str) -> float:
    u = usage_for(text)
    return (u["prompt"] * PRICE["input"] + u["completion"] * PRICE["output"]) / 1e6


class Ledger:
    """The generations as the gateway's store holds them, read while it runs (SQLite in WAL mode)."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._store: SQLiteStore | None = None

    async def _open(self) -> SQLiteStore:
        if self._store is None:
            (path,) = self._dir.glob("ledger-*.db")  # the gateway fixture puts the ledger in the test's directory
            self._store = SQLiteStore(str(path))
            await self._store.open()
        return self._store

    async def __call__(self, gw: Any, http: aiohttp.ClientSession, gen_id: str) -> GenerationRecord:
        """One generation, once flushed — after checking that `/api/v1/generation` (the key's own view) shows
        the same attempts."""
        assert gen_id
        store = await self._open()
        async with asyncio.timeout(T):
            while (record := await store.get_generation(gen_id)) is None:
                await asyncio.sleep(0.02)
            async with http.get(gw.url + "/api/v1/generation", params={"id": gen_id}, headers=AUTH) as r:
                assert r.status == 200, await r.text()
                view = orjson.loads(await r.read())["data"]
        got = [(a["provider"], a["outcome"], a["status"]) for a in view["attempts"]]
        assert got == attempts(record)
        assert view["provider_name"] == (record.provider or None) and view["cancelled"] == record.cancelled
        return record

    async def wait_count(self, n: int) -> None:
        store = await self._open()
        async with asyncio.timeout(T):
            while await store.count_generations() < n:
                await asyncio.sleep(0.02)

    async def only(self, gw: Any, http: aiohttp.ClientSession) -> GenerationRecord:
        """The one generation recorded (a request whose client never saw its id)."""
        await self.wait_count(1)
        (path,) = self._dir.glob("ledger-*.db")
        with sqlite3.connect(path) as db:
            (gen_id,) = db.execute("SELECT id FROM generations").fetchone()
        return await self(gw, http, gen_id)

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    reader = Ledger(tmp_path)
    yield reader
    await reader.close()


def attempts(record: GenerationRecord) -> list[tuple[str, str, int]]:
    return [(a.provider, a.outcome, a.status) for a in record.attempts]


async def health(http: aiohttp.ClientSession, gw: Any) -> dict[str, dict[str, Any]]:
    """`/api/v1/providers`, by provider (one endpoint each here)."""
    async with asyncio.timeout(T), http.get(gw.url + "/api/v1/providers", headers=AUTH) as r:
        assert r.status == 200
        return {e["provider"]: e for e in orjson.loads(await r.read())["data"]}


def outcomes(entry: dict[str, Any]) -> dict[str, int]:
    """The endpoint's non-zero outcome counts over 5 minutes."""
    return {k: v for k, v in entry["outcomes_5m"].items() if v}


async def still_serves(http: aiohttp.ClientSession, gw: Any, provider: str) -> None:
    """A clean request afterwards is served: the fault wedged nothing (no stuck connection, no lost slot)."""
    ans = await call(http, gw, "after the fault", order=[provider])
    assert ans.status == 200, ans.body
    assert ans.headers["X-Hedgerow-Provider"] == provider


# --- slow but well-formed ----------------------------------------------------------------------------------------


async def test_latency_and_jitter_only_delay_the_answer(chaos, gateway, http, ledger):
    ups = await chaos("a")
    gw = await gateway(config(ups))
    plain = await call(http, gw, "latency=0.15 jitter=0.1")
    assert plain.status == 200 and plain.took >= 0.15
    assert plain.body == ups["a"].posts[0].sent  # the upstream's bytes, as sent
    streamed = await call(http, gw, "latency=0.15 jitter=0.1 stream", stream=True)
    assert streamed.status == 200 and streamed.took >= 0.15
    assert streamed.headers["Content-Type"] == "text/event-stream"
    assert streamed.body == ups["a"].posts[1].sent and streamed.body.endswith(b"data: [DONE]\n\n")

    for ans, text in ((plain, "latency=0.15 jitter=0.1"), (streamed, "latency=0.15 jitter=0.1 stream")):
        rec = await ledger(gw, http, ans.gen_id)
        assert rec.status == 200 and attempts(rec) == [("a", "ok", 200)]
        assert rec.prompt_tokens == usage_for(text)["prompt"]
        assert rec.completion_tokens == usage_for(text)["completion"]
        assert rec.cost == pytest.approx(cost_of(text), abs=1e-12)
        assert rec.ttft is not None and rec.ttft >= 0.15 and rec.finish_reason == "stop"
    assert ups["a"].reported.requests == 2
    h = (await health(http, gw))["a"]
    assert outcomes(h) == {"ok": 2} and h["consecutive_failures"] == 0 and h["ejected"] is False


@pytest.mark.parametrize("gateway", GATEWAY_VARIANTS[:2], indirect=True)  # the two upstream clients' read paths
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_slow_trickle_within_the_timeouts_is_relayed_whole(chaos, gateway, http, ledger, stream):
    """8 bytes every 10-20 ms: never silent for the idle timeout (0.5 s), though the body takes twice as long."""
    ups = await chaos("a")
    gw = await gateway(config(ups))
    text = "trickle=800 stream" if stream else "trickle=400"  # ≈ 940 and 450 bytes
    ans = await call(http, gw, text, stream=stream)
    assert ans.status == 200, ans.body
    assert ans.took > 0.8  # the whole body took longer than the idle timeout: idle is silence, not duration
    assert ans.body == ups["a"].posts[0].sent
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "ok", 200)]
    assert rec.completion_tokens == usage_for(text)["completion"]
    assert outcomes((await health(http, gw))["a"]) == {"ok": 1}


async def test_early_hints_before_the_answer_are_skipped(chaos, gateway, http, ledger):
    ups = await chaos("a")
    gw = await gateway(config(ups))
    ans = await call(http, gw, "interim")
    assert ans.status == 200 and ans.body == ups["a"].posts[0].sent
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "ok", 200)]


async def test_crlf_framed_stream_commits_at_its_first_token_and_relays_byte_identical(chaos, gateway, http, ledger):
    """`\\r\\n\\r\\n` ends an SSE event as well as `\\n\\n`: the first token commits the stream when it comes, not
    when the stream ends (events 0.2 s apart; the first-token timeout is 0.7 s, the whole stream takes 1 s)."""
    ups = await chaos("a")
    gw = await gateway(config(ups, timeouts={"first-token-s": 0.7}))
    ans = await call(http, gw, "crlf gap=0.2", stream=True)
    assert ans.status == 200, ans.body
    assert b"\r\n\r\n" in ans.body and ans.body == ups["a"].posts[0].sent
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "ok", 200)] and rec.finish_reason == "stop"
    assert rec.ttft is not None and rec.ttft < 0.6  # the second event, ≈ 0.2 s
    assert rec.cost == pytest.approx(cost_of("crlf gap=0.2"), abs=1e-12)


@pytest.mark.parametrize("gateway", ONE_VARIANT, indirect=True)
async def test_slow_trickle_over_the_total_time_is_a_504(chaos, gateway, http, ledger):
    """Never silent for the idle timeout, yet too slow: the total time cuts it, before the body was whole."""
    ups = await chaos("a")
    gw = await gateway(config(ups, timeouts={"total-s": 1.0}))
    ans = await call(http, gw, "trickle=200")  # ≈ 450 bytes: 2.2 s
    assert ans.status == 504 and 1.0 <= ans.took < 2.0
    assert "total time" in ans.error("upstream_timeout")["message"]
    await ups["a"].wait_hung_up(1)
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 504 and attempts(rec) == [("a", "timeout", 0)]
    assert ups["a"].reported.requests == 0
    assert outcomes((await health(http, gw))["a"]) == {"timeout": 1}


@pytest.mark.parametrize("gateway", ONE_VARIANT, indirect=True)
async def test_slow_trickle_over_the_total_time_ends_the_stream_with_an_error_event(chaos, gateway, http, ledger):
    """Never silent for the idle timeout, yet too slow: the total time cuts it, after the commit."""
    ups = await chaos("a")
    gw = await gateway(config(ups, timeouts={"total-s": 1.0}))
    ans = await call(http, gw, "stream trickle=400", stream=True)  # first token ≈ 0.7 s; the rest would take 1 s
    assert ans.status == 200 and 1.0 <= ans.took < 2.5
    err = sse_error(ans.body, ups["a"].posts[0].sent, cut_by_deadline=True)
    assert err["code"] == "upstream_timeout"
    await ups["a"].wait_hung_up(1)  # the gateway closed the upstream connection
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "timeout", 200)]
    assert rec.prompt_tokens == 0 and rec.cost == 0.0  # the usage chunk never came
    h = (await health(http, gw))["a"]
    assert outcomes(h) == {"timeout": 1} and h["consecutive_failures"] == 1
    await still_serves(http, gw, "a")


# --- stalls ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "stream"),
    [("stall-head", False), ("stall-head", True), ("stall-mid-head", False)],
    ids=["plain", "stream", "half-a-head"],
)
async def test_stall_before_headers_is_a_504_after_the_first_byte_timeout(chaos, gateway, http, ledger, fault, stream):
    ups = await chaos("a")
    gw = await gateway(config(ups))
    ans = await call(http, gw, fault, stream=stream)
    assert ans.status == 504 and 0.5 <= ans.took < 2.0
    assert ans.error("upstream_timeout")["type"] == "timeout"
    await ups["a"].wait_hung_up(1)
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 504 and attempts(rec) == [("a", "timeout", 0)] and rec.provider == ""
    h = (await health(http, gw))["a"]
    assert outcomes(h) == {"timeout": 1} and h["consecutive_failures"] == 1
    assert h["ejected"] is False  # a model's only endpoint is never ejected
    await still_serves(http, gw, "a")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_stall_before_headers_fails_over_to_the_second_provider(chaos, gateway, http, ledger, stream):
    ups = await chaos("a", "b")
    gw = await gateway(config(ups))
    ans = await call(http, gw, "stall-head@a stream", stream=stream, order=["a", "b"])
    assert ans.status == 200 and 0.5 <= ans.took < 2.0
    assert ans.headers["X-Hedgerow-Provider"] == "b" and ans.headers["X-Hedgerow-Attempts"] == "2"
    assert ans.body == ups["b"].posts[0].sent
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and rec.provider == "b"
    assert attempts(rec) == [("a", "timeout", 0), ("b", "ok", 200)]
    if stream:  # a stream has its usage only when the gateway asked for it (it does, for OpenAI upstreams)
        assert rec.completion_tokens == usage_for("stall-head@a stream")["completion"]
    h = await health(http, gw)
    assert outcomes(h["a"]) == {"timeout": 1} and outcomes(h["b"]) == {"ok": 1}


async def test_stall_before_headers_is_overtaken_by_a_hedge(chaos, gateway, http, ledger):
    """With hedging on, the stalled attempt does not even cost the first-byte timeout: the hedge answers, the
    stalled connection is closed, and the loser counts for nothing in health."""
    ups = await chaos("a", "b")
    gw = await gateway(config(ups, hedge={"delay-s": 0.1, "budget": 1.0}))
    ans = await call(http, gw, "stall-head@a", stream=True, order=["a", "b"])
    assert ans.status == 200 and ans.took < 0.5
    assert ans.headers["X-Hedgerow-Provider"] == "b" and ans.headers["X-Hedgerow-Hedged"] == "won"
    assert ans.body == ups["b"].posts[0].sent
    await ups["a"].wait_hung_up(1)
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and rec.provider == "b"
    assert sorted(attempts(rec)) == [("a", "hedge_lost", 0), ("b", "ok", 200)]
    assert rec.cost == pytest.approx(cost_of("stall-head@a"), abs=1e-12)
    h = await health(http, gw)
    assert outcomes(h["a"]) == {"cancelled": 1} and h["a"]["consecutive_failures"] == 0
    assert outcomes(h["b"]) == {"ok": 1}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_stall_after_headers_is_a_504_after_the_idle_timeout(chaos, gateway, http, ledger, stream):
    """The head came, the body never does: before the commit, so a JSON 504 (a stream too: no byte went out)."""
    ups = await chaos("a")
    gw = await gateway(config(ups))
    ans = await call(http, gw, "stall-body", stream=stream)
    assert ans.status == 504 and 0.5 <= ans.took < 2.0
    ans.error("upstream_timeout")
    await ups["a"].wait_hung_up(1)
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 504 and attempts(rec) == [("a", "timeout", 0)]
    assert outcomes((await health(http, gw))["a"]) == {"timeout": 1}
    await still_serves(http, gw, "a")


async def test_stall_after_headers_once_keepalives_went_out_ends_the_stream_with_an_error_event(
    chaos, gateway, http, ledger
):
    """SSE keep-alive comments already opened the client's stream (200): the timeout can only end it."""
    ups = await chaos("a")
    gw = await gateway(config(ups, routing={"stream-keepalive-s": 0.15}))
    ans = await call(http, gw, "stall-body", stream=True)
    assert ans.status == 200 and 0.5 <= ans.took < 2.0
    keepalives = ans.body.count(b": keep-alive\n\n")
    assert keepalives >= 2
    err = sse_error(ans.body, b": keep-alive\n\n" * keepalives)
    assert err["code"] == "upstream_timeout"
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "timeout", 0)] and rec.cost == 0.0
    assert outcomes((await health(http, gw))["a"]) == {"timeout": 1}


@pytest.mark.parametrize("fault", ["stall-head", "stall-body"])
async def test_client_giving_up_on_a_stalled_upstream_is_a_cancellation(chaos, gateway, http, ledger, fault):
    """The client's own timeout ends it first: the upstream connection is closed at once, the ledger says
    cancelled, and health counts nothing against the upstream."""
    ups = await chaos("a")
    gw = await gateway(config(ups, timeouts={"first-byte-s": 5.0, "idle-s": 5.0}))
    body = {"model": MODEL, "messages": [{"role": "user", "content": fault}]}
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3), http.post(gw.v1 + "/chat/completions", json=body, headers=AUTH) as r:
            await r.read()
    await ups["a"].wait_hung_up(1, within=2.0)
    rec = await ledger.only(gw, http)
    assert rec.cancelled and rec.status == 499 and attempts(rec) == [("a", "cancelled", 0)] and rec.cost == 0.0
    h = (await health(http, gw))["a"]
    assert outcomes(h) == {"cancelled": 1} and h["consecutive_failures"] == 0 and h["in_flight"] == 0
    await still_serves(http, gw, "a")


# --- connections cut ---------------------------------------------------------------------------------------------


async def test_reset_mid_stream_after_the_commit_ends_it_with_an_error_event(chaos, gateway, http, ledger):
    ups = await chaos("a", "b")
    gw = await gateway(config(ups))
    ans = await call(http, gw, "stream reset-after=3@a", stream=True, order=["a", "b"])
    assert ans.status == 200 and ans.headers["X-Hedgerow-Provider"] == "a"
    err = sse_error(ans.body, ups["a"].posts[0].sent)  # three events relayed, then the error
    assert err["code"] == "stream_interrupted"
    assert ups["b"].posts == []  # never retried once bytes reached the client
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "protocol", 200)]
    assert rec.streamed and not rec.cancelled and rec.prompt_tokens == 0 and rec.cost == 0.0
    h = await health(http, gw)
    assert outcomes(h["a"]) == {"protocol": 1} and h["a"]["consecutive_failures"] == 1
    assert outcomes(h["b"]) == {}
    await still_serves(http, gw, "a")


async def test_reset_before_the_first_token_fails_over(chaos, gateway, http, ledger):
    ups = await chaos("a", "b")
    gw = await gateway(config(ups))
    text = "stream reset-after=1@a"  # only the role chunk, which does not commit a stream
    ans = await call(http, gw, text, stream=True, order=["a", "b"])
    assert ans.status == 200 and ans.headers["X-Hedgerow-Provider"] == "b"
    assert ans.body == ups["b"].posts[0].sent  # nothing of a's stream reached the client
    rec = await ledger(gw, http, ans.gen_id)
    assert attempts(rec) == [("a", "protocol", 0), ("b", "ok", 200)]
    assert rec.status == 200 and rec.provider == "b" and rec.cost == pytest.approx(cost_of(text), abs=1e-12)
    h = await health(http, gw)
    assert outcomes(h["a"]) == {"protocol": 1} and outcomes(h["b"]) == {"ok": 1}


@pytest.mark.parametrize("fault", ["close-after=40", "reset-after=40"])
async def test_connection_cut_mid_body_is_a_502(chaos, gateway, http, ledger, fault):
    ups = await chaos("a")
    gw = await gateway(config(ups))
    ans = await call(http, gw, fault)
    assert ans.status == 502
    assert ans.error()["type"] == "upstream_error"
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 502 and attempts(rec) == [("a", "protocol", 0)]
    assert outcomes((await health(http, gw))["a"]) == {"protocol": 1}
    await still_serves(http, gw, "a")


async def test_close_after_n_bytes_of_a_committed_stream_ends_it_with_an_error_event(chaos, gateway, http, ledger):
    """A chunked stream closed cleanly in the middle of a chunk: framed for more, so it is an interruption."""
    ups = await chaos("a")
    gw = await gateway(config(ups))
    ans = await call(http, gw, "stream close-after=420", stream=True)
    assert ans.status == 200
    sent = ups["a"].posts[0].sent
    assert len(sent) == 420  # two events (the commit) and part of a third
    err = sse_error(ans.body, sent)
    assert err["code"] == "stream_interrupted"
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "protocol", 200)] and rec.cost == 0.0
    assert outcomes((await health(http, gw))["a"]) == {"protocol": 1}


# --- bytes: sliced, broken, wrong, too many ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_one_byte_slices_are_relayed_byte_identical(chaos, gateway, http, ledger, stream):
    ups = await chaos("a")
    gw = await gateway(config(ups))
    text = "slice stream" if stream else "slice"
    ans = await call(http, gw, text, stream=stream)
    assert ans.status == 200
    assert ans.body == ups["a"].posts[0].sent  # every byte, in order, none added
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "ok", 200)] and rec.finish_reason == "stop"
    assert rec.completion_tokens == usage_for(text)["completion"]  # the usage read across 1-byte pieces
    assert rec.cost == pytest.approx(cost_of(text), abs=1e-12)
    assert outcomes((await health(http, gw))["a"]) == {"ok": 1}


BROKEN = [
    pytest.param("garbage", id="garbage-body"),
    pytest.param("truncated", id="truncated-json"),
    pytest.param("short-length", id="short-content-length"),
    pytest.param("html", id="html-page"),
    pytest.param("not-http", id="not-http"),
    pytest.param("stream ctype=text/plain", id="stream-as-text-plain"),
]


@pytest.mark.parametrize("fault", BROKEN)
async def test_broken_response_is_a_502(chaos, gateway, http, ledger, fault):
    """A 200 whose body is not an OpenAI answer is the upstream's failure, never relayed as a success."""
    ups = await chaos("a")
    gw = await gateway(config(ups))
    ans = await call(http, gw, fault, stream="stream" in fault)
    assert ans.status == 502, ans.body
    assert ans.error()["type"] == "upstream_error"
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 502 and [a[:2] for a in attempts(rec)] == [("a", "protocol")] and rec.cost == 0.0
    h = (await health(http, gw))["a"]
    assert outcomes(h) == {"protocol": 1} and h["consecutive_failures"] == 1
    await still_serves(http, gw, "a")


@pytest.mark.parametrize("fault", BROKEN)
async def test_broken_response_fails_over_to_the_second_provider(chaos, gateway, http, ledger, fault):
    ups = await chaos("a", "b")
    gw = await gateway(config(ups))
    words = fault.split()
    text = " ".join(w if w == "stream" else f"{w}@a" for w in words)
    ans = await call(http, gw, text, stream="stream" in words, order=["a", "b"])
    assert ans.status == 200 and ans.headers["X-Hedgerow-Provider"] == "b"
    assert ans.body == ups["b"].posts[0].sent
    rec = await ledger(gw, http, ans.gen_id)
    assert [a[:2] for a in attempts(rec)] == [("a", "protocol"), ("b", "ok")] and rec.provider == "b"
    assert rec.cost == pytest.approx(cost_of(text), abs=1e-12)
    h = await health(http, gw)
    assert outcomes(h["a"]) == {"protocol": 1} and outcomes(h["b"]) == {"ok": 1}


async def test_json_answer_under_a_wrong_content_type_is_relayed_as_json(chaos, gateway, http, ledger):
    ups = await chaos("a")
    gw = await gateway(config(ups))
    ans = await call(http, gw, "ctype=text/plain")
    assert ans.status == 200 and ans.headers["Content-Type"].startswith("application/json")
    assert ans.body == ups["a"].posts[0].sent
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "ok", 200)]
    assert rec.cost == pytest.approx(cost_of("ctype=text/plain"), abs=1e-12)


async def test_oversized_response_is_a_502_naming_the_limit(chaos, gateway, http, ledger):
    ups = await chaos("a")
    gw = await gateway(config(ups, max_response_bytes=4096))
    ans = await call(http, gw, "oversize=20000")
    assert ans.status == 502
    assert "4096" in ans.error()["message"]
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 502 and [a[:2] for a in attempts(rec)] == [("a", "protocol")]
    assert outcomes((await health(http, gw))["a"]) == {"protocol": 1}
    assert (await call(http, gw, "oversize=4000")).status == 200  # under the limit: served
    await still_serves(http, gw, "a")


# --- status storms -----------------------------------------------------------------------------------------------


async def test_429_with_retry_after_in_seconds_ejects_the_endpoint_for_that_long(chaos, gateway, http, ledger):
    await _ejected_for_retry_after(chaos, gateway, http, ledger, "429=1")


@pytest.mark.parametrize("gateway", ONE_VARIANT, indirect=True)  # parsing the date is health's, whatever the server
async def test_429_with_retry_after_as_an_http_date_ejects_the_endpoint_for_that_long(chaos, gateway, http, ledger):
    await _ejected_for_retry_after(chaos, gateway, http, ledger, "429-date=2")


async def _ejected_for_retry_after(chaos: Chaos, gateway: Any, http: aiohttp.ClientSession, ledger: Ledger, form: str):
    ups = await chaos("a", "b")
    gw = await gateway(config(ups))
    ans = await call(http, gw, f"{form}@a", order=["a", "b"])
    t0 = time.monotonic()
    assert ans.status == 200 and ans.headers["X-Hedgerow-Provider"] == "b"  # failed over at once
    rec = await ledger(gw, http, ans.gen_id)
    assert attempts(rec) == [("a", "rate_limited", 429), ("b", "ok", 200)] and rec.status == 200
    h = await health(http, gw)
    assert outcomes(h["a"]) == {"rate_limited": 1} and h["a"]["ejected"] is True
    # an HTTP-date has whole seconds: two seconds ahead is between one and two
    assert 0.5 < h["a"]["ejected_for_s"] <= 2.0
    during = await call(http, gw, "while ejected", order=["a", "b"])
    assert during.headers["X-Hedgerow-Provider"] == "b" and during.headers["X-Hedgerow-Attempts"] == "1"
    assert len(ups["a"].posts) == 1  # the ejected endpoint got nothing
    async with asyncio.timeout(T):  # readmitted once its time is up (the expiry timer runs every 0.5 s)
        while (await call(http, gw, "after the ejection", order=["a", "b"])).headers["X-Hedgerow-Provider"] != "a":
            await asyncio.sleep(0.05)
    assert 0.5 <= time.monotonic() - t0 < 4.0
    assert (await health(http, gw))["a"]["ejected"] is False


@pytest.mark.parametrize("form", ["429=7", "429-date=7"], ids=["seconds", "http-date"])
async def test_429_from_the_only_endpoint_is_relayed_with_its_retry_after(chaos, gateway, http, ledger, form):
    ups = await chaos("a")
    gw = await gateway(config(ups))
    ans = await call(http, gw, form)
    assert ans.status == 429
    assert ans.error()["type"] == "rate_limit_error"
    retry_after = ans.headers["Retry-After"]
    assert (retry_after == "7") if form == "429=7" else retry_after.endswith("GMT")
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 429 and attempts(rec) == [("a", "rate_limited", 429)]
    h = (await health(http, gw))["a"]
    assert outcomes(h) == {"rate_limited": 1} and h["ejected"] is False  # a lone endpoint stays in


async def test_5xx_storm_ejects_after_consecutive_failures(chaos, gateway, http, ledger):
    ups = await chaos("a", "b")
    gw = await gateway(config(ups))  # consecutive-failures: 3
    streak = []
    for i in range(3):
        ans = await call(http, gw, f"status=503@a {i}", order=["a", "b"])
        assert ans.status == 200 and ans.headers["X-Hedgerow-Provider"] == "b"
        rec = await ledger(gw, http, ans.gen_id)
        assert attempts(rec) == [("a", "server_error", 503), ("b", "ok", 200)]
        h = await health(http, gw)
        streak.append((h["a"]["consecutive_failures"], h["a"]["ejected"]))
    assert streak == [(1, False), (2, False), (0, True)]  # the third failure ejects; the streak is spent
    h = await health(http, gw)
    assert outcomes(h["a"]) == {"server_error": 3} and h["a"]["ejections"] == 1
    assert 3.0 < h["a"]["ejected_for_s"] <= 6.0  # base 5 s ± 20 %
    assert outcomes(h["b"]) == {"ok": 3}
    ans = await call(http, gw, "status=503@a 3", order=["a", "b"])
    assert ans.headers["X-Hedgerow-Attempts"] == "1" and ans.headers["X-Hedgerow-Provider"] == "b"
    assert len(ups["a"].posts) == 3  # ejected: no fourth request reached it


async def test_5xx_storm_on_the_only_endpoint_is_a_502_per_request_then_recovers(chaos, gateway, http, ledger):
    ups = await chaos("a")
    gw = await gateway(config(ups))
    got = [await call(http, gw, "storm=4") for _ in range(5)]
    assert [a.status for a in got] == [502, 502, 502, 502, 200]
    for ans in got[:4]:
        assert ans.error("bad_gateway")["type"] == "upstream_error" and "503" in ans.error()["message"]
        rec = await ledger(gw, http, ans.gen_id)
        assert rec.status == 502 and attempts(rec) == [("a", "server_error", 503)]
    rec = await ledger(gw, http, got[4].gen_id)
    assert rec.status == 200 and attempts(rec) == [("a", "ok", 200)] and rec.cost == pytest.approx(cost_of("storm=4"))
    h = (await health(http, gw))["a"]
    assert outcomes(h) == {"server_error": 4, "ok": 1} and h["consecutive_failures"] == 0 and h["ejected"] is False


async def test_every_endpoint_failing_is_a_503_with_every_attempt_in_the_ledger(chaos, gateway, http, ledger):
    ups = await chaos("a", "b")
    gw = await gateway(config(ups))
    ans = await call(http, gw, "stall-head@a status=500@b", order=["a", "b"])
    assert ans.status == 503 and ans.took < 2.0
    assert "all 2 endpoints failed" in ans.error("service_unavailable")["message"]
    rec = await ledger(gw, http, ans.gen_id)
    assert rec.status == 503 and attempts(rec) == [("a", "timeout", 0), ("b", "server_error", 500)]
    h = await health(http, gw)
    assert outcomes(h["a"]) == {"timeout": 1} and outcomes(h["b"]) == {"server_error": 1}


# --- all of it at once -------------------------------------------------------------------------------------------

SOAK = [  # (faults, streamed); a word `X@p` applies on provider p only
    ("", False),
    ("", True),
    ("latency=0.05 jitter=0.1", True),
    ("slice", True),
    ("slice", False),
    ("stall-head@a", False),
    ("stall-body@b", True),
    ("status=503@a", False),
    ("storm=1@b", True),
    ("429=1@b", False),
    ("garbage@a", False),
    ("truncated@b", False),
    ("html@a", False),
    ("not-http@b", True),
    ("close-after=40@a", False),
    ("reset-after=3@a", True),
    ("reset-after=1@b", True),
    ("crlf", True),
]


async def test_a_mix_of_every_fault_under_concurrency_keeps_ledger_and_health_in_step(chaos, gateway, http, ledger):
    """Concurrent requests, each with its faults, routed as P2C likes: every one ends within bounds with a proper
    answer; the ledger has one record per request with the status the client saw; per endpoint, health's outcome
    counts equal the ledger's attempts; nothing is left in flight; the tokens recorded per provider are exactly
    what that provider reported."""
    ups = await chaos("a", "b")
    gw = await gateway(config(ups))
    plan = [(f"{faults} n{i}".strip(), streamed) for i in range(3) for faults, streamed in SOAK]
    sem = asyncio.Semaphore(12)

    async def one(text: str, streamed: bool) -> Answer:
        async with sem:
            return await call(http, gw, text, stream=streamed)

    answers = await asyncio.gather(*(one(t, s) for t, s in plan))
    await ledger.wait_count(len(plan))
    records = [await ledger(gw, http, ans.gen_id) for ans in answers]
    for (text, streamed), ans, rec in zip(plan, answers, records, strict=True):
        assert ans.status in (200, 429, 502, 503, 504), (text, ans.status, ans.body)
        assert rec.status == ans.status, text
        if ans.status != 200:
            ans.error()
            continue
        assert int(ans.headers["X-Hedgerow-Attempts"]) == len(rec.attempts), text
        served = ups[rec.provider]
        if not streamed:
            assert attempts(rec)[-1] == (rec.provider, "ok", 200)
            assert orjson.loads(ans.body)["object"] == "chat.completion"
            continue
        assert ans.body.endswith((b"data: [DONE]\n\n", b"data: [DONE]\r\n\r\n")), text
        if b'"error"' in ans.body:  # cut after the commit: what the provider sent, then the error event
            sent = next(r.sent for r in served.posts if r.text == text and r.sent)
            sse_error(ans.body, sent, cut_by_deadline=attempts(rec)[-1][1] == "timeout")
            assert attempts(rec)[-1][1] in ("protocol", "timeout")
        else:
            assert ans.body in [r.sent for r in served.posts if r.text == text]
    h = await health(http, gw)
    for name, up in ups.items():
        counted = Counter(outcome for rec in records for p, outcome, _ in attempts(rec) if p == name)
        assert outcomes(h[name]) == dict(counted), name
        assert h[name]["in_flight"] == 0
        mine = [r for r in records if r.provider == name]
        assert sum(r.prompt_tokens for r in mine) == up.reported.prompt
        assert sum(r.completion_tokens for r in mine) == up.reported.completion
        priced = sum(u["prompt"] * PRICE["input"] + u["completion"] * PRICE["output"] for u in up.reported.usages)
        assert sum(r.cost for r in mine) == pytest.approx(priced / 1e6, abs=1e-12)
    assert {r.provider for r in records if r.status == 200} == {"a", "b"}  # both served: the mix reached both
    assert any(len(r.attempts) > 1 and r.status == 200 for r in records)  # and some failed over
