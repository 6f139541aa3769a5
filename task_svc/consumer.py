"""The engine's side of SB_JOBS: what Submit stored is run by the process that stored it, and
removed from the stream by sequence when done; a durable pull consumer only brings back, at
start, the jobs a previous incarnation left (killed, or stopped with them unfinished).

So a job costs one publish (Submit's PubAck) and one removal, never a round trip through a
consumer that hands the process back the job it has just stored. Recovered deliveries are held
with in-progress acks while they wait or run, and acked when done.

Single-instance assumption: task_svc runs as ONE instance owning SB_JOBS. At start the
consumer is deleted and created again, which makes JetStream deliver every job still stored at
once (the previous incarnation's deliveries are forgotten) instead of after ack_wait: a
task_svc killed with -9 gets its queued and running work back immediately. Several instances
need one subject partition (shard) per owner instead, each recovering only its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from svckit.nats import JOBS_STREAM, JOBS_SUBJECT_PREFIX

log = logging.getLogger(__name__)

# How long one pull request waits for jobs on the server.
FETCH_EXPIRES_S = 0.5
MESSAGE_NOT_FOUND = 10037  # JetStream's error code: removed already (or never stored)


class JobConsumer:
    def __init__(
        self,
        nc: Client,
        *,
        name: str,
        ack_wait_s: float,
        max_ack_pending: int,
        batch: int,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = name
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.batch = batch
        self.open = False
        self._sub: JetStreamContext.PullSubscription | None = None
        self._keeper: asyncio.Task[None] | None = None

    async def bind(self) -> None:
        """Recreate the durable consumer (see the module docstring) and bind to it."""
        with contextlib.suppress(NotFoundError):
            await self.js.delete_consumer(JOBS_STREAM, self.name)
        config = ConsumerConfig(
            name=self.name,
            durable_name=self.name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
            max_deliver=-1,
            filter_subject=f"{JOBS_SUBJECT_PREFIX}.>",
        )
        await self.js.add_consumer(JOBS_STREAM, config)
        self._sub = await self.js.pull_subscribe_bind(durable=self.name, stream=JOBS_STREAM)

    async def take_pending(self) -> list[Msg]:
        """Every job waiting on the stream now (at start: the previous incarnation's)."""
        assert self._sub is not None
        info = await self.js.consumer_info(JOBS_STREAM, self.name)
        remaining = info.num_pending or 0
        out: list[Msg] = []
        while remaining > 0:
            try:
                msgs = await self._sub.fetch(min(self.batch, remaining), timeout=FETCH_EXPIRES_S)
            except nats.errors.TimeoutError:
                break
            remaining -= len(msgs)
            out.extend(msgs)
        return out

    def start(self, held: Callable[[], Iterable[Msg]]) -> None:
        """Keep the recovered deliveries that `held` lists alive until they are acked."""
        self.open = True
        self._keeper = asyncio.create_task(self._keep_alive_loop(held), name="jobs-in-progress")

    async def remove(self, stream_seq: int) -> None:
        """Remove a finished job that this process stored (JetStream's STREAM.MSG.DELETE; no
        secure erase, which would overwrite the message on disk first)."""
        request = orjson.dumps({"seq": stream_seq, "no_erase": True})
        reply = await self.nc.request(f"$JS.API.STREAM.MSG.DELETE.{JOBS_STREAM}", request)
        error = orjson.loads(reply.data).get("error")
        if error and error.get("err_code") != MESSAGE_NOT_FOUND:
            raise nats.errors.Error(f"job {stream_seq} not removed: {error.get('description')}")

    async def close(self) -> None:
        self.open = False
        await cancel_quietly(self._keeper)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None

    async def _keep_alive_loop(self, held: Callable[[], Iterable[Msg]]) -> None:
        # A held job's ack_wait runs from its delivery, queued or running: tell JetStream
        # we are still on it well before it would be redelivered.
        interval = max(self.ack_wait_s / 3, 0.1)
        while True:
            await asyncio.sleep(interval)
            for msg in list(held()):
                with contextlib.suppress(nats.errors.Error, OSError):
                    await msg.in_progress()


async def cancel_quietly(task: asyncio.Task[object] | asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
