"""The job engine: durable intake on JetStream, in-memory scheduling per queue, one supervised
TaskServer per task, retries, dead letters, and the rules that tie a job message's fate to
its task's.

Guarantees (docs/architecture.md, task_svc):
- Submit replies only after JetStream has stored the `Job` (PubAck), with message id =
  task id, so a retried Submit is deduplicated by JetStream as well as by the registry. A full
  queue refuses Submit with OVERLOADED and a retry-after (load shedding), before storing.
- Jobs come back through a durable pull consumer (consumer.py) and wait in their queue's
  scheduler. A job message is acked only after its task's terminal lifecycle event is
  acknowledged by JetStream; while it waits or runs it gets in-progress acks. At shutdown,
  running tasks get a grace period, then are cancelled and their jobs nak'd.
- Retryable failures run again after a backoff (queues.RetryPolicy) while attempts remain;
  the task goes back to QUEUED with a "restarted: ..." message (watchers reset their text).
  Out of attempts (or crashed too often), the task fails and is dead-lettered (deadletters.py)
  before its job is acked.
- Recovery: at start every job not acked is taken from the stream at once and its task
  rebuilt before the gRPC server opens (recovery.py), so Watch and Get answer correctly from
  the first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats.errors

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, tasks_pb2
from task_svc.job import RESTARTED, job_subject
from task_svc.recovery import Recovery
from task_svc.registry import forbidden
from task_svc.task_server import TaskServer
from task_svc.task_state import TaskCore, TaskSpec

log = logging.getLogger(__name__)

Code = common_pb2.ErrorCode


class JobEngine(Recovery):
    """The job engine (see the module docstring); its layers are in intake.py, runner.py
    and recovery.py."""

    # -- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the consumer, rebuild every task whose job was not acked (all of them before
        this returns), then open intake."""
        await self.dead_letters.open()
        await self.consumer.bind()
        pending = await self.consumer.take_pending()
        recoveries = [t for msg in pending if (t := self._on_msg(msg)) is not None]
        if recoveries:
            await asyncio.gather(*recoveries)
            log.info("jobs recovered at start", extra={"count": len(recoveries)})
        self._intake_open = True
        for queue in list(self._queues.values()):
            self._pump(queue)
        self.consumer.start(self._held)
        self.positions.start()

    def stop_intake(self) -> None:
        """Refuse new Submits (idempotent)."""
        self._intake_open = False

    async def shutdown(self, grace_s: float) -> None:
        """Stop intake, let running tasks finish for `grace_s`, then cancel them and nak their
        jobs (so they are redelivered), nak the queued ones, stop every actor. Idempotent."""
        self.stop_intake()
        running = [j.runner for j in self._jobs.values() if j.runner and not j.runner.done()]
        if running:
            await asyncio.wait(running, timeout=grace_s)
        self._stopping = True
        for job in list(self._jobs.values()):
            if job.retry_timer is not None:
                job.retry_timer.cancel()
            if job.worker is not None and not job.worker.done() and not job.cancel_requested:
                job.stop_reason = "shutdown"
                job.worker.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for job in list(self._jobs.values()):
            if job.msg is not None and not job.finished.is_set():
                with contextlib.suppress(nats.errors.Error, OSError):
                    await job.msg.nak()
        await self.positions.stop()
        await self.consumer.close()
        for task in list(self._owned):
            task.cancel()
        await asyncio.gather(*self._owned, return_exceptions=True)
        await self.supervisor.stop()

    # -- the gRPC-facing operations ---------------------------------------------------

    async def submit(self, spec: TaskSpec) -> tuple[common_pb2.TaskState, bool]:
        """Accept a task durably; (its state, whether it had been submitted before)."""
        if not self._intake_open:
            raise ServiceError(Code.ERROR_CODE_OVERLOADED, "task_svc is shutting down")
        self.registry.check_owner(spec.task_id, spec.user_id)
        job = self._jobs.get(spec.task_id)
        if job is not None:
            if job.spec.user_id != spec.user_id:
                raise forbidden(spec.task_id)
            await asyncio.shield(job.accepted)
            return self._fresh(job.server), True
        server = self.registry.get(spec.task_id)
        if server is not None:
            return server.core.snapshot(), True
        refusal = self.queue(spec.queue).refuse()
        if refusal is not None:
            raise refusal

        job = self._new_job(spec)
        try:
            ack = await self.js.publish(
                job_subject(spec.queue),
                spec.to_job().SerializeToString(),
                timeout=self.config.publish_timeout_s,
                headers={"Nats-Msg-Id": spec.task_id},
            )
        except (nats.errors.Error, OSError, TimeoutError) as error:
            failure = ServiceError(
                Code.ERROR_CODE_OVERLOADED, "the task could not be stored; try again"
            )
            self._abandon(job, failure)
            log.warning("job publish failed", extra={"task_id": spec.task_id, "error": repr(error)})
            raise failure from error
        restart = ""
        if ack.duplicate:
            # JetStream knew this id (submitted before a restart of task_svc, and its job not
            # pending any more, or recovery would have rebuilt it): what was stored says how
            # it ended, or where its seq must continue.
            stored = await self._stored(spec.task_id)
            if stored is not None and stored.user_id and stored.user_id != spec.user_id:
                self._abandon(job, forbidden(spec.task_id))
                raise forbidden(spec.task_id)
            if stored is not None and stored.terminal:
                assert stored.lifecycle is not None
                job.server.core.restore_terminal(stored.lifecycle)
                self._uncount(job)
                self._register(job)
                job.accepted.set_result(None)
                self._jobs.pop(spec.task_id, None)
                job.finished.set()
                self._expire_later(job.server)
                return job.server.core.snapshot(), True
            if stored is not None:
                self._continue_seq(job, stored)
                restart = RESTARTED
        job.stream_seq = ack.seq
        self._register(job)
        await self._accept(job, restart)
        # Per task, so DEBUG: at hundreds of tasks a second, INFO is for what goes wrong.
        log.debug(
            "task accepted",
            extra={"task_id": spec.task_id, "queue": spec.queue, "priority": spec.priority},
        )
        return job.server.core.snapshot(), bool(ack.duplicate)

    async def find(self, task_id: str) -> TaskServer | None:
        """The task's server; for a task finished before this process started (so not in
        memory), one rebuilt from its terminal lifecycle event on SB_TASK_EVENTS."""
        server = self.registry.get(task_id)
        if server is not None or task_id in self._jobs:
            return server
        stored = await self._stored(task_id)
        if stored is None or not stored.terminal:
            return None
        server = self.registry.get(task_id)  # someone else may have rebuilt it meanwhile
        if server is not None or task_id in self._jobs:
            return server
        assert stored.lifecycle is not None
        last = stored.lifecycle
        core = TaskCore(TaskSpec(task_id, last.user_id, last.prompt, last.model, last.priority))
        core.restore_terminal(last)
        server = TaskServer(core, self.host)
        self.registry.add(server)
        self._expire_later(server)
        return server

    async def cancel(self, task_id: str, user_id: str) -> common_pb2.TaskState:
        server = await self.find(task_id)
        job = self._jobs.get(task_id)
        if server is None and job is not None:
            await asyncio.shield(job.accepted)  # a Submit in flight: cancel what it accepts
            server = self.registry.get(task_id)
        if server is None:
            raise ServiceError(Code.ERROR_CODE_NOT_FOUND, f"no task {task_id}")
        if server.user_id != user_id:
            raise forbidden(task_id)
        job = self._jobs.get(task_id)
        if job is None or server.core.terminal:
            return server.core.snapshot()
        await asyncio.shield(job.accepted)
        if job.cancel_requested:
            await job.finished.wait()
        elif job.runner is not None:
            job.cancel_requested = True
            job.stop_reason = "cancel"
            if job.worker is not None:
                job.worker.cancel()
            await job.finished.wait()
        else:
            job.cancel_requested = True
            if job.retry_timer is not None:
                job.retry_timer.cancel()
            self.queue(job.spec.queue).scheduler.remove(task_id)
            lifecycle = await self._apply_or_none(job, lambda core: core.cancelled())
            await self._finish(job, lifecycle)
        return server.core.snapshot()

    async def state(self, task_id: str, user_id: str) -> common_pb2.TaskState:
        server = await self.find(task_id)
        if server is None:
            raise ServiceError(Code.ERROR_CODE_NOT_FOUND, f"no task {task_id}")
        if server.user_id != user_id:
            raise forbidden(task_id)
        return self._fresh(server)

    async def refresh_position(self, server: TaskServer) -> None:
        """Bring a queued task's position and eta up to date (before a Watch reads them)."""
        await self.positions.refresh(server)

    async def list_dead_letters(self, queue: str, limit: int) -> list[tasks_pb2.DeadLetter]:
        return await self.dead_letters.list(queue, limit)

    async def requeue_dead_letter(self, task_id: str) -> common_pb2.TaskState:
        """Run a dead-lettered task again (same id, seq continuing, attempts from zero)."""
        if not self._intake_open:
            raise ServiceError(Code.ERROR_CODE_OVERLOADED, "task_svc is shutting down")
        letter = await self.dead_letters.get(task_id)
        if letter is None:
            raise ServiceError(Code.ERROR_CODE_NOT_FOUND, f"no dead letter for task {task_id}")
        if task_id in self._jobs:
            raise ServiceError(Code.ERROR_CODE_INVALID_REQUEST, f"task {task_id} is active")
        old = await self.find(task_id)
        stored_seq = old.core.seq if old is not None else 0
        if old is not None:
            self.registry.remove(old)
            old.end()
        spec = TaskSpec(
            task_id=letter.task_id,
            user_id=letter.user_id,
            prompt=letter.prompt,
            model=letter.model,
            priority=letter.priority,
            queue=letter.queue or "default",
            options=letter.options,
            submitted_ns=letter.submitted_at.ToNanoseconds(),
        )
        job = self._new_job(spec, seq_base=stored_seq)
        try:
            # A new message id: JetStream's dedup window still knows the task id.
            ack = await self.js.publish(
                job_subject(spec.queue),
                spec.to_job().SerializeToString(),
                timeout=self.config.publish_timeout_s,
                headers={"Nats-Msg-Id": f"{task_id}:requeue:{time.time_ns()}"},
            )
        except (nats.errors.Error, OSError, TimeoutError) as error:
            failure = ServiceError(Code.ERROR_CODE_OVERLOADED, "the job could not be stored")
            self._abandon(job, failure)
            raise failure from error
        job.stream_seq = ack.seq
        self._register(job)
        await self._accept(job, f"{RESTARTED}: requeued from the dead letters")
        await self.dead_letters.remove(task_id)
        return job.server.core.snapshot()
