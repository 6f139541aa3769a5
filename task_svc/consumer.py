"""The engine's side of SB_JOBS: one durable pull consumer, fetched in a loop, and in-progress
acks for every job held.

Single-instance assumption: task_svc runs as ONE instance owning the durable consumer. At
start the consumer is deleted and created again, which makes JetStream deliver every job not
yet acked at once (the previous incarnation's deliveries are forgotten) instead of after
ack_wait: a task_svc killed with -9 gets its queued and running work back immediately. Two
instances sharing the consumer would steal each other's in-flight jobs this way; running
several needs one consumer (and one subject partition) per instance instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from svckit.nats import JOBS_STREAM, JOBS_SUBJECT_PREFIX

log = logging.getLogger(__name__)

# How long one pull request waits for jobs on the server (and so how long shutdown may wait
# for the last one to end).
FETCH_EXPIRES_S = 0.5


class JobConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        name: str,
        ack_wait_s: float,
        max_ack_pending: int,
        batch: int,
    ) -> None:
        self.js = js
        self.name = name
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.batch = batch
        self.open = False
        self._sub: JetStreamContext.PullSubscription | None = None
        self._fetcher: asyncio.Task[None] | None = None
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

    def start(self, on_msg: Callable[[Msg], Any], held: Callable[[], Iterable[Msg]]) -> None:
        self.open = True
        self._fetcher = asyncio.create_task(self._fetch_loop(on_msg), name="jobs-fetch")
        self._keeper = asyncio.create_task(self._keep_alive_loop(held), name="jobs-in-progress")

    def stop_fetching(self) -> None:
        """The fetch loop ends after its current pull request rather than being cancelled: a
        pull request left open on the server would swallow the jobs nak'd at shutdown
        (delivered to a gone inbox, they would wait out ack_wait before redelivery)."""
        self.open = False

    async def wait_fetcher(self) -> None:
        if self._fetcher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._fetcher), FETCH_EXPIRES_S + 2)
            except TimeoutError:
                await cancel_quietly(self._fetcher)

    async def close(self) -> None:
        self.open = False
        await cancel_quietly(self._fetcher)
        await cancel_quietly(self._keeper)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None

    async def _fetch_loop(self, on_msg: Callable[[Msg], Any]) -> None:
        assert self._sub is not None
        while self.open:
            try:
                msgs = await self._sub.fetch(self.batch, timeout=FETCH_EXPIRES_S)
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.Error, OSError) as error:
                log.warning("job fetch failed", extra={"error": repr(error)})
                await asyncio.sleep(0.5)  # NATS reconnecting: do not spin
                continue
            for msg in msgs:
                on_msg(msg)

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
