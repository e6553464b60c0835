"""Incremental SSE framing: events out of a byte stream cut at arbitrary boundaries.

An event ends at a blank line. Providers use `\\n\\n`; the spec also allows `\\r\\n\\r\\n` (and bare `\\r`,
which no LLM provider sends, so it is not handled). A boundary can fall anywhere, even between the two
newlines, so the splitter keeps the unfinished tail and searches only the bytes it has not searched yet.
"""

from __future__ import annotations


class SseSplitter:
    __slots__ = ("_buf", "_scanned")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already searched for an event end (minus 3 for a split `\r\n\r\n`)

    def feed(self, data: bytes) -> list[bytes]:
        """Complete events (without their blank-line terminator) found so far."""
        buf = self._buf
        buf += data
        events: list[bytes] = []
        start = 0
        pos = max(self._scanned - 3, 0)
        while True:
            lf = buf.find(b"\n\n", pos)
            crlf = buf.find(b"\r\n\r\n", pos)
            if lf == -1 and crlf == -1:
                break
            if crlf != -1 and (lf == -1 or crlf < lf):
                end, after = crlf, crlf + 4
            else:
                end, after = lf, lf + 2
            events.append(bytes(buf[start:end]))
            start = pos = after
        if start:
            del buf[:start]
        self._scanned = len(buf)
        return events

    def flush(self) -> bytes:
        """What is left when the stream ends: an unterminated last event, or b""."""
        rest = bytes(self._buf).strip()
        self._buf.clear()
        self._scanned = 0
        return rest


def event_end(buf: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """The first event end at or after `start`: (where the event's bytes end, where the next event begins), or
    (-1, -1) when no blank line (`\n\n` or `\r\n\r\n`) follows yet."""
    lf = buf.find(b"\n\n", start)
    crlf = buf.find(b"\r\n\r\n", start)
    if crlf != -1 and (lf == -1 or crlf < lf):
        return crlf, crlf + 4
    if lf != -1:
        return lf, lf + 2
    return -1, -1


def last_event_end(buf: bytes | bytearray) -> int:
    """Where the bytes after the last complete event begin (0 when no event is complete)."""
    lf, crlf = buf.rfind(b"\n\n"), buf.rfind(b"\r\n\r\n")  # -1 when absent: -1 + 4 would be a false end at 3
    return max(lf + 2 if lf != -1 else 0, crlf + 4 if crlf != -1 else 0)


def data_of(event: bytes) -> bytes:
    """The `data:` payload of an event (multi-line data joined by `\\n`, as the spec says)."""
    parts = [line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(parts)


def field_of(event: bytes, name: bytes) -> bytes | None:
    """The value of another field of an event, e.g. `event:`; None when absent."""
    prefix = name + b":"
    for line in event.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None
