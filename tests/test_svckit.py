"""The shared bootstrap: NATS layout, typed errors across a real gRPC hop, health."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import random
import sys
from collections.abc import AsyncGenerator
from contextlib import aclosing

import grpc
import nats.errors
import orjson
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js.errors import APIError
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from svckit import tracing
from svckit.backoff import full_jitter
from svckit.errors import ERRORS, ServiceError
from svckit.grpc_server import GrpcServer, insecure_channel
from svckit.lifecycle import cancel_and_wait, report_slow_shutdown
from svckit.logs import JsonFormatter
from svckit.nats import (
    NO_PEERS_FOR_PLACEMENT,
    close_nats,
    connect_nats,
    ensure_stream,
    jobs_stream_config,
    while_forming,
)
from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
from tests.conftest import timeout
from tests.traces import in_memory_traces, json_lines, trace_id
from tools.natsserver import NatsServer

Code = common_pb2.ErrorCode


def test_every_error_code_has_a_row() -> None:
    assert set(ERRORS) == set(Code.values())


async def test_nats_connect_checks_version_and_streams_are_idempotent(nats_url: str) -> None:
    nc = await connect_nats(nats_url, "test")
    try:
        js = nc.jetstream()
        await ensure_stream(js, jobs_stream_config())
        await ensure_stream(js, jobs_stream_config())
        info = await js.stream_info("SB_JOBS")
        assert info.config.subjects == ["switchboard.jobs.>"]
    finally:
        await nc.close()


def test_closing_while_nats_is_gone_returns_on_uvloop(nats_server: NatsServer) -> None:
    """The services' own loop: nats-py's close, with publishes still pending, writes to a
    transport that is closed already, and uvloop raises where asyncio only warns."""

    async def scenario() -> None:
        lost = asyncio.Event()

        async def on_link(up: bool) -> None:
            if not up:
                lost.set()

        nc = await connect_nats(nats_server.url, "test", on_link=on_link)
        nats_server.stop()
        async with asyncio.timeout(timeout(10)):
            await lost.wait()
        await nc.publish("switchboard.test", b"pending")
        await close_nats(nc)
        assert nc.is_closed

    uvloop.run(scenario())


class _Refusing(tasks_pb2_grpc.TaskServiceServicer):
    async def Get(self, request, context):  # type: ignore[no-untyped-def]
        await ServiceError(Code.ERROR_CODE_RATE_LIMITED, "slow down", retry_after_ms=1500).abort(
            context
        )


async def test_typed_error_survives_a_grpc_hop_and_health_reports_serving() -> None:
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: tasks_pb2_grpc.add_TaskServiceServicer_to_server(_Refusing(), s),
        ["switchboard.v1.TaskService"],
    )
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await tasks_pb2_grpc.TaskServiceStub(channel).Get(
                    tasks_pb2.GetTaskRequest(task_id="t")
                )
            error = ServiceError.from_rpc_error(caught.value)
            assert error.code == Code.ERROR_CODE_RATE_LIMITED
            assert error.retry_after_ms == 1500 and error.retryable
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(
                health_pb2.HealthCheckRequest(service="switchboard.v1.TaskService")
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


async def test_a_new_channel_to_a_server_back_at_an_old_address_is_not_failed_by_an_old_one() -> (
    None
):
    # A channel left open to a server that is gone keeps its connection failing; a new
    # channel to a server started later on the same port must not share that connection
    # (gRPC's global subchannel pool would, and fail the new channel's first call at once).
    names = ["switchboard.v1.TaskService"]
    first = GrpcServer("127.0.0.1:0", lambda _server: None, names)
    await first.start()
    port = first.port
    request = health_pb2.HealthCheckRequest()
    async with insecure_channel(f"127.0.0.1:{port}") as old:
        await health_pb2_grpc.HealthStub(old).Check(request, timeout=timeout(5))
        await first.stop(0)
        async with asyncio.timeout(timeout(10)):
            while (state := old.get_state()) != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                await old.wait_for_state_change(state)
        second = GrpcServer(f"127.0.0.1:{port}", lambda _server: None, names)
        await second.start()
        try:
            async with insecure_channel(f"127.0.0.1:{port}") as new:
                reply = await health_pb2_grpc.HealthStub(new).Check(request, timeout=timeout(5))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await second.stop(0)


def test_full_jitter_doubles_its_ceiling_up_to_the_cap() -> None:
    random.seed(7)
    for attempt, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)):
        delays = [full_jitter(attempt, 0.5, 3.0) for _ in range(500)]
        assert min(delays) >= 0 and max(delays) <= ceiling
        assert max(delays) > 0.9 * ceiling  # drawn over the whole range, not a fixed step


async def test_a_jetstream_request_is_asked_again_while_the_cluster_forms() -> None:
    answers: list[BaseException | str] = [
        APIError(code=400, err_code=NO_PEERS_FOR_PLACEMENT, description="peer offline"),
        nats.errors.TimeoutError(),
        "created",
    ]

    async def request() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert await while_forming("SB_TEST", request) == "created"

    async def refused() -> str:
        raise APIError(code=400, err_code=10058, description="stream name already in use")

    with pytest.raises(APIError):  # any other refusal is final
        await while_forming("SB_TEST", refused)


def test_a_log_line_inside_a_span_carries_its_trace_id_and_outside_none() -> None:
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracing.use(provider, "test")
    formatter = JsonFormatter("test")

    def line() -> dict[str, object]:
        record = logging.LogRecord("test", logging.INFO, __file__, 1, "hello", None, None)
        return orjson.loads(formatter.format(record))  # type: ignore[no-any-return]

    try:
        with tracing.span("outer") as span:
            inside = line()
            child = tracing.start("child", tracing.traceparent(span))
            tracing.end(child, error="boom")
        outside = line()
    finally:
        tracing.shutdown()
    (child_span, outer) = exported.get_finished_spans()
    assert inside["trace_id"] == format(outer.context.trace_id, "032x")
    assert child_span.context.trace_id == outer.context.trace_id  # joined by traceparent
    assert child_span.status.description == "boom"
    assert "trace_id" not in outside
    assert not tracing.enabled() and tracing.start("off") is None


async def test_a_span_made_current_for_a_block_a_task_and_a_generators_steps_tags_their_lines() -> (
    None
):
    log = logging.getLogger("test.current")

    async def steps() -> AsyncGenerator[int, None]:
        try:
            for step in range(2):
                log.info("step")
                await asyncio.sleep(0)  # the step goes on across an await, still in its span
                yield step
        finally:
            log.info("closed")

    with in_memory_traces() as exported, json_lines("test.current") as logs:
        job = tracing.start("job")
        with tracing.current(job):
            log.info("block")
            with tracing.untraced():  # for what outlives the span
                log.info("untraced")
        log.info("outside")
        await asyncio.create_task(_logs("task"), context=tracing.context_with(job))
        with tracing.current(job):  # a task made for no span does not take its creator's
            await asyncio.create_task(_logs("other task"), context=tracing.context_with(None))
        seen = []
        async with aclosing(tracing.current_in(job, steps())) as events:
            async for _ in events:
                seen.append(tracing.current_trace_id())  # the consumer, between steps
                break  # closed early: its close runs in the span too
        log.info("after")
        tracing.end(job)
    (span,) = exported.get_finished_spans()
    traced = {line["msg"]: line.get("trace_id") for line in logs.lines}
    assert traced == {
        "block": trace_id(span),
        "untraced": None,
        "outside": None,
        "task": trace_id(span),
        "other task": None,
        "step": trace_id(span),
        "closed": trace_id(span),
        "after": None,
    }
    assert seen == [""]


def test_with_tracing_off_making_a_span_current_costs_nothing() -> None:
    assert not tracing.enabled()
    events = _no_events()
    assert tracing.current_in(None, events) is events  # not wrapped
    assert tracing.context_with(None) is None  # asyncio's own copy, nothing attached
    assert tracing.current(None) is tracing.untraced()  # one shared no-op
    assert tracing.only(None) is tracing.untraced()
    with tracing.current(None), tracing.untraced():
        assert tracing.current_trace_id() == ""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert tracing.trace_fields(traceparent) == {}  # off: no trace id in any line


def test_only_makes_a_span_current_or_none_and_trace_fields_name_a_traceparents_trace() -> None:
    log = logging.getLogger("test.only")
    with in_memory_traces(), json_lines("test.only") as logs:
        job, other = tracing.start("job"), tracing.start("other")
        with tracing.current(other):
            with tracing.only(job):
                log.info("job's")
            with tracing.only(None):
                log.info("nobody's")
            log.info("batch", extra=tracing.trace_fields(tracing.traceparent(job)))
        assert tracing.trace_fields("") == tracing.trace_fields("not a traceparent") == {}
        tracing.end(job)
        tracing.end(other)
    traced = {line["msg"]: line.get("trace_id") for line in logs.lines}
    job_trace = tracing.traceparent(job).split("-")[1]
    assert traced == {"job's": job_trace, "nobody's": None, "batch": job_trace}
    assert job_trace != tracing.traceparent(other).split("-")[1]


async def _logs(msg: str) -> None:
    logging.getLogger("test.current").info(msg)


async def _no_events() -> AsyncGenerator[int, None]:
    return
    yield  # pragma: no cover - makes this an async generator


async def test_a_stuck_shutdown_logs_what_each_task_waits_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = asyncio.Event()

    async def hand_over_forever() -> None:
        await stuck.wait()

    holder = asyncio.create_task(hand_over_forever(), name="shard 3")
    stop = asyncio.Event()
    watchdog = asyncio.create_task(report_slow_shutdown(stop, after_s=0.01))
    try:
        with caplog.at_level(logging.WARNING, logger="svckit.lifecycle"):
            stop.set()
            await watchdog
    finally:
        faulthandler.cancel_dump_traceback_later()
        await cancel_and_wait(holder, watchdog)
    [record] = [r for r in caplog.records if r.getMessage() == "shutdown still running"]
    [line] = [t for t in record.tasks if t.startswith("shard 3:")]  # type: ignore[attr-defined]
    assert "hand_over_forever" in line and "test_svckit.py" in line


async def test_a_cancel_lost_in_wait_for_is_made_again(caplog: pytest.LogCaptureFixture) -> None:
    """Python 3.11's wait_for returns the result when its future completes in the loop turn
    the cancel comes in; a loop of requests around it (nats-py's) goes on. A shutdown must
    still end it."""
    replies: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()

    async def requests_forever() -> None:
        while True:
            reply = asyncio.get_running_loop().create_future()
            replies.put_nowait(reply)
            await asyncio.wait_for(reply, 10)

    task = asyncio.create_task(requests_forever(), name="requests")
    (await replies.get()).set_result(None)  # the reply lands in the turn the cancel does
    with caplog.at_level(logging.WARNING, logger="svckit.lifecycle"):
        async with asyncio.timeout(timeout(5)):
            await cancel_and_wait(task, again_after_s=0.01)
    assert task.cancelled()
    if sys.version_info < (3, 12):  # 3.12's wait_for keeps the cancel
        assert replies.qsize() == 1  # the first cancel was lost: it asked again
        assert "a cancel was lost; cancelling again" in caplog.messages
