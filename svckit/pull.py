"""A JetStream pull consumer's deliveries in batches, without a task per message.

nats-py's `fetch` makes an asyncio task, a `wait_for` and a uuid4 for every message it hands
out, and asks the server twice per batch (a no-wait probe, then a waiting request). Here one
subscription callback queues what the server delivers, and `take` hands out what is queued:

- With nothing queued and no request waiting on the server, it asks for a batch with
  `no_wait`: what is stored comes at once, then a 404 (nothing more) ends the request.
- With nothing stored (the 404 came first), it asks again, waiting up to `timeout` on the
  server (a 408 ends it); `take` returns as soon as the first message arrives, and the
  rest of that request's deliveries queue up for the next `take`.

So at most one request is out at a time (one that got its whole batch is over), and no more
than `batch` messages are ever delivered and not yet taken. `close` unsubscribes and gives
back what was queued and never taken, for the owner to nak (a request still waiting on the
server expires within `timeout`; what it delivers meanwhile is redelivered after ack_wait,
as after a crash).
"""

from __future__ import annotations

import asyncio
import collections

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext

is_status = JetStreamContext.is_status_msg


class PullFeed:
    def __init__(self, nc: Client, stream: str, consumer: str, *, batch: int) -> None:
        self.nc = nc
        self.batch = batch
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._queued: collections.deque[Msg] = collections.deque()
        self._arrived = asyncio.Event()
        self._left = 0  # messages the request still open on the server may deliver

    @property
    def waiting(self) -> int:
        """Deliveries (status messages included) queued and not taken yet."""
        return len(self._queued)

    @property
    def started(self) -> bool:
        return self._sub is not None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self._inbox, cb=self._delivered)

    async def _delivered(self, msg: Msg) -> None:
        self._queued.append(msg)
        self._arrived.set()

    async def take(self, timeout: float) -> list[Msg]:
        """What is stored, up to `batch` messages; if nothing is, the first to come within
        `timeout` and what came with it; empty if none did."""
        assert self.started, "start() first"
        taken = self._take_queued()
        if taken or self._left:
            return taken or await self._wait(timeout)
        await self._ask(no_wait=True)
        taken = await self._wait(timeout)
        if taken or self._left:
            return taken
        await self._ask(expires_s=timeout)  # nothing was stored: wait on the server
        return await self._wait(timeout)

    async def _ask(self, *, no_wait: bool = False, expires_s: float = 0.0) -> None:
        request: dict[str, int | bool] = {"batch": self.batch}
        if no_wait:
            request["no_wait"] = True
        else:
            request["expires"] = int(expires_s * 1e9)
        self._left = self.batch
        await self.nc.publish(self._next_subject, orjson.dumps(request), reply=self._inbox)

    async def _wait(self, timeout: float) -> list[Msg]:
        """Until something is taken, the open request ends, or `timeout` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._left:
            self._arrived.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._arrived.wait()
            except TimeoutError:
                self._left = 0  # lost (a reconnect) or never answered: the next take asks
                return []
            taken = self._take_queued()
            if taken:
                return taken
        return []

    def _take_queued(self) -> list[Msg]:
        taken: list[Msg] = []
        while self._queued and len(taken) < self.batch:
            msg = self._queued.popleft()
            if is_status(msg):
                self._left = 0  # 404, 408, 409 (no heartbeats are asked for): it is over
            else:
                taken.append(msg)
                self._left = max(self._left - 1, 0)  # at 0 it got all it asked for
        return taken

    async def close(self) -> list[Msg]:
        """Stop taking deliveries; the messages delivered and never taken."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()
        left = [msg for msg in self._queued if not is_status(msg)]
        self._queued.clear()
        return left
