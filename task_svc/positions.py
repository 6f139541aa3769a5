"""Queue positions: the ack and the `progress` events of a queued task carry its position
and an eta computed from the queue's measured throughput (scheduler.ThroughputMeter).

Watched queued tasks get a Progress when their position or eta changed, at most once per
interval (coalesced; the task's log keeps only the newest such update). Unwatched ones cost
nothing: Get, and the state that starts a Watch, compute their position when asked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from functools import partial

from switchboard.v1 import common_pb2
from task_svc.job import Job
from task_svc.queues import JobQueue, Queues
from task_svc.task_server import TaskServer, TaskServerDown
from task_svc.task_state import TaskCore

Status = common_pb2.TaskStatus


class PositionReporter:
    def __init__(self, jobs: Mapping[str, Job], queues: Queues, interval_s: float) -> None:
        self.jobs = jobs
        self.queues = queues
        self.interval_s = interval_s

    def _where(self, server: TaskServer) -> tuple[JobQueue, int] | None:
        job = self.jobs.get(server.task_id)
        if job is None or server.core.status != Status.TASK_STATUS_QUEUED:
            return None
        position = job.queue.scheduler.position(server.task_id)
        return (job.queue, position) if position else None

    def fresh_state(self, server: TaskServer) -> common_pb2.TaskState:
        """The task's state, with its position and eta as of now when it is queued."""
        state = server.core.snapshot()
        where = self._where(server)
        if where is not None:
            queue, position = where
            state.queue_position, state.eta_ms = position, queue.eta_ms(position)
        return state

    async def refresh(self, server: TaskServer) -> None:
        where = None if server.down else self._where(server)
        if where is not None:
            queue, position = where
            moved = partial(
                TaskCore.queue_moved, position=position, eta_ms=queue.eta_ms(position), emit=True
            )
            with contextlib.suppress(TaskServerDown):
                await server.apply(moved)

    async def run(self) -> None:
        """The loop that moves watchers' positions (the engine supervises it)."""
        while True:
            await asyncio.sleep(self.interval_s)
            for queue in self.queues:
                if queue.scheduler.waiting:
                    await self._update(queue)

    async def _update(self, queue: JobQueue) -> None:
        for position, task_id in enumerate(list(queue.scheduler.order()), start=1):
            job = self.jobs.get(task_id)
            if job is None or not job.server.watchers or job.server.down:
                continue
            eta = queue.eta_ms(position)
            if (job.server.core.queue_position, job.server.core.eta_ms) == (position, eta):
                continue
            moved = partial(TaskCore.queue_moved, position=position, eta_ms=eta, emit=True)
            with contextlib.suppress(TaskServerDown):
                await job.server.apply(moved)
