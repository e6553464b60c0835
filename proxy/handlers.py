"""Thin HTTP handlers: authenticate, read and parse only what routing needs, forward.

Errors are raised as `GatewayError`s and rendered in one place (`error_middleware`), so no handler chooses a
status or an error shape, and nothing — not even an unexpected exception — reaches a client as a traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from proxy.accounting.accountant import Accountant
from proxy.accounting.catalog import model_entry
from proxy.accounting.keys import KeyRing
from proxy.attempt import Front
from proxy.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
)
from proxy.forward import GENERATION_HEADER, Forwarder
from proxy.schema import _View, decode_view
from proxy.store.base import KeyRecord

if TYPE_CHECKING:
    from proxy.reload import Runtime

log = logging.getLogger("hedgerow")
TRACING = False  # set by proxy/insights/tracing.py: requests keep the client's `traceparent` for their span


class Gateway:
    """Everything a handler needs, built once per worker (see app.py)."""

    __slots__ = (
        "_ids",
        "accountant",
        "body_timeout_s",
        "draining",
        "forwarder",
        "keys",
        "max_body_bytes",
        "models_body",
        "runtime",
    )

    def __init__(self, keys: KeyRing, accountant: Accountant, max_body_bytes: int, body_timeout_s: float) -> None:
        self.keys = keys
        self.accountant = accountant
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.draining = False
        # Generation ids: a random per-process prefix and a counter; unique without a syscall per request.
        self._ids = map(f"gen-{os.urandom(6).hex()}-{{:x}}".format, itertools.count(1))
        self.forwarder: Forwarder
        self.models_body = b""
        self.runtime: Runtime | None = None  # proxy/reload.py: set by the lifecycle, rebuilt on SIGHUP

    def attach(self, forwarder: Forwarder) -> None:
        """Set at startup, once the upstream client and the route table exist. The model list is OpenAI's
        (`id`, `object`, `created`, `owned_by`) and OpenRouter's (`name`, `context_length`, `pricing` of the
        first endpoint in USD per token, `top_provider`, `supported_parameters`), built once."""
        self.forwarder = forwarder
        table = forwarder.table
        data = [model_entry(table.models[m]) for m in table.public]
        self.models_body = orjson.dumps({"object": "list", "data": data})

    async def read_body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {self.max_body_bytes}")
        try:
            if request.content.is_eof():  # the whole body came with the head: no wait, no timer
                return await request.read()
            async with asyncio.timeout(self.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"request body exceeds the limit of {self.max_body_bytes} bytes") from None
        except TimeoutError:
            raise RequestTimeout(f"request body not received within {self.body_timeout_s:g}s") from None

    def caller(self, key: KeyRecord) -> KeyRecord:
        """A key that may call models (provisioning keys may not: they hold no credit of their own)."""
        if self.keys.is_admin(key):
            raise Forbidden("a provisioning key manages keys and credits; it cannot call models")
        return key

    async def _proxy(self, request: web.Request, kind: str) -> web.StreamResponse:
        key = self.caller(self.keys.check(request.headers.get("Authorization")))
        body = await self.read_body(request)
        return await self.serve(request, kind, decode_view(kind, body), body, key)

    async def serve(
        self, request: web.Request, kind: str, view: _View, body: bytes, key: KeyRecord, front: Front | None = None
    ) -> web.StreamResponse:
        """Forward one request, accounted: rate limits first, then the forwarder (which reserves credit once it
        knows the candidate endpoints); the generation is recorded however the request ends."""
        acct = self.accountant
        usage = view.usage
        gen = acct.begin(next(self._ids), key, view.model, view.stream, usage is not None and usage.include)
        if TRACING:
            gen.traceparent, gen.operation = request.headers.get("traceparent"), kind
        try:
            acct.allowed(gen)
            if acct.limited(gen):
                await acct.admit(gen)
            return await self.forwarder.forward(request, kind, view, body, gen, front)
        except GatewayError as e:
            gen.status = e.status
            e.generation = gen.id  # the error answer names the generation too (and so its request id)
            raise
        except RecursionError:
            # A body nested just under what decode_view() could follow, read again deeper in the stack (the
            # adapter's rewrite, prompt affinity): the same refusal as decode_view's, not an internal error.
            err = BadRequest("request body is nested too deeply")
            gen.status, err.generation = err.status, gen.id
            raise err from None
        except BaseException:  # the client left (cancelled, or its connection reset mid-stream)
            gen.cancelled = True
            gen.status = gen.status or 499
            raise
        finally:
            # One loop step later: a whole answer is written in this step (transport.write, before the task
            # yields), and its bookkeeping (ledger record, credit commit, the observers' batch) need not delay it.
            asyncio.get_running_loop().call_soon(acct.finish, gen)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "completions")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "embeddings")

    async def models(self, request: web.Request) -> web.Response:
        self.keys.check(request.headers.get("Authorization"))
        return web.Response(body=self.models_body, content_type="application/json")

    async def providers(self, request: web.Request) -> web.Response:
        """Each endpoint's state and live stats, in the spirit of OpenRouter's endpoint stats."""
        self.keys.check(request.headers.get("Authorization"))
        data = self.forwarder.monitor.snapshot()
        return web.Response(body=orjson.dumps({"data": data}), content_type="application/json")

    async def livez(self, request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            raise Unavailable("draining: this node is shutting down")
        acct = self.accountant
        if acct.cfg.fail_closed and not acct.store_ok:  # it would refuse metered keys: send traffic elsewhere
            raise Unavailable("the accounting store is unreachable and `fail-closed` is set")
        return web.Response(body=b'{"status":"ready"}', content_type="application/json")


def render(err: GatewayError, body: bytes | None = None) -> web.Response:
    """`body`: the error in another API's shape (proxy/messages.py); by default OpenAI's."""
    resp = web.Response(status=err.status, body=err.body() if body is None else body, content_type="application/json")
    for name, value in err.headers().items():
        resp.headers[name] = value
    if err.generation is not None:
        resp.headers[GENERATION_HEADER] = err.generation
    if isinstance(err, PayloadTooLarge | RequestTimeout):
        resp.force_close()  # the rest of the body may still be in flight; don't read it
    return resp


def error_response(request: web.Request, err: GatewayError, body: bytes | None = None) -> web.Response:
    """A handler's `GatewayError` as its response (both server engines use this); `body` as in render()."""
    if isinstance(err, RequestTimeout):  # a 413 lingers: a client still writing must get to read it
        no_linger = getattr(request.protocol, "no_linger", None)  # the production connection handlers
        if no_linger is not None:
            no_linger()
    return render(err, body)


def unexpected_error(request: web.Request) -> web.Response:
    """Called in an `except` block: log the traceback, answer a bare 500 (no traceback leaks)."""
    log.exception("unexpected error serving %s %s", request.method, request.path)
    return render(GatewayError("internal error in the gateway"))


@web.middleware
async def error_middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as e:
        return error_response(request, e)
    except web.HTTPException as e:  # aiohttp's own: unknown route, wrong method, body too large
        if e.status == 404:
            return render(NotFound(f"no route for {request.method} {request.path}"))
        if e.status == 405:
            allow = e.allowed_methods if isinstance(e, web.HTTPMethodNotAllowed) else ()
            return render(MethodNotAllowed(f"method {request.method} not allowed on {request.path}", allow))
        if e.status == 413:
            return render(PayloadTooLarge("request body too large"))
        return render(_http_error(e))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        return unexpected_error(request)


def _http_error(e: web.HTTPException) -> GatewayError:
    err = GatewayError(e.reason)
    err.status = e.status  # type: ignore[misc]
    return err
