"""The acks' own path (gateway_svc/direct_submit.py): the gateway stores a new task's job in
JetStream itself (a real nats-server) and estimates the ack from task_svc's QueueBoard; a
task that is not known to be new goes to TaskService.Submit (the fake)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client
from websockets.asyncio.client import connect

from gateway_svc.direct_submit import BOARD_STALE_S, DirectSubmit, QueueBoard
from svckit.catalog import ModelCatalog
from svckit.direct_publisher import DirectPublisher
from svckit.errors import ServiceError
from svckit.nats import (
    JOBS_STREAM,
    QUEUE_BOARD_SUBJECT,
    connect_nats,
)
from svckit.shards import job_subject, shard_of
from switchboard.v1 import common_pb2, events_pb2, llm_pb2, tasks_pb2
from tests.conftest import eventually, publish_until_heard, timeout
from tests.gateway.fake_tasks import FakeTask
from tests.gateway.live import recv, running_stack, send, topic
from tools.natsserver import NatsServer

Code = common_pb2.ErrorCode


def stats(queue: str = "default", **fields: Any) -> events_pb2.QueueStats:
    values: dict[str, Any] = {"concurrency": 2, "mean_run_s": 1.0, "max_depth": 10}
    values.update(fields)
    return events_pb2.QueueStats(queue=queue, **values)


def test_the_board_estimates_position_and_eta_and_counts_what_it_stored() -> None:
    board = QueueBoard()
    board.heard(events_pb2.QueueBoard(queues=[stats(waiting_by_priority=[3, 0, 2])]), now=0)
    # Priority 1 goes behind the 3 at priority 0 only (the 2 at priority 2 come later).
    assert board.stored("default", 1, now=1) == (4, 2000)  # 2 rounds of 1 s on 2 slots
    assert board.stored("default", 1, now=1) == (5, 3000)  # the one stored since counts
    assert board.stored("other", 0, now=1) == (1, 0)  # a queue the board does not know


def test_a_full_queue_is_refused_with_a_retry_after_and_a_stale_board_refuses_nothing() -> None:
    board = QueueBoard()
    board.heard(events_pb2.QueueBoard(queues=[stats(waiting_by_priority=[10])]), now=0)
    refusal = board.refusal("default", now=1)
    assert refusal is not None and refusal.code == Code.ERROR_CODE_OVERLOADED
    assert refusal.retryable and refusal.retry_after_ms >= 1000
    assert board.refusal("default", now=BOARD_STALE_S + 1) is None
    assert board.stored("default", 0, now=BOARD_STALE_S + 1) == (1, 0)


class Models:
    """llm_svc's ListModels, as the catalogue calls it."""

    async def ListModels(self, request: Any, timeout: float | None = None) -> Any:
        return llm_pb2.ListModelsResponse(
            models=[
                llm_pb2.ModelInfo(id="small", queue="fast", is_default=True),
                llm_pb2.ModelInfo(id="big", queue="slow"),
            ]
        )


@pytest.fixture(params=["nats-py", "own connection"])
async def direct(
    request: pytest.FixtureRequest, nats_url: str, jobs_nc: Client
) -> AsyncIterator[DirectSubmit]:
    """The acks' path storing jobs through nats-py, or through its own connection
    (svckit/direct_publisher.py, as gateway_svc runs it)."""
    gateway_nc = await connect_nats(nats_url, "gateway")
    own = DirectPublisher(nats_url, "test acks") if request.param == "own connection" else None
    catalog = ModelCatalog(Models())  # type: ignore[arg-type]
    submit = DirectSubmit(gateway_nc, catalog, publisher=own)
    await submit.start()
    try:
        if own is not None:
            async with asyncio.timeout(timeout(10)):
                await own.wait_connected()
        yield submit
    finally:
        await submit.close()


def request(task_id: str = "t-1", model: str = "") -> tasks_pb2.SubmitRequest:
    return tasks_pb2.SubmitRequest(
        task_id=task_id, user_id="alice", prompt="hello", model=model, priority=2
    )


async def test_the_job_is_stored_once_with_its_resolved_model_and_queue(
    direct: DirectSubmit, jobs_nc: Client
) -> None:
    response = await direct.submit(request("t-1", model="big"))
    assert response is not None and not response.duplicate
    assert response.state.status == common_pb2.TASK_STATUS_QUEUED
    assert response.state.model == "big" and response.state.queue_position == 1
    stored = await jobs_nc.jetstream().get_last_msg(
        JOBS_STREAM, job_subject(shard_of("t-1"), "slow")
    )
    job = events_pb2.Job.FromString(stored.data or b"")
    assert (job.task_id, job.user_id, job.prompt, job.model) == ("t-1", "alice", "hello", "big")
    assert job.priority == 2 and job.submitted_at.seconds > 0
    assert (stored.headers or {}).get("Nats-Msg-Id") == "t-1"
    # Stored before: task_svc must answer (None), and nothing is stored twice.
    assert await direct.submit(request("t-1", model="big")) is None
    assert (await jobs_nc.jetstream().stream_info(JOBS_STREAM)).state.messages == 1


