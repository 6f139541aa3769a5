"""The ack's own path: the gateway stores an `llm_generate`'s job in JetStream itself and
replies as soon as JetStream confirms it, with no hop through task_svc, whose event loop is
busy with every stream's events. task_svc's job consumer then hands the job to the engine
(task_svc/consumer.py), which runs it exactly as a job it stored itself.

The job goes out on a NATS connection of the acks' own (svckit/direct_publisher.py: the
PubAck wakes the ack from the socket's read callback, without nats-py's task hops), or through
nats-py while that one is down.

Taken only for a task the channel knows to be new: its join said so, its watch has seen no
event since, and the join is recent (`max_age_s`, well inside JetStream's duplicate window).
Everything else goes to TaskService.Submit, which knows what became of a task submitted
before: so does a job the store already held (message id = task id, `duplicate`), and one
that could not be stored here (NATS away, no stream yet). A Submit repeated after either is
deduplicated by JetStream all the same.

What task_svc would check first is checked here with the same rules: the request
(svckit/requests.py), the model (svckit/catalog.py), and whether the queue is full, from the
QueueBoard task_svc publishes a few times a second (task_svc/queue_board.py). The ack's
position and eta are estimated from that board; the `queued` push that follows carries
task_svc's own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import grpc
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from svckit.catalog import ModelCatalog, job_of
from svckit.direct_publisher import DirectPublisher
from svckit.errors import ServiceError
from svckit.nats import QUEUE_BOARD_SUBJECT, JobPublisher, close_nats, store_job
from svckit.pubacks import AckedPublisher
from svckit.queueing import eta_ms, queue_full
from switchboard.v1 import common_pb2, events_pb2, tasks_pb2

log = logging.getLogger(__name__)

BOARD_STALE_S = 5.0  # an older board says nothing: task_svc is away or not publishing
MAX_AGE_S = 3600.0  # the duplicate window is 24 h (svckit/nats.py)


@dataclass
class _Queue:
    stats: events_pb2.QueueStats
    heard_at: float
    waiting: list[int]  # by priority, read out of the message once
    stored_since: int = 0  # jobs this gateway stored after the board was heard


@dataclass
class QueueBoard:
    """The last QueueBoard heard, per queue, with what this gateway added since."""

    queues: dict[str, _Queue] = field(default_factory=dict)

    def heard(self, board: events_pb2.QueueBoard, now: float) -> None:
        self.queues = {
            stats.queue: _Queue(stats, now, list(stats.waiting_by_priority))
            for stats in board.queues
        }

    def fresh(self, queue: str, now: float) -> _Queue | None:
        known = self.queues.get(queue)
        return known if known is not None and now - known.heard_at < BOARD_STALE_S else None

    def refusal(self, queue: str, now: float) -> ServiceError | None:
        known = self.fresh(queue, now)
        if known is None:
            return None
        s = known.stats
        depth = sum(known.waiting) + known.stored_since
        return queue_full(queue, depth, s.max_depth, s.concurrency, s.mean_run_s)

    def stored(self, queue: str, priority: int, now: float) -> tuple[int, int]:
        """Count a job stored into `queue`; its estimated (position, eta_ms)."""
        known = self.fresh(queue, now)
        if known is None:
            return 1, 0
        s = known.stats
        known.stored_since += 1
        position = sum(known.waiting[: priority + 1]) + known.stored_since
        return position, eta_ms(position, s.free_slots, s.concurrency, s.mean_run_s)


class DirectSubmit:
    def __init__(
        self,
        nc: Client,
        catalog: ModelCatalog,
        *,
        llm_channel: grpc.aio.Channel | None = None,
        max_age_s: float = MAX_AGE_S,
        publisher: DirectPublisher | None = None,
    ) -> None:
        self.nc = nc
        self.llm_channel = llm_channel  # the catalogue's, closed with this
        self.acks = AckedPublisher(nc)
        # The acks' own connection (svckit/direct_publisher.py); nats-py's while it is down.
        self.publisher = publisher
        self.catalog = catalog
        self.max_age_s = max_age_s
        self.board = QueueBoard()

    async def start(self) -> None:
        await self.nc.subscribe(QUEUE_BOARD_SUBJECT, cb=self._heard)
        await self.nc.flush()  # subscribed on the server: no board is missed from here on
        if self.publisher is not None:
            self.publisher.start()

    async def close(self) -> None:
        if self.publisher is not None:
            await self.publisher.close()
        await self.catalog.close()
        if self.llm_channel is not None:
            await self.llm_channel.close()
        await close_nats(self.nc)

    def _jobs(self) -> JobPublisher:
        if self.publisher is not None and self.publisher.connected:
            return self.publisher
        return self.acks

    async def _heard(self, msg: Msg) -> None:
        try:
            board = events_pb2.QueueBoard.FromString(msg.data)
        except Exception:
            log.warning("unreadable queue board ignored")
            return
        self.board.heard(board, time.monotonic())

    async def submit(self, request: tasks_pb2.SubmitRequest) -> tasks_pb2.SubmitResponse | None:
        """Store the job and answer for it; None when TaskService.Submit must answer instead.
        Raises ServiceError for a refusal (unknown model, queue full)."""
        resolved = await self.catalog.resolve(request.model)
        now = time.monotonic()
        refusal = self.board.refusal(resolved.queue, now)
        if refusal is not None:
            raise refusal
        job = job_of(request, resolved)
        try:
            data = job.SerializeToString()
            ack = await store_job(
                self._jobs(), request.task_id, resolved.queue, data, request.task_id
            )
        except (nats.errors.Error, OSError, TimeoutError) as error:
            log.warning(
                "job not stored here; task_svc will",
                extra={"task_id": request.task_id, "e": repr(error)},
            )
            return None
        if ack.duplicate:
            return None
        position, eta = self.board.stored(resolved.queue, request.priority, now)
        state = common_pb2.TaskState(
            task_id=request.task_id,
            user_id=request.user_id,
            status=common_pb2.TASK_STATUS_QUEUED,
            model=resolved.model,
            queue_position=position,
            eta_ms=eta,
        )
        return tasks_pb2.SubmitResponse(state=state)
