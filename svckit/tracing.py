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

A log line carries the trace id of the span current where it is written (svckit/logs.py), so
the work done for a span runs with it current: a block of a coroutine (`span`, `current`),
a whole asyncio task (`context_with`, or `only` around what starts it), or each step of an
async generator (`current_in`: a context set inside a generator would otherwise leak to
whoever iterates it, and what that one sets would leak in). A line about one traced item
written where its span cannot be current (a batch of many) names its trace explicitly
(`trace_fields`). Off, none of them attaches anything.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import AsyncGenerator, Iterator, Mapping
from typing import TypeVar

from opentelemetry import context as otel_context
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
T = TypeVar("T")
_NOTHING = contextlib.nullcontext()  # reusable: `current(None)` allocates nothing


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
    carry its trace id). Not across an async generator's yields: use `around` there (and
    `current_in` for what runs between them)."""
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


def current(span: Span | None) -> contextlib.AbstractContextManager[object]:
    """`span` current for a block of one coroutine, without ending it (its `with` may span
    awaits, not an async generator's yields: `current_in` is for those); nothing when None."""
    if span is None:
        return _NOTHING
    return _attached(trace.set_span_in_context(span))


def only(span: Span | None) -> contextlib.AbstractContextManager[object]:
    """`span` current for a block, and when it is None (tracing on) no span at all: for a
    block that starts an asyncio task working for `span` alone (the task copies the context),
    so that whose span the caller happens to have does not decide the task's. Nothing when
    tracing is off."""
    if span is None:
        return untraced()
    return _attached(trace.set_span_in_context(span))


def untraced() -> contextlib.AbstractContextManager[object]:
    """No span current for a block: for what it starts that outlives the span (a shared
    stream's tasks), whose log lines must not join one trace for good."""
    if _tracer is None:
        return _NOTHING
    return _attached(trace.set_span_in_context(trace.INVALID_SPAN))


@contextlib.contextmanager
def _attached(context: Context) -> Iterator[None]:
    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def context_with(span: Span | None) -> contextvars.Context | None:
    """A copy of the current context with `span` current, for one asyncio task that works
    for it (`asyncio.create_task(..., context=...)`; one copy per task: a context is not
    to be shared). No span while tracing is on: a copy with none current, so that the task
    does not inherit its creator's (another job's). None while tracing is off: the task
    takes the ordinary copy."""
    if _tracer is None:
        return None
    copied = contextvars.copy_context()
    # Never detached: the copy belongs to the task, and goes with it.
    copied.run(otel_context.attach, trace.set_span_in_context(span or trace.INVALID_SPAN))
    return copied


def current_in(span: Span | None, events: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """`events`, each of its steps (and its close) run with `span` current, and nothing of
    that seen by the consumer between steps; `events` itself when None."""
    if span is None:
        return events
    return _stepwise(trace.set_span_in_context(span), events)


async def _stepwise(context: Context, events: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    try:
        while True:
            # Attached and detached within one step: in the same context, whichever task
            # iterates (a consumer may hand the iteration to a task of its own).
            with _attached(context):
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    return
            yield event
    finally:
        with _attached(context):
            await events.aclose()


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


def trace_fields(parent: str) -> dict[str, str]:
    """The `extra` of a log line about one traced item (`{"trace_id": ...}`, the trace of
    its `parent` traceparent), for a line written where no span of that item is current (a
    batch holding many traces, a job refused before its span is made); svckit/logs.py keeps
    it over the current span's. Empty when tracing is off or `parent` names no trace."""
    if _tracer is None or not parent:
        return {}
    context = trace.get_current_span(_context_of(parent)).get_span_context()
    return {"trace_id": format(context.trace_id, "032x")} if context.is_valid else {}


def _context_of(parent: str) -> Context:
    return _propagator.extract({TRACEPARENT: parent})
