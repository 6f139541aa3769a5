"""The operator dashboard's TaskService calls (admin only): ListActiveTasks (what a node holds
that has not ended, without its text) and DiscardDeadLetter (a dead letter dropped for good),
over real gRPC with a real nats-server and the fake LlmService; and the engine discarding a
dead letter of a shard it does not hold (the dead-letter stream is shared)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import grpc
import pytest

from svckit.errors import ServiceError
from svckit.grpc_server import GrpcServer, insecure_channel
from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
from task_svc.app import SERVICE_NAME, TaskApp
from task_svc.config import Settings, engine_config, node_id
from task_svc.jobs import JobEngine
from task_svc.memory_store import MemoryJobStore
from task_svc.service import TaskService
from tests.conftest import timeout
from tests.task.conftest import (
    AppFactory,
    FakeLlm,
    Observed,
    Status,
    kind,
    new_id,
    submit,
    watch_all,
)
from tests.task.fakes import Recorder, ScriptedLlm

Code = common_pb2.ErrorCode
Stub = tasks_pb2_grpc.TaskServiceStub


async def error_of(awaitable: Awaitable[object]) -> ServiceError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return ServiceError.from_rpc_error(caught.value)


@pytest.fixture
async def admin(app: TaskApp) -> AsyncIterator[Stub]:
    """The app's TaskService as an operator calls it (an `admin` service token)."""
    async with insecure_channel(f"127.0.0.1:{app.port}", caller="admin") as channel:
        yield Stub(channel)


async def progressed(stub: Stub, task_id: str) -> None:
    """Return once the task's run has reported progress (its text has started)."""
    request = tasks_pb2.WatchRequest(task_id=task_id, user_id="alice")
    async with asyncio.timeout(timeout(10)):
        async for response in stub.Watch(request):
            event = response.event
            if (
                response.HasField("event")
                and kind(event) == "processing"
                and event.progress.progress
            ):
                return
    raise AssertionError(f"{task_id} ended before it progressed")


async def test_active_tasks_are_the_running_and_the_queued_newest_first_without_text(
    make_app: AppFactory, fake_llm: FakeLlm
) -> None:
    app = await make_app(task_concurrency=1)
    observed = Observed(app)
    async with insecure_channel(f"127.0.0.1:{app.port}", caller="admin") as channel:
        stub = Stub(channel)
        finished, running, queued = new_id(), new_id(), new_id()
        await submit(stub, finished, prompt="over already")
        await observed.wait("finished", finished)
        await submit(stub, running, prompt="hold the line", priority=2)
        await progressed(stub, running)  # "hold" streamed, progress 1/3
        await submit(stub, queued, user="bob", prompt="waits its turn", model="fake-large")
        await observed.wait("scheduled", queued)

        reply = await stub.ListActiveTasks(tasks_pb2.ListActiveTasksRequest())
        assert [t.task_id for t in reply.tasks] == [queued, running]  # newest update first
        waiting, busy = reply.tasks
        assert (waiting.status, waiting.user_id, waiting.model) == (
            Status.TASK_STATUS_QUEUED,
            "bob",
            "fake-large",
        )
        assert waiting.queue_position == 1 and waiting.attempts == 0 and waiting.seq >= 1
        assert (busy.status, busy.user_id, busy.model) == (
            Status.TASK_STATUS_PROCESSING,
            "alice",
            "fake-small",
        )
        assert busy.progress == pytest.approx(1 / 3) and busy.attempts == 1
        assert busy.priority == 2 and busy.prompt == "hold the line"
        # The text is there (Get shows it), but not in the operator's list.
        get = tasks_pb2.GetTaskRequest(task_id=running, user_id="alice")
        assert (await stub.Get(get)).state.content == "hold"
        assert busy.seq == (await stub.Get(get)).state.seq
        assert [t.content for t in reply.tasks] == ["", ""]
        assert not any(t.HasField("completed_at") for t in reply.tasks)

        newest = await stub.ListActiveTasks(tasks_pb2.ListActiveTasksRequest(limit=1))
        assert [t.task_id for t in newest.tasks] == [queued]
        bad = stub.ListActiveTasks(tasks_pb2.ListActiveTasksRequest(limit=-1))
        assert (await error_of(bad)).code == Code.ERROR_CODE_INVALID_REQUEST

        fake_llm.release(running)
        await observed.wait("finished", queued)
        after = await stub.ListActiveTasks(tasks_pb2.ListActiveTasksRequest())
        assert list(after.tasks) == []


