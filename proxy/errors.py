"""The gateway's error tree: the only place statuses and OpenAI error types are chosen.

* GatewayError                 500 server_error           internal
  * ClientError                4xx                        the caller's fault; never counts against an upstream
    * BadRequest               400 invalid_request_error
    * Unauthorized             401 authentication_error
    * PaymentRequired          402 insufficient_quota     the key's or organisation's credit cannot cover it
    * Forbidden                403 permission_error       a valid key without the right (admin, model)
    * NotFound                 404 invalid_request_error  unknown route
      * UnknownModel           404 model_not_found
    * MethodNotAllowed         405 invalid_request_error
    * RequestTimeout           408 timeout                client too slow sending its request
    * Conflict                 409 invalid_request_error  creating what already exists
    * PayloadTooLarge          413 invalid_request_error
    * RateLimited              429 rate_limit_error       the key's rpm/tpm; Retry-After and X-RateLimit-*
    * HeadersTooLarge          431 invalid_request_error  request head over the server's limit
  * Unavailable                503 service_unavailable    draining, or no endpoint can serve the model
    * TooManyConnections       503 too_many_connections   a new connection over `max-connections`(`-per-ip`)
  * UpstreamError              502 upstream_error         counts against the upstream's health
    * UpstreamConnectError     502                        retryable: nothing was sent
    * UpstreamTimeout          504 timeout                retryable only before the first byte went downstream
    * UpstreamProtocolError    502                        garbage where HTTP or a body was expected
    * StreamInterrupted        502                        never retried: the client already has bytes

An upstream's own 4xx answer is relayed with its status and needs no class: as received from OpenAI-format
providers, rewritten into OpenAI's error shape by translating adapters (`error_body`) — in both cases with the
provider's own credential masked, should the upstream quote it (proxy/attempt.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import orjson


class GatewayError(Exception):
    status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    kind: ClassVar[str] = "internal"  # low-cardinality label for metrics and logs
    retryable: ClassVar[bool] = False
    generation: str | None = None  # the generation that failed, if the request got that far (sent as a header)

    def __init__(self, message: str, *, param: str | None = None, upstream: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.upstream = upstream

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.openai_type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )

    def sse_event(self) -> bytes:
        """The event that ends a stream already under way: an OpenAI-shaped error, then [DONE]."""
        return b"data: " + self.body() + b"\n\ndata: [DONE]\n\n"

    def headers(self) -> dict[str, str]:
        return {}


class ClientError(GatewayError):
    status = 400
    openai_type = "invalid_request_error"
    kind = "client"


class BadRequest(ClientError):
    status = 400
    code = "invalid_request"


class Unauthorized(ClientError):
    status = 401
    openai_type = "authentication_error"
    code = "invalid_api_key"
    kind = "auth"


class PaymentRequired(ClientError):
    status = 402
    openai_type = "insufficient_quota"
    code = "insufficient_quota"
    kind = "credit"


class Forbidden(ClientError):
    status = 403
    openai_type = "permission_error"
    code = "permission_denied"
    kind = "auth"


class RateLimited(ClientError):
    status = 429
    openai_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    kind = "rate_limit"

    def __init__(self, message: str, retry_after: int, limit_headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.limit_headers = limit_headers

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after), **self.limit_headers}


class NotFound(ClientError):
    status = 404
    code = "not_found"


class UnknownModel(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allow: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.allow = ", ".join(sorted(set(allow)))  # RFC 9110: a 405 lists the methods the resource takes

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow}


class Conflict(ClientError):
    status = 409
    code = "conflict"


class RequestTimeout(ClientError):
    status = 408
    openai_type = "timeout"
    code = "request_timeout"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class HeadersTooLarge(ClientError):
    status = 431
    code = "request_header_fields_too_large"


class Unavailable(GatewayError):
    status = 503
    openai_type = "service_unavailable"
    code = "service_unavailable"
    kind = "unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class TooManyConnections(Unavailable):
    code = "too_many_connections"


class UpstreamError(GatewayError):
    status = 502
    openai_type = "upstream_error"
    code = "bad_gateway"
    kind = "upstream"


class UpstreamConnectError(UpstreamError):
    kind = "connect"
    retryable = True


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    openai_type = "timeout"
    code = "upstream_timeout"
    kind = "timeout"
    retryable = True


class UpstreamProtocolError(UpstreamError):
    kind = "protocol"
    retryable = True


class StreamInterrupted(UpstreamError):
    kind = "interrupted"
    code = "stream_interrupted"


class UpstreamStatus(UpstreamError):
    """An upstream answered 408/409/429/5xx. Carries its response so the last one can be relayed as is."""

    kind = "status"

    def __init__(self, status: int, body: bytes, headers: dict[str, str], *, upstream: str) -> None:
        super().__init__(f"upstream {upstream} answered {status}", upstream=upstream)
        self.upstream_status = status
        self.upstream_body = body
        self.upstream_headers = headers

    retryable = True
