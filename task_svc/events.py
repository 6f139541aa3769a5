"""Publishing lifecycle events (events.proto LifecycleEvent) and snapshots of active tasks
(history.proto TaskSnapshot) to JetStream, and reading back what was stored for a task.

Subject `switchboard.tasks.<task_id>.<kind>`, message id `<task_id>:<seq>` (JetStream drops a
re-publish of the same id within the stream's duplicate window, so retrying is safe). Events of
one task are published in order, each once the one before it is acknowledged (so the last
message stored for a task is its latest even when a publish had to be retried); different
tasks' events go out together, their PubAcks awaited at once, so a busy process pays one round
trip for many of them. If NATS is briefly unavailable a task's chain retries with backoff
rather than lose the event.

Snapshots (checkpoints: seq, owner, attempts and the text so far) go to
`switchboard.tasks.<task_id>.snapshot`, message id `<task_id>:snapshot:<seq>`; persistence_svc
acks them without storing. They take the same chain as the task's lifecycle events, so the
last message stored for a task always holds its highest stored seq.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors

from svckit.lifecycle import cancel_and_wait
from svckit.nats import (
    TASK_EVENTS_STREAM,
    TASK_EVENTS_SUBJECT_PREFIX,
    is_snapshot,
    snapshot_subject,
)
from svckit.pubacks import AckedPublisher, last_message
from svckit.tracing import TRACEPARENT
from switchboard.v1 import events_pb2, history_pb2
from task_svc.task_state import TERMINAL

log = logging.getLogger(__name__)

Kind = events_pb2.LifecycleKind


def subject(event: events_pb2.LifecycleEvent) -> str:
    kind = Kind.Name(event.kind).removeprefix("LIFECYCLE_KIND_").lower()
    return f"{TASK_EVENTS_SUBJECT_PREFIX}.{event.task_id}.{kind}"


def msg_id(event: events_pb2.LifecycleEvent) -> str:
    return f"{event.task_id}:{event.seq}"


@dataclass
class _Item:
    task_id: str
    seq: int
    subject: str
    data: bytes
    msg_id: str
    done: asyncio.Future[None]
    traceparent: str = ""


class LifecyclePublisher:
    def __init__(
        self,
        acks: AckedPublisher,
        *,
        publish_timeout_s: float = 5.0,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.acks = acks
        self.publish_timeout_s = publish_timeout_s
        self.max_backoff_s = max_backoff_s
        self._chains: dict[str, collections.deque[_Item]] = {}  # by task id: not yet acked
        self._tasks: set[asyncio.Task[None]] = set()  # one per chain being published
        self._closed = False
        # The trace an event joins (its job's span; svckit/tracing.py): set by the app when
        # tracing is on, and sent in the message's `traceparent` header.
        self.trace_of: Callable[[str], str] | None = None

    def publish(self, event: events_pb2.LifecycleEvent) -> asyncio.Future[None]:
        """Queue `event`; the future resolves once JetStream has acknowledged it."""
        data = event.SerializeToString()
        trace = self.trace_of(event.task_id) if self.trace_of is not None else ""
        return self._queue(event.task_id, event.seq, subject(event), data, msg_id(event), trace)

    def publish_snapshot(self, snapshot: history_pb2.TaskSnapshot) -> asyncio.Future[None]:
        state = snapshot.state
        key = f"{state.task_id}:snapshot:{state.seq}"
        data = snapshot.SerializeToString()
        return self._queue(state.task_id, state.seq, snapshot_subject(state.task_id), data, key)

    def _queue(
        self, task_id: str, seq: int, subject: str, data: bytes, key: str, trace: str = ""
    ) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = _Item(task_id, seq, subject, data, key, done, trace)
        chain = self._chains.get(task_id)
        if chain is not None:  # its chain is running: it takes this one after the others
            chain.append(item)
            return done
        self._chains[task_id] = collections.deque([item])
        if not self._closed:
            self._spawn(task_id)
        return done

    def _spawn(self, task_id: str) -> None:
        task = asyncio.create_task(self._chain(task_id), name=f"lifecycle {task_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pending(self) -> int:
        return sum(len(chain) for chain in self._chains.values())

    async def _chain(self, task_id: str) -> None:
        chain = self._chains[task_id]
        try:
            while chain:
                item = chain[0]
                await self._publish_until_acked(item)
                chain.popleft()
                if not item.done.done():
                    item.done.set_result(None)
        finally:
            if not chain and self._chains.get(task_id) is chain:
                del self._chains[task_id]

    async def _publish_until_acked(self, item: _Item) -> None:
        headers = {"Nats-Msg-Id": item.msg_id}
        if item.traceparent:
            headers[TRACEPARENT] = item.traceparent
        backoff = 0.05
        while True:
            try:
                await self.acks.publish(
                    item.subject, item.data, timeout=self.publish_timeout_s, headers=headers
                )
                return
            except (nats.errors.Error, OSError, TimeoutError) as error:
                log.warning(
                    "lifecycle publish failed, retrying",
                    extra={"task_id": item.task_id, "seq": item.seq, "error": repr(error)},
                )
            except Exception:  # a bug must not end the chain and strand what follows
                log.exception(
                    "lifecycle publish crashed, retrying", extra={"task_id": item.task_id}
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def close(self, grace_s: float) -> None:
        """Let queued events go out for up to `grace_s` seconds, then stop (idempotent)."""
        if not self._closed:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace_s
            # Chains may start while others end: wait until none is left, or the grace is up.
            while self._tasks and (left := deadline - loop.time()) > 0:
                await asyncio.wait(set(self._tasks), timeout=left)
            if self._tasks:
                log.warning("lifecycle events left unpublished", extra={"count": self.pending})
        self._closed = True
        await cancel_and_wait(*self._tasks)


@dataclass(frozen=True)
class Stored:
    """What SB_TASK_EVENTS holds about a task: its last message, a lifecycle event or a
    snapshot (both carry the highest seq stored for the task)."""

    seq: int
    user_id: str
    attempts: int
    lifecycle: events_pb2.LifecycleEvent | None = None
    content: str = ""  # a snapshot's text so far (a run cut mid-way continues it)
    progress: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.lifecycle is not None and self.lifecycle.status in TERMINAL


async def read_stored(requests: AckedPublisher, task_id: str) -> Stored | None:
    """The last message stored for a task (JetStream's last-by-subject lookup accepts a
    wildcard), or None if none is stored."""
    raw = await last_message(
        requests, TASK_EVENTS_STREAM, f"{TASK_EVENTS_SUBJECT_PREFIX}.{task_id}.>"
    )
    if raw is None:
        return None
    if is_snapshot(raw.subject):
        state = history_pb2.TaskSnapshot.FromString(raw.data).state
        return Stored(
            state.seq, state.user_id, state.attempts, content=state.content, progress=state.progress
        )
    event = events_pb2.LifecycleEvent.FromString(raw.data)
    return Stored(event.seq, event.user_id, event.attempt, event)