async def test_active_tasks_say_which_node_answered(app: TaskApp) -> None:
    """The servicer reports the node it is given (a servicer of its own on the app's engine,
    as the app's own does not name it yet: see the next test)."""
    service = TaskService(app.engine, app.catalog, node=node_id(app.settings))
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: tasks_pb2_grpc.add_TaskServiceServicer_to_server(service, s),
        [SERVICE_NAME],
    )
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}", caller="admin") as channel:
            reply = await Stub(channel).ListActiveTasks(tasks_pb2.ListActiveTasksRequest())
    finally:
        await server.stop(0)
    assert reply.node == node_id(app.settings) == "test-node"


async def test_the_apps_active_tasks_name_its_node(app: TaskApp, admin: Stub) -> None:
    reply = await admin.ListActiveTasks(tasks_pb2.ListActiveTasksRequest())
    assert reply.node == node_id(app.settings)


async def test_a_discarded_dead_letter_is_gone_for_good_and_its_task_stays_failed(
    make_app: AppFactory,
) -> None:
    # "flaky" fails twice with RATE_LIMITED: with two attempts, a dead letter.
    app = await make_app(task_max_attempts=2, task_retry_base_s=0.01)
    observed = Observed(app)
    async with insecure_channel(f"127.0.0.1:{app.port}", caller="admin") as channel:
        stub = Stub(channel)
        task_id, kept = new_id(), new_id()
        for each in (task_id, kept):
            await submit(stub, each, prompt="flaky answer")
            await observed.wait("dead", each)
        listed = await stub.ListDeadLetters(tasks_pb2.ListDeadLettersRequest())
        assert {d.task_id for d in listed.dead_letters} == {task_id, kept}

        discard = tasks_pb2.DiscardDeadLetterRequest(task_id=task_id)
        assert (await stub.DiscardDeadLetter(discard)).discarded
        listed = await stub.ListDeadLetters(tasks_pb2.ListDeadLettersRequest())
        assert [d.task_id for d in listed.dead_letters] == [kept]  # only that one went
        requeue = stub.RequeueDeadLetter(tasks_pb2.RequeueDeadLetterRequest(task_id=task_id))
        assert (await error_of(requeue)).code == Code.ERROR_CODE_NOT_FOUND
        again = await stub.DiscardDeadLetter(discard)
        assert not again.discarded  # there was none

        state = await stub.Get(tasks_pb2.GetTaskRequest(task_id=task_id, user_id="alice"))
        assert state.state.status == Status.TASK_STATUS_FAILED
        assert state.state.error.code == Code.ERROR_CODE_RATE_LIMITED
        never = tasks_pb2.DiscardDeadLetterRequest(task_id=new_id())
        assert not (await stub.DiscardDeadLetter(never)).discarded
        garbled = stub.DiscardDeadLetter(tasks_pb2.DiscardDeadLetterRequest(task_id="nope"))
        assert (await error_of(garbled)).code == Code.ERROR_CODE_INVALID_REQUEST
        # The one kept still runs again.
        requeued = await stub.RequeueDeadLetter(tasks_pb2.RequeueDeadLetterRequest(task_id=kept))
        assert requeued.state.status != Status.TASK_STATUS_FAILED
        # Followed to its end (the watch may open after it: then its state is all it gets).
        await watch_all(stub, kept, after_seq=requeued.state.seq)
        done = await stub.Get(tasks_pb2.GetTaskRequest(task_id=kept, user_id="alice"))
        assert done.state.status == Status.TASK_STATUS_COMPLETED
        assert done.state.content == "flaky answer"


async def test_any_node_may_discard_a_dead_letter() -> None:
    """An engine holding no shard at all (a node just joined) discards, where it may not
    requeue (that runs the task, which is its shard owner's to do)."""
    store = MemoryJobStore()
    engine = JobEngine(store, Recorder(store), ScriptedLlm(), engine_config(Settings()))
    await engine.start(shards=())
    try:
        task_id = new_id()
        store.letters[task_id] = tasks_pb2.DeadLetter(task_id=task_id, user_id="alice")
        with pytest.raises(ServiceError) as caught:
            await engine.requeue_dead_letter(task_id)
        assert caught.value.code == Code.ERROR_CODE_UNAVAILABLE  # another node's shard
        assert await engine.discard_dead_letter(task_id)
        assert store.letters == {}
        assert not await engine.discard_dead_letter(task_id)
    finally:
        await engine.shutdown(0)


@pytest.mark.parametrize(
    "call",
    [
        lambda stub: stub.ListActiveTasks(tasks_pb2.ListActiveTasksRequest()),
        lambda stub: stub.DiscardDeadLetter(tasks_pb2.DiscardDeadLetterRequest(task_id=new_id())),
    ],
    ids=["ListActiveTasks", "DiscardDeadLetter"],
)
async def test_the_new_admin_calls_refuse_a_service_that_is_not_the_admin(stub, call) -> None:
    """`stub` carries this process's own service token (a service, not the operator)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(stub)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
