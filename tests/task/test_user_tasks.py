"""ListUserTasks (what the user channel's delete_all cancels): one user's tasks a node holds
that have not ended, never another user's, for any service (not only the admin), over real
gRPC with a real nats-server and the fake LlmService; and a Cancel of each returns only once
its CANCELLED lifecycle event is stored in JetStream (what lets history's delete_all, asked
next, find and tombstone it)."""

from __future__ import annotations

import grpc
import pytest
from nats.aio.client import Client

from svckit.grpc_server import insecure_channel
from svckit.nats import TASK_EVENTS_STREAM, TASK_EVENTS_SUBJECT_PREFIX
from switchboard.v1 import common_pb2, events_pb2, tasks_pb2, tasks_pb2_grpc
from task_svc.app import TaskApp
from tests.conftest import timeout
from tests.task.conftest import AppFactory, Observed, new_id, submit
from tests.task.test_admin import error_of, progressed

Code = common_pb2.ErrorCode
Kind = events_pb2.LifecycleKind
Stub = tasks_pb2_grpc.TaskServiceStub


async def listed(stub: Stub, user: str, limit: int = 0) -> tasks_pb2.ListUserTasksResponse:
    request = tasks_pb2.ListUserTasksRequest(user_id=user, limit=limit)
    reply: tasks_pb2.ListUserTasksResponse = await stub.ListUserTasks(request, timeout=timeout(5))
    return reply


async def test_a_users_list_holds_their_unfinished_tasks_only(
    make_app: AppFactory, nc: Client
) -> None:
    app = await make_app(task_concurrency=1)
    observed = Observed(app)
    # This process's own service token: a service, not the operator, may ask for one user's
    # tasks.
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = Stub(channel)
        finished, running, queued, bobs = new_id(), new_id(), new_id(), new_id()
        await submit(stub, finished, prompt="over already")
        await observed.wait("finished", finished)
        await submit(stub, running, prompt="hold the line")
        await progressed(stub, running)
        await submit(stub, queued, prompt="hold, waiting its turn")
        await submit(stub, bobs, user="bob", prompt="hold, bob waits too")
        await observed.wait("scheduled", bobs)

        alices = await listed(stub, "alice")
        assert set(alices.task_ids) == {running, queued} and not alices.more
        assert list((await listed(stub, "bob")).task_ids) == [bobs]
        assert list((await listed(stub, "carol")).task_ids) == []
        one = await listed(stub, "alice", limit=1)
        assert len(one.task_ids) == 1 and one.more
        assert set(one.task_ids) <= {running, queued}

        for bad in (
            tasks_pb2.ListUserTasksRequest(user_id=""),  # never "everyone's"
            tasks_pb2.ListUserTasksRequest(user_id="alice", limit=-1),
        ):
            error = await error_of(stub.ListUserTasks(bad))
            assert error.code == Code.ERROR_CODE_INVALID_REQUEST

        # Cancelled one by one, as delete_all does: each Cancel returns after its task's
        # CANCELLED event is in JetStream (read at once, without waiting for it).
        js = nc.jetstream()
        for task_id in alices.task_ids:
            cancel = tasks_pb2.CancelRequest(task_id=task_id, user_id="alice")
            state = (await stub.Cancel(cancel, timeout=timeout(10))).state
            assert state.status == common_pb2.TASK_STATUS_CANCELLED
            stored = await js.get_last_msg(
                TASK_EVENTS_STREAM, f"{TASK_EVENTS_SUBJECT_PREFIX}.{task_id}.cancelled"
            )
            assert stored.data is not None
            event = events_pb2.LifecycleEvent.FromString(stored.data)
            assert (event.task_id, event.kind) == (task_id, Kind.LIFECYCLE_KIND_CANCELLED)
        assert list((await listed(stub, "alice")).task_ids) == []
        assert list((await listed(stub, "bob")).task_ids) == [bobs]  # untouched


async def test_a_call_without_a_service_token_is_refused(app: TaskApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        call = Stub(channel).ListUserTasks(tasks_pb2.ListUserTasksRequest(user_id="alice"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
