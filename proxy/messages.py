"""`POST /v1/messages`: Anthropic's Messages API in front of the gateway, so Anthropic SDK clients and coding
agents can point their base URL here and reach every model the gateway routes.

A request is planned, cached, hedged and failed over exactly like a chat request (same route table, same
`provider` / `models` preferences); `MessagesFront` (the `Front` hook of proxy/attempt.py) decides per
endpoint what goes up and what comes back:
- an `anthropic` endpoint is native: the client's body goes up with only `model` rewritten (one top-level
  rewrite, proxy/schema.py), plus the client's `anthropic-beta` flags (beta body fields need them); its
  answer, JSON or SSE, success or error, comes back byte for byte;
- any other endpoint is reached through OpenAI chat (adapters/anthropic_front.py): the request translated once,
  then the endpoint's adapter as usual; the answer translated back into a `message` or Anthropic events.
The stream commit point reads Anthropic events either way, so an `error` event (or garbage) before the first
content fails over to the next endpoint, as on the chat route.

Errors on this route are Anthropic-shaped (`{"type": "error", "error": {type, message}}`) with the gateway's
status; a failure after the stream started ends it with an `event: error`. `anthropic-version` is accepted and
not checked: the gateway speaks the one version every Anthropic SDK sends (2023-06-01).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import ClassVar

from aiohttp import web

from adapters.anthropic_front import MessagesTranscoder, error_body, error_event, to_message, to_openai_request
from proxy.attempt import classify_messages_event
from proxy.errors import BadRequest, GatewayError, Unauthorized
from proxy.handlers import Gateway, error_response
from proxy.router import Endpoint
from proxy.schema import MessagesView, decode_view, rewrite

log = logging.getLogger("hedgerow")

NATIVE_ADAPTER = "anthropic"  # endpoints of this adapter take the client's Messages body as it is
BETA_HEADER = "anthropic-beta"


class MessagesFront:
    """The `Front` for one /v1/messages request; the OpenAI translation is made on first use, so a request
    only ever served by Anthropic endpoints is never translated (nor refused for what OpenAI lacks)."""

    kind: ClassVar[str] = "messages"
    tokens: ClassVar[re.Pattern[bytes]] = re.compile(rb'"output_tokens"\s*:\s*(\d+)')  # the last is final
    classify = staticmethod(classify_messages_event)
    response = staticmethod(to_message)
    error_body = staticmethod(error_body)
    transcoder = MessagesTranscoder

    __slots__ = ("_beta", "_body", "_model", "_openai")

    def __init__(self, body: bytes, model: str, beta: str | None) -> None:
        self._body = body
        self._model = model
        self._beta = beta
        self._openai: bytes | None = None

    def native(self, ep: Endpoint) -> bool:
        return ep.adapter.name == NATIVE_ADAPTER

    def request(self, ep: Endpoint, strip: bool) -> tuple[bytes, Mapping[str, str] | None]:
        if self.native(ep):
            return rewrite(self._body, ep.model, strip), self._beta_header(ep) if self._beta else None
        if self._openai is None:
            self._openai = to_openai_request(self._body)
        # The translation is a whitelist: no gateway field in it, so nothing to strip.
        return ep.adapter.request_body(self._openai, self._model, ep.model, False), None

    def sse_error(self, err: GatewayError) -> bytes:
        return error_event(err.status, err.body())

    def _beta_header(self, ep: Endpoint) -> dict[str, str]:
        """The client's beta flags, joined to any the provider's config sets (under the config's spelling, so
        the upstream gets one header, not two)."""
        flags = _flags(self._beta or "")
        target = ep.adapter.target("chat", ep.model, False)
        for name, value in (target.headers if target is not None else {}).items():
            if name.lower() == BETA_HEADER:
                own = _flags(value)
                return {name: ",".join(own + [f for f in flags if f not in own])}
        return {BETA_HEADER: ",".join(flags)}


def _flags(header: str) -> list[str]:
    return [f.strip() for f in header.split(",") if f.strip()]


def _secret(request: web.Request) -> str:
    """Anthropic clients send the key as `x-api-key`; `Authorization: Bearer` (an auth token) works too."""
    key = request.headers.get("x-api-key")
    if key is not None:
        return key
    scheme, _, secret = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and secret.strip():
        return secret
    raise Unauthorized("missing API key: send `x-api-key: <key>` or `Authorization: Bearer <key>`")


def messages_handler(gw: Gateway) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The route's handler. It renders its own errors (rather than the OpenAI-shaped middleware), so they are
    Anthropic-shaped on either server engine."""

    async def messages(request: web.Request) -> web.StreamResponse:
        try:
            key = gw.caller(gw.keys.check_secret(_secret(request)))
            body = await gw.read_body(request)
            view = decode_view("messages", body)
            assert isinstance(view, MessagesView)
            if not view.max_tokens or view.max_tokens < 1:
                raise BadRequest("`max_tokens` is required and must be a positive integer", param="max_tokens")
            front = MessagesFront(body, view.model, request.headers.get(BETA_HEADER))
            return await gw.serve(request, "chat", view, body, key, front)
        except GatewayError as e:
            return error_response(request, e, error_body(e.status, e.body()))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            err = GatewayError("internal error in the gateway")
            return error_response(request, err, error_body(err.status, err.body()))

    return messages