async def test_an_unknown_model_and_a_full_queue_are_refused_before_anything_is_stored(
    direct: DirectSubmit, jobs_nc: Client
) -> None:
    with pytest.raises(ServiceError) as unknown:
        await direct.submit(request("t-2", model="nope"))
    assert unknown.value.code == Code.ERROR_CODE_MODEL_NOT_FOUND
    full = events_pb2.QueueBoard(queues=[stats("fast", waiting_by_priority=[10])])
    await publish_until_heard(
        jobs_nc,
        [(QUEUE_BOARD_SUBJECT, full.SerializeToString())],
        lambda: direct.board.fresh("fast", now=time.monotonic()) is not None,
    )
    with pytest.raises(ServiceError) as overloaded:
        await direct.submit(request("t-3"))
    assert overloaded.value.code == Code.ERROR_CODE_OVERLOADED
    assert (await jobs_nc.jetstream().stream_info(JOBS_STREAM)).state.messages == 0


async def test_without_a_stream_the_job_is_left_to_task_svc(
    direct: DirectSubmit, jobs_nc: Client
) -> None:
    await jobs_nc.jetstream().delete_stream(JOBS_STREAM)
    assert await direct.submit(request("t-4")) is None


async def test_only_the_first_push_on_a_new_task_is_stored_by_the_gateway(
    direct: DirectSubmit, jobs_nc: Client
) -> None:
    async with running_stack(direct=direct) as stack, connect(stack.url()) as ws:
        new = topic()
        await send(ws, ["1", "1", new, "phx_join", {}])
        assert (await recv(ws))[4]["response"] == {"status": "new"}
        await send(ws, ["1", "2", new, "llm_generate", {"prompt": "hi"}])
        ack = await recv(ws)
        assert ack[4]["status"] == "ok" and ack[4]["response"]["status"] == "queued"
        assert stack.fake.submits == []  # stored here, not by task_svc
        assert stack.metric("switchboard_ack_store_seconds_count") == 1
        subject = job_subject(shard_of(new.split(":")[1]), "fast")
        stored = await jobs_nc.jetstream().get_last_msg(JOBS_STREAM, subject)
        assert events_pb2.Job.FromString(stored.data or b"").task_id == new.split(":")[1]
        # Pushed again on the same channel: task_svc answers (idempotency is its job).
        await send(ws, ["1", "3", new, "llm_generate", {"prompt": "hi"}])
        await recv(ws)
        assert [s.task_id for s in stack.fake.submits] == [new.split(":")[1]]
        assert stack.metric("switchboard_ack_store_seconds_count") == 1  # that one not here
        assert stack.metric("switchboard_ack_seconds_count") == 2


async def test_a_task_the_join_found_submitted_goes_to_task_svc(
    direct: DirectSubmit, jobs_nc: Client
) -> None:
    async with running_stack(direct=direct) as stack:
        known = topic()
        task_id = known.split(":")[1]
        state = common_pb2.TaskState(
            task_id=task_id, user_id="alice", status=common_pb2.TASK_STATUS_QUEUED
        )
        stack.fake.tasks[task_id] = FakeTask(state)
        async with connect(stack.url()) as ws:
            await send(ws, ["1", "1", known, "phx_join", {}])
            assert (await recv(ws))[4]["response"]["status"] == "queued"
            await send(ws, ["1", "2", known, "llm_generate", {"prompt": "hi"}])
            await recv(ws)
        assert [s.task_id for s in stack.fake.submits] == [task_id]
        assert (await jobs_nc.jetstream().stream_info(JOBS_STREAM)).state.messages == 0


async def test_with_nats_away_the_job_is_left_to_task_svc_at_once(
    nats_server: NatsServer, direct: DirectSubmit
) -> None:
    nats_server.stop()

    async def disconnected() -> bool:
        return not direct.nc.is_connected

    await eventually(disconnected)
    async with asyncio.timeout(timeout(10)):
        assert await direct.submit(request("t-5")) is None
    # Not even tried (it would wait in the reconnect buffer for a PubAck that cannot come).
    assert direct.nc.pending_data_size == 0
