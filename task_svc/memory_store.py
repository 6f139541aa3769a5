"""A JobStore in dicts, for the engine's tests: the same contract as JetStreamJobStore (a job
stays until `done`, message ids deduplicate, pending jobs are held until done or given back at
close), and every operation recorded in `log` so a test can check what was stored in which
order. One instance may outlive an engine: a second engine on it is "the next start".

Set `unavailable` to make every write fail as an unreachable store would, `lookups_failing`
to make the next lookups of what was stored fail. `stored` (what
SB_TASK_EVENTS would answer) is the test's to fill, usually by the lifecycle publisher.
`store_elsewhere` is a gateway storing a job itself: it comes to the engine through
`arrivals`; with `echo_puts`, so does every job the engine stores itself, as JetStream's
consumer hands it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from svckit.shards import shard_of
from switchboard.v1 import tasks_pb2
from task_svc.deadletters import MAX_LIST
from task_svc.events import Stored
from task_svc.store import Loop, Pending, Put, StoreUnavailable
from task_svc.task_state import TaskSpec


class MemoryJobStore:
    def __init__(self, *, echo_puts: bool = False) -> None:
        self.echo_puts = echo_puts
        self._arrived: asyncio.Queue[Pending] = asyncio.Queue()
        self.jobs: dict[int, TaskSpec] = {}  # the stream: seq -> job
        self.msg_ids: dict[str, int] = {}  # every message id ever stored (dedup)
        self.held: set[int] = set()  # pending jobs handed to the current engine
        self.shards: set[int] = set()  # the shards the current engine holds
        self.stored: dict[str, Stored] = {}  # task id -> last lifecycle event or snapshot
        self.letters: dict[str, tasks_pb2.DeadLetter] = {}  # oldest first
        self.log: list[tuple[str, str | int]] = []
        self.unavailable = False
        self.lookups_failing = 0  # the next this many `last_stored` fail
        self._next_seq = 1

    def _write(self, what: str, key: str | int) -> None:
        if self.unavailable:
            raise StoreUnavailable(f"{what} {key}: the store is unavailable")
        self.log.append((what, key))

    async def open(self) -> None:
        self.held = set()
        self.shards = set()
        self._arrived = asyncio.Queue()  # a previous engine's arrivals are pending jobs now

    async def close(self) -> None:
        for seq in sorted(self.held):
            self.log.append(("nak", seq))
        self.held = set()

    async def put(self, spec: TaskSpec, msg_id: str) -> Put:
        self._write("put", spec.task_id)
        if msg_id in self.msg_ids:
            return Put(self.msg_ids[msg_id], duplicate=True)
        seq = self._add(spec, msg_id)
        if self.echo_puts:
            self._arrive(spec, seq)
        return Put(seq, duplicate=False)

    def store_elsewhere(self, spec: TaskSpec) -> Put:
        """What a gateway does with an `llm_generate` (message id = task id)."""
        self._write("put elsewhere", spec.task_id)
        if spec.task_id in self.msg_ids:
            return Put(self.msg_ids[spec.task_id], duplicate=True)
        seq = self._add(spec, spec.task_id)
        self._arrive(spec, seq)
        return Put(seq, duplicate=False)

    def _add(self, spec: TaskSpec, msg_id: str) -> int:
        seq = self.msg_ids[msg_id] = self._next_seq
        self._next_seq += 1
        self.jobs[seq] = spec
        return seq

    def _arrive(self, spec: TaskSpec, seq: int) -> None:
        if shard_of(spec.task_id) not in self.shards:
            return  # stored for whoever holds its shard
        self.held.add(seq)
        self._arrived.put_nowait(Pending(spec, seq))

    def loops(self) -> Mapping[str, Loop]:
        return {}

    async def arrivals(self) -> AsyncIterator[Pending]:
        while True:
            yield await self._arrived.get()

    async def acquire(self, shard: int) -> list[Pending]:
        self.shards.add(shard)
        mine = {seq: spec for seq, spec in self.jobs.items() if shard_of(spec.task_id) == shard}
        self.held |= set(mine)
        return [Pending(spec, seq) for seq, spec in mine.items()]

    async def release(self, shard: int) -> None:
        self.shards.discard(shard)
        for seq in sorted(s for s in self.held if shard_of(self.jobs[s].task_id) == shard):
            self.log.append(("nak", seq))
            self.held.discard(seq)

    async def done(self, seq: int) -> None:
        self._write("ack" if seq in self.held else "remove", seq)
        self.held.discard(seq)
        self.jobs.pop(seq, None)

    async def last_stored(self, task_id: str) -> Stored | None:
        if self.lookups_failing > 0:
            self.lookups_failing -= 1
            raise StoreUnavailable(f"last stored {task_id}: the store is unavailable")
        return self.stored.get(task_id)

    async def put_dead_letter(self, letter: tasks_pb2.DeadLetter) -> None:
        self._write("dead", letter.task_id)
        self.letters.pop(letter.task_id, None)
        self.letters[letter.task_id] = letter

    async def dead_letter(self, task_id: str) -> tasks_pb2.DeadLetter | None:
        return self.letters.get(task_id)

    async def remove_dead_letter(self, task_id: str) -> bool:
        return self.letters.pop(task_id, None) is not None

    async def dead_letters(self, queue: str, limit: int) -> list[tasks_pb2.DeadLetter]:
        limit = min(limit or MAX_LIST, MAX_LIST)
        return [d for d in self.letters.values() if not queue or d.queue == queue][:limit]
