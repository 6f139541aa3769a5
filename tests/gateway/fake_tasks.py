"""A small in-memory TaskService with task_svc's task semantics (docs/architecture.md), for
tests of the gateway over a real gRPC server. Tests drive it: `run(task_id)` plays a short
generation, `break_streams()` aborts every Watch as a task_svc restart would."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
from task_svc.submit_mux import serve_submits
from task_svc.watch_mux import serve_watch_many

Status = common_pb2.TaskStatus
Code = common_pb2.ErrorCode
TERMINAL = {Status.TASK_STATUS_COMPLETED, Status.TASK_STATUS_FAILED, Status.TASK_STATUS_CANCELLED}


@dataclass
class FakeTask:
    state: common_pb2.TaskState
    events: list[tasks_pb2.TaskEvent] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    breaks: int = 0
    sent_seq: int = 0  # the highest seq any Watch of this task has handed to gRPC

    @property
    def terminal(self) -> bool:
        return self.state.status in TERMINAL

    async def emit(self, **kind: object) -> tasks_pb2.TaskEvent:
        self.state.seq += 1
        event = tasks_pb2.TaskEvent(task_id=self.state.task_id, seq=self.state.seq, **kind)  # type: ignore[arg-type]
        which = event.WhichOneof("kind")
        if which == "progress":
            self.state.status = event.progress.status
            self.state.progress = max(self.state.progress, event.progress.progress)
        elif which == "chunk":
            self.state.content += event.chunk.delta
        elif which == "completed":
            self.state.status = Status.TASK_STATUS_COMPLETED
            self.state.content = event.completed.content
            self.state.model = event.completed.model
            self.state.usage.CopyFrom(event.completed.usage)
            self.state.finish_reason = event.completed.finish_reason
            self.state.progress = 1.0
        elif which == "error":
            self.state.status = Status.TASK_STATUS_FAILED
            self.state.error.CopyFrom(event.error)
        self.events.append(event)
        async with self.changed:
            self.changed.notify_all()
        return event


class OneCall:
    """The context the fake's Watch and Submit see inside WatchMany and SubmitMany: an abort
    ends that one call, with the typed error (as task_svc's own calls end)."""

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):  # type: ignore[no-untyped-def]
        raise ServiceError.from_status(code, details, trailing_metadata)


