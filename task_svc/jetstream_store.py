"""The JobStore on NATS JetStream: jobs on the work-queue stream SB_JOBS (subject
`switchboard.jobs.<queue>`), what was stored about a task read back from SB_TASK_EVENTS
(events.py), dead letters on SB_DEAD_LETTERS (deadletters.py).

Every job reaches the engine through the durable consumer (consumer.py): at start those a
previous incarnation left, then each one stored meanwhile, whether a gateway stored it
(gateway_svc/direct_submit.py) or this engine did for a Submit (one publish, awaiting its
PubAck: Submit replies only after it). A finished job is acked off the work queue; one that
finished before the consumer handed it over is removed by stream sequence
(STREAM.MSG.DELETE, without secure erase, which would first overwrite the message on disk).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from svckit.nats import JOBS_STREAM, JOBS_SUBJECT_PREFIX, PUBLISH_TIMEOUT_S, store_job
from switchboard.v1 import events_pb2, tasks_pb2
from task_svc.consumer import JobConsumer
from task_svc.deadletters import DeadLetters
from task_svc.events import Stored, read_stored
from task_svc.store import Loop, Pending, Put, StoreUnavailable
from task_svc.task_state import TaskSpec

log = logging.getLogger(__name__)

MESSAGE_NOT_FOUND = 10037  # JetStream's error code: removed already (or never stored)
ALL_JOBS = f"{JOBS_SUBJECT_PREFIX}.>"  # the one shard there is


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

    def loops(self) -> Mapping[str, Loop]:
        return {"in-progress acks": self.consumer.keep_alive}

    async def put(self, spec: TaskSpec, msg_id: str) -> Put:
        with unavailable():
            job = spec.to_job().SerializeToString()
            ack = await store_job(self.nc, self.js, spec.queue, job, msg_id)
        return Put(ack.seq, bool(ack.duplicate))

    async def take_pending(self) -> list[Pending]:
        msgs = await self.consumer.take_pending()
        return [job for msg in msgs if (job := await self._job(msg)) is not None]

    async def arrivals(self) -> AsyncIterator[Pending]:
        with unavailable():
            async for msg in self.consumer.follow():
                job = await self._job(msg)
                if job is not None:
                    yield job

    async def _job(self, msg: Msg) -> Pending | None:
        """A delivered job, or None for one that cannot be read (terminated: never again)."""
        metadata = msg.metadata
        seq = metadata.sequence.stream
        try:
            job = events_pb2.Job.FromString(msg.data)
            if not job.task_id:
                raise ValueError("job without task_id")
        except Exception:
            log.error("undecodable job terminated", extra={"subject": msg.subject})
            self.consumer.held.pop(seq, None)
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.term()
            return None
        queue = msg.subject.removeprefix(f"{JOBS_SUBJECT_PREFIX}.")
        return Pending(TaskSpec.from_job(job, queue), seq, metadata.num_delivered > 1)

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
