"""The JobStore on NATS JetStream: jobs on the work-queue stream SB_JOBS (subject
`switchboard.jobs.<shard>.<queue>`, svckit/shards.py), what was stored about a task read
back from SB_TASK_EVENTS (events.py), dead letters on SB_DEAD_LETTERS (deadletters.py).

Every job reaches the engine through the durable consumer of its shard (consumer.py, one per
shard this node holds, named `<consumer>-shard-<n>`): when the shard is acquired, the jobs it
holds (a previous owner's, killed or drained), then each one stored meanwhile, whether a
gateway stored it (gateway_svc/direct_submit.py) or this engine did for a Submit (one publish,
awaiting its PubAck: Submit replies only after it). A finished job is acked off the work
queue; one that finished before the consumer handed it over is removed by stream sequence
(STREAM.MSG.DELETE, without secure erase, which would first overwrite the message on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from svckit.lifecycle import cancel_and_wait
from svckit.nats import JOBS_STREAM, PUBLISH_TIMEOUT_S, store_job
from svckit.pubacks import AckedPublisher
from svckit.shards import queue_of, shard_subjects
from switchboard.v1 import events_pb2, tasks_pb2
from task_svc.consumer import JobConsumer
from task_svc.deadletters import DeadLetters
from task_svc.events import Stored, read_stored
from task_svc.legacy_jobs import MOVED_HEADER, move_legacy_jobs
from task_svc.store import Loop, Pending, Put, StoreUnavailable
from task_svc.task_state import TaskSpec

log = logging.getLogger(__name__)

MESSAGE_NOT_FOUND = 10037  # JetStream's error code: removed already (or never stored)
FOLLOW_RETRY_S = 0.5


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
        acks: AckedPublisher,
        *,
        consumer: str,
        ack_wait_s: float,
        max_ack_pending: int,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.acks = acks  # where jobs are stored (store_job) and stored events read
        self.consumer_name = consumer
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.consumers: dict[int, JobConsumer] = {}  # by shard held
        self._follows: dict[int, asyncio.Task[None]] = {}
        self._arrived: asyncio.Queue[Pending] = asyncio.Queue()
        self.letters = DeadLetters(nc, PUBLISH_TIMEOUT_S)

    async def open(self) -> None:
        await self.letters.open()

    async def close(self) -> None:
        for shard in list(self.consumers):
            await self.release(shard)

    def loops(self) -> Mapping[str, Loop]:
        return {"in-progress acks": self._keep_alive}

    async def acquire(self, shard: int) -> list[Pending]:
        with unavailable():
            if shard == 0:  # once per cluster start, by whoever takes shard 0
                await move_legacy_jobs(self.js, self.consumer_name)
            consumer = JobConsumer(
                self.nc,
                name=f"{self.consumer_name}-shard-{shard}",
                ack_wait_s=self.ack_wait_s,
                max_ack_pending=self.max_ack_pending,
                filter_subject=shard_subjects(shard),
            )
            await consumer.bind()
            msgs = await consumer.take_pending()
        self.consumers[shard] = consumer
        self._follows[shard] = asyncio.create_task(self._follow(consumer), name=f"jobs {shard}")
        return [job for msg in msgs if (job := await self._job(consumer, msg)) is not None]

    async def release(self, shard: int) -> None:
        await cancel_and_wait(self._follows.pop(shard, None))
        consumer = self.consumers.pop(shard, None)
        if consumer is not None:
            await consumer.close()

    async def _follow(self, consumer: JobConsumer) -> None:
        """One shard's jobs as they are stored, into the arrivals every shard shares."""
        while True:
            try:
                async for msg in consumer.follow():
                    job = await self._job(consumer, msg)
                    if job is not None:
                        self._arrived.put_nowait(job)
            except (nats.errors.Error, OSError, TimeoutError) as error:
                log.warning("job arrivals broke; following again", extra={"e": repr(error)})
            await asyncio.sleep(FOLLOW_RETRY_S)

    async def arrivals(self) -> AsyncIterator[Pending]:
        while True:
            yield await self._arrived.get()

    async def _keep_alive(self) -> None:
        """The in-progress acks of every shard's held jobs (consumer.py)."""
        interval = max(self.ack_wait_s / 3, 0.1)
        while True:
            await asyncio.sleep(interval)
            for consumer in list(self.consumers.values()):
                await consumer.touch_held()

    async def put(self, spec: TaskSpec, msg_id: str) -> Put:
        with unavailable():
            job = spec.to_job().SerializeToString()
            ack = await store_job(self.acks, spec.task_id, spec.queue, job, msg_id)
        return Put(ack.seq, bool(ack.duplicate))

    async def _job(self, consumer: JobConsumer, msg: Msg) -> Pending | None:
        """A delivered job, or None for one that cannot be read (terminated: never again)."""
        metadata = msg.metadata
        seq = metadata.sequence.stream
        try:
            job = events_pb2.Job.FromString(msg.data)
            if not job.task_id:
                raise ValueError("job without task_id")
        except Exception:
            log.error("undecodable job terminated", extra={"subject": msg.subject})
            consumer.held.pop(seq, None)
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.term()
            return None
        moved = bool(msg.headers and msg.headers.get(MOVED_HEADER))
        # A recreated consumer counts deliveries from one again: a job stored before it was
        # bound may have run at the shard's previous holder, however it comes now.
        redelivered = metadata.num_delivered > 1 or moved or seq <= consumer.stored_before_bind
        return Pending(TaskSpec.from_job(job, queue_of(msg.subject)), seq, redelivered)

    async def done(self, seq: int) -> None:
        with unavailable():
            for consumer in self.consumers.values():
                if seq in consumer.held:
                    await consumer.ack(seq)
                    return
            await self._delete(seq)

    async def _delete(self, seq: int) -> None:
        request = orjson.dumps({"seq": seq, "no_erase": True})
        reply = await self.nc.request(f"$JS.API.STREAM.MSG.DELETE.{JOBS_STREAM}", request)
        error = orjson.loads(reply.data).get("error")
        if error and error.get("err_code") != MESSAGE_NOT_FOUND:
            raise nats.errors.Error(f"job {seq} not removed: {error.get('description')}")

    async def last_stored(self, task_id: str) -> Stored | None:
        with unavailable():
            return await read_stored(self.acks, task_id)

    async def put_dead_letter(self, letter: tasks_pb2.DeadLetter) -> None:
        with unavailable():
            await self.letters.put(letter)

    async def dead_letter(self, task_id: str) -> tasks_pb2.DeadLetter | None:
        return await self.letters.get(task_id)

    async def remove_dead_letter(self, task_id: str) -> bool:
        with unavailable():
            return await self.letters.remove(task_id)

    async def dead_letters(self, queue: str, limit: int) -> list[tasks_pb2.DeadLetter]:
        return await self.letters.list(queue, limit)
