"""The `transcoding` scenario: what translating a provider's wire format costs, in process and through a gateway.

In process (on the gateway's core, nothing else of the benchmark running): for every registered adapter that
transcodes (not passthrough) and has recorded fixtures under tests/fixtures/<adapter>/, its recorded text
stream (stream_ok.*) and tool-call stream (stream_tools.* / stream_function*.*) through `new_transcoder()`,
fed (a) one provider event per `feed()` call, as a provider flushing each event arrives, and (b) the whole
stream in one `feed()`; then `finish()`. Also `parse_response` per body (chat_ok.json and the tool-call body)
and `request_body` for a typical chat request with tools, and a tool-call round trip. Baselines in the same
run: the OpenAI adapter's passthrough path (`request_body` with the same model: zero-copy; with the model
renamed, as the gateway's config usually does: one rewrite; `parse_response`: identity; streams: no transcoder
at all) and the raw SSE splitter alone (adapters/sse.py) on the same bytes, which every transcoder runs first.
Each figure: `timeit` (GC off, as timeit does), N calls per repeat with N calibrated to a repeat of ~30 ms,
the median over 21 repeats; the repeats of all functions are interleaved, so a slow spell of a shared machine
hits every figure alike.

Through a gateway (each component in its own process, pinned as in `overhead`): three fake upstreams
(benchmarks/fake_upstream.py `--format openai|anthropic|gemini`, zero delay) and three gateways, each with one
provider on the matching fake: `openai` (passthrough), `anthropic` (adapter: anthropic) and `gemini`
(adapter: gemini), all serving the public model `fake/gpt-4o-mini` to the same client request. Per round, for
each: open-loop streamed requests to the fake directly and through the gateway (TTFB; added = gateway − direct
within the round), and closed loop (c=32) streamed and non-streamed (req/s, the gateway's CPU per request).
Every relayed stream is checked: byte-identical to the fixture (openai), or equal to the in-process
transcoding of the fixture with `created` timestamps and ids left open (anthropic, gemini).
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from adapters import REGISTRY
from adapters.base import DONE, Adapter
from adapters.sse import SseSplitter
from benchmarks.fake_upstream import FIXTURES_ROOT, sse_events
from benchmarks.harness import CpuPlan, Service, ServiceError, cpu_plan, free_ports, run_load
from benchmarks.kit import (
    CHAT_PATH,
    GATEWAY_KEY,
    MODEL,
    banner,
    check,
    exit_status,
    fmt,
    gateway_config,
    gateway_cpu,
    orchestrator_on,
    progress,
    start_gateway,
    start_upstream,
    startup_failed,
    table,
    verdicts,
    write_report,
)
from proxy.config import ProviderConfig

if TYPE_CHECKING:
    from benchmarks.scenarios import Options

RATE = 200.0
DURATION_S, QUICK_DURATION_S = 2.0, 0.4
ROUNDS, QUICK_ROUNDS = 5, 1
WARMUP_S, QUICK_WARMUP_S = 1.0, 0.2
CONCURRENCY = 32
# In process: each repeat runs ~REPEAT_S of calls (N calibrated per function); the median of REPEAT repeats.
REPEAT_S, QUICK_REPEAT_S = 0.03, 0.002
REPEAT, QUICK_REPEAT = 21, 3

# The upstream model each adapter is asked for (the transcoders take the model the provider reports, when it does).
UPSTREAM_MODELS = {
    "openai": "gpt-4o-mini",
    "anthropic": "claude-sonnet-4-20250514",
    "gemini": "gemini-2.5-flash",
    "bedrock": "anthropic.claude-sonnet-4-20250514-v1:0",
}
# Adapters that sign each request (a `sign(target, body)` method, Bedrock's SigV4) are also timed signing, with
# a key pair (fake, never sent anywhere) and a base-url that names the region.
SIGNED = {
    "bedrock": (
        "AKIDBENCHMARK0000000:benchmark-secret-key-0000000000000000000",
        "https://bedrock-runtime.us-east-1.amazonaws.com",
    )
}
DEFAULT_UPSTREAM_MODEL = "bench-model"
TEXT_STREAMS = ("stream_ok.*",)
TOOL_STREAMS = ("stream_tool*.*", "stream_function*.*")
TEXT_BODIES = ("chat_ok.json",)
TOOL_BODIES = ("chat_tool*.json", "chat_function*.json")


@dataclass(frozen=True)
class Wire:
    """How a gateway reaches a fake upstream of this format, and where the load generator reaches it direct."""

    base_path: str  # of the provider's base-url
    stream_path: str  # a streamed request, straight to the fake
    upstream_model: str


WIRES = {
    "openai": Wire("/v1", CHAT_PATH, UPSTREAM_MODELS["openai"]),
    "anthropic": Wire("/v1", "/v1/messages", UPSTREAM_MODELS["anthropic"]),
    "gemini": Wire(
        "/v1beta",
        f"/v1beta/models/{UPSTREAM_MODELS['gemini']}:streamGenerateContent?alt=sse",
        UPSTREAM_MODELS["gemini"],
    ),
}
GATEWAYS = tuple(WIRES)  # openai first: the passthrough baseline
TESTS = ("direct-stream", "open-stream", "closed-stream", "closed-nonstream")

# A typical chat request with tools (what a coding or support agent sends on its first turn) …
_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_docs",
            "description": "Search the product documentation and return the best matching passages.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 20},
                },
                "required": ["query"],
            },
        },
    },
]
_SYSTEM = {"role": "system", "content": "You are a helpful assistant. Answer briefly; use the tools when needed."}
_USER = {"role": "user", "content": "What's the weather in Paris today, and should I take an umbrella?"}
CHAT_WITH_TOOLS = {
    "model": MODEL,
    "messages": [_SYSTEM, _USER],
    "tools": _TOOLS,
    "tool_choice": "auto",
    "temperature": 0.2,
    "max_tokens": 512,
    "stream": True,
}
# … and its second turn: the assistant's tool call and the tool's result sent back.
TOOL_ROUND_TRIP = {
    **CHAT_WITH_TOOLS,
    "messages": [
        _SYSTEM,
        _USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0123456789abcdef",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_0123456789abcdef",
            "content": '{"city":"Paris","temperature":14,"conditions":"light rain","precipitation_mm":2.5}',
        },
    ],
}


@dataclass
class Subject:
    """One adapter with its fixtures, as the in-process benchmark runs it."""

    name: str
    adapter: Adapter
    model: str
    streams: dict[str, tuple[Path, list[bytes]]] = field(default_factory=dict)  # "text"/"tools" → file, events
    bodies: dict[str, Path] = field(default_factory=dict)  # "text"/"tools" → file


def run(opts: Options) -> int:
    plan = cpu_plan()
    rate = opts.rate or RATE
    duration = opts.duration_s or (QUICK_DURATION_S if opts.quick else DURATION_S)
    rounds = opts.rounds or (QUICK_ROUNDS if opts.quick else ROUNDS)
    warmup = QUICK_WARMUP_S if opts.quick else WARMUP_S
    repeat_s, repeat = (QUICK_REPEAT_S, QUICK_REPEAT) if opts.quick else (REPEAT_S, REPEAT)
    settings = {
        "rate": rate,
        "duration_s": duration,
        "rounds": rounds,
        "warmup_s": warmup,
        "concurrency": CONCURRENCY,
        "micro_repeat": repeat,
        "micro_repeat_s": repeat_s,
        "quick": opts.quick,
    }
    host = banner(
        "transcoding",
        f"in process: median of {repeat} repeats × ~{1000 * repeat_s:g} ms; through a gateway: {rounds} round(s) "
        f"× {duration:g} s per run,\nopen loop {rate:g} req/s (streamed) and closed loop c={CONCURRENCY} "
        "(streamed, non-streamed); gateways: openai (passthrough), anthropic, gemini",
        plan,
    )
    subjects, skipped = _subjects()
    for name, why in skipped.items():
        progress(f"in process: skipping {name}: {why}")
    progress("in process: transcoders, parse_response, request_body, SSE splitter")
    micro = _micro(plan, subjects, repeat_s, repeat)
    print(_stream_table(micro, repeat, repeat_s))
    print()
    print(_body_table(micro))
    print(flush=True)

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {g: {t: [] for t in TESTS} for g in GATEWAYS}
    status = 0
    try:
        with orchestrator_on(plan), tempfile.TemporaryDirectory(prefix="hedgerow-bench-") as tmp:
            _gateway_rounds(Path(tmp), plan, rounds, rate, duration, warmup, runs)
    except ServiceError as e:
        status = startup_failed(e)
    summary = _summarize(runs) if status == 0 else {}
    if status == 0:
        print(_gateway_table(summary))
    checks = _checks(micro, summary, runs) if status == 0 else _checks(micro, None, None)
    print(verdicts(checks, opts.quick))
    write_report(
        opts,
        {
            "scenario": "transcoding",
            "settings": settings,
            "machine": host,
            "pinning": plan.describe(),
            "skipped": skipped,
            "micro": micro,
            "summary": summary,
            "checks": checks,
            "runs": runs,
        },
    )
    return status or exit_status(checks, opts.quick)


# -- in process ----------------------------------------------------------------------------------------------


def provider_events(raw: bytes) -> list[bytes]:
    """A recorded stream cut into the provider's events, each as it arrives on the wire: SSE events with their
    blank-line terminator, or else AWS event-stream frames (Bedrock; each starts with its total length)."""
    try:
        return sse_events(raw)
    except ValueError:
        pass
    events, i = [], 0
    while i + 16 <= len(raw):
        n = int.from_bytes(raw[i : i + 4], "big")
        if n < 16 or i + n > len(raw):
            break
        events.append(raw[i : i + n])
        i += n
    if not events or i != len(raw):
        raise ValueError("neither SSE events nor AWS event-stream frames")
    return events


def _first(directory: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        found = sorted(directory.glob(pattern))
        if found:
            return found[0]
    return None


def _adapter(name: str, base_url: str = "http://127.0.0.1:9/v1") -> Adapter:
    provider = ProviderConfig(name=f"bench-{name}", adapter=name, base_url=base_url, api_key="sk-bench-0123456789")
    return REGISTRY[name](provider, base_url)


def _signing(name: str) -> Any:
    """An adapter of this kind that signs each request, or None (most authenticate with a static header)."""
    if name not in SIGNED:
        return None
    key, base_url = SIGNED[name]
    try:
        provider = ProviderConfig(name=f"bench-{name}-signed", adapter=name, base_url=base_url, api_key=key)
        adapter = REGISTRY[name](provider, base_url)
        target = adapter.target("chat", UPSTREAM_MODELS.get(name, DEFAULT_UPSTREAM_MODEL), True)
        return adapter if target is not None and adapter.sign(target, b"{}") else None  # type: ignore[attr-defined]
    except Exception:
        return None


def _subjects() -> tuple[list[Subject], dict[str, str]]:
    """Every registered adapter that transcodes and has its fixtures; the others with why they are skipped."""
    subjects: list[Subject] = []
    skipped: dict[str, str] = {}
    for name in sorted(REGISTRY):
        if REGISTRY[name].passthrough:
            if name != "openai":
                skipped[name] = "passthrough (OpenAI-shaped bytes, no transcoder)"
            continue
        fixtures = FIXTURES_ROOT / name
        text = _first(fixtures, TEXT_STREAMS) if fixtures.is_dir() else None
        if text is None:
            skipped[name] = f"no recorded stream (tests/fixtures/{name}/stream_ok.*)"
            continue
        try:
            adapter = _adapter(name)
        except Exception as e:  # a new adapter may want more config than a base-url and a key
            skipped[name] = f"could not build the adapter: {type(e).__name__}: {e}"
            continue
        subject = Subject(name, adapter, UPSTREAM_MODELS.get(name, DEFAULT_UPSTREAM_MODEL))
        try:
            for kind, path in (("text", text), ("tools", _first(fixtures, TOOL_STREAMS))):
                if path is not None:
                    subject.streams[kind] = (path, provider_events(path.read_bytes()))
        except ValueError as e:
            skipped[name] = f"{path}: {e}"
            continue
        for kind, path in (("text", _first(fixtures, TEXT_BODIES)), ("tools", _first(fixtures, TOOL_BODIES))):
            if path is not None:
                subject.bodies[kind] = path
        try:  # everything once, so an adapter under construction is skipped here, not halfway through timing
            for _, events in subject.streams.values():
                _transcode(adapter, subject.model, events)
            for path in subject.bodies.values():
                adapter.parse_response(path.read_bytes(), subject.model)
            adapter.request_body(orjson.dumps(TOOL_ROUND_TRIP), MODEL, subject.model, False)
        except Exception as e:
            skipped[name] = f"failed on its fixtures or a request: {type(e).__name__}: {e}"
            continue
        subjects.append(subject)
    return subjects, skipped


def _calibrated(timer: timeit.Timer, repeat_s: float) -> int:
    """Calls per repeat so that one repeat takes about repeat_s."""
    number = 1
    while True:
        t = timer.timeit(number)
        if t >= repeat_s / 4 or number >= 1_000_000:
            break
        number *= 4
    return max(1, round(number * repeat_s / t)) if t > 0 else number


def _time_all(cells: list[tuple[Callable[[], object], dict[str, Any]]], repeat_s: float, repeat: int) -> None:
    """Times every function, filling its cell with µs per call: the median over `repeat` repeats of N calls
    (N calibrated per function, so a repeat takes ~repeat_s), and the spread (interquartile range / median).
    Repeats are interleaved (repeat r of every function, then r + 1, in a rotating order), so a slow spell of a
    shared machine hits every figure alike instead of a few, and the figures stay comparable."""
    timers = [timeit.Timer(fn) for fn, _ in cells]
    numbers = [_calibrated(t, repeat_s) for t in timers]
    samples: list[list[float]] = [[] for _ in cells]
    for r in range(repeat):
        for k in range(len(cells)):
            i = (k + r) % len(cells)
            samples[i].append(timers[i].timeit(numbers[i]) / numbers[i])
    for (_, cell), number, per_call in zip(cells, numbers, samples, strict=True):
        per_call.sort()
        median = statistics.median(per_call)
        q1, q3 = per_call[len(per_call) // 4], per_call[(3 * len(per_call)) // 4]
        cell["us"] = round(1e6 * median, 3)
        cell["iqr_pct"] = round(100 * (q3 - q1) / median, 1) if median else None
        cell["number"] = number


# What differs from one transcoding of the same stream to the next: `created` timestamps, and ids the adapter
# generates when the provider sends none (chat completion ids, tool call ids); (pattern, stand-in) each.
_OPEN = {
    b'"created"': (rb'"created":\d+', b'"created":_'),
    b'"id":"chatcmpl-': (rb'"id":"chatcmpl-[^"]*"', b'"id":"chatcmpl-_"'),
    b'"id":"call_': (rb'"id":"call_[^"]*"', b'"id":"call__"'),
}
_OPEN_RE = re.compile(b"|".join(pattern for pattern, _ in _OPEN.values()))


def _open(match: re.Match[bytes]) -> tuple[bytes, bytes]:
    text = match.group(0)
    return next(v for k, v in _OPEN.items() if text.startswith(k))


def _normalized(stream: bytes) -> bytes:
    """A transcoded stream with what differs from call to call blanked."""
    return _OPEN_RE.sub(lambda m: _open(m)[1], stream)


def expected_pattern(stream: bytes) -> bytes:
    """A regular expression a relayed transcoded stream must match whole: these bytes, with timestamps and
    generated ids left open."""
    parts, pos = [], 0
    for m in _OPEN_RE.finditer(stream):
        parts += [re.escape(stream[pos : m.start()]), _open(m)[0]]
        pos = m.end()
    parts.append(re.escape(stream[pos:]))
    return b"".join(parts)


def _transcode(adapter: Adapter, model: str, pieces: list[bytes]) -> bytes:
    tx = adapter.new_transcoder(model)
    assert tx is not None
    return b"".join([tx.feed(p) for p in pieces]) + tx.finish()


def _micro(plan: CpuPlan, subjects: list[Subject], repeat_s: float, repeat: int) -> dict[str, Any]:
    """Every in-process figure, on the gateway's core (idle: no gateway runs yet)."""
    own = os.sched_getaffinity(0)
    if plan.proxy is not None:
        os.sched_setaffinity(0, plan.proxy)
    try:
        return _micro_pinned(subjects, repeat_s, repeat)
    finally:
        os.sched_setaffinity(0, own)


