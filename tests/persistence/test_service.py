"""HistoryService over a real grpc.aio server on port 0, on both databases."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest

from persistence_svc.repository import Repository
from persistence_svc.server import SERVICE_NAME
from persistence_svc.service import HistoryService
from svckit.errors import Code, ServiceError
from svckit.grpc_server import GrpcServer, insecure_channel
from switchboard.v1 import common_pb2, history_pb2, history_pb2_grpc
from tests.conftest import timeout
from tests.persistence.factory import T0, completed_lifecycle, new_task_id


@pytest.fixture
async def history(repository: Repository) -> AsyncIterator[history_pb2_grpc.HistoryServiceStub]:
    service = HistoryService(repository)
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: history_pb2_grpc.add_HistoryServiceServicer_to_server(service, s),
        [SERVICE_NAME],
    )
    await server.start()
    channel = insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield history_pb2_grpc.HistoryServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def rpc_error(call: object) -> ServiceError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return ServiceError.from_rpc_error(caught.value)


async def test_get_task_and_its_events(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    task_id = new_task_id()
    await repository.apply(completed_lifecycle(task_id))
    task = await history.GetTask(
        history_pb2.GetHistoryTaskRequest(task_id=task_id, user_id="alice"), timeout=timeout(5)
    )
    assert (task.task_id, task.user_id, task.status) == (
        task_id,
        "alice",
        common_pb2.TASK_STATUS_COMPLETED,
    )
    assert task.response == "Rayleigh."
    trail = await history.GetTaskEvents(
        history_pb2.GetTaskEventsRequest(task_id=task_id, user_id="alice"), timeout=timeout(5)
    )
    assert [e.seq for e in trail.events] == [1, 2, 7]
    assert trail.events[2].content == "Rayleigh."


async def test_another_users_task_is_not_found_like_a_missing_one(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    task_id = new_task_id()
    await repository.apply(completed_lifecycle(task_id, user="alice"))
    for request_task, user in [(task_id, "bob"), (new_task_id(), "alice")]:
        error = await rpc_error(
            history.GetTask(
                history_pb2.GetHistoryTaskRequest(task_id=request_task, user_id=user),
                timeout=timeout(5),
            )
        )
        assert error.code == Code.ERROR_CODE_NOT_FOUND
        error = await rpc_error(
            history.GetTaskEvents(
                history_pb2.GetTaskEventsRequest(task_id=request_task, user_id=user),
                timeout=timeout(5),
            )
        )
        assert error.code == Code.ERROR_CODE_NOT_FOUND


async def test_list_tasks_pages_through_cursor(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    ids = []
    for minute in range(5):
        task_id = new_task_id()
        await repository.apply(completed_lifecycle(task_id, at=T0 + timedelta(minutes=minute)))
        ids.append(task_id)
    await repository.apply(completed_lifecycle(new_task_id(), user="bob"))
    seen: list[str] = []
    cursor = ""
    while True:
        page = await history.ListTasks(
            history_pb2.ListTasksRequest(user_id="alice", page_size=2, cursor=cursor),
            timeout=timeout(5),
        )
        seen += [t.task_id for t in page.tasks]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert seen == list(reversed(ids))


@pytest.mark.parametrize(
    "request_",
    [
        history_pb2.ListTasksRequest(user_id="alice", cursor="garbage!"),
        history_pb2.ListTasksRequest(user_id="alice", page_size=-1),
        history_pb2.ListTasksRequest(user_id=""),
    ],
)
async def test_bad_list_requests_are_invalid(
    history: history_pb2_grpc.HistoryServiceStub, request_: history_pb2.ListTasksRequest
) -> None:
    error = await rpc_error(history.ListTasks(request_, timeout=timeout(5)))
    assert error.code == Code.ERROR_CODE_INVALID_REQUEST
    assert error.kind.status == grpc.StatusCode.INVALID_ARGUMENT


async def test_database_down_is_a_retryable_unavailable() -> None:
    repo = await Repository.open("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    service = HistoryService(repo)
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: history_pb2_grpc.add_HistoryServiceServicer_to_server(service, s),
        [SERVICE_NAME],
    )
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = history_pb2_grpc.HistoryServiceStub(channel)
            error = await rpc_error(
                stub.ListTasks(history_pb2.ListTasksRequest(user_id="alice"), timeout=timeout(10))
            )
        assert error.kind.status == grpc.StatusCode.UNAVAILABLE
        assert error.retryable
    finally:
        await server.stop(0)
        await repo.close()
