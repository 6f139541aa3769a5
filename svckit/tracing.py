"""Distributed traces (OpenTelemetry): one trace per generation, across the four services.

Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set (the SDK's own variable, read by each service's
settings): then spans go to that OTLP/gRPC collector in batches (OTEL_BSP_* tune them), each
service named by its `service.name`. Off, every function here is a cheap no-op and no span
object is made, so the hot path pays nothing.

A trace's context crosses process boundaries as a W3C `traceparent` string:
- in the `traceparent` field of SubmitRequest, Job and GenerateRequest: these travel on
  multiplexed gRPC streams (one call carries many generations, so per-call metadata cannot
  carry them) and in stored jobs (so a job redelivered after a crash keeps its trace);
- in the `traceparent` header of each lifecycle event on JetStream (NATS headers), which
  persistence_svc reads for its history write.

The spans: gateway `llm_generate` (push to ack) → task_svc `task` (the job, accepted to
finished) → `generate` (the stream from llm_svc) → llm_svc `generation` → `provider` (each
attempt) ; and persistence_svc `history write` per lifecycle event.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
_propagator = TraceContextTextMapPropagator()
_tracer: Tracer | None = None  # None: tracing is off
_provider: TracerProvider | None = None

Attributes = Mapping[str, str | int | float | bool]


def setup(service: str, endpoint: str) -> None:
    """Export this process's spans to the OTLP collector at `endpoint` (empty: off)."""
    if not endpoint:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    insecure = endpoint.startswith("http://")
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint, insecure=insecure)))
    use(provider, service)
    log.info("tracing on", extra={"endpoint": endpoint})


def use(provider: TracerProvider, service: str) -> None:
    """Trace with `provider` (setup's, or a test's with an in-memory exporter)."""
    global _tracer, _provider
    _provider, _tracer = provider, provider.get_tracer(service)


def shutdown() -> None:
    """Export what is left (bounded by the SDK's own timeouts), then stop."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def start(name: str, parent: str = "", attributes: Attributes | None = None) -> Span | None:
    """A span that the caller ends (`end`), child of the `parent` traceparent (a new trace
    when empty); None when tracing is off."""
    if _tracer is None:
        return None
    context = _context_of(parent) if parent else None
    return _tracer.start_span(name, context=context, attributes=attributes)


def end(span: Span | None, error: str = "") -> None:
    if span is None:
        return
    failed(span, error)
    span.end()


def failed(span: Span | None, error: str) -> None:
    """Mark `span` as failed with `error` (nothing when either is empty)."""
    if span is not None and error:
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))


@contextlib.contextmanager
def span(
    name: str, parent: str = "", attributes: Attributes | None = None
) -> Iterator[Span | None]:
    """A span around a block of a coroutine, current inside it (so the block's log lines
    carry its trace id). Not across an async generator's yields: use `around` there."""
    if _tracer is None:
        yield None
        return
    context = _context_of(parent) if parent else None
    with _tracer.start_as_current_span(name, context=context, attributes=attributes) as current:
        yield current


@contextlib.contextmanager
def around(
    name: str, parent: str = "", attributes: Attributes | None = None
) -> Iterator[Span | None]:
    """A span around a block that is not made current: safe across the yields of an async
    generator (a current span would be detached in another context). An exception ends it
    with an error status."""
    started = start(name, parent, attributes)
    try:
        yield started
    except BaseException as error:
        end(started, error=type(error).__name__)
        raise
    end(started)


def traceparent(span: Span | None) -> str:
    """The W3C traceparent of `span` (to send along); empty when there is none."""
    if span is None:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get(TRACEPARENT, "")


def current_trace_id() -> str:
    """The current span's trace id in hex (for log lines); empty outside a span."""
    if _tracer is None:
        return ""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def _context_of(parent: str) -> Context:
    return _propagator.extract({TRACEPARENT: parent})