class FakeTasks(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self) -> None:
        self.tasks: dict[str, FakeTask] = {}
        self.submits: list[tasks_pb2.SubmitRequest] = []
        self.watches: list[tasks_pb2.WatchRequest] = []
        self.refuse_submit: ServiceError | None = None
        self.auto_run = False  # play the generation right after each Submit
        self.runs: set[asyncio.Task[None]] = set()  # owned: the test fixture cancels them
        self.active_watches = 0  # Watch streams not yet ended (the gateway must end them)
        self.watches_changed = asyncio.Condition()

    def _owned(self, task_id: str, user: str) -> FakeTask:
        task = self.tasks.get(task_id)
        if task is None:
            # The first watcher or submitter owns the task id.
            task = FakeTask(common_pb2.TaskState(task_id=task_id, user_id=user))
            self.tasks[task_id] = task
        return task

    async def _check(self, task: FakeTask, user: str, context: grpc.aio.ServicerContext) -> None:  # type: ignore[type-arg]
        if task.state.user_id != user:
            await ServiceError(Code.ERROR_CODE_FORBIDDEN, "another user's task").abort(context)

    async def Submit(self, request, context):  # type: ignore[no-untyped-def]
        if self.refuse_submit is not None:
            await self.refuse_submit.abort(context)
        task = self._owned(request.task_id, request.user_id)
        await self._check(task, request.user_id, context)
        self.submits.append(request)
        if task.state.status != Status.TASK_STATUS_UNSPECIFIED:
            return tasks_pb2.SubmitResponse(state=task.state, duplicate=True)
        task.state.prompt = request.prompt
        task.state.model = request.model or "local-small"
        task.state.queue_position = 1
        task.state.eta_ms = 250
        # The queued event is emitted before Submit returns: the gateway must still put the
        # ack first on the socket.
        await task.emit(
            progress=tasks_pb2.Progress(
                status=Status.TASK_STATUS_QUEUED, queue_position=1, eta_ms=250
            )
        )
        if self.auto_run:
            run = asyncio.create_task(self.run(request.task_id))
            self.runs.add(run)
            run.add_done_callback(self.runs.discard)
        return tasks_pb2.SubmitResponse(state=task.state)

    async def SubmitMany(self, request_iterator, context):  # type: ignore[no-untyped-def, override]
        await serve_submits(request_iterator, context, lambda r: self.Submit(r, OneCall()))  # type: ignore[no-untyped-call]

    async def WatchMany(self, request_iterator, context):  # type: ignore[no-untyped-def, override]
        # task_svc's own server half, around the fake's Watch.
        await serve_watch_many(request_iterator, context, lambda r: self.Watch(r, OneCall()))  # type: ignore[no-untyped-call]

    async def Watch(self, request, context):  # type: ignore[no-untyped-def]
        self.watches.append(request)
        await self._watch_count(+1)
        try:
            async for response in self._watch(request, context):  # type: ignore[no-untyped-call]
                yield response
                if response.HasField("event"):
                    task = self.tasks[request.task_id]
                    task.sent_seq = max(task.sent_seq, response.event.seq)
                    async with task.changed:
                        task.changed.notify_all()
        finally:
            await self._watch_count(-1)
            ended = self.tasks.get(request.task_id)
            if ended is not None:
                async with ended.changed:
                    ended.changed.notify_all()

    async def _watch_count(self, delta: int) -> None:
        async with self.watches_changed:
            self.active_watches += delta
            self.watches_changed.notify_all()

    async def wait_watches(self, count: int) -> None:
        async with self.watches_changed:
            await self.watches_changed.wait_for(lambda: self.active_watches == count)

    async def wait_sent(self, task_id: str, seq: int) -> bool:
        """Wait until a Watch has handed event `seq` to gRPC; False if no Watch is left."""
        task = self.tasks[task_id]
        async with task.changed:
            await task.changed.wait_for(lambda: task.sent_seq >= seq or self.active_watches == 0)
        return task.sent_seq >= seq

    async def _watch(self, request, context):  # type: ignore[no-untyped-def]
        task = self._owned(request.task_id, request.user_id)
        await self._check(task, request.user_id, context)
        breaks = task.breaks
        yield tasks_pb2.WatchResponse(state=task.state)
        seq = request.after_seq
        while True:
            pending = [event for event in task.events if event.seq > seq]
            for event in pending:
                seq = event.seq
                yield tasks_pb2.WatchResponse(event=event)
            if pending:
                continue  # more may have arrived while yielding
            if task.terminal:
                return
            seen = seq

            def moved() -> bool:
                return task.breaks != breaks or task.state.seq > seen  # noqa: B023

            async with task.changed:
                await task.changed.wait_for(moved)
            if task.breaks != breaks:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "task service restarting")

    async def Cancel(self, request, context):  # type: ignore[no-untyped-def]
        task = self.tasks.get(request.task_id)
        if task is None:
            await ServiceError(Code.ERROR_CODE_NOT_FOUND, "no such task").abort(context)
        await self._check(task, request.user_id, context)
        if not task.terminal:
            await task.emit(progress=tasks_pb2.Progress(status=Status.TASK_STATUS_CANCELLED))
        return tasks_pb2.CancelResponse(state=task.state)

    async def run(self, task_id: str, deltas: tuple[str, ...] = ("Hello", ", world")) -> None:
        """Play a generation: started, one chunk per delta, completed."""
        task = self.tasks[task_id]
        await task.emit(progress=tasks_pb2.Progress(status=Status.TASK_STATUS_PROCESSING))
        for delta in deltas:
            await task.emit(chunk=tasks_pb2.Chunk(delta=delta))
        await task.emit(
            completed=tasks_pb2.Completed(
                content="".join(deltas),
                model=task.state.model,
                usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
                finish_reason="stop",
            )
        )

    async def break_streams(self, task_id: str) -> None:
        task = self.tasks[task_id]
        task.breaks += 1
        async with task.changed:
            task.changed.notify_all()
