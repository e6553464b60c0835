"""The SSE splitter gives the same events wherever the byte stream is cut."""

from __future__ import annotations

from adapters.sse import SseSplitter, data_of, field_of
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