def _micro_pinned(subjects: list[Subject], repeat_s: float, repeat: int) -> dict[str, Any]:
    cells: list[tuple[Callable[[], object], dict[str, Any]]] = []

    def us(fn: Callable[[], object]) -> dict[str, Any]:
        """A cell for fn's timing, filled in once every function is known (see _time_all)."""
        cell: dict[str, Any] = {}
        cells.append((fn, cell))
        return cell

    streams: dict[str, dict[str, Any]] = {}
    for s in subjects:
        for kind, (path, events) in s.streams.items():
            raw = b"".join(events)
            adapter, model = s.adapter, s.model
            per_event = _transcode(adapter, model, events)
            whole = _transcode(adapter, model, [raw])
            entry: dict[str, Any] = {
                "adapter": s.name,
                "kind": kind,
                "fixture": str(path.relative_to(FIXTURES_ROOT)),
                "events": len(events),
                "bytes": len(raw),
                "out_bytes": len(whole),
                "out_events": whole.count(b"\n\n"),
                "same_output": _normalized(per_event) == _normalized(whole) and whole.endswith(DONE),
                "per_event": us(lambda a=adapter, m=model, ev=events: _transcode(a, m, ev)),
                "whole": us(lambda a=adapter, m=model, r=[raw]: _transcode(a, m, r)),
            }
            framing = _framing(path)
            if framing is not None:
                entry["framing"] = framing.__doc__
                entry["split_per_event"] = us(lambda f=framing, ev=events: f(ev))
                entry["split_whole"] = us(lambda f=framing, r=[raw]: f(r))
            streams[f"{s.name} {kind}"] = entry

    bodies: dict[str, dict[str, Any]] = {}
    chat = orjson.dumps(CHAT_WITH_TOOLS)
    round_trip = orjson.dumps(TOOL_ROUND_TRIP)
    openai = _adapter("openai")
    targets = [(s.name, s.adapter, s.model, s.bodies) for s in subjects]
    for name, adapter, model, files in [*targets, ("openai", openai, UPSTREAM_MODELS["openai"], {})]:
        row: dict[str, Any] = {}
        passthrough = name == "openai"
        for kind, path in files.items():
            body = path.read_bytes()
            row[f"parse_{kind}"] = us(lambda a=adapter, b=body, m=model: a.parse_response(b, m))
        if passthrough:  # identity: the body is relayed as it came
            body = (FIXTURES_ROOT / "openai" / "chat_ok.json").read_bytes()
            row["parse_text"] = us(lambda a=adapter, b=body, m=model: a.parse_response(b, m))
        renamed = UPSTREAM_MODELS["openai"] if passthrough else model
        # Same model name on both sides (the OpenAI adapter's zero-copy case), then renamed, as the gateway's
        # config maps its public model to the upstream's.
        row["request_same"] = us(lambda a=adapter, b=chat: a.request_body(b, MODEL, MODEL, False))
        row["request_renamed"] = us(lambda a=adapter, b=chat, m=renamed: a.request_body(b, MODEL, m, False))
        row["request_round_trip"] = us(lambda a=adapter, b=round_trip, m=renamed: a.request_body(b, MODEL, m, False))
        row["new_transcoder"] = us(lambda a=adapter, m=model: a.new_transcoder(m))
        signer = _signing(name)
        if signer is not None:
            target = signer.target("chat", model, True)
            signed = signer.request_body(chat, MODEL, model, False)  # what is signed: the body sent upstream
            row["sign"] = us(lambda a=signer, t=target, b=signed: a.sign(t, b))
        row["zero_copy"] = openai.request_body(chat, MODEL, MODEL, False) is chat if passthrough else None
        bodies[name] = row
    progress(f"  timing {len(cells)} functions, {repeat} interleaved repeats of ~{1000 * repeat_s:g} ms each")
    _time_all(cells, repeat_s, repeat)
    return {
        "streams": streams,
        "bodies": bodies,
        "request_bytes": {"chat_with_tools": len(chat), "tool_round_trip": len(round_trip)},
    }


