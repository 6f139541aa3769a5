"""The QueueBoard (events.proto): task_svc's queues as a gateway needs them to answer an
`llm_generate` whose job it stores itself (gateway_svc/direct_submit.py): how many wait at
each priority, free slots, the mean run time and the depth limit; and, for the operator
dashboard (gateway_svc/admin.py), how long each queue's oldest job has waited. Published on
core NATS every `interval_s`: not stored, a gateway keeps the last one it heard.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.client import Client

from svckit.lifecycle import cancel_and_wait
from svckit.nats import QUEUE_BOARD_SUBJECT
from switchboard.v1 import events_pb2
from task_svc.queues import Queues

log = logging.getLogger(__name__)


def board(queues: Queues, node: str = "") -> events_pb2.QueueBoard:
    return events_pb2.QueueBoard(queues=[queue.stats() for queue in queues], node=node)


class BoardPublisher:
    def __init__(self, nc: Client, queues: Queues, interval_s: float, node: str = "") -> None:
        self.nc = nc
        self.queues = queues
        self.interval_s = interval_s
        self.node = node
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="queue board")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                data = board(self.queues, self.node).SerializeToString()
                await self.nc.publish(QUEUE_BOARD_SUBJECT, data)
            except (nats.errors.Error, OSError):
                pass  # NATS away: the gateways stop trusting the board after a few seconds
            except Exception:  # a bug: say so, and go on with the next board
                log.exception("queue board failed")
            await asyncio.sleep(self.interval_s)
