"""The TaskServer actor: one per task, a mailbox, and the watchers of that task.

Every change to a task goes through the mailbox and is applied by the actor's loop, one at a
time, so events get strictly increasing seq and a watcher subscribes atomically: its state
snapshot, the replay of what it missed and its registration for live events are one mailbox
message, so there is no gap and nothing twice between replay and live.

The loop is the supervised part (`run`): if a message crashes it, the caller of that message
gets the exception, the supervisor runs the loop again and it carries on from the state it
holds (the state lives on the object, not in the loop). After too many crashes the
supervisor calls `give_up`, which fails the task directly (the loop is dead).

A slow watcher never blocks the actor: each has a bounded queue, and on overflow it is
dropped (its stream ends with a retryable error, and it reconnects with its last seq).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, events_pb2, tasks_pb2
from task_svc.task_state import TaskCore, Transition

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskServerDown(Exception):
    """The actor is gone (ended after retention, or failed for good)."""


class _Dropped:
    pass


DROPPED: Final = _Dropped()
WatchItem = tasks_pb2.TaskEvent | _Dropped


class Watcher:
    """One Watch stream's view of a task: a bounded queue of live events."""

    def __init__(self, limit: int) -> None:
        self.queue: asyncio.Queue[WatchItem] = asyncio.Queue(maxsize=limit)
        self.dropped = False

    def push(self, event: tasks_pb2.TaskEvent) -> bool:
        """Queue an event; False (and the watcher is marked dropped) on overflow."""
        try:
            self.queue.put_nowait(event)
            return True
        except asyncio.QueueFull:
            self.dropped = True
            # Free the queue so the stream sees DROPPED next, not a stale tail.
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(DROPPED)
            return False

    async def get(self) -> WatchItem:
        return await self.queue.get()


class TaskServer:
    def __init__(self, core: TaskCore, *, watcher_limit: int = 1024, retain_s: float = 300.0):
        self.core = core
        self.watcher_limit = watcher_limit
        self.retain_s = retain_s
        self.watchers: set[Watcher] = set()
        self.restarts = 0
        self.down = False
        self._mailbox: asyncio.Queue[tuple[Callable[[], Any], asyncio.Future[Any]]] = (
            asyncio.Queue()
        )
        self._ended = False
        self._running = False

    @property
    def task_id(self) -> str:
        return self.core.task_id

    @property
    def user_id(self) -> str:
        return self.core.user_id

    # -- the mailbox -------------------------------------------------------------------

    async def call(self, fn: Callable[[TaskCore], T]) -> T:
        """Run `fn` on the state inside the actor and return its result."""
        if self.down or self._ended:
            raise TaskServerDown(self.task_id)
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._mailbox.put_nowait((lambda: fn(self.core), future))
        return await future

    async def apply(
        self, change: Callable[[TaskCore], Transition | None]
    ) -> events_pb2.LifecycleEvent | None:
        """Apply one change; fan its event out to the watchers; return the lifecycle event
        to publish (None when the change added nothing or was not a lifecycle change)."""

        def step(core: TaskCore) -> events_pb2.LifecycleEvent | None:
            transition = change(core)
            if transition is None:
                return None
            self._fan_out(transition)
            return transition.lifecycle

        return await self.call(step)

    async def subscribe(
        self, after_seq: int
    ) -> tuple[Watcher | None, common_pb2.TaskState, list[tasks_pb2.TaskEvent]]:
        """State, the events after `after_seq`, and a watcher for what follows (None when
        the task is finished: nothing follows)."""

        def step(core: TaskCore) -> tuple[Watcher | None, common_pb2.TaskState, list[Any]]:
            watcher = None if core.terminal else Watcher(self.watcher_limit)
            if watcher is not None:
                self.watchers.add(watcher)
            return watcher, core.snapshot(), core.events_after(after_seq)

        if self.down or self._ended:
            # Nothing changes any more: read directly.
            return None, self.core.snapshot(), self.core.events_after(after_seq)
        return await self.call(step)

    def unsubscribe(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def _fan_out(self, transition: Transition) -> None:
        for watcher in list(self.watchers):
            if not watcher.push(transition.event):
                self.watchers.discard(watcher)
                log.warning("slow watcher dropped", extra={"task_id": self.task_id})
        if transition.terminal:
            # Each stream ends after the terminal event it already has in its queue.
            self.watchers.clear()

    # -- the supervised loop ---------------------------------------------------------

    async def run(self) -> None:
        """Process the mailbox until the task has been finished for `retain_s` seconds."""
        if self._running:
            self.restarts += 1
        self._running = True
        while True:
            wait: float | None = None
            if self.core.terminal:
                finished_at = self.core.completed_ns / 1e9 if self.core.completed_ns else 0.0
                wait = max(0.0, finished_at + self.retain_s - time.time())
            try:
                thunk, future = await asyncio.wait_for(self._mailbox.get(), wait)
            except TimeoutError:
                if self._mailbox.empty():
                    self._ended = True
                    return
                continue
            if future.cancelled():
                continue
            try:
                result = thunk()
            except Exception as error:
                if not future.done():
                    future.set_exception(error)
                raise
            if not future.done():
                future.set_result(result)

    def give_up(self, error: BaseException) -> events_pb2.LifecycleEvent | None:
        """The loop crashed too often: fail the task here (the loop is dead) and fail every
        pending call. Returns the FAILED lifecycle event to publish."""
        self.down = True
        message = f"task server crashed {self.restarts + 1} times: {error!r}"
        failure = ServiceError(common_pb2.ERROR_CODE_INTERNAL, message, retryable=False)
        transition = self.core.failed(failure.to_proto())
        if transition is not None:
            self._fan_out(transition)
        while not self._mailbox.empty():
            _, future = self._mailbox.get_nowait()
            if not future.done():
                future.set_exception(TaskServerDown(self.task_id))
        return transition.lifecycle if transition is not None else None
