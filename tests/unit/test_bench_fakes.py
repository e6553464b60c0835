"""The benchmark fake upstream serves the very bytes of the test fixtures, for every wire format."""

from __future__ import annotations

import pytest

from benchmarks.fake_upstream import FORMATS, Routes
from tests.fakes import FIXTURES

STREAM_FIXTURE = {"bedrock": "stream_ok.eventstream"}


def _dechunk(chunks: list[bytes]) -> bytes:
    out = b""
    for c in chunks:
        size, _, rest = c.partition(b"\r\n")
        out += rest[: int(size, 16)]
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_upstream_serves_the_fixture_bytes(fmt):
    routes = Routes(fmt=fmt)
    stream = (FIXTURES / fmt / STREAM_FIXTURE.get(fmt, "stream_ok.sse")).read_bytes()
    assert _dechunk(routes.stream_chunks) == stream
    chat_ok = (FIXTURES / fmt / "chat_ok.json").read_bytes()
    assert any(resp.endswith(b"\r\n\r\n" + chat_ok) for resp in routes.fixed.values())
