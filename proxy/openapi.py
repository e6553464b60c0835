"""`GET /openapi.json`: the gateway's API as an OpenAPI 3.1 document, served without a key.

`SPEC` describes every route proxy/app.py can mount; `openapi_handler(table)` serves the part of it that this
gateway mounts (the admin API only with accounting on, `/metrics` only with metrics on), encoded once, on the
first request. What a request body declares is what the gateway itself checks and refuses with a 400: every other
field of an OpenAI or Anthropic body goes to the provider as sent (`additionalProperties`). Every status an
operation can answer is listed, with its error body (OpenAI's shape; Anthropic's on /v1/messages) and headers
(`Retry-After` on 429 and 503, `Allow` on 405); every response carries `X-Request-Id`.

Besides the operations' own statuses, any request can meet the HTTP layer's: 400 (malformed HTTP), 408 (the head
or body too slow), 431 (the head too large); they are listed on every operation. An unknown path is a 404 and an
unrouted method a 405 (`#/components/responses/NotFound`, `MethodNotAllowed`).

tests/functional/test_openapi.py checks a running gateway against this document with Schemathesis, and that it
names exactly the routes of `routes()`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson
from aiohttp import web

from proxy import __version__

Json = dict[str, Any]
JSON = "application/json"
SSE = "text/event-stream"


def _schema(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _header(name: str) -> Json:
    return {"$ref": f"#/components/headers/{name}"}


def _response(name: str) -> Json:
    return {"$ref": f"#/components/responses/{name}"}


def _nullable(schema: Json) -> Json:
    return {"anyOf": [schema, {"type": "null"}]}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_TOKEN_BOUNDS: Json = {"minimum": 0, "maximum": 2**31 - 1}  # proxy/schema.py refuses more: no 500 on a 400-digit cap
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}
_TIME = {"type": ["string", "null"], "description": "ISO 8601, UTC"}

# -- errors --

# status → (component name, when, headers it always carries). The gateway chooses these in proxy/errors.py.
_ERRORS: dict[int, tuple[str, str, tuple[str, ...]]] = {
    400: (
        "BadRequest",
        "The request is invalid: not JSON, a field the gateway reads is missing or of the wrong "
        "type, an unknown query value, or malformed HTTP.",
        (),
    ),
    401: ("Unauthorized", "The key is missing, unknown, disabled or expired.", ()),
    402: (
        "PaymentRequired",
        "The key's limit or its organisation's credit cannot cover the request's worst-case "
        "cost (`insufficient_quota`).",
        (),
    ),
    403: (
        "Forbidden",
        "A valid key without the right: a provisioning key calling a model, a model the key may not "
        "use, a non-admin key on an admin route.",
        (),
    ),
    404: (
        "NotFound",
        "No such model (`model_not_found`), record or route; or no endpoint of the model matches the request's "
        "`provider` preferences.",
        (),
    ),
    405: ("MethodNotAllowed", "The path exists; the method does not. `Allow` lists the ones that do.", ("Allow",)),
    408: (
        "RequestTimeout",
        "The request head or body did not arrive in time (`header-timeout-s`, `body-timeout-s`).",
        (),
    ),
    409: ("Conflict", "The record already exists.", ()),
    413: ("PayloadTooLarge", "The body is larger than `server.max-body-bytes`.", ()),
    429: (
        "RateLimited",
        "The key's `rpm`/`tpm` (with `X-RateLimit-*`), or every endpoint of the model was "
        "rate-limited (the provider's answer, with its `Retry-After`).",
        ("Retry-After",),
    ),
    431: ("HeadersTooLarge", "The request head is larger than the server's limit.", ()),
    502: (
        "BadGateway",
        "The provider failed: a 5xx, a connection failure or a broken response (a model with one endpoint).",
        (),
    ),
    503: (
        "Unavailable",
        "Every endpoint of the model failed, the accounting store is unreachable, or the node is draining.",
        ("Retry-After",),
    ),
    504: ("GatewayTimeout", "The provider timed out (connect, first byte, idle or total).", ()),
}
_PROTOCOL = (400, 408, 431)  # any request, any route: the HTTP layer's own answers
_PROXY = (400, 401, 402, 403, 404, 408, 413, 429, 431, 502, 503, 504)  # the routes that call a model


def _error_responses() -> Json:
    out: Json = {}
    for status, (name, when, always) in _ERRORS.items():
        for prefix, schema in (("", _schema("Error")), ("Messages", _schema("MessagesError"))):
            headers: Json = {"X-Request-Id": _header("RequestId")}
            for h in always:
                headers[h] = _header(h.replace("-", ""))
            if status == 429:
                headers.update(_RATE_HEADERS)
            if status in (400, 401, 402, 403, 404, 408, 409, 413, 429, 502, 503, 504):
                headers["X-Hedgerow-Generation-Id"] = _header("GenerationIdOptional")
            out[prefix + name] = {
                "description": f"{status}. {when}",
                "headers": headers,
                "content": {JSON: {"schema": schema}},
            }
    return out


def _errors(statuses: Iterable[int], *, messages: bool = False) -> Json:
    prefix = "Messages" if messages else ""
    return {str(s): _response(prefix + _ERRORS[s][0]) for s in sorted({*statuses, *_PROTOCOL})}


_RATE_HEADERS = {
    name: {"description": "The key's rate limit (keys with `rpm` or `tpm`).", "schema": _STR}
    for name in (
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
        "X-RateLimit-Limit-Tokens",
        "X-RateLimit-Remaining-Tokens",
    )
}

# -- responses --


def _ok(description: str, schema: Json, *, media: str = JSON, headers: Json | None = None) -> Json:
    return {
        "description": description,
        "headers": {"X-Request-Id": _header("RequestId"), **(headers or {})},
        "content": {media: {"schema": schema}},
    }


_ROUTED = {  # what a response served by a model's endpoint tells about how it was served
    "X-Hedgerow-Generation-Id": _header("GenerationId"),
    "X-Hedgerow-Provider": {"description": "The provider that served.", "schema": _STR},
    "X-Hedgerow-Endpoint": {"description": "The endpoint (provider/model) that served.", "schema": _STR},
    "X-Hedgerow-Attempts": {"description": "Upstream attempts made (failover, hedging).", "schema": _STR},
    "X-Hedgerow-Hedged": {"description": "`won` or `lost`, when a hedge raced.", "schema": _STR},
    "X-Hedgerow-Cache": {"description": "`hit`, `miss` or `bypass` (models with the cache on).", "schema": _STR},
    "X-Hedgerow-Upstream-TTFB-Ms": {"description": "The serving attempt's time to first byte.", "schema": _STR},
    "Server-Timing": {"description": "`gateway;dur=…, upstream;dur=…` (ms).", "schema": _STR},
    **_RATE_HEADERS,
}


def _proxied(description: str, schema: Json, *, stream: bool = True) -> Json:
    ok = _ok(description, schema, headers=_ROUTED)
    if stream:
        ok["content"][SSE] = {  # OpenAPI 3.1: `schema` describes each event (OpenAI chunks, or Anthropic's events)
            "schema": {
                "type": "object",
                "description": "One server-sent event, relayed as the provider sent it (or transcoded); a "
                "failure after the stream began ends it with an error event.",
                "required": ["data"],
                "properties": {"data": _STR, "event": _STR, "id": _STR},
            }
        }
    return ok


_RELAYED_4XX = {
    "description": "A provider's own client-error answer (the request's fault), relayed as received.",
    "headers": {"X-Request-Id": _header("RequestId"), "X-Hedgerow-Generation-Id": _header("GenerationIdOptional")},
    "content": {JSON: {"schema": {}}},
}

# -- request bodies --

_ROUTING_FIELDS: Json = {  # OpenRouter's routing fields, read by the gateway and never sent upstream
    "provider": _schema("ProviderPreferences"),
    "models": {
        "type": "array",
        "items": _STR,
        "description": "Fallback models, tried in order when the first model's endpoints all fail.",
    },
    "usage": _nullable(
        {
            "type": "object",
            "properties": {"include": {**_BOOL, "description": "Put the cost in the final usage."}},
        }
    ),
    "route": {"description": "OpenRouter's routing hint; accepted and not sent upstream."},
    "transforms": {"description": "OpenRouter's transforms; accepted and not sent upstream."},
}


def _openai_body(required: str, field: Json, *, stream: bool = True) -> Json:
    props: Json = {
        "model": {**_STR, "minLength": 1, "description": "A public model name (GET /v1/models)."},
        required: field,
        **_ROUTING_FIELDS,
        "max_tokens": {
            "type": ["integer", "null"],
            **_TOKEN_BOUNDS,
            "description": "The completion's cap; with `max_completion_tokens`, it bounds the credit reserved.",
        },
        "max_completion_tokens": {"type": ["integer", "null"], **_TOKEN_BOUNDS},
    }
    if stream:
        props["stream"] = {**_BOOL, "description": "Answer with server-sent events."}
    return {
        "type": "object",
        "required": ["model", required],
        "properties": props,
        "additionalProperties": True,  # every other field goes to the provider as sent
    }


_TEXT_BLOCK = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": _STR},
}

_MESSAGES_BODY: Json = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        "model": {**_STR, "minLength": 1},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role", "content"],
                "properties": {
                    "role": {"enum": ["user", "assistant"]},
                    "content": {
                        "anyOf": [_STR, {"type": "array", "items": _TEXT_BLOCK}],
                        "description": "A string, or content blocks: text (here), and image, document, tool_use, "
                        "tool_result and thinking blocks as Anthropic defines them.",
                    },
                },
            },
        },
        "max_tokens": {**_INT, "minimum": 1, "maximum": _TOKEN_BOUNDS["maximum"]},
        "stream": _BOOL,
        "system": {"anyOf": [_STR, {"type": "array", "items": _TEXT_BLOCK}, {"type": "null"}]},
        **_ROUTING_FIELDS,
    },
    "additionalProperties": True,
}

# -- schemas --

_MODEL: Json = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by", "pricing"],
    "properties": {
        "id": _STR,
        "object": {"const": "model"},
        "created": _INT,
        "owned_by": _STR,
        "name": _STR,
        "context_length": {"type": ["integer", "null"]},
        "pricing": _schema("Pricing"),
        "top_provider": {"type": "object"},
        "supported_parameters": {"type": "array", "items": _STR},
    },
}

_QUANTILES = {
    "type": "object",
    "properties": {q: {"type": ["number", "null"]} for q in ("p50", "p90", "p99")},
}

_KEY: Json = {
    "type": "object",
    "required": ["id", "label", "org", "disabled", "limit", "usage", "created_at"],
    "properties": {
        "id": _STR,
        "label": _STR,
        "org": _STR,
        "disabled": _BOOL,
        "expires_at": _TIME,
        "allowed_models": {"type": ["array", "null"], "items": _STR},
        "limit": {"type": ["number", "null"]},
        "limit_reset": {"enum": ["daily", "weekly", "monthly", None]},
        "limit_remaining": {"type": ["number", "null"]},
        "usage": _NUM,
        "rpm": {"type": ["integer", "null"]},
        "tpm": {"type": ["integer", "null"]},
        "created_at": _TIME,
        "updated_at": _TIME,
    },
}

_KEY_SPEC: Json = {
    "type": "object",
    "description": "A key's fields. On PATCH, a field left out is kept and `null` clears it. `name` and `label` "
    "are one field (give either). `expires_at` must be in the future.",
    "properties": {
        "name": {**_STR, "minLength": 1, "maxLength": 200},
        "label": {**_STR, "minLength": 1, "maxLength": 200},
        "org": {**_STR, "description": "An existing organisation (default `org_default`)."},
        "limit": {"type": ["number", "null"], "minimum": 0, "description": "USD per period (or ever)."},
        "limit_reset": {"enum": ["daily", "weekly", "monthly", None]},
        "allowed_models": {"type": ["array", "null"], "minItems": 1, "items": {**_STR, "minLength": 1}},
        "rpm": {"type": ["integer", "null"], "minimum": 1},
        "tpm": {"type": ["integer", "null"], "minimum": 1},
        "expires_at": {"type": ["number", "string", "null"], "description": "Unix seconds or ISO 8601."},
        "disabled": _BOOL,
    },
    "additionalProperties": False,
}

_ORG: Json = {
    "type": "object",
    "required": ["id", "name", "balance", "spent", "created_at"],
    "properties": {
        "id": _STR,
        "name": _STR,
        "balance": {"type": ["number", "null"], "description": "USD left; null: unlimited."},
        "spent": _NUM,
        "created_at": _TIME,
    },
}

_GENERATION: Json = {
    "type": "object",
    "required": ["id", "total_cost", "model", "streamed", "cancelled", "attempts"],
    "properties": {
        "id": _STR,
        "total_cost": _NUM,
        "created_at": _TIME,
        "model": _STR,
        "streamed": _BOOL,
        "cancelled": _BOOL,
        "provider_name": {"type": ["string", "null"]},
        "latency": {"type": ["number", "null"], "description": "ms, arrival to last byte"},
        "generation_time": {"type": ["number", "null"]},
        "finish_reason": {"type": ["string", "null"]},
        "tokens_prompt": _INT,
        "tokens_completion": _INT,
        "usage": _NUM,
        "upstream_inference_cost": _NUM,
        "gateway_fee": _NUM,
        "attempts": {"type": "array", "items": {"type": "object"}},
    },
}

_SCHEMAS: Json = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message"],
                "properties": {
                    "message": _STR,
                    "type": _STR,
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "integer", "null"]},
                },
            }
        },
        "description": "OpenAI's error body. The gateway's own have `type`, `param` and `code` too; a provider's "
        "relayed error is passed on as it came, when it was already in this shape.",
    },
    "MessagesError": {
        "description": "Anthropic's error body (the route's own errors); errors of the HTTP layer are OpenAI's.",
        "anyOf": [
            {
                "type": "object",
                "required": ["type", "error"],
                "properties": {
                    "type": {"const": "error"},
                    "error": {
                        "type": "object",
                        "required": ["type", "message"],
                        "properties": {"type": _STR, "message": _STR},
                    },
                },
            },
            _schema("Error"),
        ],
    },
    "ProviderPreferences": {
        "type": "object",
        "description": "OpenRouter's provider routing preferences.",
        "properties": {
            "order": {"type": ["array", "null"], "items": _STR},
            "only": {"type": ["array", "null"], "items": _STR},
            "ignore": {"type": ["array", "null"], "items": _STR},
            "allow_fallbacks": _BOOL,
            "sort": {"enum": ["price", "latency", "throughput", None]},
            "max_price": _nullable(
                {
                    "type": "object",
                    "properties": {"prompt": {"type": ["number", "null"]}, "completion": {"type": ["number", "null"]}},
                }
            ),
            "require_parameters": _BOOL,
        },
    },
    "ChatCompletionRequest": _openai_body(
        "messages",
        {
            "type": "array",
            "minItems": 1,
            "description": "OpenAI chat messages, passed to the provider as sent.",
        },
    ),
    "CompletionRequest": _openai_body("prompt", {"description": "The prompt (a string, or a list of them)."}),
    "EmbeddingRequest": _openai_body(
        "input", {"description": "The text (or texts, or token arrays) to embed."}, stream=False
    ),
    "MessagesRequest": _MESSAGES_BODY,
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "choices"],
        "properties": {
            "id": _STR,
            "object": _STR,
            "created": _INT,
            "model": _STR,
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": ["object", "null"]},
        },
    },
    "Completion": {
        "type": "object",
        "required": ["id", "object", "choices"],
        "properties": {
            "id": _STR,
            "object": _STR,
            "model": _STR,
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": ["object", "null"]},
        },
    },
    "Embeddings": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["embedding"],
                    "properties": {
                        "object": _STR,
                        "index": _INT,
                        "embedding": {"anyOf": [{"type": "array", "items": _NUM}, _STR]},
                    },
                },
            },
            "model": _STR,
            "usage": {"type": ["object", "null"]},
        },
    },
    "Message": {
        "type": "object",
        "required": ["id", "type", "role", "content"],
        "properties": {
            "id": _STR,
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "content": {"type": "array", "items": {"type": "object"}},
            "model": _STR,
            "stop_reason": {"type": ["string", "null"]},
            "usage": {"type": "object"},
        },
    },
    "Pricing": {
        "type": "object",
        "description": "USD per token (`request`: per request), as decimal strings.",
        "properties": {
            k: _STR
            for k in ("prompt", "completion", "request", "input_cache_read", "input_cache_write", "internal_reasoning")
        },
    },
    "Model": _MODEL,
    "ModelList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _schema("Model")}},
    },
    "ModelStatsList": {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "allOf": [
                        _schema("Model"),
                        {
                            "type": "object",
                            "required": ["endpoints"],
                            "properties": {"endpoints": {"type": "array", "items": _schema("EndpointStats")}},
                        },
                    ]
                },
            },
        },
    },
    "EndpointStats": {
        "type": "object",
        "required": ["provider", "endpoint", "pricing", "status"],
        "properties": {
            "provider": _STR,
            "endpoint": _STR,
            "pricing": _schema("Pricing"),
            "context_length": {"type": ["integer", "null"]},
            "status": {"enum": ["healthy", "ejected"]},
            "uptime": {"type": ["object", "number", "null"]},
            "ttft_ms": _QUANTILES,
            "latency_ms": _QUANTILES,
            "throughput_tps": {},
            "requests_5m": _INT,
            "errors_5m": _INT,
        },
    },
    "Providers": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["endpoint", "provider", "models"],
                    "properties": {"endpoint": _STR, "provider": _STR, "models": {"type": "array", "items": _STR}},
                },
            }
        },
    },
    "Rankings": {
        "type": "object",
        "required": ["period", "start", "end", "data"],
        "properties": {
            "period": {"enum": ["day", "week", "month"]},
            "start": _TIME,
            "end": _TIME,
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["model", "requests", "total_tokens", "share"],
                    "properties": {
                        "model": _STR,
                        "requests": _INT,
                        "prompt_tokens": _INT,
                        "completion_tokens": _INT,
                        "total_tokens": _INT,
                        "cost": _NUM,
                        "share": _NUM,
                        "previous": {"type": "object"},
                        "trend": {"type": ["number", "null"]},
                    },
                },
            },
        },
    },
    "Activity": {
        "type": "object",
        "required": ["start", "end", "data"],
        "properties": {
            "start": _TIME,
            "end": _TIME,
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["day", "model", "requests"],
                    "properties": {
                        "day": _STR,
                        "model": _STR,
                        "requests": _INT,
                        "prompt_tokens": _INT,
                        "completion_tokens": _INT,
                        "cached_tokens": _INT,
                        "reasoning_tokens": _INT,
                        "cost": _NUM,
                        "fee": _NUM,
                    },
                },
            },
        },
    },
    "Key": _KEY,
    "KeySpec": _KEY_SPEC,
    "Org": _ORG,
    "Generation": _GENERATION,
    "Status": {"type": "object", "required": ["status"], "properties": {"status": _STR}},
}

_HEADERS: Json = {
    "RequestId": {
        "description": "The client's own `X-Request-Id` when it sent a sane one (1–128 visible ASCII "
        "characters), else the generation id of a proxied request, else one the gateway made up.",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
    },
    "GenerationId": {
        "description": "The generation's id: GET /api/v1/generation?id= reads its record.",
        "required": True,
        "schema": _STR,
    },
    "GenerationIdOptional": {
        "description": "The generation's id, when the request got as far as being routed.",
        "schema": _STR,
    },
    "RetryAfter": {"description": "Seconds to wait before trying again.", "required": True, "schema": _STR},
    "Allow": {"description": "The methods the path takes.", "required": True, "schema": _STR},
}

# -- operations --


def _op(
    op_id: str,
    tag: str,
    summary: str,
    responses: Json,
    *,
    body: str | None = None,
    params: list[Json] | None = None,
    security: list[Json] | None = None,
    description: str | None = None,
) -> Json:
    op: Json = {"operationId": op_id, "tags": [tag], "summary": summary, "responses": responses}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": _schema(body)}}}
    if security is not None:
        op["security"] = security
    return op


def _query(name: str, schema: Json, *, required: bool = False, description: str = "") -> Json:
    p: Json = {"name": name, "in": "query", "required": required, "schema": schema}
    if description:
        p["description"] = description
    return p


_ID = {"name": "id", "in": "path", "required": True, "schema": {**_STR, "minLength": 1}}
_OPEN: list[Json] = []  # no key
_PER_REQUEST = (
    "Per request: `X-Hedgerow-Hedge` (`off`, or seconds before a hedge), `X-Hedgerow-Cache` (`on`/`off`), "
    "`Cache-Control: no-cache | no-store`, and `X-Request-Id` (echoed)."
)


def _data(schema: Json) -> Json:
    return {"type": "object", "required": ["data"], "properties": {"data": schema}}


def _paths() -> dict[str, Json]:
    admin = (400, 401, 403, 503)
    return {
        "/v1/chat/completions": {
            "post": _op(
                "createChatCompletion",
                "OpenAI",
                "Chat completion, routed to one of the model's endpoints (streamed as SSE with `stream: true`)",
                {
                    "200": _proxied("The completion, or its event stream.", _schema("ChatCompletion")),
                    **_errors(_PROXY),
                    "4XX": _RELAYED_4XX,
                },
                body="ChatCompletionRequest",
                description=_PER_REQUEST,
            )
        },
        "/v1/completions": {
            "post": _op(
                "createCompletion",
                "OpenAI",
                "Legacy text completion",
                {"200": _proxied("The completion.", _schema("Completion")), **_errors(_PROXY), "4XX": _RELAYED_4XX},
                body="CompletionRequest",
                description=_PER_REQUEST,
            )
        },
        "/v1/embeddings": {
            "post": _op(
                "createEmbedding",
                "OpenAI",
                "Embeddings",
                {
                    "200": _proxied("The embeddings.", _schema("Embeddings"), stream=False),
                    **_errors(_PROXY),
                    "4XX": _RELAYED_4XX,
                },
                body="EmbeddingRequest",
                description=_PER_REQUEST,
            )
        },
        "/v1/messages": {
            "post": _op(
                "createMessage",
                "Anthropic",
                "Anthropic's Messages API, for every model the gateway routes",
                {
                    "200": _proxied("The message, or its event stream.", _schema("Message")),
                    **_errors(_PROXY, messages=True),
                    "4XX": _RELAYED_4XX,
                },
                body="MessagesRequest",
                security=[{"apiKey": []}, {"bearer": []}],
                description="Errors are Anthropic-shaped. `anthropic-version` is accepted and not checked; "
                "`anthropic-beta` is passed on to Anthropic endpoints.",
            )
        },
        "/v1/models": {
            "get": _op(
                "listModels",
                "OpenAI",
                "The public models, with pricing and context length",
                {"200": _ok("The models.", _schema("ModelList")), **_errors([401])},
            )
        },
        "/api/v1/models": {
            "get": _op(
                "listModelStats",
                "Stats",
                "The models, each with its endpoints' live stats on this node",
                {"200": _ok("The models.", _schema("ModelStatsList")), **_errors([401])},
            )
        },
        "/api/v1/rankings": {
            "get": _op(
                "rankings",
                "Stats",
                "Tokens per model over a period and the one before it",
                {"200": _ok("The board.", _schema("Rankings")), **_errors([400, 401, 503])},
                params=[_query("period", {"enum": ["day", "week", "month"]}, description="default `day`")],
            )
        },
        "/api/v1/activity": {
            "get": _op(
                "activity",
                "Stats",
                "Usage per UTC day and model: the caller's, or (an admin key) a key's, an org's or everyone's",
                {"200": _ok("The usage.", _schema("Activity")), **_errors([400, 401, 403, 503])},
                params=[
                    _query("days", {**_INT, "minimum": 1, "maximum": 400}, description="default 30"),
                    _query("key", _STR, description="a key id (an admin key, or the caller's own)"),
                    _query("org", _STR, description="an organisation (an admin key, or the caller's own)"),
                ],
            )
        },
        "/api/v1/keys": {
            "post": _op(
                "createKey",
                "Admin",
                "Create a key (admin key); its secret is in this answer only",
                {
                    "201": _ok(
                        "The key and its secret.",
                        {
                            "type": "object",
                            "required": ["data", "key"],
                            "properties": {"data": _schema("Key"), "key": _STR},
                        },
                    ),
                    **_errors([*admin, 404, 413]),
                },
                body="KeySpec",
            ),
            "get": _op(
                "listKeys",
                "Admin",
                "List keys (admin key)",
                {"200": _ok("The keys.", _data({"type": "array", "items": _schema("Key")})), **_errors(admin)},
                params=[_query("org", _STR, description="only this organisation's")],
            ),
        },
        "/api/v1/keys/{id}": {
            "get": _op(
                "getKey",
                "Admin",
                "One key (admin key)",
                {"200": _ok("The key.", _data(_schema("Key"))), **_errors([*admin, 404])},
                params=[_ID],
            ),
            "patch": _op(
                "updateKey",
                "Admin",
                "Change a key (admin key): the fields given; `null` clears one",
                {"200": _ok("The key.", _data(_schema("Key"))), **_errors([*admin, 404, 413])},
                params=[_ID],
                body="KeySpec",
            ),
            "delete": _op(
                "deleteKey",
                "Admin",
                "Delete a key (admin key)",
                {
                    "200": _ok(
                        "Deleted.",
                        _data({"type": "object", "required": ["deleted"], "properties": {"deleted": _BOOL}}),
                    ),
                    **_errors([*admin, 404]),
                },
                params=[_ID],
            ),
        },
        "/api/v1/key": {
            "get": _op(
                "currentKey",
                "Admin",
                "The calling key: label, usage, limit, remaining, reset, rate limits",
                {
                    "200": _ok(
                        "The key.",
                        _data(
                            {
                                "type": "object",
                                "required": ["label", "usage", "limit", "limit_remaining", "rate_limit"],
                                "properties": {
                                    "label": _STR,
                                    "usage": _NUM,
                                    "limit": {"type": ["number", "null"]},
                                    "limit_remaining": {"type": ["number", "null"]},
                                    "limit_reset": {"type": ["string", "null"]},
                                    "is_free_tier": _BOOL,
                                    "rate_limit": {"type": "object"},
                                    "tokens_per_minute": _INT,
                                },
                            }
                        ),
                    ),
                    **_errors([401, 503]),
                },
            )
        },
        "/api/v1/credits": {
            "get": _op(
                "credits",
                "Admin",
                "The calling key's organisation: total credits and usage",
                {
                    "200": _ok(
                        "The credits.",
                        _data(
                            {
                                "type": "object",
                                "required": ["total_credits", "total_usage"],
                                "properties": {"total_credits": {"type": ["number", "null"]}, "total_usage": _NUM},
                            }
                        ),
                    ),
                    **_errors([401, 404, 503]),
                },
            )
        },
        "/api/v1/credits/{id}": {
            "post": _op(
                "topUp",
                "Admin",
                "Top up an organisation (admin key)",
                {
                    "200": _ok(
                        "The new balance.",
                        _data(
                            {
                                "type": "object",
                                "required": ["id", "balance"],
                                "properties": {"id": _STR, "balance": {"type": ["number", "null"]}},
                            }
                        ),
                    ),
                    **_errors([*admin, 404, 413]),
                },
                params=[{**_ID, "description": "the organisation"}],
                body="TopUp",
            )
        },
        "/api/v1/orgs": {
            "post": _op(
                "createOrg",
                "Admin",
                "Create an organisation (admin key)",
                {"201": _ok("The organisation.", _data(_schema("Org"))), **_errors([*admin, 409, 413])},
                body="OrgSpec",
            ),
            "get": _op(
                "listOrgs",
                "Admin",
                "List organisations (admin key)",
                {"200": _ok("The organisations.", _data({"type": "array", "items": _schema("Org")})), **_errors(admin)},
            ),
        },
        "/api/v1/generation": {
            "get": _op(
                "getGeneration",
                "Admin",
                "One generation record, with every attempt (its own key's, or any with an admin key)",
                {"200": _ok("The record.", _data(_schema("Generation"))), **_errors([400, 401, 404, 503])},
                params=[_query("id", {**_STR, "minLength": 1}, required=True, description="the generation id")],
            )
        },
        "/api/v1/providers": {"get": _providers("listProviders")},
        "/api/v1/endpoints": {"get": _providers("listEndpoints")},
        "/livez": {
            "get": _op(
                "livez",
                "Operations",
                "200 while the event loop runs",
                {"200": _ok("Alive.", _schema("Status"))},
                security=_OPEN,
            )
        },
        "/readyz": {
            "get": _op(
                "readyz",
                "Operations",
                "200 when serving; 503 while draining (or the store is down with `fail-closed`)",
                {"200": _ok("Ready.", _schema("Status")), **_errors([503])},
                security=_OPEN,
            )
        },
        "/dashboard": {
            "get": _op(
                "dashboard",
                "Operations",
                "The operator's live page (it asks for an admin key itself)",
                {"200": _ok("The page.", _STR, media="text/html")},
                security=_OPEN,
            )
        },
        "/metrics": {
            "get": _op(
                "metrics",
                "Operations",
                "Prometheus metrics of every worker (no key: keep it off the public network)",
                {"200": _ok("The metrics.", _STR, media="text/plain")},
                security=_OPEN,
            )
        },
        "/openapi.json": {
            "get": _op(
                "openapi",
                "Operations",
                "This document",
                {
                    "200": _ok(
                        "The OpenAPI document.",
                        {"type": "object", "required": ["openapi", "info", "paths"]},
                    )
                },
                security=_OPEN,
            )
        },
    }


def _providers(op_id: str) -> Json:
    return _op(
        op_id,
        "Stats",
        "Each endpoint's state and live stats on this node",
        {"200": _ok("The endpoints.", _schema("Providers")), **_errors([401])},
    )


_SCHEMAS["TopUp"] = {
    "type": "object",
    "required": ["amount"],
    "properties": {"amount": {**_NUM, "exclusiveMinimum": 0, "description": "USD"}},
    "additionalProperties": False,
}
_SCHEMAS["OrgSpec"] = {
    "type": "object",
    "required": ["id"],
    "properties": {
        "id": {**_STR, "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
        "name": {**_STR, "description": "default: the id"},
        "credits": {"type": ["number", "null"], "minimum": 0, "description": "USD; null: unlimited"},
    },
    "additionalProperties": False,
}

SPEC: Json = {
    "openapi": "3.1.0",
    "info": {
        "title": "Hedgerow",
        "version": __version__,
        "description": "An OpenAI-compatible LLM gateway: one API, many providers. Every response carries "
        "`X-Request-Id`.",
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    },
    "security": [{"bearer": []}],
    "paths": _paths(),
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "A gateway key: `Bearer sk-…`."},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "Anthropic's way."},
        },
        "schemas": _SCHEMAS,
        "headers": _HEADERS,
        "responses": _error_responses(),
    },
}


def spec_for(table: Iterable[tuple[str, str, object]]) -> Json:
    """SPEC with only the operations of `table` (method, path, handler); HEAD is implied by GET."""
    mounted = {(m.lower(), p) for m, p, _ in table}
    paths: Json = {}
    for path, ops in SPEC["paths"].items():
        kept = {m: op for m, op in ops.items() if (m, path) in mounted}
        if kept:
            paths[path] = kept
    return {**SPEC, "paths": paths}


def openapi_handler(table: list[Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The route's handler: the document for `table` (plus this route), encoded once, on first use."""
    body: list[bytes] = []

    async def openapi(request: web.Request) -> web.Response:
        if not body:
            body.append(orjson.dumps(spec_for([*table, ("GET", "/openapi.json", None)])))
        return web.Response(body=body[0], content_type="application/json")

    return openapi
