"""The TaskService servicer (tasks.proto): validation, then the job engine and the actors."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc

from svckit.catalog import ModelCatalog, job_of
from svckit.errors import ServiceError, rpc
from svckit.requests import (
    MAX_PROMPT_CHARS,
    InvalidRequest,
    check_submit,
    check_task_id,
    check_user,
)
from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
from task_svc.jobs import JobEngine, not_here
from task_svc.registry import forbidden
from task_svc.submit_mux import serve_submits
from task_svc.task_server import DROPPED, MOVED, TaskServer
from task_svc.task_state import TaskSpec, ends_task
from task_svc.watch_mux import serve_watch_many

log = logging.getLogger(__name__)

Code = common_pb2.ErrorCode
_QUEUE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class TaskService(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(
        self,
        engine: JobEngine,
        catalog: ModelCatalog,
        *,
        max_prompt_chars: int = MAX_PROMPT_CHARS,
        node: str = "",
    ) -> None:
        self.engine = engine
        self.catalog = catalog
        self.max_prompt_chars = max_prompt_chars
        # This node's id (config.node_id, as the membership has it): ListActiveTasks says
        # who answered, since the dashboard asks every node and merges their lists.
        self.node = node

    @rpc
    async def Submit(
        self, request: tasks_pb2.SubmitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.SubmitResponse:
        return await self.submit(request)

    async def SubmitMany(  # type: ignore[override]
        self,
        request_iterator: AsyncIterable[tasks_pb2.SubmitCommands],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await serve_submits(request_iterator, context, self.submit)

    async def submit(self, request: tasks_pb2.SubmitRequest) -> tasks_pb2.SubmitResponse:
        """Accept a task (both Submit and SubmitMany); raises ServiceError when refused."""
        check_submit(request, self.max_prompt_chars)
        resolved = await self.catalog.resolve(request.model)
        spec = TaskSpec.from_job(job_of(request, resolved), resolved.queue)
        state, duplicate = await self.engine.submit(spec)
        return tasks_pb2.SubmitResponse(state=state, duplicate=duplicate)

    async def Watch(
        self, request: tasks_pb2.WatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[tasks_pb2.WatchResponse]:
        try:
            async for response in self._watch(request):
                yield response
        except ServiceError as error:
            await error.abort(context)

    async def WatchMany(  # type: ignore[override]
        self,
        request_iterator: AsyncIterable[tasks_pb2.WatchCommands],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        await serve_watch_many(request_iterator, context, self._watch)

    async def _watch(
        self, request: tasks_pb2.WatchRequest
    ) -> AsyncIterator[tasks_pb2.WatchResponse]:
        check_task_id(request.task_id)
        check_user(request.user_id)
        await self.engine.check_owned(request.task_id)
        registry = self.engine.registry
        server = await self.engine.find(request.task_id)
        send_state = True
        if server is None:
            # Not submitted yet: the watcher's user claims the id and waits for the submit.
            claim = registry.claim(request.task_id, request.user_id)
            try:
                new = common_pb2.TaskState(task_id=request.task_id, user_id=request.user_id)
                yield tasks_pb2.WatchResponse(state=new)
                server = await claim.submitted
            finally:
                registry.release(claim)
            send_state = False
        if server.user_id != request.user_id:
            raise forbidden(request.task_id)
        if send_state:
            await self.engine.refresh_position(server)
        async for response in self._follow(server, request.after_seq, send_state):
            yield response

    async def _follow(
        self, server: TaskServer, after_seq: int, send_state: bool
    ) -> AsyncIterator[tasks_pb2.WatchResponse]:
        watcher, state, backlog = await server.subscribe(after_seq)
        try:
            if send_state:
                yield tasks_pb2.WatchResponse(state=state)
            for event in backlog:
                yield tasks_pb2.WatchResponse(event=event)
                if ends_task(event):
                    return
            if watcher is None:
                return
            while True:
                item = await watcher.get()
                if item is MOVED:
                    raise not_here(server.task_id)
                if item is DROPPED or not isinstance(item, tasks_pb2.TaskEvent):
                    raise ServiceError(
                        Code.ERROR_CODE_OVERLOADED,
                        "watcher fell behind; watch again with the last seq",
                    )
                yield tasks_pb2.WatchResponse(event=item)
                if ends_task(item):
                    return
        finally:
            if watcher is not None:
                server.unsubscribe(watcher)

    @rpc
    async def Cancel(
        self, request: tasks_pb2.CancelRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.CancelResponse:
        check_task_id(request.task_id)
        check_user(request.user_id)
        state = await self.engine.cancel(request.task_id, request.user_id)
        return tasks_pb2.CancelResponse(state=state)

    @rpc
    async def Get(
        self, request: tasks_pb2.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tasks_pb2.GetTaskResponse:
        check_task_id(request.task_id)
        check_user(request.user_id)
        state = await self.engine.state(request.task_id, request.user_id)
        return tasks_pb2.GetTaskResponse(state=state)

    # -- admin: the dead-letter queue ------------------------------------------------

    @rpc
    async def ListDeadLetters(
        self,
        request: tasks_pb2.ListDeadLettersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tasks_pb2.ListDeadLettersResponse:
        if request.limit < 0:
            raise InvalidRequest("limit must not be negative")
        letters = await self.engine.list_dead_letters(request.queue, request.limit)
        return tasks_pb2.ListDeadLettersResponse(dead_letters=letters)

    @rpc
    async def RequeueDeadLetter(
        self,
        request: tasks_pb2.RequeueDeadLetterRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tasks_pb2.RequeueDeadLetterResponse:
        check_task_id(request.task_id)
        state = await self.engine.requeue_dead_letter(request.task_id)
        return tasks_pb2.RequeueDeadLetterResponse(state=state)

    @rpc
    async def DiscardDeadLetter(
        self,
        request: tasks_pb2.DiscardDeadLetterRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tasks_pb2.DiscardDeadLetterResponse:
        check_task_id(request.task_id)
        discarded = await self.engine.discard_dead_letter(request.task_id)
        return tasks_pb2.DiscardDeadLetterResponse(discarded=discarded)

    # -- admin: what this node holds --------------------------------------------------

    @rpc
    async def ListActiveTasks(
        self,
        request: tasks_pb2.ListActiveTasksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tasks_pb2.ListActiveTasksResponse:
        if request.limit < 0:
            raise InvalidRequest("limit must not be negative")
        tasks = self.engine.active(request.limit)
        return tasks_pb2.ListActiveTasksResponse(tasks=tasks, node=self.node)

    # -- a user's own: what the user channel's delete_all cancels ------------------------

    @rpc
    async def ListUserTasks(
        self,
        request: tasks_pb2.ListUserTasksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tasks_pb2.ListUserTasksResponse:
        # An empty user must not mean "everyone's": the filter is the whole authorisation.
        check_user(request.user_id)
        if request.limit < 0:
            raise InvalidRequest("limit must not be negative")
        ids, more = self.engine.user_tasks(request.user_id, request.limit)
        return tasks_pb2.ListUserTasksResponse(task_ids=ids, more=more, node=self.node)
