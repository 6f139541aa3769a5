"""The TaskServer actor: one per task, a mailbox, and the watchers of that task.

Every change to a task goes through the mailbox and is applied by the actor's loop, one at a
time, so events get strictly increasing seq and a watcher subscribes atomically: its state
snapshot, the replay of what it missed and its registration for live events are one mailbox
message, so there is no gap and nothing twice between replay and live.

The loop is the supervised part: if a message crashes it, the caller of that message gets
the exception, the supervisor runs the loop again and it carries on from the state it holds
(the state lives on the object, not in the loop). After too many crashes the supervisor's
give-up fails the task directly (`give_up`; the loop is dead). The loop's asyncio task, and
so what it and the supervisor log about it, has the task's `task` span current (`span`), or
none: never the span of whoever's message woke it.

Hibernation (Erlang's `proc_lib:hibernate`): an idle actor has no loop, no asyncio task and no
mailbox; the next message creates the mailbox and starts the loop under the supervisor, and
the loop ends when the mailbox is empty. A queued task waiting for minutes costs only its state.

Seq checkpoints (so that seq keeps increasing across incarnations of a task): an event may be
fanned out only while its seq is at most `durable_seq + checkpoint_every`, where `durable_seq`
is the seq of the last snapshot JetStream has stored. A snapshot is published (without
waiting) once half of that margin is used, and the loop waits for it only if the margin runs
out. A task rebuilt after a crash therefore starts at `stored seq + checkpoint_every`, above
any seq a watcher can have seen (see `jobs.py`, recovery).

A slow watcher never blocks the actor: each has a bounded queue, and on overflow it is
dropped (its stream ends with a retryable error, and it reconnects with its last seq).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeVar

from opentelemetry.trace import Span

from svckit import tracing
from svckit.errors import ServiceError
from svckit.inbox import Inbox
from switchboard.v1 import common_pb2, events_pb2, history_pb2, tasks_pb2
from task_svc.supervisor import Supervisor
from task_svc.task_state import TaskCore, Transition

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskServerDown(Exception):
    """The actor is gone (ended after retention, or failed for good)."""


class _Dropped:
    pass


DROPPED: Final = _Dropped()  # the watcher fell behind
MOVED: Final = _Dropped()  # the task's shard went to another node
WatchItem = tasks_pb2.TaskEvent | _Dropped


class Watcher:
    """One Watch stream's view of a task: a bounded queue of live events."""

    def __init__(self, limit: int) -> None:
        self.queue: Inbox[WatchItem] = Inbox(maxsize=limit)
        self.dropped = False

    def push(self, event: tasks_pb2.TaskEvent) -> bool:
        """Queue an event; False (and the watcher is marked dropped) on overflow."""
        if not self.queue.full():
            self.queue.put(event)
            return True
        self.dropped = True
        # Free the queue so the stream sees DROPPED next, not a stale tail.
        self.queue.clear()
        self.queue.put(DROPPED)
        return False

    def end(self, why: _Dropped) -> None:
        """Queue `why` after what is queued (or instead of it, when the queue is full)."""
        if self.queue.full():
            self.queue.clear()
        self.queue.put(why)

    async def get(self) -> WatchItem:
        return await self.queue.get()


Checkpoint = Callable[[history_pb2.TaskSnapshot], "asyncio.Future[None]"]
_Mail = tuple[Callable[[TaskCore], Any], "asyncio.Future[Any] | None"]  # None: a cast


def _reraise(error: Exception, core: TaskCore) -> None:
    raise error


def _no_give_up(server: TaskServer, error: BaseException) -> None:
    server.give_up(error)


@dataclass
class Host:
    """What every TaskServer of one engine shares (one object, not one per server)."""

    supervisor: Supervisor = field(default_factory=lambda: Supervisor("tasks"))
    watcher_limit: int = 1024
    # 0: no checkpoints (tests of the actor alone).
    checkpoint_every: int = 0
    checkpoint: Checkpoint | None = None
    # Called when the supervisor gives up on a server; the default fails its task.
    gave_up: Callable[[TaskServer, BaseException], None] = _no_give_up


