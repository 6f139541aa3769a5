"""Every way a job comes in: a Submit, a requeued dead letter, and the jobs a previous
incarnation left in the store (recovery, at start). Each creates the job (ACCEPTING), has it
stored, registers its TaskServer, and puts it in QUEUED and in its queue.

Submit is durable and idempotent: it replies only once the store has confirmed the job, with
message id = task id, so a Submit repeated while this process runs finds the job in memory,
and one repeated after a restart is deduplicated by the store; what was stored about the task
then says whether it finished (restored, not rerun) or must run on.

A job from a previous incarnation runs again unless its task had finished (then it is only
removed), its seq continuing above anything a watcher may have seen (task_server.py,
checkpoints), its first event saying that the text restarts, and the text its last
checkpoint held coming back at once, for the run to continue.

Once its job is made, each way in runs with the job's `task` span current, so what it logs
(stored, recovered, dropped) carries the job's trace id; a job refused before it is made
names the trace its traceparent says (`tracing.trace_fields`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from svckit import tracing
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, tasks_pb2
from task_svc.deadletters import requeued_spec
from task_svc.events import Stored
from task_svc.job import RESTARTED, Job
from task_svc.job_state import Step
from task_svc.queues import Queues
from task_svc.registry import forbidden
from task_svc.runner import Runner
from task_svc.servers import Servers
from task_svc.store import JobStore, Lifecycle, Pending, Put, StoreUnavailable
from task_svc.task_server import TaskServer
from task_svc.task_state import TaskSpec

log = logging.getLogger(__name__)

Code = common_pb2.ErrorCode


LOOKUP_ATTEMPTS = 5
LOOKUP_RETRY_S = 0.25  # doubled after each failed lookup: 3.75 s of patience in all


def not_stored() -> ServiceError:
    return ServiceError(Code.ERROR_CODE_OVERLOADED, "the task could not be stored; try again")


class Intake:
    def __init__(
        self,
        jobs: dict[str, Job],
        queues: Queues,
        store: JobStore,
        publisher: Lifecycle,
        servers: Servers,
        runner: Runner,
        seq_reserve: int,
    ) -> None:
        self.jobs = jobs
        self.queues = queues
        self.store = store
        self.publisher = publisher
        self.servers = servers
        self.registry = servers.registry
        self.runner = runner
        self.seq_reserve = seq_reserve

    async def submit(self, spec: TaskSpec) -> tuple[TaskServer, bool]:
        """Accept a task durably: its server, and whether it had been submitted before."""
        self.registry.check_owner(spec.task_id, spec.user_id)
        job = self.jobs.get(spec.task_id)
        if job is not None:  # running, queued, or its first Submit still being stored
            if job.spec.user_id != spec.user_id:
                raise forbidden(spec.task_id)
            await job.accepted.wait()
            server = self.registry.get(spec.task_id)
            if server is None:  # that first Submit failed
                raise not_stored()
            return server, True
        server = self.registry.get(spec.task_id)
        if server is not None:  # finished, still in memory
            return server, True
        refusal = self.queues[spec.queue].refuse()
        if refusal is not None:
            raise refusal
        job = self._new(spec)
        with tracing.current(job.span):  # nothing attached when tracing is off
            return await self._accept(job)

    async def _accept(self, job: Job) -> tuple[TaskServer, bool]:
        """Store a new job and queue it (or find how it went, when the store knew it)."""
        spec = job.spec
        put = await self._put(job, spec.task_id)
        if put.duplicate:
            return await self._resubmitted(job), True
        self._enqueue(job)
        # Per task, so DEBUG: at hundreds of tasks a second, INFO is for what goes wrong.
        log.debug("task accepted", extra={"task_id": spec.task_id, "queue": spec.queue})
        return job.server, False

    async def _resubmitted(self, job: Job) -> TaskServer:
        """The store knew the id: submitted before a restart, and not pending any more (or
        recovery would have rebuilt it). What was stored says how it ended, or where its seq
        must continue."""
        try:
            stored = await self.last_stored(job)
        except StoreUnavailable as error:
            raise not_stored() from error
        if stored is not None and stored.user_id and stored.user_id != job.spec.user_id:
            self._drop(job)
            raise forbidden(job.task_id)
        last = stored.lifecycle if stored is not None and stored.terminal else None
        if last is not None:
            job.server.core.restore_terminal(last)
            self.registry.add(job.server)
            self._drop(job)
            self.servers.retire_later(job.server)
            return job.server
        if stored is not None:
            continue_seq(job, stored, self.seq_reserve)
        self._enqueue(job, RESTARTED if stored is not None else "")
        return job.server

    async def arrived(self, item: Pending) -> None:
        """A job handed over by the store: one a gateway stored itself (new here: it runs),
        one of this engine's own (known already: the store holds it until `done`), or, when
        redelivered, one that may have run before (recovered from what was stored)."""
        task_id = item.spec.task_id
        job = self.jobs.get(task_id)
        if job is not None:
            if job.seq not in (0, item.seq):  # the same task stored twice: one is enough
                await self.runner.remove(item.seq, task_id)
            return
        if self.registry.get(task_id) is not None:  # finished here already
            await self.runner.remove(item.seq, task_id)
            return
        if self.registry.owner(task_id) not in (None, item.spec.user_id):
            # A gateway stores only for the user whose join claimed the id (registry.py).
            # No job, so no span of its own: the line names the trace the job came in.
            trace = tracing.trace_fields(item.spec.traceparent)
            log.error("job of another user's task dropped", extra={"task_id": task_id, **trace})
            await self.runner.remove(item.seq, task_id)
            return
        job = self._new(item.spec)
        job.seq = item.seq
        with tracing.current(job.span):
            if item.redelivered:  # it may have run (and even finished) somewhere before
                await self._recover(job)
                return
            self._enqueue(job)

    async def requeue(self, letter: tasks_pb2.DeadLetter, seq_base: int) -> TaskServer:
        """Run a dead-lettered task again: same id, seq continuing, attempts from zero."""
        job = self._new(requeued_spec(letter), seq_base=seq_base)
        with tracing.current(job.span):
            # A new message id: the store's deduplication still knows the task id.
            await self._put(job, f"{job.task_id}:requeue:{time.time_ns()}")
            requeued = tasks_pb2.Reset(attempt=1, reason="requeued")
            self._enqueue(job, f"{RESTARTED}: requeued from the dead letters", requeued)
        return job.server

    async def recover(self, pending: list[Pending]) -> None:
        """Rebuild the jobs a previous incarnation left, all of them before this returns:
        each as a redelivered arrival (it may have run, and even finished). Raises
        StoreUnavailable when what was stored about one could not be read (the shard's
        take-over is tried again)."""
        arrivals = (self.arrived(replace(item, redelivered=True)) for item in pending)
        for result in await asyncio.gather(*arrivals, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result

    async def _recover(self, job: Job) -> None:
        stored = await self.last_stored(job)
        last = stored.lifecycle if stored is not None and stored.terminal else None
        log.info("job recovered", extra={"task_id": job.task_id, "finished": last is not None})
        if last is not None:
            job.server.core.restore_terminal(last)
            self.registry.add(job.server)
            await self.runner.finish(job)  # re-published: the store drops the duplicate
            return
        stored = stored or Stored(0, job.spec.user_id, 0)
        continue_seq(job, stored, self.seq_reserve)
        self._enqueue(job, RESTARTED, text=(stored.content, stored.progress))

    async def last_stored(self, job: Job) -> Stored | None:
        """What was stored about the task of a job that may have run before. A failed
        lookup is asked again, a few times; then the job is dropped here and
        StoreUnavailable raised (its message stays stored, for another try). Never read as
        nothing stored: a task that had finished then ran a second time, and its history
        held two COMPLETED (a NATS node killed mid-stream, the lookup timing out)."""
        delay, attempt = LOOKUP_RETRY_S, 1
        while True:
            try:
                return await self.store.last_stored(job.task_id)
            except StoreUnavailable as error:
                log.warning(
                    "stored state lookup failed",
                    extra={"task_id": job.task_id, "attempt": attempt, "e": repr(error)},
                )
                if attempt == LOOKUP_ATTEMPTS:
                    self._drop(job)
                    raise
            await asyncio.sleep(delay)
            delay, attempt = delay * 2, attempt + 1

    # -- the steps every way in takes --------------------------------------------------

    def _new(self, spec: TaskSpec, *, seq_base: int = 0) -> Job:
        job = Job(spec, self.servers.new(spec, seq_base=seq_base), self.queues[spec.queue])
        job.server.span = job.span  # its loop runs in the job's trace (task_server.py)
        self.jobs[spec.task_id] = job
        return job

    async def _put(self, job: Job, msg_id: str) -> Put:
        try:
            put = await self.store.put(job.spec, msg_id)
        except StoreUnavailable as error:
            log.warning("job not stored", extra={"task_id": job.task_id, "error": repr(error)})
            self._drop(job)
            raise not_stored() from error
        job.seq = put.seq
        return put

    def _drop(self, job: Job) -> None:
        """Forget a job that has nothing to run."""
        job.move(Step.DROP)
        if self.jobs.get(job.task_id) is job:
            del self.jobs[job.task_id]

    def _enqueue(
        self,
        job: Job,
        restart: str = "",
        reset: tasks_pb2.Reset | None = None,
        text: tuple[str, float] = ("", 0.0),
    ) -> None:
        """Put the task in QUEUED (with its position and eta), register its server, and put
        the job in its queue.

        `text`: the text a recovered task's last checkpoint held, and its progress. Watchers
        drop theirs at the restart and get this back at once, in one chunk; the run then
        continues it (worker.py, `continue_from`) instead of generating it again.

        QUEUED is applied to the state directly, not through the mailbox: the server is not
        registered yet, so nothing else can reach it (no watcher, no message), and the ack
        waits for no mailbox round trip. A watcher that joined before the Submit gets the
        QUEUED event from the log when it subscribes, just after `registry.add`."""
        position = job.queue.scheduler.position_for(job.spec.priority)
        eta_ms = job.queue.eta_ms(position)
        queued = job.server.core.queued(position, eta_ms, restart, reset)
        if text[0]:
            job.server.core.chunk(*text)
        self.registry.add(job.server)
        if queued is not None and queued.lifecycle is not None:
            self.publisher.publish(queued.lifecycle)
        job.move(Step.ACCEPT)
        self.runner.schedule(job)


def continue_seq(job: Job, stored: Stored, reserve: int) -> None:
    """Start above any seq a watcher may have seen (task_server.py, checkpoints). The server
    is not registered yet, so nothing else sees its state: set it directly."""
    core = job.server.core
    core.seq = stored.seq + reserve
    core.attempts = stored.attempts
    job.server.durable_seq = stored.seq
