"""Reading a task's history from persistence_svc in end-to-end tests. History is written
behind the hot path, so a read waits (bounded) until the task's row is terminal."""

from __future__ import annotations

import grpc

from svckit.grpc_server import insecure_channel
from switchboard.v1 import common_pb2, events_pb2, history_pb2, history_pb2_grpc
from tests.conftest import eventually
from tools.stack import Stack

TERMINAL = {
    common_pb2.TASK_STATUS_COMPLETED,
    common_pb2.TASK_STATUS_FAILED,
    common_pb2.TASK_STATUS_CANCELLED,
}


async def terminal_history(
    stack: Stack, task_id: str, user: str, seconds: float = 30
) -> tuple[history_pb2.HistoryTask, list[events_pb2.LifecycleEvent]]:
    """The task's row once it is terminal, and its event trail in seq order."""
    return await terminal_history_at(
        stack.config.address("persistence_svc"), task_id, user, seconds
    )


async def terminal_history_at(
    address: str, task_id: str, user: str, seconds: float = 30
) -> tuple[history_pb2.HistoryTask, list[events_pb2.LifecycleEvent]]:
    """`terminal_history`, from the persistence_svc at `address`."""
    async with insecure_channel(address) as channel:
        history = history_pb2_grpc.HistoryServiceStub(channel)

        async def terminal_row() -> history_pb2.HistoryTask | None:
            try:
                task: history_pb2.HistoryTask = await history.GetTask(
                    history_pb2.GetHistoryTaskRequest(task_id=task_id, user_id=user)
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:  # not written yet
                    raise
                return None
            return task if task.status in TERMINAL else None

        task = await eventually(terminal_row, seconds)
        trail = await history.GetTaskEvents(
            history_pb2.GetTaskEventsRequest(task_id=task_id, user_id=user)
        )
        return task, list(trail.events)
