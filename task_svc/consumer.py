"""The durable pull consumer on SB_JOBS: at start it brings back the jobs a previous
incarnation left (killed, or stopped with them unfinished), then (`follow`) every job stored
while this one runs, the moment it is stored: mostly those a gateway stored itself to
acknowledge an `llm_generate` at once (gateway_svc/direct_submit.py), and the engine's own,
which it recognises by task id.

The deliveries it hands out are held: in-progress acks go out every third of `ack_wait_s`
while their jobs wait or run (`keep_alive`, a loop the engine supervises), an ack when one is
done, a nak for those still held at close.

One consumer per shard (`filter_subject`: that shard's jobs), bound by the node holding the
shard (task_svc/membership.py), and only one node holds a shard at a time. When a node takes a
shard, its consumer is deleted and created again, which makes JetStream deliver every job
still stored at once (the previous holder's deliveries are forgotten) instead of after
ack_wait: a task_svc killed with -9 has its queued and running work back immediately, at its
restart or wherever its shards went.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from svckit.nats import JOBS_STREAM

log = logging.getLogger(__name__)

FETCH_BATCH = 256  # jobs asked for per pull request
FETCH_EXPIRES_S = 0.5  # how long one pull request of `take_pending` waits on the server
# `follow` keeps one pull request waiting on the server, renewed when used up or expired;
# the server sends a heartbeat while it has nothing, so a request lost with a NATS
# reconnect is noticed after three missed ones and asked again.
FOLLOW_EXPIRES_S = 30.0
FOLLOW_HEARTBEAT_S = 1.0
HEARTBEAT = "100"


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
        self.nc = nc
        self.js = nc.jetstream()
        self.name = name
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.filter_subject = filter_subject
        self.held: dict[int, Msg] = {}  # by stream sequence
        self._sub: JetStreamContext.PullSubscription | None = None
        self._pending_at_bind = 0
        # The stream's last sequence just before this consumer was made: a job at or below
        # it may have been delivered (and run) by a previous holder, whichever of `take_pending`
        # and `follow` hands it over here; above it, the job was stored since.
        self.stored_before_bind = 0

    async def bind(self) -> None:
        """Recreate the durable consumer (see the module docstring) and bind to it."""
        stream = await self.js.stream_info(JOBS_STREAM)
        self.stored_before_bind = stream.state.last_seq
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
        # What it holds comes with the answer: on a cluster, an info request made at once
        # may reach a server that does not know the new consumer yet.
        info = await self.js.add_consumer(JOBS_STREAM, config)
        self._pending_at_bind = info.num_pending or 0
        self._sub = await self.js.pull_subscribe_bind(durable=self.name, stream=JOBS_STREAM)

    async def take_pending(self) -> list[Msg]:
        """Every job waiting for this consumer when it was bound; each is held until
        `ack`ed."""
        assert self._sub is not None
        remaining = self._pending_at_bind
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

    async def follow(self) -> AsyncIterator[Msg]:
        """Every job delivered from now on, each held until `ack`ed; runs until cancelled.

        Deliveries are queued by a subscription callback and taken without suspending while
        any wait: nats-py's own message iterator makes a task and an `asyncio.wait` per
        message, which under load cost each job of a burst a few turns of a busy event loop
        (hundreds of milliseconds for the last of 300)."""
        inbox = self.nc.new_inbox()
        delivered: asyncio.Queue[Msg] = asyncio.Queue()

        async def deliver(msg: Msg) -> None:
            delivered.put_nowait(msg)

        sub = await self.nc.subscribe(inbox, cb=deliver)
        pull = orjson.dumps(
            {
                "batch": FETCH_BATCH,
                "expires": int(FOLLOW_EXPIRES_S * 1e9),
                "idle_heartbeat": int(FOLLOW_HEARTBEAT_S * 1e9),
            }
        )
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{JOBS_STREAM}.{self.name}"
        try:
            while True:
                await self.nc.publish(subject, pull, reply=inbox)
                left = FETCH_BATCH
                while left > 0:
                    msg = await _next(delivered, 3 * FOLLOW_HEARTBEAT_S)
                    if msg is None:
                        break  # heartbeats stopped: the request is gone, ask again
                    status = JetStreamContext.is_status_msg(msg)
                    if status == HEARTBEAT:
                        continue
                    if status:  # 408: the request expired; 409: ask again
                        break
                    left -= 1
                    self.held[msg.metadata.sequence.stream] = msg
                    yield msg
        finally:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()

    async def ack(self, seq: int) -> None:
        """A finished job off the work queue. Not confirmed (a round trip per job): an ack
        lost with the connection means a redelivery, of a job whose task is stored as
        finished, which is then only removed (intake.py)."""
        msg = self.held.pop(seq)
        await msg.ack()

    async def close(self) -> None:
        """Nak every job still held, for redelivery (the in-progress acks have stopped)."""
        held, self.held = list(self.held.values()), {}
        for msg in held:
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.nak()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None

    async def touch_held(self) -> None:
        """An in-progress ack for every held job (the store sends them every third of
        ack_wait): a held job's ack_wait runs from its delivery, queued or running, so
        JetStream is told we are still on it well before it would redeliver it."""
        for msg in list(self.held.values()):
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.in_progress()


async def _next(queue: asyncio.Queue[Msg], timeout: float) -> Msg | None:
    """The next message, or None after `timeout` without one; no timer while one waits."""
    if not queue.empty():
        return queue.get_nowait()
    try:
        async with asyncio.timeout(timeout):
            return await queue.get()
    except TimeoutError:
        return None