def _split_sse(pieces: list[bytes]) -> None:
    """adapters.sse.SseSplitter"""
    sp = SseSplitter()
    for p in pieces:
        sp.feed(p)
    sp.flush()


def _split_eventstream(pieces: list[bytes]) -> None:
    """adapters.bedrock_aws.EventFrames"""
    from adapters.bedrock_aws import EventFrames

    frames = EventFrames()
    for p in pieces:
        frames.feed(p)


def _framing(path: Path) -> Callable[[list[bytes]], None] | None:
    """What every transcoder of this stream format runs first: the framing alone, as a baseline."""
    if path.suffix == ".sse":
        return _split_sse
    if path.suffix == ".eventstream":
        try:
            _split_eventstream([])
        except Exception:  # botocore missing: no baseline, the row shows —
            return None
        return _split_eventstream
    return None


def _stream_table(micro: dict[str, Any], repeat: int, repeat_s: float) -> str:
    streams = micro["streams"]
    if not streams:
        return "in process: no adapter with a transcoder and recorded streams"

    def per_ev(e: dict[str, Any], key: str) -> float | None:
        return e[key]["us"] / e["events"] if key in e else None

    def rate(e: dict[str, Any], key: str) -> str:
        return fmt(1e6 * e["events"] / e[key]["us"], ",.0f") if key in e else "—"

    out = [
        f"in process, on the gateway's core: transcoding recorded streams (timeit, median of {repeat} repeats × "
        f"~{1000 * repeat_s:g} ms);\na stream is new_transcoder(), every feed(), finish(); the OpenAI adapter has "
        "no transcoder: its streams are relayed as they come"
    ]
    for kind, what in (("text", "text answer"), ("tools", "tool calls")):
        entries = {e["adapter"]: e for e in streams.values() if e["kind"] == kind}
        if not entries:
            continue

        def row(label: str, get: Callable[[dict[str, Any]], str]) -> tuple[str, list[str]]:
            return label, [get(e) for e in entries.values()]  # noqa: B023 - used before the loop moves on

        rows = [
            row("fixture", lambda e: e["fixture"].split("/", 1)[1]),
            row("provider events / bytes", lambda e: f"{e['events']} / {e['bytes']:,}"),
            row("OpenAI events out ([DONE] too) / bytes", lambda e: f"{e['out_events']} / {e['out_bytes']:,}"),
            ("fed one event per feed()", []),
            row("  µs per event", lambda e: fmt(per_ev(e, "per_event"), ".2f")),
            row("  events/s", lambda e: rate(e, "per_event")),
            row("  µs per stream", lambda e: fmt(e["per_event"]["us"], ".1f")),
            ("fed whole, in one feed()", []),
            row("  µs per event", lambda e: fmt(per_ev(e, "whole"), ".2f")),
            row("  events/s", lambda e: rate(e, "whole")),
            row("  µs per stream", lambda e: fmt(e["whole"]["us"], ".1f")),
            ("baseline: the framing alone, µs per event", []),
            row("  one event per feed()", lambda e: fmt(per_ev(e, "split_per_event"), ".2f")),
            row("  whole, in one feed()", lambda e: fmt(per_ev(e, "split_whole"), ".2f")),
            row("transcoding beyond framing, µs per event", lambda e: fmt(_beyond_split(e), ".2f")),
            row("spread (IQR / median) %, worst figure", lambda e: fmt(_worst_iqr(e), ".0f")),
        ]
        out.append(f"\n{what} stream:\n" + table(list(entries), rows, label_width=42))
    out.append(
        "\nframing: SSE streams: adapters.sse.SseSplitter; Bedrock (AWS event stream): adapters.bedrock_aws."
        "EventFrames (botocore)"
    )
    return "\n".join(out)


