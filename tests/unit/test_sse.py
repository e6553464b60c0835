"""The SSE splitter gives the same events wherever the byte stream is cut."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from adapters.sse import SseSplitter, data_of, event_end, field_of, last_event_end
from tests.fakes import fixture

STREAM = fixture("stream_ok.sse")


def _split_all(pieces: list[bytes]) -> list[bytes]:
    s = SseSplitter()
    out = []
    for p in pieces:
        out.extend(s.feed(p))
    assert s.flush() == b""
    return out


def test_every_single_cut_point_gives_the_same_events():
    whole = _split_all([STREAM])
    assert len(whole) == 13 and whole[-1] == b"data: [DONE]"
    for i in range(len(STREAM) + 1):
        assert _split_all([STREAM[:i], STREAM[i:]]) == whole, i


def test_one_byte_at_a_time_and_crlf_framing():
    crlf = STREAM.replace(b"\n", b"\r\n")
    expected = [e.replace(b"\n", b"\r\n") for e in _split_all([STREAM])]
    assert _split_all([crlf[i : i + 1] for i in range(len(crlf))]) == expected


def test_unterminated_tail_is_flushed():
    s = SseSplitter()
    assert s.feed(b'event: ping\ndata: {}\n\ndata: {"a"') == [b"event: ping\ndata: {}"]
    assert s.flush() == b'data: {"a"'


def test_fields():
    ev = b'event: message_start\ndata: {"x":1}\ndata: {"y":2}'
    assert field_of(ev, b"event") == b"message_start"
    assert data_of(ev) == b'{"x":1}\n{"y":2}'
    assert field_of(ev, b"id") is None


# --- properties: any stream, cut anywhere ---
# The contract (adapters/sse.py): an event ends at the first `\n\n` or `\r\n\r\n`; `feed` returns the complete
# events without that terminator, whatever the cuts; `flush` the stripped rest. `event_end` finds the same ends one
# at a time, `last_event_end` where the bytes after the last of them begin.

TERMINATORS = (b"\n\n", b"\r\n\r\n")
FIELDS = (b"data:", b"data: ", b"event:", b"event: ", b"id:", b"id: ", b"retry:", b":", b": ")
# Payload bytes: anything but a line feed (a carriage return included: the splitter must not mistake `\r` alone
# for a line end); fragments that look like framing, so they turn up often.
payloads = st.lists(
    st.one_of(
        st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")),
        st.sampled_from([b"\r", b" ", b"data: ", b":", b'{"a":1}', b"[DONE]", "é".encode()]),
    ),
    max_size=4,
).map(b"".join)
eols = st.sampled_from([b"\n", b"\r\n"])


@st.composite
def streams(draw: st.DrawFn, payload: st.SearchStrategy[bytes] = payloads) -> tuple[bytes, list[bytes], bytes]:
    """(stream, its events, its unterminated tail): events of field lines framed by LF or CRLF (one kind per
    event, as senders do), some empty, then maybe an unfinished event cut inside its terminator."""
    field_lines = st.builds(bytes.__add__, st.sampled_from(FIELDS), payload)
    data, events = b"", []
    for _ in range(draw(st.integers(0, 6))):
        eol = draw(eols)
        event = eol.join(draw(st.lists(field_lines, max_size=4)))
        events.append(event)
        data += event + eol + eol
    tail = b""
    if draw(st.booleans()):
        eol = draw(eols)
        cut = draw(st.integers(0, 2 * len(eol) - 1))  # inside the terminator: still unfinished
        tail = eol.join(draw(st.lists(field_lines, min_size=1, max_size=3))) + (eol + eol)[:cut]
    return data + tail, events, tail


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _feed(pieces: list[bytes]) -> tuple[list[bytes], bytes]:
    s = SseSplitter()
    events = [e for p in pieces for e in s.feed(p)]
    return events, s.flush()


def _by_event_end(data: bytes) -> tuple[list[bytes], int]:
    """The events `event_end` finds from the start, and where the bytes after the last one begin."""
    events, start = [], 0
    while (bounds := event_end(data, start))[0] != -1:
        events.append(data[start : bounds[0]])
        start = bounds[1]
    return events, start


@given(stream=streams(), data=st.data())
def test_the_events_sent_come_out_whatever_the_cuts(stream, data):
    raw, sent, tail = stream
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12), label="cuts")
    events, rest = _feed(_pieces(raw, cuts))
    assert events == sent
    assert rest == tail.strip()
    assert _by_event_end(raw) == (sent, len(raw) - len(tail))


# Raw bytes rich in the framing characters: every kind of near-terminator, mixed line ends, stray blank lines.
raw_streams = st.lists(st.sampled_from([b"\n", b"\r", b"\r\n", b"\n\n", b"a", b"data: x", b":", b" "]), max_size=40)


@given(parts=raw_streams, data=st.data())
def test_any_bytes_split_the_same_whatever_the_cuts_and_event_end_agrees(parts, data):
    raw = b"".join(parts)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20), label="cuts")
    whole, rest = _feed([raw])
    assert _feed(_pieces(raw, cuts)) == (whole, rest)
    assert _feed([raw[i : i + 1] for i in range(len(raw))]) == (whole, rest)
    events, end = _by_event_end(raw)
    assert events == whole
    assert raw[end:].strip() == rest
    # Nothing is lost: the events and their terminators, in order, are the bytes up to the last event's end.
    rebuilt, start = b"", 0
    for event in whole:
        term = raw[start + len(event) :][:4]
        term = b"\r\n\r\n" if term == b"\r\n\r\n" else b"\n\n"
        assert raw.startswith(event + term, start)
        rebuilt += event + term
        start += len(event) + len(term)
    assert rebuilt == raw[:end]


@given(stream=streams())
def test_last_event_end_is_where_the_sent_events_end(stream):
    raw, _, tail = stream
    assert last_event_end(raw) == len(raw) - len(tail)


@given(parts=raw_streams)
def test_last_event_end_is_after_a_terminator_and_the_rest_is_what_the_splitter_keeps(parts):
    raw = b"".join(parts)
    k = last_event_end(raw)
    assert k == 0 or raw[:k].endswith(TERMINATORS)
    assert not any(t in raw[k:] for t in TERMINATORS)
    assert raw[k:].strip() == _feed([raw])[1]  # the tail buffer a relay keeps holds what the splitter would flush


@given(stream=streams(st.binary(max_size=16).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))))
def test_data_and_fields_of_any_event(stream):
    _, events, _ = stream
    for event in events:
        lines = event.splitlines()
        datas = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        assert data_of(event) == b"\n".join(datas)
        for name in (b"event", b"id", b"retry"):
            values = [line[len(name) + 1 :].strip() for line in lines if line.startswith(name + b":")]
            assert field_of(event, name) == (values[0] if values else None)
