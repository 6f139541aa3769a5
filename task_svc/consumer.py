"""The durable pull consumer on SB_JOBS: it only brings back, at start, the jobs a previous
incarnation left (killed, or stopped with them unfinished). What a running task_svc submits it
runs itself, and removes by sequence when done (jetstream_store.py): no consumer hands it back
the job it has just stored.

The deliveries it hands out are held: in-progress acks go out every third of `ack_wait_s`
while their jobs wait or run, an ack when one is done, a nak for those still held at close.

Single-instance assumption: task_svc runs as ONE instance owning SB_JOBS. At start the
consumer is deleted and created again, which makes JetStream deliver every job still stored at
once (the previous incarnation's deliveries are forgotten) instead of after ack_wait: a
task_svc killed with -9 gets its queued and running work back immediately. Several instances
need one subject partition (shard) per owner instead (`filter_subject`), each recovering only
its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from svckit.nats import JOBS_STREAM

log = logging.getLogger(__name__)

FETCH_BATCH = 256  # jobs asked for per pull request
FETCH_EXPIRES_S = 0.5  # how long one pull request waits for jobs on the server
ACK_TIMEOUT_S = 5.0


class JobConsumer:
    def __init__(
        self,
        nc: Client,
        *,
        name: str,
        ack_wait_s: float,
        max_ack_pending: int,
        filter_subject: str,
    ) -> None:
        self.js = nc.jetstream()
        self.name = name
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.filter_subject = filter_subject
        self.held: dict[int, Msg] = {}  # by stream sequence
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
            filter_subject=self.filter_subject,
        )
        await self.js.add_consumer(JOBS_STREAM, config)
        self._sub = await self.js.pull_subscribe_bind(durable=self.name, stream=JOBS_STREAM)
        self._keeper = asyncio.create_task(self._keep_alive(), name="jobs-in-progress")

    async def take_pending(self) -> list[Msg]:
        """Every job waiting for this consumer now; each is held until `ack`ed."""
        assert self._sub is not None
        info = await self.js.consumer_info(JOBS_STREAM, self.name)
        remaining = info.num_pending or 0
        out: list[Msg] = []
        while remaining > 0:
            try:
                msgs = await self._sub.fetch(min(FETCH_BATCH, remaining), timeout=FETCH_EXPIRES_S)
            except nats.errors.TimeoutError:
                break
            remaining -= len(msgs)
            out.extend(msgs)
        for msg in out:
            self.held[msg.metadata.sequence.stream] = msg
        return out

    async def ack(self, seq: int) -> None:
        """Confirmed: a finished job is gone from the work queue once this returns."""
        msg = self.held.pop(seq)
        await msg.ack_sync(timeout=ACK_TIMEOUT_S)

    async def close(self) -> None:
        """Stop the in-progress acks and nak every job still held, for redelivery."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        held, self.held = list(self.held.values()), {}
        for msg in held:
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.nak()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None

    async def _keep_alive(self) -> None:
        # A held job's ack_wait runs from its delivery, queued or running: tell JetStream
        # we are still on it well before it would be redelivered.
        interval = max(self.ack_wait_s / 3, 0.1)
        while True:
            await asyncio.sleep(interval)
            for msg in list(self.held.values()):
                with contextlib.suppress(nats.errors.Error, OSError):
                    await msg.in_progress()