def _beyond_split(e: dict[str, Any]) -> float | None:
    """µs per event the transcoder spends besides splitting, one event per feed()."""
    if "split_per_event" not in e:
        return None
    return (e["per_event"]["us"] - e["split_per_event"]["us"]) / e["events"]


def _worst_iqr(e: dict[str, Any]) -> float | None:
    spreads = [v["iqr_pct"] for v in e.values() if isinstance(v, dict) and v.get("iqr_pct") is not None]
    return max(spreads) if spreads else None


def _body_table(micro: dict[str, Any]) -> str:
    bodies = micro["bodies"]
    names = list(bodies)
    sizes = micro["request_bytes"]

    def cell(name: str, key: str) -> str:
        v = bodies[name].get(key)
        return "—" if v is None else fmt(v["us"], ".2f")

    def row(label: str, key: str) -> tuple[str, list[str]]:
        return label, [cell(n, key) for n in names]

    rows = [
        row("parse_response, text answer", "parse_text"),
        row("parse_response, tool call", "parse_tools"),
        row(f"request_body, chat + tools ({sizes['chat_with_tools']:,} B)", "request_same"),
        row("  same, model renamed", "request_renamed"),
        row(f"request_body, tool round trip ({sizes['tool_round_trip']:,} B)", "request_round_trip"),
        row("new_transcoder()", "new_transcoder"),
        row("sign() per request (SigV4), chat + tools", "sign"),
    ]
    heads = [f"{n} (passthrough)" if n == "openai" else n for n in names]
    zero_copy = bodies.get("openai", {}).get("zero_copy")
    title = (
        "in process, µs per call (median): non-streamed bodies and requests; openai: parse_response is the "
        "identity,\nrequest_body with the same model name is zero-copy"
        + ("" if zero_copy else " (NOT zero-copy in this run)")
        + ", a renamed model costs one rewrite; every other adapter rebuilds the request"
    )
    return title + "\n" + table(heads, rows, label_width=42)


