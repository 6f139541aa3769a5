"""What the job engine needs to be durable, as two small interfaces: the `JobStore` (jobs,
what was stored about a task, dead letters) and the `Lifecycle` publisher (events.py).

`JetStreamJobStore` (jetstream_store.py) is the real one; `MemoryJobStore` (memory_store.py)
keeps everything in dicts, so the engine's tests run without NATS.

A job is stored at a sequence number (`seq`) and stays stored until `done(seq)`: that is what
makes it survive a crash. Jobs are sharded by task id (svckit/shards.py); `acquire(shard)`
hands over what the shard holds when this engine takes it (what a previous holder left:
killed, or stopped with the job unfinished); `arrivals` then hands over every job stored in
the shards held: those a gateway stored itself to acknowledge an `llm_generate` at once, and
this engine's own (which it knows already: it created them before storing them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from switchboard.v1 import events_pb2, history_pb2, tasks_pb2
from task_svc.events import Stored
from task_svc.task_state import TaskSpec


class StoreUnavailable(Exception):
    """The store could not be reached or did not confirm in time; nothing is known stored."""


@dataclass(frozen=True)
class Put:
    seq: int  # where the job is stored
    duplicate: bool  # the message id was stored before (seq is that earlier job's)


@dataclass(frozen=True)
class Pending:
    """A stored job handed to this engine, held by it until `done`."""

    spec: TaskSpec
    seq: int
    redelivered: bool = False  # handed out before (to a previous incarnation, or to this one)


Loop = Callable[[], Coroutine[Any, Any, None]]


class JobStore(Protocol):
    async def open(self) -> None:
        """Get ready (holding no shard yet)."""

    async def close(self) -> None:
        """Give back every pending job not `done` (redelivered to the shards' next holder)."""

    def loops(self) -> Mapping[str, Loop]:
        """The store's own loops, by name: the engine runs them, supervised, from `open`
        until just before `close`."""

    async def put(self, spec: TaskSpec, msg_id: str) -> Put:
        """Store a job durably (deduplicated on `msg_id`)."""

    async def acquire(self, shard: int) -> list[Pending]:
        """Hold `shard`: every job it holds now (a previous holder's); its jobs stored from
        now on come through `arrivals`."""

    async def release(self, shard: int) -> None:
        """Stop holding `shard`; its pending jobs not `done` are given back."""

    def arrivals(self) -> AsyncIterator[Pending]:
        """Every job stored in a held shard from now on, in order, until `close`."""

    async def done(self, seq: int) -> None:
        """The job at `seq` is finished: remove it (a pending one is acknowledged)."""

    async def last_stored(self, task_id: str) -> Stored | None:
        """The last lifecycle event or snapshot stored for a task, if any."""

    async def put_dead_letter(self, letter: tasks_pb2.DeadLetter) -> None: ...

    async def dead_letter(self, task_id: str) -> tasks_pb2.DeadLetter | None: ...

    async def remove_dead_letter(self, task_id: str) -> bool:
        """Remove the task's dead letter (requeued, or discarded); whether there was one."""

    async def dead_letters(self, queue: str, limit: int) -> list[tasks_pb2.DeadLetter]:
        """Oldest first, of one queue (all when empty), at most `limit` (0: the store's)."""


class Lifecycle(Protocol):
    """Where lifecycle events and checkpoints go (events.LifecyclePublisher); each future
    resolves once the event is stored."""

    def publish(self, event: events_pb2.LifecycleEvent) -> asyncio.Future[None]: ...

    def publish_snapshot(self, snapshot: history_pb2.TaskSnapshot) -> asyncio.Future[None]: ...
