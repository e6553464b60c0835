"""Send a client request upstream: try endpoints in order, fail over before any byte reached the client.

Failover happens only on errors that another endpoint may not share (connect errors, timeouts, 408/409/
429/5xx); an upstream's 4xx is the client's fault and is relayed at once. After the stream's first byte went
downstream there are no retries (stream.py ends the stream with an error event instead).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping

import orjson
from aiohttp import web

from proxy.errors import (
    BadRequest,
    GatewayError,
    UpstreamError,
    UpstreamStatus,
    UpstreamTimeout,
)
from proxy.router import Endpoint, RouteTable, attempt_order
from proxy.schema import _View
from proxy.stream import SSE_HEADERS, pipe
from proxy.upstream import UpstreamClient

GENERATION_HEADER = "X-Hedgerow-Generation-Id"
PROVIDER_HEADER = "X-Hedgerow-Provider"


class Forwarder:
    """Per-process forwarding state: the route table snapshot, the pooled client, limits."""

    __slots__ = ("client", "max_response_bytes", "rng", "table")

    def __init__(self, table: RouteTable, client: UpstreamClient, max_response_bytes: int) -> None:
        self.table = table
        self.client = client
        self.max_response_bytes = max_response_bytes
        self.rng = random.Random()

    async def forward(
        self, request: web.Request, kind: str, view: _View, body: bytes, gen_id: str
    ) -> web.StreamResponse:
        endpoints = attempt_order(self.table.candidates(view.model), self.rng)
        strip = view.has_gateway_fields()
        loop = asyncio.get_running_loop()
        last: UpstreamError | None = None
        for ep in endpoints:
            target = ep.adapter.target(kind)
            if target is None:
                continue
            up_body = ep.adapter.request_body(body, view.model, ep.model, strip)
            deadline = loop.time() + target.timeouts.total_s
            headers = {GENERATION_HEADER: gen_id, PROVIDER_HEADER: ep.provider}
            try:
                async with asyncio.timeout_at(deadline):
                    resp = await self.client.send(target, up_body)
                    if resp.status >= 300:
                        data = await resp.read(self.max_response_bytes)
                        failure = ep.adapter.classify(resp.status, data, resp.headers)
                        if failure is not None:
                            raise failure
                        return _relay(resp.status, data, resp.headers, headers)  # the client's fault
                    ctype = resp.headers.get("Content-Type", "application/json")
                    if view.stream and ctype.startswith("text/event-stream"):
                        data = None
                    else:
                        data = await resp.read(self.max_response_bytes)
            except UpstreamError as e:
                last = e
                continue
            except TimeoutError:
                last = UpstreamTimeout(
                    f"upstream {ep.provider} exceeded the total time of {target.timeouts.total_s:g}s"
                )
                continue
            headers["Content-Type"] = ctype
            if data is None:
                headers.update(SSE_HEADERS)
                return await pipe(request, resp, headers, deadline)
            return web.Response(body=data, status=resp.status, headers=headers)
        if last is None:
            raise BadRequest(f"model `{view.model}` does not support this endpoint", param="model")
        raise _final_error(last, endpoints[-1])


_RELAYED = ("Content-Type", "Retry-After")


def _relay(status: int, body: bytes, upstream: Mapping[str, str], headers: dict[str, str]) -> web.Response:
    for name in _RELAYED:
        value = upstream.get(name)
        if value is not None:
            headers[name] = value
    return web.Response(body=body, status=status, headers=headers)


class RelayedStatus(GatewayError):
    """The last upstream's own error, relayed with its status (429 keeps Retry-After), once failover ran out."""

    kind = "status"

    def __init__(self, err: UpstreamStatus) -> None:
        super().__init__(err.message, upstream=err.upstream)
        self._err = err

    def body(self) -> bytes:
        body = self._err.upstream_body
        try:
            if isinstance(orjson.loads(body).get("error"), dict):
                return body  # already OpenAI-shaped
        except (orjson.JSONDecodeError, AttributeError):
            pass
        return super().body()

    def headers(self) -> dict[str, str]:
        return {"Retry-After": self._err.upstream_headers.get("Retry-After", "1")}


def _final_error(last: UpstreamError, ep: Endpoint) -> GatewayError:
    """What the client gets when every endpoint failed: 429 relayed, 5xx as 502/504, the rest as raised."""
    if isinstance(last, UpstreamStatus):
        status = last.upstream_status
        if status in (408, 409, 429):
            relayed = RelayedStatus(last)
            relayed.status = status  # type: ignore[misc]
            relayed.openai_type = "rate_limit_error" if status == 429 else "upstream_error"  # type: ignore[misc]
            return relayed
        if status == 504:
            return UpstreamTimeout(f"upstream {last.upstream} timed out (504)", upstream=last.upstream)
        return UpstreamError(f"upstream {last.upstream} failed with status {status}", upstream=last.upstream)
    return last
