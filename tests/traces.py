"""Traces and log lines for tests: an in-memory span exporter, and the services' JSON log lines
as they are written (svckit/logs.py reads the current span's trace id at that moment, so a
line formatted later, as caplog would, could not say which trace it was written in)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import orjson
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from svckit import tracing
from svckit.logs import JsonFormatter


class JsonLines(logging.Handler):
    """Every record, as the JSON line a service writes, formatted when it is logged."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("test"))
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(orjson.loads(self.format(record)))

    def written(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["msg"] == msg]


@contextlib.contextmanager
def json_lines(*loggers: str) -> Iterator[JsonLines]:
    """The lines `loggers` write inside the block, DEBUG included."""
    handler = JsonLines()
    levels = {}
    for name in loggers:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for name, level in levels.items():
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def in_memory_traces() -> Iterator[InMemorySpanExporter]:
    """Tracing on inside the block, every span ended there kept in memory."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracing.use(provider, "test")
    try:
        yield exported
    finally:
        tracing.shutdown()


def trace_id(span: ReadableSpan) -> str:
    """A span's trace id as log lines write it."""
    assert span.context is not None
    return format(span.context.trace_id, "032x")
