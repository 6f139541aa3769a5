"""HistoryService: the history, read and deleted, each call scoped to the calling user.

Another user's task answers NOT_FOUND exactly like a missing one (a delete of it: deleted =
false, nothing touched), so a caller cannot learn that a task id exists. The user id is the
app's external id, as the gateway authenticated it. Every call reaches the database through
`call_storage`: while it is down, each answers UNAVAILABLE, retryable, with a retry-after.

DeleteAllTasks also tombstones the user's tasks whose events are still on their way to the
database (backlog.py): without JetStream to read them from, it answers UNAVAILABLE too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, TypeAlias, TypeVar

import grpc

from persistence_svc.backlog import Backlog, BacklogUnavailable
from persistence_svc.cursor import Cursor
from persistence_svc.errors import InvalidCursor, StorageRejected, StorageUnavailable
from persistence_svc.events import STATUS_NAMES
from persistence_svc.repository import Repository
from svckit.errors import Code, ServiceError, rpc
from switchboard.v1 import common_pb2, history_pb2, history_pb2_grpc

log = logging.getLogger(__name__)

# The retry-after of a call refused while the database is down: about the consumer's first
# back-off, so that a client retrying then finds it back as soon as the writes do.
RETRY_AFTER_MS = 1000

T = TypeVar("T")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class HistoryService(history_pb2_grpc.HistoryServiceServicer):
    def __init__(self, repository: Repository, backlog: Backlog | None = None) -> None:
        self.repository = repository
        # None: no JetStream (tests of the database alone): DeleteAllTasks removes rows only.
        self.backlog = backlog

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
        if request.preview_chars < 0:
            raise ServiceError(Code.ERROR_CODE_INVALID_REQUEST, "preview_chars must be >= 0")
        status = ""
        if request.status != common_pb2.TASK_STATUS_UNSPECIFIED:
            status = STATUS_NAMES.get(request.status, "")
            if not status:
                raise ServiceError(
                    Code.ERROR_CODE_INVALID_REQUEST, f"unknown status {request.status}"
                )
        after = None
        if request.cursor:
            try:
                after = Cursor.decode(request.cursor)
            except InvalidCursor as error:
                raise ServiceError(Code.ERROR_CODE_INVALID_REQUEST, str(error)) from None
        page = await call_storage(
            self.repository.list_tasks(
                request.user_id,
                request.page_size,
                after,
                status=status,
                preview_chars=request.preview_chars,
            )
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

    @rpc
    async def CountTasks(
        self, request: history_pb2.CountTasksRequest, context: Context
    ) -> history_pb2.CountTasksResponse:
        require_user(request.user_id)
        counts = await call_storage(self.repository.count_tasks(request.user_id))
        return history_pb2.CountTasksResponse(by_status=counts, total=sum(counts.values()))

    @rpc
    async def DeleteTask(
        self, request: history_pb2.DeleteTaskRequest, context: Context
    ) -> history_pb2.DeleteTaskResponse:
        require_user(request.user_id)
        deleted = await call_storage(self.repository.delete_task(request.task_id, request.user_id))
        return history_pb2.DeleteTaskResponse(deleted=deleted)

    @rpc
    async def DeleteAllTasks(
        self, request: history_pb2.DeleteAllTasksRequest, context: Context
    ) -> history_pb2.DeleteAllTasksResponse:
        require_user(request.user_id)
        in_flight = await self._in_flight(request.user_id)
        deleted = await call_storage(self.repository.delete_all_tasks(request.user_id, in_flight))
        return history_pb2.DeleteAllTasksResponse(deleted=deleted)

    async def _in_flight(self, user_id: str) -> set[str]:
        """The user's tasks with events not written yet (before the delete's transaction: a
        task first published after this read is newer than the delete, and kept)."""
        if self.backlog is None:
            return set()
        try:
            return await self.backlog.tasks_of(user_id)
        except BacklogUnavailable as error:
            log.warning("lifecycle backlog unreadable", extra={"error": str(error)})
            raise ServiceError(
                Code.ERROR_CODE_UNAVAILABLE,
                "history cannot see the tasks on their way, retry later",
                retry_after_ms=RETRY_AFTER_MS,
            ) from error


def require_user(user_id: str) -> None:
    if not user_id or "\x00" in user_id:
        raise ServiceError(Code.ERROR_CODE_INVALID_REQUEST, "user_id is required")


def _not_found(task_id: str) -> ServiceError:
    return ServiceError(Code.ERROR_CODE_NOT_FOUND, f"task {task_id} not found")


async def call_storage(call: Awaitable[T]) -> T:
    """Await a repository call (HistoryService's and UserService's, reads and deletes alike):
    a database that cannot be reached becomes UNAVAILABLE, retryable, with RETRY_AFTER_MS in
    the typed error details (svckit.errors), which the gateway passes on to the app."""
    try:
        return await call
    except StorageUnavailable as error:
        log.warning("history store unavailable", extra={"error": str(error)})
        raise ServiceError(
            Code.ERROR_CODE_UNAVAILABLE,
            "history is unavailable, retry later",
            retry_after_ms=RETRY_AFTER_MS,
        ) from error
    except StorageRejected as error:
        log.error("history store error", extra={"error": str(error)})
        raise ServiceError(Code.ERROR_CODE_INTERNAL, "history store error") from error