# -- through a gateway ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    name: str  # == its wire format
    port: int
    upstream_port: int
    service: Service
    expect: list[str]  # the load generator's check of a relayed stream


def _gateway_rounds(
    tmp: Path,
    plan: CpuPlan,
    rounds: int,
    rate: float,
    duration: float,
    warmup: float,
    runs: dict[str, dict[str, list[dict[str, Any]]]],
) -> None:
    services: list[Service] = []
    try:
        gateways = _start(tmp, plan, services)
        for gw in gateways:  # pools, first-call paths; not recorded
            for test in ("closed-stream", "closed-nonstream", "open-stream"):
                run_load(_args(test, gw, rate, warmup), plan.load, timeout_s=warmup + 60)
        for r in range(rounds):
            order = gateways[r % len(gateways) :] + gateways[: r % len(gateways)]
            for test in TESTS:
                for gw in order:
                    with gateway_cpu(plan, gw.service) as cpu:
                        result = run_load(_args(test, gw, rate, duration), plan.load, timeout_s=duration + 60)
                    n = result["count"]
                    if test != "direct-stream":
                        cpu_s, user_s = cpu["gateway_cpu_s"] or 0.0, cpu["gateway_user_s"] or 0.0
                        result["gateway_cpu_us_per_request"] = round(1e6 * cpu_s / n, 1) if n else None
                        result["gateway_user_us_per_request"] = round(1e6 * user_s / n, 1) if n else None
                        result["other_load_on_proxy_cpu_pct"] = cpu["other_load_pct"]
                    runs[gw.name][test].append(result)
                    progress(f"round {r + 1}/{rounds} {test:<16} {gw.name:<9} {_brief(test, result)}")
    finally:
        for service in reversed(services):
            service.stop()


