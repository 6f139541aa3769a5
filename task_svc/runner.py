"""Running jobs and ending them: a queue's free slots start its next jobs; a run's outcome
becomes a retry (QUEUED again after a backoff) or the end of the job; cancel, the supervisor
giving up on a TaskServer and shutdown stop jobs wherever they are.

Every job ends in `finish`: dead letter (if due), terminal lifecycle event, removal from the
store, each stored before the next, so a crash in between repeats the rest at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from svckit import tracing
from svckit.errors import ServiceError
from svckit.lifecycle import cancel_and_wait
from svckit.nats import PUBLISH_TIMEOUT_S
from switchboard.v1 import common_pb2, events_pb2, tasks_pb2
from task_svc.deadletters import dead_letter
from task_svc.job import RESTARTED, RESUMING, Job
from task_svc.job_state import JobState, Step
from task_svc.llm_client import LlmClient, LlmUnreachable
from task_svc.queues import JobQueue
from task_svc.servers import Servers
from task_svc.store import JobStore, Lifecycle, StoreUnavailable
from task_svc.task_server import TaskServer, TaskServerDown
from task_svc.task_state import TaskCore, Transition
from task_svc.worker import Outcome, run_task

log = logging.getLogger(__name__)

Code = common_pb2.ErrorCode
Status = common_pb2.TaskStatus
Kind = events_pb2.LifecycleKind
Change = Callable[[TaskCore], Transition | None]
Notify = Callable[[str, str], None]

TERMINAL_KIND = {
    Status.TASK_STATUS_COMPLETED: Kind.LIFECYCLE_KIND_COMPLETED,
    Status.TASK_STATUS_FAILED: Kind.LIFECYCLE_KIND_FAILED,
    Status.TASK_STATUS_CANCELLED: Kind.LIFECYCLE_KIND_CANCELLED,
}
WAITING_IN_QUEUE = (JobState.QUEUED, JobState.RETRY_WAIT)


class Runner:
    def __init__(
        self,
        jobs: dict[str, Job],
        store: JobStore,
        publisher: Lifecycle,
        llm: LlmClient,
        servers: Servers,
        notify: Notify,
        owns: Callable[[str], bool] = lambda _task_id: True,
    ) -> None:
        self.jobs = jobs
        self.store = store
        self.publisher = publisher
        self.llm = llm
        self.servers = servers
        self.notify = notify
        self.owns = owns  # whether this node holds the task's shard
        self.open = False  # jobs start only while open (after start, before shutdown)
        self.stopping = False  # past the shutdown grace: what has not finished stays stored
        self._owned: set[asyncio.Task[None]] = set()

    # -- starting ---------------------------------------------------------------------

    def schedule(self, job: Job) -> None:
        """A QUEUED job goes into its queue's scheduler; free slots start at once."""
        job.queue.scheduler.push(job.task_id, job.spec.priority)
        self.notify("scheduled", job.task_id)
        self.pump(job.queue)

    def pump(self, queue: JobQueue) -> None:
        while self.open and (task_id := queue.scheduler.next_ready()) is not None:
            job = self.jobs[task_id]  # the scheduler holds QUEUED jobs only
            if not self.owns(task_id):  # accepted as its shard was handed over
                queue.scheduler.finished(task_id)
                job.released = True
                self._let_go(job)
                continue
            job.move(Step.START)
            # Both tasks run with the job's `task` span current: what they log carries its
            # trace id (no context made when tracing is off).
            job.worker = asyncio.create_task(
                run_task(job.server, self.llm, self.publisher.publish, job.traceparent),
                name=f"work:{task_id}",
                context=tracing.context_with(job.span),
            )
            job.runner = asyncio.create_task(
                self._run(job), name=f"run:{task_id}", context=tracing.context_with(job.span)
            )
            self.notify("started", task_id)

    async def _run(self, job: Job) -> None:
        """Wait for the worker, then decide. The worker is its own asyncio task so that
        cancelling it (Cancel, shutdown, a supervisor giving up) always lands here."""
        assert job.worker is not None
        started = time.monotonic()
        await asyncio.wait([job.worker])
        job.queue.meter.record(time.monotonic() - started)
        job.queue.scheduler.finished(job.task_id)
        self.pump(job.queue)
        core = job.server.core
        result = outcome(job)
        if (self.stopping or job.released) and not core.terminal:
            self._let_go(job)  # cut by shutdown or a hand-over: run again where it goes
        elif isinstance(result, LlmUnreachable) and not core.terminal:
            await self._after_outage(job, result)
        elif isinstance(result, ServiceError) and not core.terminal:
            job.outage_since, job.outages = None, 0
            delay_s = job.queue.retry.delay_s(core.attempts, result)
            if delay_s is None:
                await self._fail(job, result)
                return
            attempt, most = core.attempts + 1, job.queue.config.max_attempts
            reset = tasks_pb2.Reset(
                attempt=attempt, max_attempts=most, reason="retry", error=result.reason
            )
            why = f"attempt {attempt} of {most} in {delay_s:.1f}s after {result.reason}"
            await self._again(job, delay_s, why, reset)
        else:
            await self.finish(job)  # completed, or cancelled, or failed by a give-up

    async def _after_outage(self, job: Job, error: LlmUnreachable) -> None:
        """llm_svc was unreachable or restarted under the task: our outage, not the
        provider's. The task runs again without spending the attempt, until the outage
        has lasted the deadline."""
        now = time.monotonic()
        if job.outage_since is None:
            job.outage_since = now
        job.outages += 1
        delay_s = job.queue.retry.outage_delay_s(job.outages, now - job.outage_since)
        if delay_s is None:
            await self._fail(job, error)
            return
        core = job.server.core
        reset = tasks_pb2.Reset(attempt=core.attempts, reason="outage", error=error.reason)
        why = f"llm_svc unreachable, again in {delay_s:.1f}s"
        await self._again(job, delay_s, why, reset, uncount=True)

    async def _fail(self, job: Job, error: ServiceError) -> None:
        failed = partial(TaskCore.failed, error=error.to_proto())
        await self.finish(job, failed, dead=error if error.retryable else None)

    async def _again(
        self,
        job: Job,
        delay_s: float,
        why: str,
        reset: tasks_pb2.Reset,
        *,
        uncount: bool = False,
    ) -> None:
        """Back to QUEUED, and into the scheduler after `delay_s`. A run that had streamed
        text is resumed (the text stays, the next run continues it: worker.py); any other
        restarts, `reset` telling watchers why. `uncount`: the cut attempt does not count."""
        eta_ms = int(delay_s * 1000)
        if job.server.core.content:
            message = f"{RESUMING}: {why}"
            change = partial(
                TaskCore.queued_to_resume, eta_ms=eta_ms, message=message, uncount=uncount
            )
        else:
            change = partial(
                TaskCore.queued,
                position=0,
                eta_ms=eta_ms,
                restart=f"{RESTARTED}: {why}",
                reset=reset,
                uncount=uncount,
            )
        queued = await apply(job, change)
        if queued is not None:
            self.publisher.publish(queued)
        if job.server.core.terminal:  # cancelled, or crashed, meanwhile
            await self.finish(job)
            return
        job.move(Step.RETRY)
        job.retry_timer = asyncio.get_running_loop().call_later(delay_s, self._due, job)
        self.notify("retrying", job.task_id)

    def _due(self, job: Job) -> None:
        job.retry_timer = None
        job.move(Step.DUE)
        self.schedule(job)

    # -- ending -----------------------------------------------------------------------

    async def finish(
        self, job: Job, change: Change | None = None, dead: ServiceError | None = None
    ) -> None:
        """End the job: apply `change` (the terminal one, if not made yet), then store the
        dead letter if due, the terminal lifecycle event, and remove the job from the store."""
        job.move(Step.FINISH)  # before any await: nobody else starts or ends it now
        # Its span current here too: a cancel or a give-up ends the job outside its runner.
        with tracing.current(job.span):
            await self._finish(job, change, dead)

    async def _finish(self, job: Job, change: Change | None, dead: ServiceError | None) -> None:
        if change is not None:
            await apply(job, change)
        core = job.server.core
        if dead is None and job.server.down and core.status == Status.TASK_STATUS_FAILED:
            # Failed by the supervisor giving up on its server.
            dead = ServiceError(Code.ERROR_CODE_INTERNAL, "task server crashed")
        if dead is not None:
            await self._dead_letter(job, dead)
        if core.terminal:
            await self.publisher.publish(core.lifecycle(TERMINAL_KIND[core.status]))
        await self.remove(job.seq, job.task_id)
        job.move(Step.REMOVED)
        if self.jobs.get(job.task_id) is job:
            del self.jobs[job.task_id]
        self.servers.retire_later(job.server)
        # Per task, so DEBUG: at hundreds of tasks a second, INFO is for what goes wrong.
        log.debug(
            "task finished",
            extra={"task_id": job.task_id, "status": Status.Name(core.status), "seq": core.seq},
        )
        self.notify("finished", job.task_id)

    async def remove(self, seq: int, task_id: str) -> None:
        try:
            await self.store.done(seq)
        except StoreUnavailable as error:
            # Not fatal: at the next start the job comes back, its task finished: only removed.
            log.warning("job removal failed", extra={"task_id": task_id, "e": repr(error)})

    async def _dead_letter(self, job: Job, reason: ServiceError) -> None:
        letter = dead_letter(job.spec, job.server.core, reason)
        backoff = 0.05
        while True:  # never removed without its dead letter stored
            try:
                await self.store.put_dead_letter(letter)
                break
            except StoreUnavailable as error:
                log.warning("dead letter not stored, retrying", extra={"error": repr(error)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
        log.warning("task dead-lettered", extra={"task_id": job.task_id, "code": reason.reason})
        self.notify("dead", job.task_id)

    def _withdraw(self, job: Job) -> None:
        """Take a waiting job out of its queue (its scheduler place, or its retry timer)."""
        job.queue.scheduler.remove(job.task_id)
        if job.retry_timer is not None:
            job.retry_timer.cancel()
            job.retry_timer = None

    async def cancel(self, job: Job) -> None:
        """Cancel the job's task, and return once the job is done. A running one is
        cancelled first, then its worker (which closes the generation upstream), and its
        runner ends it; a waiting one is ended here."""
        await job.accepted.wait()
        if job.state is JobState.RUNNING:
            await apply(job, TaskCore.cancelled)
            if job.worker is not None:
                job.worker.cancel()
        if job.state in WAITING_IN_QUEUE:  # waiting, or gone back to waiting meanwhile
            self._withdraw(job)
            await self.finish(job, TaskCore.cancelled)
        await job.finished.wait()

    def gave_up(self, server: TaskServer, error: BaseException) -> None:
        """The supervisor gave up on a TaskServer: its task fails (and is dead-lettered)
        wherever its job is. Called by the supervisor, so it must not block."""
        failed = server.give_up(error)
        job = self.jobs.get(server.task_id)
        if job is None or job.server is not server:
            if failed is not None:
                self.publisher.publish(failed)
            self.servers.retire_later(server)
        elif job.state is JobState.RUNNING and job.worker is not None:
            job.worker.cancel()  # its runner ends the job
        elif job.state in WAITING_IN_QUEUE:
            self._withdraw(job)
            self._spawn(self.finish(job), f"finish:{job.task_id}")
        # ACCEPTING: the apply in progress fails, and intake ends the job.

    async def stop(self, grace_s: float) -> None:
        """Shutdown: running jobs may finish for `grace_s`, then are cancelled; every job not
        finished by then is released (it stays in the store for the next start)."""
        self.open = False
        runs = [j.runner for j in self.jobs.values() if j.runner and not j.runner.done()]
        if runs:
            await asyncio.wait(runs, timeout=grace_s)
        self.stopping = True
        cut = self._cut(list(self.jobs.values()))
        await asyncio.gather(*runs, return_exceptions=True)
        self._keep_text(cut)  # the publisher's own close waits for them
        for job in list(self.jobs.values()):
            if job.state in WAITING_IN_QUEUE:
                self._withdraw(job)
                job.move(Step.RELEASE)
        await cancel_and_wait(*self._owned)

    async def release(self, jobs: list[Job], grace_s: float, *, keep_text: bool = True) -> None:
        """A shard's hand-over: its waiting jobs are let go at once, its running ones may
        finish for `grace_s`, then are cut; all stay stored for the shard's next holder,
        with a checkpoint of each cut run's text, which the next holder continues
        (`keep_text`; not when NATS is out of reach: the last periodic one stands)."""
        for job in jobs:
            job.released = True
        self._let_go_waiting(jobs)
        runs = [j.runner for j in jobs if j.runner and not j.runner.done()]
        if runs:
            await asyncio.wait(runs, timeout=grace_s)
        cut = self._cut(jobs)
        await asyncio.gather(*runs, return_exceptions=True)
        self._let_go_waiting(jobs)  # gone back to waiting (a retry) meanwhile
        stored = self._keep_text(cut) if keep_text else []
        if stored:
            await asyncio.wait(stored, timeout=PUBLISH_TIMEOUT_S)

    @staticmethod
    def _cut(jobs: list[Job]) -> list[Job]:
        """Cancel the running ones' workers (their runners end them); those cut."""
        cut = [job for job in jobs if job.state is JobState.RUNNING and job.worker is not None]
        for job in cut:
            assert job.worker is not None
            job.worker.cancel()
        return cut

    def _keep_text(self, cut: list[Job]) -> list[asyncio.Future[None]]:
        """A checkpoint of each cut run that had streamed text: its next run, here after a
        restart or at the shard's next holder, continues from there (intake.py)."""
        cores = [job.server.core for job in cut]
        return [
            self.publisher.publish_snapshot(core.snapshot_message())
            for core in cores
            if core.content and not core.terminal
        ]

    def _let_go_waiting(self, jobs: list[Job]) -> None:
        for job in jobs:
            if job.state in WAITING_IN_QUEUE:
                self._withdraw(job)
                self._let_go(job)

    def _let_go(self, job: Job) -> None:
        """Leave an unfinished job in the store (RELEASE): the next start, or the next
        holder of its shard, runs it."""
        job.move(Step.RELEASE)
        if job.released and self.jobs.get(job.task_id) is job:
            del self.jobs[job.task_id]
        if not self.owns(job.task_id):
            self.servers.registry.remove(job.server)
            job.server.move_away()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._owned.add(task)
        task.add_done_callback(self._owned.discard)


def outcome(job: Job) -> Outcome:
    """What the job's worker ended with: None when it was cancelled or its server is gone."""
    worker = job.worker
    assert worker is not None and worker.done()
    if worker.cancelled():
        return None
    error = worker.exception()
    if error is None:
        return worker.result()
    if isinstance(error, TaskServerDown):
        return None  # the supervisor gave up: the task is failed already
    log.error("task runner failed", exc_info=error, extra={"task_id": job.task_id})
    return ServiceError(Code.ERROR_CODE_INTERNAL, f"task runner failed: {error!r}")


async def apply(job: Job, change: Change) -> events_pb2.LifecycleEvent | None:
    """Apply a change to the job's task; None also when its server is gone (given up)."""
    try:
        return await job.server.apply(change)
    except TaskServerDown:
        return None
