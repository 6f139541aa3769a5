"""The dead-letter queue: tasks that failed for good, on their own JetStream stream.

One message per task, subject `switchboard.dead.<task_id>` (the stream keeps one message per
subject, so dead-lettering a task again replaces its entry), holding a `DeadLetter`
(tasks.proto). Limits retention: entries stay until requeued or discarded (the subject is
purged) or the stream's age limit drops them, and survive restarts of task_svc and of NATS
(file storage).
"""

from __future__ import annotations

import time

import nats.errors
import orjson
from nats.aio.client import Client
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from svckit.errors import ServiceError
from svckit.nats import ensure_stream
from switchboard.v1 import tasks_pb2
from task_svc.task_state import TaskCore, TaskSpec, timestamp

DEAD_STREAM = "SB_DEAD_LETTERS"
DEAD_PREFIX = "switchboard.dead"
MAX_LIST = 100


def dead_letters_stream_config() -> StreamConfig:
    return StreamConfig(
        name=DEAD_STREAM,
        subjects=[f"{DEAD_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_msgs_per_subject=1,
        discard=DiscardPolicy.OLD,
        max_age=30 * 24 * 3600,  # seconds (nats-py converts to nanoseconds)
    )


def dead_letter(spec: TaskSpec, core: TaskCore, reason: ServiceError) -> tasks_pb2.DeadLetter:
    return tasks_pb2.DeadLetter(
        task_id=spec.task_id,
        user_id=spec.user_id,
        queue=spec.queue,
        model=spec.model,
        priority=spec.priority,
        prompt=spec.prompt,
        options=spec.options,
        attempts=core.attempts,
        error=core.error if core.error is not None else reason.to_proto(),
        submitted_at=timestamp(spec.submitted_ns),
        failed_at=timestamp(core.completed_ns or time.time_ns()),
    )


def requeued_spec(letter: tasks_pb2.DeadLetter) -> TaskSpec:
    """What a dead letter says was submitted, to run it again."""
    return TaskSpec(
        task_id=letter.task_id,
        user_id=letter.user_id,
        prompt=letter.prompt,
        model=letter.model,
        priority=letter.priority,
        queue=letter.queue or "default",
        options=letter.options,
        submitted_ns=letter.submitted_at.ToNanoseconds(),
    )


class DeadLetters:
    """The stream itself (jetstream_store.py uses it)."""

    def __init__(self, nc: Client, timeout_s: float) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.timeout_s = timeout_s

    async def open(self) -> None:
        await ensure_stream(self.js, dead_letters_stream_config())

    async def put(self, letter: tasks_pb2.DeadLetter) -> None:
        """Store `letter` (awaits the PubAck: a dead letter is never only in memory)."""
        await self.js.publish(
            f"{DEAD_PREFIX}.{letter.task_id}",
            letter.SerializeToString(),
            timeout=self.timeout_s,
        )

    async def get(self, task_id: str) -> tasks_pb2.DeadLetter | None:
        try:
            raw = await self.js.get_last_msg(DEAD_STREAM, f"{DEAD_PREFIX}.{task_id}")
        except NotFoundError:
            return None
        return tasks_pb2.DeadLetter.FromString(raw.data or b"")

    async def remove(self, task_id: str) -> bool:
        """Purge the task's entry; whether there was one. The server's own count says so
        (nats-py's purge_stream drops it), so of two operators discarding one dead letter at
        once only one is told it was theirs."""
        request = orjson.dumps({"filter": f"{DEAD_PREFIX}.{task_id}"})
        reply = await self.nc.request(
            f"$JS.API.STREAM.PURGE.{DEAD_STREAM}", request, timeout=self.timeout_s
        )
        answer = orjson.loads(reply.data)
        error = answer.get("error")
        if error:
            raise nats.errors.Error(f"dead letter {task_id} not purged: {error.get('description')}")
        return int(answer.get("purged", 0)) > 0

    async def list(self, queue: str = "", limit: int = 0) -> list[tasks_pb2.DeadLetter]:
        """Oldest first; at most `limit` (0: MAX_LIST)."""
        limit = min(limit or MAX_LIST, MAX_LIST)
        out: list[tasks_pb2.DeadLetter] = []
        seq = 1
        while len(out) < limit:
            try:
                raw = await self.js.get_msg(
                    DEAD_STREAM, seq=seq, subject=f"{DEAD_PREFIX}.>", next=True
                )
            except NotFoundError:
                break
            letter = tasks_pb2.DeadLetter.FromString(raw.data or b"")
            if not queue or letter.queue == queue:
                out.append(letter)
            seq = (raw.seq or seq) + 1
        return out
