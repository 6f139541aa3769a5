"""What one replica spends, told to the other replicas of its service over core NATS, so that
a rate limit counted in each process is one budget for the fleet, not one per replica.

A replica records what it takes from a budget (`spend(key, amounts)`); every `interval_s`
the sums since the last message go out on `subject` as one message, and each other replica
hands them to its own `on_spent`, which charges its buckets with them. The check stays
local, so an admission waits for no round trip; the price is a window of `interval_s` in
which two replicas may both admit the last unit. Core NATS may lose a message: a lost charge
is lost (a budget passed by at most one interval's spending), nothing breaks.

The gateway's per-user limits (gateway_svc/shared_limits.py) also share counts of what is
held (sockets), so they keep their own message; llm_svc's provider limits use this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from svckit.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)

Spent = dict[str, list[float]]  # key -> amounts, summed element by element


class SpendShare:
    def __init__(
        self,
        nc: Client,
        subject: str,
        on_spent: Callable[[Spent], None],
        *,
        interval_s: float = 0.1,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.on_spent = on_spent
        self.interval_s = interval_s
        self.id = uuid.uuid4().hex
        self._unsent: Spent = {}
        self._sub: Subscription | None = None
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subject, cb=self._heard)
        self._loop = asyncio.create_task(self._publish_every_interval(), name=self.subject)

    async def close(self) -> None:
        await cancel_and_wait(self._loop)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    def spend(self, key: str, amounts: Sequence[float]) -> None:
        """This replica took `amounts` from the budget `key` (negative: gave back)."""
        sums = self._unsent.get(key)
        if sums is None:
            self._unsent[key] = list(amounts)
            return
        for index, amount in enumerate(amounts):
            sums[index] += amount

    def message(self) -> bytes | None:
        """What was spent since the last message, or None when nothing was."""
        if not self._unsent:
            return None
        spent, self._unsent = self._unsent, {}
        return orjson.dumps({"from": self.id, "spent": spent})

    async def _publish_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if not self.nc.is_connected:
                continue  # kept until connected again: the charges are late, not lost
            data = self.message()
            if data is None:
                continue
            try:
                await self.nc.publish(self.subject, data)
            except (nats.errors.Error, OSError) as error:
                log.warning("spending not shared this time", extra={"e": repr(error)})

    async def _heard(self, msg: Msg) -> None:
        try:
            news = orjson.loads(msg.data)
            sender = str(news["from"])
            spent = {str(k): [float(a) for a in v] for k, v in news["spent"].items()}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.warning("unreadable spending message ignored", extra={"subject": msg.subject})
            return
        if sender != self.id:
            self.on_spent(spent)
