"""How tests/fixtures/bedrock/*.eventstream are made: the documented ConverseStream event shapes, encoded as
AWS event-stream frames (the inverse of botocore's EventStreamBuffer).

Each frame: total length and headers length (big-endian uint32 each), a CRC32 of those 8 bytes, the headers
(name length, name, type 7 = string, value length, value), the JSON payload, and a CRC32 of everything
before it. Bedrock's events carry `:event-type`, `:content-type` and `:message-type: event` headers and pad
their payloads with a `p` field of filler letters (so the length of an event does not reveal its text); the
recipes keep that padding. Regenerate with `python -m tests.bedrock_streams`; test_bedrock checks that the
stored files are exactly what these recipes encode to, and that botocore's own ConverseStream parser reads them.
"""

from __future__ import annotations

import struct
import sys
from binascii import crc32
from pathlib import Path
from typing import Any

import orjson

FIXTURES = Path(__file__).parent / "fixtures" / "bedrock"
_PAD = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    head = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        head += bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v
    prelude = struct.pack(">II", 12 + len(head) + len(payload) + 4, len(head))
    message = prelude + struct.pack(">I", crc32(prelude)) + head + payload
    return message + struct.pack(">I", crc32(message))


def event(event_type: str, payload: dict[str, Any], pad: int = 0) -> bytes:
    body = {**payload, "p": _PAD[: pad or 1 + len(event_type) % len(_PAD)]}
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    return frame(headers, orjson.dumps(body))


def exception(exception_type: str, message: str) -> bytes:
    """An exception frame, as ConverseStream sends one mid-stream (e.g. throttlingException)."""
    headers = {":exception-type": exception_type, ":content-type": "application/json", ":message-type": "exception"}
    return frame(headers, orjson.dumps({"message": message}))


def frames_of(data: bytes) -> list[bytes]:
    """A stream cut into its frames, each as the upstream writes it (each starts with its total length)."""
    out, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        out.append(data[i : i + n])
        i += n
    return out


def _text(index: int, *pieces: str) -> list[bytes]:
    return [event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": p}}) for p in pieces]


def _tool(index: int, tool_id: str, name: str, *pieces: str) -> list[bytes]:
    start = {"contentBlockIndex": index, "start": {"toolUse": {"toolUseId": tool_id, "name": name}}}
    deltas = [{"contentBlockIndex": index, "delta": {"toolUse": {"input": p}}} for p in pieces]
    return [
        event("contentBlockStart", start),
        *(event("contentBlockDelta", d) for d in deltas),
        event("contentBlockStop", {"contentBlockIndex": index}),
    ]


def _end(stop: str, usage: dict[str, int], latency_ms: int) -> list[bytes]:
    return [
        event("messageStop", {"stopReason": stop}),
        event("metadata", {"usage": usage, "metrics": {"latencyMs": latency_ms}}, pad=40),
    ]


def _usage(inputs: int, output: int, read: int = 0, write: int = 0) -> dict[str, int]:
    total = inputs + output + read + write  # Bedrock's totalTokens counts cache reads and writes too
    usage = {"inputTokens": inputs, "outputTokens": output, "totalTokens": total}
    if read or write:
        usage |= {"cacheReadInputTokens": read, "cacheWriteInputTokens": write}
    return usage


START = event("messageStart", {"role": "assistant"})
STOP_0 = event("contentBlockStop", {"contentBlockIndex": 0})

# chat_ok.json streamed
STREAM_OK = [
    START,
    *_text(0, "Hello", "! How can I", " help you today?"),
    STOP_0,
    *_end("end_turn", _usage(12, 12, 2048, 256), 412),
]
# chat_tool_use.json streamed: text, then two tool calls whose input arrives in pieces
STREAM_TOOLS = [
    START,
    *_text(0, "I'll check the weather in Paris", " and the time in London."),
    STOP_0,
    *_tool(
        1, "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "get_weather", '{"location": "Par', 'is, France", "unit": "cel', 'sius"}'
    ),
    *_tool(2, "tooluse_3ZqHh1YbQzqkP0Ezv1fLbg", "get_time", "", '{"timezone": ', '"Europe/London"}'),
    *_end("tool_use", _usage(472, 89, 1800, 0), 1533),
]
# Claude with thinking on: reasoning text, its signature (dropped), then the answer
STREAM_THINKING = [
    START,
    *(
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": t}}})
        for t in ("1071 = 2·462 + 147; 462 = 3·147 + 21;", " 147 = 7·21.", " So the GCD is 21.")
    ),
    event(
        "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": "EqoBCkgIARABGAIiQ"}}}
    ),
    STOP_0,
    *_text(1, "The greatest common divisor of 1071 and 462", " is **21**."),
    event("contentBlockStop", {"contentBlockIndex": 1}),
    *_end("end_turn", _usage(45, 197), 2210),
]
STREAMS = {
    "stream_ok.eventstream": STREAM_OK,
    "stream_tools.eventstream": STREAM_TOOLS,
    "stream_thinking.eventstream": STREAM_THINKING,
}


def build(name: str) -> bytes:
    return b"".join(STREAMS[name])


def main() -> int:
    for name in STREAMS:
        (FIXTURES / name).write_bytes(build(name))
        print(f"wrote {FIXTURES / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
