"""Running tasks: a queue's free slots start its next tasks; one run's outcome becomes a
retry (back to QUEUED after a backoff), a terminal state, or a dead letter; finishing
publishes the terminal event and acks the job, in that order."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import nats.errors

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, events_pb2
from task_svc.deadletters import dead_letter
from task_svc.intake import EngineBase
from task_svc.job import RESTARTED, Job
from task_svc.queues import JobQueue
from task_svc.task_server import TaskServer, TaskServerDown
from task_svc.worker import run_task

log = logging.getLogger(__name__)

Code = common_pb2.ErrorCode
Status = common_pb2.TaskStatus
Kind = events_pb2.LifecycleKind

_TERMINAL_KIND = {
    Status.TASK_STATUS_COMPLETED: Kind.LIFECYCLE_KIND_COMPLETED,
    Status.TASK_STATUS_FAILED: Kind.LIFECYCLE_KIND_FAILED,
    Status.TASK_STATUS_CANCELLED: Kind.LIFECYCLE_KIND_CANCELLED,
}


class Runner(EngineBase):
    def _pump(self, queue: JobQueue) -> None:
        if not self._intake_open:
            return  # starting or stopping: what waits stays (for later, or redelivery)
        while (task_id := queue.scheduler.next_ready()) is not None:
            job = self._jobs.get(task_id)
            if job is None:
                queue.scheduler.finished(task_id)
                continue
            self._uncount(job)
            job.runner = asyncio.create_task(self._run(job, queue), name=f"run:{task_id}")
            self._notify("started", task_id)

    async def _run(self, job: Job, queue: JobQueue) -> None:
        """Own one run of a task. The worker is its own asyncio task so that cancelling it (a
        user's Cancel, shutdown, a supervisor giving up) always lands in code that runs."""
        started = time.monotonic()
        lifecycle: events_pb2.LifecycleEvent | None = None
        dead: ServiceError | None = None
        retry_in: float | None = None
        try:
            if self._stopping:
                return  # shutdown came first: the job stays for redelivery
            outcome: Any = None
            if not job.cancel_requested:
                job.worker = asyncio.create_task(
                    run_task(job.server, self.llm, self.publisher.publish),
                    name=f"work:{job.task_id}",
                )
                try:
                    outcome = await job.worker
                except asyncio.CancelledError:
                    if job.stop_reason == "shutdown":
                        return  # the job stays unacked: shutdown naks it for redelivery
            if job.cancel_requested:
                cancelled = await self._apply_or_none(job, lambda core: core.cancelled())
                lifecycle = cancelled or lifecycle
            elif isinstance(outcome, ServiceError):
                attempts = job.server.core.attempts
                retry_in = None if self._stopping else queue.retry.delay_s(attempts, outcome)
                if retry_in is None:
                    error = outcome.to_proto()
                    lifecycle = await self._apply_or_none(job, lambda core: core.failed(error))
                    dead = outcome if outcome.retryable else None
            else:
                lifecycle = outcome
                if job.stop_reason == "failed":
                    dead = ServiceError(Code.ERROR_CODE_INTERNAL, "task server crashed")
        except TaskServerDown:
            pass  # the supervisor gave up: give_up failed the task
        except Exception as error:
            log.exception("task runner failed", extra={"task_id": job.task_id})
            failure = ServiceError(Code.ERROR_CODE_INTERNAL, f"task runner failed: {error!r}")
            lifecycle = await self._apply_or_none(job, lambda core: core.failed(failure.to_proto()))
        finally:
            queue.meter.record(time.monotonic() - started)
            queue.scheduler.finished(job.task_id)
            self._pump(queue)
        if retry_in is not None and isinstance(outcome, ServiceError):
            await self._retry_later(job, queue, retry_in, outcome)
            return
        await self._finish(job, lifecycle, dead)

    async def _retry_later(
        self, job: Job, queue: JobQueue, delay_s: float, error: ServiceError
    ) -> None:
        """Back to QUEUED, and into the scheduler again after `delay_s`."""
        attempt = job.server.core.attempts + 1
        message = (
            f"{RESTARTED}: attempt {attempt} of {queue.config.max_attempts} "
            f"in {delay_s:.1f}s after {error.reason}"
        )
        eta_ms = int(delay_s * 1000)
        lifecycle = await self._apply_or_none(job, lambda core: core.queued(0, eta_ms, message))
        if lifecycle is not None:
            self.publisher.publish(lifecycle)
        job.runner = job.worker = None
        job.scheduled = False
        if job.cancel_requested or job.server.core.terminal:
            await self._finish(job, await self._apply_or_none(job, lambda c: c.cancelled()))
            return
        self._count(job)

        def due() -> None:
            job.retry_timer = None
            if self._jobs.get(job.task_id) is job and not job.cancel_requested:
                self._maybe_schedule(job)

        job.retry_timer = asyncio.get_running_loop().call_later(delay_s, due)
        self._notify("retrying", job.task_id)

    async def _finish(
        self,
        job: Job,
        lifecycle: events_pb2.LifecycleEvent | None,
        dead: ServiceError | None = None,
    ) -> None:
        """Dead-letter if due, publish the terminal lifecycle event (await its PubAck), then
        ack the job: each step is stored before the next, so a crash in between repeats it."""
        self._uncount(job)
        core = job.server.core
        if dead is not None:
            await self._dead_letter(job, dead)
        if lifecycle is None and core.terminal:
            lifecycle = core.lifecycle(_TERMINAL_KIND[core.status])
        if lifecycle is not None:
            await self.publisher.publish(lifecycle)
        await self._done(job)
        if self._jobs.get(job.task_id) is job:
            del self._jobs[job.task_id]
        job.finished.set()
        self._expire_later(job.server)
        # Per task, so DEBUG: at hundreds of tasks a second, INFO is for what goes wrong.
        log.debug(
            "task finished",
            extra={"task_id": job.task_id, "status": Status.Name(core.status), "seq": core.seq},
        )
        self._notify("finished", job.task_id)

    async def _dead_letter(self, job: Job, reason: ServiceError) -> None:
        letter = dead_letter(job.spec, job.server.core, reason)
        backoff = 0.05
        while True:  # never acked without its dead letter stored
            try:
                await self.dead_letters.put(letter)
                break
            except (nats.errors.Error, OSError, TimeoutError) as error:
                log.warning("dead letter not stored, retrying", extra={"error": repr(error)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        log.warning("task dead-lettered", extra={"task_id": job.task_id, "code": reason.reason})
        self._notify("dead", job.task_id)

    def _gave_up(self, server: TaskServer, error: BaseException) -> None:
        lifecycle = server.give_up(error)
        job = self._jobs.get(server.task_id)
        if job is None:
            if lifecycle is not None:
                self.publisher.publish(lifecycle)
            self._expire_later(server)
            return
        if job.runner is not None:
            job.stop_reason = "failed"
            if job.worker is not None:
                job.worker.cancel()
        else:
            if job.retry_timer is not None:
                job.retry_timer.cancel()
            self.queue(job.spec.queue).scheduler.remove(job.task_id)
            job.cancel_requested = True
            reason = ServiceError(Code.ERROR_CODE_INTERNAL, "task server crashed")
            self._spawn(self._finish(job, lifecycle, reason), f"finish:{job.task_id}")
