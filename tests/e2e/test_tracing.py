"""One trace per generation: the stack, run as `make run` runs it with
OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/gRPC collector in this test, exports spans
from all four services that join into the generation's one trace (svckit/tracing.py)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from gateway_svc.phoenix_client import PhoenixClient
from tests.conftest import eventually
from tests.e2e.conftest import running_stack
from tools.stack import dev_token

pytestmark = pytest.mark.e2e

SERVICES = {"gateway_svc", "task_svc", "llm_svc", "persistence_svc"}
EXPECTED = {
    ("gateway_svc", "llm_generate"),
    ("task_svc", "task"),
    ("task_svc", "generate"),
    ("llm_svc", "generation"),
    ("llm_svc", "provider"),
    ("persistence_svc", "history write"),
}


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: every span exported to it, as (service, trace id, name)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, str]] = []  # service, trace, span, parent

    async def Export(  # type: ignore[override]
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = _service_of(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        (service, span.trace_id.hex(), span.name, span.parent_span_id.hex())
                    )
        return trace_service_pb2.ExportTraceServiceResponse()

    def by_trace(self) -> dict[str, set[tuple[str, str]]]:
        traces: defaultdict[str, set[tuple[str, str]]] = defaultdict(set)
        for service, trace_id, name, _ in self.spans:
            traces[trace_id].add((service, name))
        return traces


def _service_of(attributes: Iterable[Any]) -> str:
    for attribute in attributes:
        if attribute.key == "service.name":
            return str(attribute.value.string_value)
    return ""


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    receiver = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, port
    finally:
        await server.stop(0)


async def test_a_generation_is_one_trace_across_the_four_services(
    request: pytest.FixtureRequest, tmp_path: Path, collector: tuple[Collector, int]
) -> None:
    receiver, port = collector
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a tenth of a second
    }
    async with running_stack(request, tmp_path / "var", env=env) as stack:
        async with await PhoenixClient.connect(
            stack.config.socket_url, token=dev_token("alice")
        ) as client:
            task_id = str(uuid.uuid4())
            channel = await client.join(f"task:{task_id}")
            reply = await channel.push("llm_generate", {"prompt": "trace me"})
            assert reply.ok, reply.response
            async for message in channel.messages():
                if message.event == "llm_response":
                    break

        # Each span is exported when it ends, and the job's "task" span ends after the
        # client has its answer, so wait for the whole set rather than for four services.
        async def the_generation_trace() -> set[tuple[str, str]] | None:
            for spans in receiver.by_trace().values():
                if EXPECTED.issubset(spans):
                    return spans
            return None

        spans = await eventually(the_generation_trace, 20)
    assert {service for service, _ in spans} == SERVICES
