"""The request object the lean engine hands to the gateway's handlers.

The handlers were written against aiohttp's `web.Request`; rather than fork them, this object offers the
few attributes they use — `method`, `path`, `headers` (a `CIMultiDictProxy`), `content_length`, `read()`,
`content.is_eof()` and `protocol.no_linger()` — filled in by the connection as llhttp parses the request.
The body is buffered by the connection up to the gateway's limit; `read()` waits only if it is still arriving.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from multidict import CIMultiDictProxy

from proxy.errors import GatewayError, PayloadTooLarge

if TYPE_CHECKING:
    from proxy.lean_server.protocol import Connection
    from proxy.lean_server.response import LeanStream


class LeanRequest:
    """One request: its head at once, its body as it arrives (see `Connection.on_body`)."""

    __slots__ = (
        "_body",
        "_conn",
        "_error",
        "_waiter",
        "body_done",
        "content_length",
        "continued",
        "dropping",
        "expect",
        "headers",
        "http10",
        "keep_alive",
        "match_info",
        "method",
        "path",
        "query_string",
        "size",
        "stream",
    )

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._body: list[bytes] = []
        self._error: GatewayError | None = None  # why the body cannot be read (too large, malformed)
        self._waiter: asyncio.Future[None] | None = None
        self.body_done = False  # the whole body arrived (or there was none)
        self.size = 0  # body bytes buffered so far
        self.dropping = False  # body bytes are read and dropped: over the limit, or the answer went out
        self.method = ""
        self.path = ""
        self.query_string = ""
        self.match_info: dict[str, str] = {}  # the trailing `{id}` of a parameterised route
        self.headers: CIMultiDictProxy[str]
        self.content_length: int | None = None
        self.http10 = False
        self.keep_alive = True  # the client allows another request on this connection after this one
        self.expect = False  # `Expect: 100-continue`: the client waits for a 100 before sending the body
        self.continued = False  # …and we sent it
        self.stream: LeanStream | None = None  # set once a streamed response was started

    # -- what handlers use (aiohttp-compatible names) --

    @property
    def content(self) -> LeanRequest:
        """`request.content.is_eof()`, as on aiohttp's request; the body stream is the request itself."""
        return self

    @property
    def protocol(self) -> Connection:
        return self._conn

    def is_eof(self) -> bool:
        return self.body_done or self._error is not None

    async def read(self) -> bytes:
        """The whole body; raises the `GatewayError` that stopped it (413, malformed chunking) instead."""
        if not self.body_done and self._error is None:
            if self.expect and not self.continued:
                self._conn.send_continue(self)
            self._waiter = waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self._error is not None:
            raise self._error
        body = self._body
        return body[0] if len(body) == 1 else b"".join(body)

    # -- fed by the connection --

    def set_target(self, url: bytes) -> None:
        """Path (percent-decoded, as aiohttp's `request.path`) and query string from the request target."""
        if url[:1] != b"/":  # absolute-form ("http://host/path") or asterisk-form
            url = (urlsplit(url.decode("latin-1")).path or "/").encode("latin-1")
        path, _, query = url.partition(b"?")
        text = path.decode("latin-1")
        self.path = unquote(text) if "%" in text else text
        self.query_string = query.decode("latin-1")

    def feed(self, data: bytes, limit: int) -> bool:
        """Buffer a piece of the body; False once the body went over `limit` (it is dropped from then on)."""
        self.size += len(data)
        if self.size > limit:
            self.refuse(limit)
            return False
        self._body.append(data)
        return True

    def refuse(self, limit: int) -> None:
        """The body is over `limit`: `read()` raises 413, and what arrives of it is dropped."""
        self._body.clear()
        self.dropping = True
        self.fail(PayloadTooLarge(f"request body exceeds the limit of {limit} bytes"))

    def complete(self) -> None:
        self.body_done = True
        self._wake()

    def fail(self, error: GatewayError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
