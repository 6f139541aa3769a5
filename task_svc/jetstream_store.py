"""The JobStore on NATS JetStream: jobs on the work-queue stream SB_JOBS (subject
`switchboard.jobs.<queue>`), what was stored about a task read back from SB_TASK_EVENTS
(events.py), dead letters on SB_DEAD_LETTERS (deadletters.py).

A job costs one publish (awaiting its PubAck: Submit replies only after it) and one removal
by stream sequence when done (STREAM.MSG.DELETE, without secure erase, which would first
overwrite the message on disk). Only the jobs a previous incarnation left come through the
durable consumer (consumer.py); those are acknowledged instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import nats.errors
import orjson
from nats.aio.client import Client

from svckit.nats import JOBS_STREAM, JOBS_SUBJECT_PREFIX
from switchboard.v1 import events_pb2, tasks_pb2
from task_svc.consumer import JobConsumer
from task_svc.deadletters import DeadLetters
from task_svc.events import Stored, read_stored
from task_svc.store import Pending, Put, StoreUnavailable
from task_svc.task_state import TaskSpec

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT_S = 5.0
MESSAGE_NOT_FOUND = 10037  # JetStream's error code: removed already (or never stored)
ALL_JOBS = f"{JOBS_SUBJECT_PREFIX}.>"  # the one shard there is


def job_subject(queue: str) -> str:
    return f"{JOBS_SUBJECT_PREFIX}.{queue}"


@contextlib.contextmanager
def unavailable() -> Iterator[None]:
    """NATS errors, as the engine sees them."""
    try:
        yield
    except (nats.errors.Error, OSError, TimeoutError) as error:
        raise StoreUnavailable(repr(error)) from error


class JetStreamJobStore:
    def __init__(
        self,
        nc: Client,
        *,
        consumer: str,
        ack_wait_s: float,
        max_ack_pending: int,
        shard: str = ALL_JOBS,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.consumer = JobConsumer(
            nc,
            name=consumer,
            ack_wait_s=ack_wait_s,
            max_ack_pending=max_ack_pending,
            filter_subject=shard,
        )
        self.letters = DeadLetters(self.js, PUBLISH_TIMEOUT_S)

    async def open(self) -> None:
        await self.letters.open()
        await self.consumer.bind()

    async def close(self) -> None:
        await self.consumer.close()

    async def put(self, spec: TaskSpec, msg_id: str) -> Put:
        with unavailable():
            ack = await self.js.publish(
                job_subject(spec.queue),
                spec.to_job().SerializeToString(),
                timeout=PUBLISH_TIMEOUT_S,
                headers={"Nats-Msg-Id": msg_id},
            )
        return Put(ack.seq, bool(ack.duplicate))

    async def take_pending(self) -> list[Pending]:
        out: list[Pending] = []
        for msg in await self.consumer.take_pending():
            seq = msg.metadata.sequence.stream
            try:
                job = events_pb2.Job.FromString(msg.data)
                if not job.task_id:
                    raise ValueError("job without task_id")
            except Exception:
                log.error("undecodable job terminated", extra={"subject": msg.subject})
                self.consumer.held.pop(seq, None)
                with contextlib.suppress(nats.errors.Error, OSError):
                    await msg.term()
                continue
            queue = msg.subject.removeprefix(f"{JOBS_SUBJECT_PREFIX}.")
            out.append(Pending(TaskSpec.from_job(job, queue), seq))
        return out

    async def done(self, seq: int) -> None:
        with unavailable():
            if seq in self.consumer.held:
                await self.consumer.ack(seq)
            else:
                await self._delete(seq)

    async def _delete(self, seq: int) -> None:
        request = orjson.dumps({"seq": seq, "no_erase": True})
        reply = await self.nc.request(f"$JS.API.STREAM.MSG.DELETE.{JOBS_STREAM}", request)
        error = orjson.loads(reply.data).get("error")
        if error and error.get("err_code") != MESSAGE_NOT_FOUND:
            raise nats.errors.Error(f"job {seq} not removed: {error.get('description')}")

    async def last_stored(self, task_id: str) -> Stored | None:
        with unavailable():
            return await read_stored(self.js, task_id)

    async def put_dead_letter(self, letter: tasks_pb2.DeadLetter) -> None:
        with unavailable():
            await self.letters.put(letter)

    async def dead_letter(self, task_id: str) -> tasks_pb2.DeadLetter | None:
        return await self.letters.get(task_id)

    async def remove_dead_letter(self, task_id: str) -> None:
        await self.letters.remove(task_id)

    async def dead_letters(self, queue: str, limit: int) -> list[tasks_pb2.DeadLetter]:
        return await self.letters.list(queue, limit)