def _start(tmp: Path, plan: CpuPlan, services: list[Service]) -> list[Gateway]:
    gateways = []
    for name, wire in WIRES.items():
        up_port, gw_port = free_ports(2)
        upstream = start_upstream(f"upstream-{name}", up_port, ["--format", name], plan, tmp)
        services.append(upstream.service)
        config = gateway_config(
            gw_port, [(name, up_port)], adapter=name, base_path=wire.base_path, upstream_model=wire.upstream_model
        )
        service = start_gateway(f"gateway-{name}", gw_port, config, plan, tmp)
        services.append(service)
        raw = (FIXTURES_ROOT / name / "stream_ok.sse").read_bytes()
        if REGISTRY[name].passthrough:
            expect = ["--expect", str(FIXTURES_ROOT / name / "stream_ok.sse")]
        else:  # what the gateway must relay: the fixture as this adapter transcodes it, timestamps aside
            pattern = tmp / f"expected-{name}.re"
            pattern.write_bytes(expected_pattern(_transcode(_adapter(name), wire.upstream_model, [raw])))
            expect = ["--expect-regex", str(pattern)]
        gateways.append(Gateway(name, gw_port, up_port, service, expect))
    return gateways


def _args(test: str, gw: Gateway, rate: float, duration: float) -> list[str]:
    if test == "direct-stream":  # the fake alone, at its own path; it sends the fixture as is
        wire = WIRES[gw.name]
        url = f"http://127.0.0.1:{gw.upstream_port}{wire.stream_path}"
        expect = ["--expect", str(FIXTURES_ROOT / gw.name / "stream_ok.sse")]
        args = ["--url", url, "--model", MODEL, "--stream", *expect]
        return [*args, "--rate", f"{rate:g}", "--duration", f"{duration:g}"]
    args = ["--url", f"http://127.0.0.1:{gw.port}{CHAT_PATH}", "--model", MODEL, "--key", GATEWAY_KEY]
    args += ["--duration", f"{duration:g}"]
    if test.startswith("open-"):
        args += ["--mode", "open", "--rate", f"{rate:g}"]
    else:
        args += ["--mode", "closed", "--concurrency", str(CONCURRENCY)]
    if test.endswith("-stream"):
        args += ["--stream", *gw.expect]
    return args