class TaskServer:
    __slots__ = (
        "_cp",
        "_ended",
        "_mailbox",
        "_wake",
        "_watchers",
        "core",
        "down",
        "durable_seq",
        "host",
        "span",
    )

    def __init__(self, core: TaskCore, host: Host, *, durable_seq: int | None = None) -> None:
        self.core = core
        self.host = host
        self.down = False
        # The highest seq known stored in JetStream (a rebuilt task passes what it read).
        self.durable_seq = core.seq if durable_seq is None else durable_seq
        self._ended = False
        self._mailbox: collections.deque[_Mail] | None = None  # None: hibernating
        self._wake: asyncio.Future[None] | None = None  # an awake, idle loop waits on it
        self._watchers: set[Watcher] | None = None
        self._cp: asyncio.Future[None] | None = None  # the snapshot being stored
        # The job's `task` span (set by intake.py; None: not traced): the loop runs with it
        # current, whichever caller's message wakes it.
        self.span: Span | None = None

    @property
    def task_id(self) -> str:
        return self.core.task_id

    @property
    def user_id(self) -> str:
        return self.core.user_id

    @property
    def watchers(self) -> set[Watcher]:
        return self._watchers if self._watchers is not None else set()

    @property
    def hibernating(self) -> bool:
        return self._mailbox is None

    @property
    def ended(self) -> bool:
        return self._ended

    def end(self) -> None:
        """Retention is over: the server answers only direct reads from now on."""
        self._ended = True

    def move_away(self) -> None:
        """The task's shard went to another node: every watcher is told to watch there."""
        self._ended = True
        for watcher in list(self.watchers):
            watcher.end(MOVED)
        self._watchers = None
        if self._mailbox is not None:  # its loop is awake: stop it, the next holder has its own
            self.host.supervisor.terminate(self.task_id)

    # -- the mailbox -------------------------------------------------------------------

    async def call(self, fn: Callable[[TaskCore], T]) -> T:
        """Run `fn` on the state inside the actor and return its result."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._post(fn, future)
        return await future

    def cast(self, change: Callable[[TaskCore], Transition | None]) -> None:
        """Apply a change without waiting for it (gen_server's cast): for the stream of a
        running task, whose results nobody reads; the mailbox keeps casts and calls in order.

        While the loop is awake with nothing to do (a running task between two deltas, the
        common case), the change is applied here: nothing is ahead of it in the mailbox and
        the loop is parked, so the state still has one writer at a time, and a delta costs
        no wake-up and no turn of the event loop. A change that raises is handed to the loop,
        which crashes with it: the supervisor restarts the actor as for any other crash."""
        step = self._step(change)
        if self._wake is None or self._mailbox or self.down or self._ended:
            self._post(step, None)
            return
        if self._checkpoint_blocks():
            self._post(step, None)  # the loop waits for the checkpoint first
            return
        try:
            step(self.core)
        except Exception as error:
            self._post(partial(_reraise, error), None)
            return
        if self.core.status != common_pb2.TASK_STATUS_PROCESSING and not self._wake.done():
            self._wake.set_result(None)  # the loop's idle rule: it hibernates

    def _post(self, fn: Callable[[TaskCore], Any], future: asyncio.Future[Any] | None) -> None:
        if self.down or self._ended:
            raise TaskServerDown(self.task_id)
        if self._mailbox is None:
            try:
                # The loop's task copies the context here: with this task's span current,
                # not the span of whoever posts (a job's runner may start another's run).
                # Once per wake-up, never per event; nothing attached when tracing is off.
                with tracing.only(self.span):
                    self.host.supervisor.start_child(
                        self.task_id, self._loop, on_give_up=self._on_give_up
                    )
            except RuntimeError:  # the supervisor is stopped (shutdown)
                raise TaskServerDown(self.task_id) from None
            self._mailbox = collections.deque()
        self._mailbox.append((fn, future))
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _on_give_up(self, error: BaseException) -> None:
        self.host.gave_up(self, error)

    async def apply(
        self, change: Callable[[TaskCore], Transition | None]
    ) -> events_pb2.LifecycleEvent | None:
        """Apply one change; fan its event out to the watchers; return the lifecycle event
        to publish (None when the change added nothing or was not a lifecycle change)."""

        return await self.call(self._step(change))

    def _step(
        self, change: Callable[[TaskCore], Transition | None]
    ) -> Callable[[TaskCore], events_pb2.LifecycleEvent | None]:
        def step(core: TaskCore) -> events_pb2.LifecycleEvent | None:
            transition = change(core)
            if transition is None:
                return None
            self._fan_out(transition)
            return transition.lifecycle

        return step

    async def subscribe(
        self, after_seq: int
    ) -> tuple[Watcher | None, common_pb2.TaskState, list[tasks_pb2.TaskEvent]]:
        """State, the events after `after_seq`, and a watcher for what follows (None when
        the task is finished: nothing follows)."""

        def step(core: TaskCore) -> tuple[Watcher | None, common_pb2.TaskState, list[Any]]:
            watcher = None if core.terminal else Watcher(self.host.watcher_limit)
            if watcher is not None:
                if self._watchers is None:
                    self._watchers = set()
                self._watchers.add(watcher)
            return watcher, core.snapshot(), core.events_after(after_seq)

        if self.down or self._ended or self.core.terminal:
            # Nothing changes any more: read directly.
            return None, self.core.snapshot(), self.core.events_after(after_seq)
        if self._mailbox is None:
            # Idle (hibernated, or never woken: a task just queued): nothing can be ahead of
            # this in the mailbox, so it runs here, sparing a join its turns of the loop.
            return step(self.core)
        return await self.call(step)

    def unsubscribe(self, watcher: Watcher) -> None:
        if self._watchers is not None:
            self._watchers.discard(watcher)
            if not self._watchers:
                self._watchers = None

    def _fan_out(self, transition: Transition) -> None:
        for watcher in list(self.watchers):
            if not watcher.push(transition.event):
                self.unsubscribe(watcher)
                log.warning("slow watcher dropped", extra={"task_id": self.task_id})
        if transition.terminal:
            # Each stream ends after the terminal event it already has in its queue.
            self._watchers = None

    # -- the supervised loop ---------------------------------------------------------

    async def _loop(self) -> None:
        """Process the mailbox until it is empty, then hibernate (the loop ends). A running
        task gets a message per text delta: its loop stays awake until the task leaves
        PROCESSING rather than being started again for every message (gen_server's
        `hibernate_after`, with "while running" as the idle rule)."""
        mailbox = self._mailbox
        while True:
            while mailbox:
                await self._checkpoint()
                fn, future = mailbox.popleft()
                if future is not None and future.cancelled():
                    continue
                try:
                    result = fn(self.core)
                except Exception as error:
                    if future is not None and not future.done():
                        future.set_exception(error)
                    raise
                if future is not None and not future.done():
                    future.set_result(result)
            if self.down or self.core.status != common_pb2.TASK_STATUS_PROCESSING:
                break
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None
        if self._mailbox is mailbox:
            self._mailbox = None

    async def _checkpoint(self) -> None:
        if self._checkpoint_blocks():
            assert self._cp is not None
            await asyncio.shield(self._cp)

    def _checkpoint_blocks(self) -> bool:
        """Start a checkpoint once half the seq reserve is used; True when the reserve is
        used up and the next event must wait until the checkpoint is stored."""
        every = self.host.checkpoint_every
        publish = self.host.checkpoint
        core = self.core
        if every <= 0 or publish is None or core.terminal or core.seq == 0:
            return False
        if self._cp is None and core.seq >= self.durable_seq + every // 2:
            self._cp = self._store(publish, core.snapshot_message(), core.seq)
        return core.seq + 1 > self.durable_seq + every and self._cp is not None

    def _store(
        self, publish: Checkpoint, snapshot: history_pb2.TaskSnapshot, seq: int
    ) -> asyncio.Future[None]:
        future = publish(snapshot)

        def stored(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:
                self.durable_seq = max(self.durable_seq, seq)
            if self._cp is done:
                self._cp = None

        future.add_done_callback(stored)
        return future

    def give_up(self, error: BaseException) -> events_pb2.LifecycleEvent | None:
        """The loop crashed too often: fail the task here (the loop is dead) and fail every
        pending call. Returns the FAILED lifecycle event to publish."""
        self.down = True
        restarts = self.host.supervisor.restarts(self.task_id)
        message = f"task server crashed {restarts + 1} times: {error!r}"
        failure = ServiceError(common_pb2.ERROR_CODE_INTERNAL, message, retryable=False)
        transition = self.core.failed(failure.to_proto())
        if transition is not None:
            self._fan_out(transition)
        while self._mailbox:
            _, future = self._mailbox.popleft()
            if future is not None and not future.done():
                future.set_exception(TaskServerDown(self.task_id))
        return transition.lifecycle if transition is not None else None
