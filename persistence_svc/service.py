"""HistoryService: reads of the history, each scoped to the calling user.

Another user's task answers NOT_FOUND exactly like a missing one, so a caller cannot learn
that a task id exists. The user id is the app's external id, as the gateway authenticated it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeAlias, TypeVar

import grpc

from persistence_svc.cursor import Cursor
from persistence_svc.errors import InvalidCursor, StorageRejected, StorageUnavailable
from persistence_svc.repository import Repository
from svckit.errors import Code, ServiceError, rpc
from switchboard.v1 import history_pb2, history_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class HistoryService(history_pb2_grpc.HistoryServiceServicer):
    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    @rpc
    async def GetTask(
        self, request: history_pb2.GetHistoryTaskRequest, context: Context
    ) -> history_pb2.HistoryTask:
        require_user(request.user_id)
        task = await call_storage(self.repository.get_task(request.task_id, request.user_id))
        if task is None:
            raise _not_found(request.task_id)
        return task

    @rpc
    async def ListTasks(
        self, request: history_pb2.ListTasksRequest, context: Context
    ) -> history_pb2.ListTasksResponse:
        require_user(request.user_id)
        if request.page_size < 0:
            raise ServiceError(Code.ERROR_CODE_INVALID_REQUEST, "page_size must be >= 0")
        after = None
        if request.cursor:
            try:
                after = Cursor.decode(request.cursor)
            except InvalidCursor as error:
                raise ServiceError(Code.ERROR_CODE_INVALID_REQUEST, str(error)) from None
        page = await call_storage(
            self.repository.list_tasks(request.user_id, request.page_size, after)
        )
        return history_pb2.ListTasksResponse(
            tasks=page.tasks,
            next_cursor=page.next_cursor.encode() if page.next_cursor else "",
        )

    @rpc
    async def GetTaskEvents(
        self, request: history_pb2.GetTaskEventsRequest, context: Context
    ) -> history_pb2.GetTaskEventsResponse:
        require_user(request.user_id)
        trail = await call_storage(
            self.repository.get_task_events(request.task_id, request.user_id)
        )
        if trail is None:
            raise _not_found(request.task_id)
        return history_pb2.GetTaskEventsResponse(events=trail)


def require_user(user_id: str) -> None:
    if not user_id or "\x00" in user_id:
        raise ServiceError(Code.ERROR_CODE_INVALID_REQUEST, "user_id is required")


def _not_found(task_id: str) -> ServiceError:
    return ServiceError(Code.ERROR_CODE_NOT_FOUND, f"task {task_id} not found")


async def call_storage(call: Awaitable[T]) -> T:
    """Await a repository read; storage failures become typed, retryable errors."""
    try:
        return await call
    except StorageUnavailable as error:
        log.warning("history store unavailable", extra={"error": str(error)})
        raise ServiceError(
            Code.ERROR_CODE_OVERLOADED, "history is unavailable, retry later"
        ) from error
    except StorageRejected as error:
        log.error("history store error", extra={"error": str(error)})
        raise ServiceError(Code.ERROR_CODE_INTERNAL, "history store error") from error
