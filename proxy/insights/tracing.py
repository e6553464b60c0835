"""OpenTelemetry traces, off by default (`server.tracing`): one SERVER span per client request and one CLIENT
span per upstream attempt, made after the fact from the accountant's batches of finished generations.

Why after the fact: a request pays nothing for tracing but what it pays for metrics (one list append), plus
one header lookup for the client's `traceparent` (proxy/handlers.py, only while tracing is on). Every half
second the accountant hands the finished generations to `Tracing` (an accountant observer), which opens and
ends each span with explicit timestamps: the generation's wall-clock arrival (`created`) plus the offsets the
loop clock measured. The SDK's BatchSpanProcessor queues the ended spans and exports them from its own thread.

Why no import of opentelemetry at the top: with tracing off (the default) the gateway never imports it, and the
`otel` extra need not be installed. This module's top holds only the config Struct (proxy/config.py imports it).

Names follow the OpenTelemetry GenAI semantic conventions where they exist (`gen_ai.*`, `http.*`, `error.type`);
the rest are `hedgerow.*`. No span carries a key's secret or any prompt or completion text (a Generation holds
none); the key's id is left out too, as in the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from proxy.structs import Base

if TYPE_CHECKING:
    from proxy.accounting.accountant import Generation


class TracingConfig(Base):
    enabled: bool = False  # a span per request and per upstream attempt (needs `pip install 'hedgerow[otel]'`)
    exporter: Literal["otlp", "console"] = "otlp"  # OTLP over HTTP (protobuf), or JSON on stderr (debugging)
    endpoint: Annotated[str, msgspec.Meta(pattern=r"^https?://")] = "http://127.0.0.1:4318/v1/traces"  # OTLP
    service_name: Annotated[str, msgspec.Meta(min_length=1)] = "hedgerow"  # the resource's `service.name`


# The client's route → gen_ai.operation.name (the GenAI conventions' well-known values).
_OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
# Attempt outcomes that are not failures of the attempt: it answered, or the gateway stopped it (the client
# left, or a hedge won). The rest (connect, timeout, rate_limited, server_error, protocol, client_error: an
# upstream 4xx, an error for a CLIENT span under the HTTP conventions) set the span's status to ERROR.
_NOT_FAILED = frozenset(("ok", "cancelled", "hedge_lost"))
_NS = 1_000_000_000


class Tracing:
    """An accountant observer: each batch of finished generations becomes spans, one tree per request."""

    __slots__ = (
        "_client",
        "_context",
        "_error",
        "_in_span",
        "_propagator",
        "_provider",
        "_server",
        "_status",
        "_tracer",
    )

    def __init__(self, cfg: TracingConfig) -> None:
        try:
            from opentelemetry.context import Context
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
            from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as e:
            raise ImportError(
                f"server.tracing needs a package that is not installed ({e.name}): pip install 'hedgerow[otel]'",
                name=e.name,
            ) from e
        import multiprocessing.util
        import sys

        import proxy
        from proxy import handlers

        exporter: SpanExporter
        if cfg.exporter == "console":
            exporter = ConsoleSpanExporter(out=sys.stderr)  # stdout is the access log's
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=cfg.endpoint)  # OTEL_EXPORTER_OTLP_HEADERS etc. still apply
        # OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER and OTEL_BSP_* are honoured, as the SDK reads them.
        resource = Resource.create({"service.name": cfg.service_name, "service.version": proxy.__version__})
        self._provider = provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        # The queued spans are exported at exit: a forked worker runs multiprocessing's finalizers, not atexit
        # (which is where the SDK's own hook lives); the main process runs them from atexit.
        multiprocessing.util.Finalize(None, provider.shutdown, exitpriority=10)
        self._tracer = provider.get_tracer("hedgerow", proxy.__version__)
        self._propagator = TraceContextTextMapPropagator()
        self._context = Context
        self._in_span = set_span_in_context
        self._server, self._client = SpanKind.SERVER, SpanKind.CLIENT
        self._status = Status
        self._error = StatusCode.ERROR
        handlers.TRACING = True  # from now on a request keeps its `traceparent` header (one lookup)

    def __call__(self, gens: Sequence[Generation]) -> None:
        for g in gens:
            self._trace(g)

    def _trace(self, g: Generation) -> None:
        tracer, empty = self._tracer, self._context
        parent = empty()  # a root span, whatever the observer's own context holds
        if g.traceparent:
            parent = self._propagator.extract({"traceparent": g.traceparent}, context=parent)
        op = _OPERATIONS.get(g.operation, g.operation or "chat")
        start = int(g.created * _NS)
        end = start + max(0, int((g.ended - g.started) * _NS))
        u, c = g.usage, g.cost
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": op,
            "gen_ai.request.model": g.model,
            "hedgerow.generation.id": g.id,
            "hedgerow.streamed": g.streamed,
            "hedgerow.hedged": bool(g.hedge),
            "hedgerow.attempts": len(g.attempts),
        }
        if g.provider:
            attrs["gen_ai.provider.name"] = g.provider
        if g.endpoint:
            attrs["hedgerow.endpoint"] = g.endpoint
        if g.status:
            attrs["http.response.status_code"] = g.status
        if u is not None:
            attrs["gen_ai.usage.input_tokens"] = u.prompt_tokens
            attrs["gen_ai.usage.output_tokens"] = u.completion_tokens
        if g.finish_reason:
            attrs["gen_ai.response.finish_reasons"] = (g.finish_reason,)
        if c is not None:
            attrs["hedgerow.cost_usd"] = c.upstream
            attrs["hedgerow.fee_usd"] = c.fee
        if g.hedge:
            attrs["hedgerow.hedge"] = g.hedge  # won, lost
        if g.ttft is not None:
            attrs["hedgerow.ttft_s"] = g.ttft
        if g.cancelled:
            attrs["hedgerow.cancelled"] = True
            attrs["error.type"] = "cancelled"
        elif g.status >= 400:
            attrs["error.type"] = str(g.status)
        span = tracer.start_span(
            f"{op} {g.model}", context=parent, kind=self._server, attributes=attrs, start_time=start
        )
        inside = self._in_span(span, empty())
        for a in g.attempts:
            # The attempts' clock and the request's may differ by a tick (uvloop's counts milliseconds): a child
            # is kept within its parent.
            a_start = min(max(start, start + int(a.started * _NS)), end)
            a_end = min(max(a_start, a_start + int(a.duration * _NS)), end)
            model = a.endpoint[len(a.provider) + 1 :] if a.endpoint.startswith(a.provider + "/") else a.endpoint
            a_attrs: dict[str, Any] = {
                "gen_ai.operation.name": op,
                "gen_ai.request.model": model,
                "gen_ai.provider.name": a.provider,
                "hedgerow.endpoint": a.endpoint,
                "hedgerow.attempt.outcome": a.outcome,
            }
            if a.status:
                a_attrs["http.response.status_code"] = a.status
            if a.prompt_tokens or a.completion_tokens:
                a_attrs["gen_ai.usage.input_tokens"] = a.prompt_tokens
                a_attrs["gen_ai.usage.output_tokens"] = a.completion_tokens
                a_attrs["hedgerow.cost_usd"] = a.cost
            failed = a.outcome not in _NOT_FAILED
            if failed:
                a_attrs["error.type"] = a.outcome
            child = tracer.start_span(
                f"{op} {model}", context=inside, kind=self._client, attributes=a_attrs, start_time=a_start
            )
            if failed:
                child.set_status(self._status(self._error, f"{a.outcome} ({a.status})" if a.status else a.outcome))
            child.end(end_time=a_end)
        if g.status >= 500 and not g.cancelled:  # a SERVER span: 4xx are the client's, not errors of the gateway
            span.set_status(self._status(self._error, str(g.status)))
        span.end(end_time=end)