def _brief(test: str, r: dict[str, Any]) -> str:
    if test.endswith("stream") and test.startswith(("direct", "open")):
        text = f"TTFB p50 {fmt(r['ttfb_p50'], '.3f')} p99 {fmt(r['ttfb_p99'], '.3f')} ms"
    else:
        text = f"{r['rps']:,.0f} req/s"
    if "gateway_cpu_us_per_request" in r:
        text += f", gateway CPU {fmt(r['gateway_cpu_us_per_request'], '.0f')} µs/req"
    if r.get("mismatches"):
        text += f", {r['mismatches']} bodies differ"
    if r["errors"]:
        text += f", {r['errors']} errors {r['error_kinds']}"
    return text


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 4) if present else None


def _diffs(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
    """a − b per round, for rounds where both have the figure."""
    return [x[key] - y[key] for x, y in zip(a, b, strict=True) if x[key] is not None and y[key] is not None]


def _summarize(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = runs["openai"]
    for name in GATEWAYS:
        rs = runs[name]
        added50 = _diffs(rs["open-stream"], rs["direct-stream"], "ttfb_p50")
        added99 = _diffs(rs["open-stream"], rs["direct-stream"], "ttfb_p99")
        s: dict[str, Any] = {
            "direct_ttfb_p50": _median([r["ttfb_p50"] for r in rs["direct-stream"]]),
            "direct_ttfb_p99": _median([r["ttfb_p99"] for r in rs["direct-stream"]]),
            "ttfb_p50": _median([r["ttfb_p50"] for r in rs["open-stream"]]),
            "ttfb_p99": _median([r["ttfb_p99"] for r in rs["open-stream"]]),
            "added_ttfb_p50": _median(added50),
            "added_ttfb_p50_range": f"{min(added50):.3f}–{max(added50):.3f}" if added50 else None,
            "added_ttfb_p99": _median(added99),
        }
        for test in ("closed-stream", "closed-nonstream"):
            s[test] = {
                "rps": _median([r["rps"] for r in rs[test]]),
                "cpu_us": _median([r["gateway_cpu_us_per_request"] for r in rs[test]]),
                "user_us": _median([r["gateway_user_us_per_request"] for r in rs[test]]),
            }
        if name != "openai":
            # Against the passthrough gateway, within each round (the gateways run back to back).
            a50 = [
                (gw["ttfb_p50"] - d["ttfb_p50"]) - (bgw["ttfb_p50"] - bd["ttfb_p50"])
                for gw, d, bgw, bd in zip(
                    rs["open-stream"], rs["direct-stream"], base["open-stream"], base["direct-stream"], strict=True
                )
                if None not in (gw["ttfb_p50"], d["ttfb_p50"], bgw["ttfb_p50"], bd["ttfb_p50"])
            ]
            cpu = "gateway_cpu_us_per_request"
            s["vs_openai"] = {
                "added_ttfb_p50_us": _median([1000 * v for v in a50]),
                "stream_rps_ratio": _ratio(
                    s["closed-stream"]["rps"], _median([r["rps"] for r in base["closed-stream"]])
                ),
                "nonstream_rps_ratio": _ratio(
                    s["closed-nonstream"]["rps"], _median([r["rps"] for r in base["closed-nonstream"]])
                ),
                "stream_cpu_us": _median(_diffs(rs["closed-stream"], base["closed-stream"], cpu)),
                "nonstream_cpu_us": _median(_diffs(rs["closed-nonstream"], base["closed-nonstream"], cpu)),
            }
        s["stream_bodies"] = {
            "checked": sum(r["ok"] for t in ("open-stream", "closed-stream") for r in rs[t]),
            "differing": sum(r.get("mismatches", 0) for t in ("open-stream", "closed-stream") for r in rs[t]),
        }
        s["direct_bodies_differing"] = sum(r.get("mismatches", 0) for r in rs["direct-stream"])
        s["errors"] = sum(r["errors"] for t in TESTS for r in rs[t])
        s["other_load_pct"] = _median([r.get("other_load_on_proxy_cpu_pct") for t in TESTS[1:] for r in rs[t]])
        out[name] = s
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _gateway_table(s: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return fmt(v, ".3f")

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> tuple[str, list[str]]:
        return label, [get(s[g]) for g in GATEWAYS]

    def vs(key: str, spec: str) -> Callable[[dict[str, Any]], str]:
        return lambda x: fmt(x["vs_openai"][key], spec) if "vs_openai" in x else "—"

    rows = [
        row("stream TTFB p50, direct to the fake (ms)", lambda x: ms(x["direct_ttfb_p50"])),
        row("stream TTFB p50, through the gateway (ms)", lambda x: ms(x["ttfb_p50"])),
        row("  added TTFB p50 (ms)", lambda x: ms(x["added_ttfb_p50"])),
        row("  added TTFB p50, range over rounds", lambda x: fmt(x["added_ttfb_p50_range"])),
        row("  added TTFB p99 (ms)", lambda x: ms(x["added_ttfb_p99"])),
        row("  added TTFB p50 − openai's (µs)", vs("added_ttfb_p50_us", "+.0f")),
        row(f"closed-loop streamed req/s (c={CONCURRENCY})", lambda x: fmt(x["closed-stream"]["rps"], ",.0f")),
        row("  / openai's", vs("stream_rps_ratio", ".2f")),
        row("  gateway CPU µs per request", lambda x: fmt(x["closed-stream"]["cpu_us"], ".0f")),
        row("  − openai's", vs("stream_cpu_us", "+.0f")),
        row(f"closed-loop non-streamed req/s (c={CONCURRENCY})", lambda x: fmt(x["closed-nonstream"]["rps"], ",.0f")),
        row("  / openai's", vs("nonstream_rps_ratio", ".2f")),
        row("  gateway CPU µs per request", lambda x: fmt(x["closed-nonstream"]["cpu_us"], ".0f")),
        row("  − openai's", vs("nonstream_cpu_us", "+.0f")),
        row("stream bodies differing / checked", lambda x: "{differing} / {checked:,}".format(**x["stream_bodies"])),
        row("failed requests", lambda x: fmt(x["errors"])),
        row("other load on gateway's CPU %", lambda x: fmt(x["other_load_pct"], ".0f")),
    ]
    title = (
        "through a gateway: one provider each, on a zero-delay fake of its format; openai = passthrough baseline\n"
        "(added = gateway − direct within a round; − openai's: within a round too; medians over rounds)"
    )
    return title + "\n" + table(list(GATEWAYS), rows, label_width=46)


def _checks(
    micro: dict[str, Any], summary: dict[str, Any] | None, runs: dict[str, dict[str, list[dict[str, Any]]]] | None
) -> list[dict[str, Any]]:
    streams = micro["streams"]
    checks = [
        check(
            "in process: one event per feed() and the whole stream in one give the same output, ending in [DONE]",
            "correctness",
            all(e["same_output"] for e in streams.values()) if streams else None,
            ", ".join(f"{n}: {'same' if e['same_output'] else 'DIFFERENT'}" for n, e in streams.items()) or "none",
        ),
        check(
            "in process: the OpenAI adapter's request_body is zero-copy for an unchanged model",
            "correctness",
            bool(micro["bodies"]["openai"]["zero_copy"]),
            "the same bytes object" if micro["bodies"]["openai"]["zero_copy"] else "a copy",
        ),
    ]
    if summary is None or runs is None:
        checks.append(check("gateway runs completed", "correctness", False, "see the error above"))
        return checks
    checks.append(
        check(
            "no failed requests",
            "correctness",
            not any(summary[g]["errors"] for g in GATEWAYS),
            ", ".join(f"{g}: {summary[g]['errors']}" for g in GATEWAYS),
        )
    )
    checks.append(
        check(
            "every relayed stream as expected (openai: byte-identical; others: the in-process transcoding)",
            "correctness",
            all(
                summary[g]["stream_bodies"]["differing"] == 0
                and summary[g]["stream_bodies"]["checked"] > 0
                and summary[g]["direct_bodies_differing"] == 0
                for g in GATEWAYS
            ),
            ", ".join(
                f"{g}: {summary[g]['stream_bodies']['differing']}/{summary[g]['stream_bodies']['checked']} differ"
                for g in GATEWAYS
            ),
        )
    )
    return checks
