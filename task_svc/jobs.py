"""The job engine: durable intake on JetStream, in-memory scheduling, one supervised
TaskServer per task, and the rules that tie a job message's fate to its task's.

Guarantees (DESIGN.md, task_svc):
- Submit replies only after JetStream has stored the `Job` (PubAck), with message id =
  task id, so a retried Submit is deduplicated by JetStream as well as by the registry.
- Jobs come back through a durable pull consumer (explicit ack, MaxAckPending raised well
  above the default 1000 so deep queues are held) and wait in a `Scheduler` per queue.
- A job message is acked only after its task's terminal lifecycle event is acknowledged by
  JetStream; while it waits or runs it gets in-progress acks. A cancelled task's job is acked
  too, so it is never redelivered. At shutdown, running tasks get a grace period, then are
  cancelled and their jobs nak'd: another (or the next) task_svc runs them again.
- A redelivered job whose task this process does not know is rebuilt from its last lifecycle
  event: if that was terminal the job is only acked; otherwise the task runs again, its seq
  continuing after the last published one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from svckit.errors import ServiceError
from svckit.nats import JOBS_STREAM, JOBS_SUBJECT_PREFIX
from switchboard.v1 import common_pb2, events_pb2, llm_pb2_grpc
from task_svc.events import LifecyclePublisher, last_lifecycle
from task_svc.registry import Registry, forbidden
from task_svc.scheduler import Scheduler, ThroughputMeter
from task_svc.supervisor import Supervisor
from task_svc.task_server import TaskServer, TaskServerDown
from task_svc.task_state import TERMINAL, TaskCore, TaskSpec
from task_svc.worker import RetryPolicy, run_task

log = logging.getLogger(__name__)

Code = common_pb2.ErrorCode
Status = common_pb2.TaskStatus
Kind = events_pb2.LifecycleKind

_TERMINAL_KIND = {
    Status.TASK_STATUS_COMPLETED: Kind.LIFECYCLE_KIND_COMPLETED,
    Status.TASK_STATUS_FAILED: Kind.LIFECYCLE_KIND_FAILED,
    Status.TASK_STATUS_CANCELLED: Kind.LIFECYCLE_KIND_CANCELLED,
}


# How long one pull request waits for jobs on the server (and so how long shutdown may wait
# for the last one to end).
FETCH_EXPIRES_S = 0.5


@dataclass(frozen=True)
class EngineConfig:
    concurrency: int = 16
    ack_wait_s: float = 60.0
    max_ack_pending: int = 100_000
    consumer: str = "task_svc"
    fetch_batch: int = 256
    publish_timeout_s: float = 5.0
    watcher_limit: int = 1024
    retain_s: float = 300.0
    max_restarts: int = 3
    restart_period_s: float = 5.0


@dataclass
class Job:
    """The engine's record of one accepted task, from Submit (or redelivery) to ack."""

    spec: TaskSpec
    server: TaskServer
    accepted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    msg: Msg | None = None
    scheduled: bool = False
    cancel_requested: bool = False
    runner: asyncio.Task[None] | None = None
    worker: asyncio.Task[events_pb2.LifecycleEvent | None] | None = None
    stop_reason: str = ""  # why the runner was cancelled: "cancel" | "shutdown" | "failed"

    @property
    def task_id(self) -> str:
        return self.spec.task_id


def job_subject(queue: str) -> str:
    return f"{JOBS_SUBJECT_PREFIX}.{queue}"


class JobEngine:
    def __init__(
        self,
        js: JetStreamContext,
        publisher: LifecyclePublisher,
        llm: llm_pb2_grpc.LlmServiceStub,
        config: EngineConfig | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.js = js
        self.publisher = publisher
        self.llm = llm
        self.config = config or EngineConfig()
        self.retry_policy = retry_policy or RetryPolicy()
        self.registry = Registry()
        self.supervisor = Supervisor(
            "tasks",
            max_restarts=self.config.max_restarts,
            period_s=self.config.restart_period_s,
        )
        self.meter = ThroughputMeter()
        self._jobs: dict[str, Job] = {}
        self._schedulers: dict[str, Scheduler] = {}
        self._owned: set[asyncio.Task[Any]] = set()
        self._fetcher: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._intake_open = False
        self._stopping = False
        # Called with (what, task_id) on "scheduled", "started" and "finished": for metrics
        # and for tests that must await a step rather than sleep.
        self.observers: list[Callable[[str, str], None]] = []

    # -- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        consumer = ConsumerConfig(
            name=self.config.consumer,
            durable_name=self.config.consumer,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.ack_wait_s,
            max_ack_pending=self.config.max_ack_pending,
            max_deliver=-1,
            filter_subject=f"{JOBS_SUBJECT_PREFIX}.>",
        )
        # Create or update: a changed TASK_JOB_ACK_WAIT_S applies to the existing consumer.
        await self.js.add_consumer(JOBS_STREAM, consumer)
        self._sub = await self.js.pull_subscribe_bind(
            durable=self.config.consumer, stream=JOBS_STREAM
        )
        self._intake_open = True
        self._fetcher = asyncio.create_task(self._fetch_loop(), name="jobs-fetch")
        self._keeper = asyncio.create_task(self._keep_alive_loop(), name="jobs-in-progress")

    def stop_intake(self) -> None:
        """Refuse new Submits and stop taking jobs from JetStream (idempotent). The fetch loop
        ends after its current pull request rather than being cancelled: a pull request left
        open on the server would swallow the jobs we nak at shutdown (delivered to a gone
        inbox, they would wait out ack_wait before being redelivered)."""
        self._intake_open = False

    async def shutdown(self, grace_s: float) -> None:
        """Stop intake, let running tasks finish for `grace_s`, then cancel them and nak their
        jobs (so they are redelivered), nak the queued ones, stop every actor. Idempotent."""
        self.stop_intake()
        if self._fetcher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._fetcher), FETCH_EXPIRES_S + 2)
            except TimeoutError:
                await _wait_quietly(self._fetcher)
        running = [j.runner for j in self._jobs.values() if j.runner and not j.runner.done()]
        if running:
            await asyncio.wait(running, timeout=grace_s)
        self._stopping = True
        for job in list(self._jobs.values()):
            if job.worker is not None and not job.worker.done() and not job.cancel_requested:
                job.stop_reason = "shutdown"
                job.worker.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        for job in list(self._jobs.values()):
            if job.msg is not None and not job.finished.is_set():
                with contextlib.suppress(nats.errors.Error, OSError):
                    await job.msg.nak()
        await _wait_quietly(self._keeper)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._sub.unsubscribe()
            self._sub = None
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
            return job.server.core.snapshot(), True
        server = self.registry.get(spec.task_id)
        if server is not None:
            return server.core.snapshot(), True

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
        if ack.duplicate:
            # JetStream knew this id (submitted before a restart of task_svc): its job is
            # either finished or still on the stream, to be delivered to us. Its last
            # lifecycle event says which; set it before the server is visible to anyone.
            last = await self._last_lifecycle(spec.task_id)
            if last is not None and last.user_id and last.user_id != spec.user_id:
                self._abandon(job, forbidden(spec.task_id))
                raise forbidden(spec.task_id)
            if last is not None:
                job.server.core.seq = last.seq
                job.server.core.attempts = last.attempt
                if last.status in TERMINAL:
                    job.server.core.restore_terminal(last)
                    self._register(job)
                    job.accepted.set_result(None)
                    self._jobs.pop(spec.task_id, None)
                    job.finished.set()
                    return job.server.core.snapshot(), True
        self._register(job)
        await self._accept(job)
        return job.server.core.snapshot(), bool(ack.duplicate)

    async def _last_lifecycle(self, task_id: str) -> events_pb2.LifecycleEvent | None:
        try:
            return await last_lifecycle(self.js, task_id)
        except (nats.errors.Error, OSError, TimeoutError) as error:
            log.warning("lifecycle lookup failed", extra={"task_id": task_id, "e": repr(error)})
            return None

    async def find(self, task_id: str) -> TaskServer | None:
        """The task's server; for a task finished before this process started (so not in
        memory), one rebuilt from its terminal lifecycle event on SB_TASK_EVENTS."""
        server = self.registry.get(task_id)
        if server is not None or task_id in self._jobs:
            return server
        last = await self._last_lifecycle(task_id)
        if last is None or last.status not in TERMINAL:
            return None  # unknown, or in flight: its job's redelivery rebuilds it
        server = self.registry.get(task_id)  # someone else may have rebuilt it meanwhile
        if server is not None or task_id in self._jobs:
            return server
        spec = TaskSpec(task_id, last.user_id, last.prompt, last.model, last.priority)
        core = TaskCore(spec)
        core.restore_terminal(last)
        server = TaskServer(
            core, watcher_limit=self.config.watcher_limit, retain_s=self.config.retain_s
        )
        self._register_server(server)
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
            self._scheduler(job.spec.queue).remove(task_id)
            lifecycle = await server.apply(lambda core: core.cancelled())
            await self._finish(job, lifecycle)
        return server.core.snapshot()

    async def state(self, task_id: str, user_id: str) -> common_pb2.TaskState:
        server = await self.find(task_id)
        if server is None:
            raise ServiceError(Code.ERROR_CODE_NOT_FOUND, f"no task {task_id}")
        if server.user_id != user_id:
            raise forbidden(task_id)
        return server.core.snapshot()

    # -- inside ---------------------------------------------------------------------

    def _scheduler(self, queue: str) -> Scheduler:
        scheduler = self._schedulers.get(queue)
        if scheduler is None:
            scheduler = self._schedulers[queue] = Scheduler(self.config.concurrency)
        return scheduler

    def _new_job(self, spec: TaskSpec, *, seq_base: int = 0, attempts: int = 0) -> Job:
        core = TaskCore(spec, seq_base=seq_base, attempts=attempts)
        server = TaskServer(
            core, watcher_limit=self.config.watcher_limit, retain_s=self.config.retain_s
        )
        job = Job(spec, server)
        self._jobs[spec.task_id] = job
        return job

    def _register(self, job: Job) -> None:
        self._register_server(job.server)

    def _register_server(self, server: TaskServer) -> None:
        self.registry.add(server)

        def on_exit() -> None:
            if not server.down:
                self.registry.remove(server)

        self.supervisor.start_child(
            server.task_id,
            server.run,
            on_exit=on_exit,
            on_give_up=lambda error: self._gave_up(server, error),
        )

    def _abandon(self, job: Job, error: ServiceError) -> None:
        """Forget a job that was never accepted (not registered yet)."""
        self._jobs.pop(job.task_id, None)
        job.accepted.set_exception(error)
        job.accepted.exception()  # retrieved: waiters re-raise it themselves
        job.finished.set()

    async def _accept(self, job: Job) -> None:
        """Put the task in QUEUED (seq, position, eta) and let it be scheduled."""
        scheduler = self._scheduler(job.spec.queue)
        position = scheduler.position_for(job.spec.priority)
        eta_ms = self.meter.eta_ms(position, scheduler.free_slots, scheduler.concurrency)
        try:
            lifecycle = await job.server.apply(lambda core: core.queued(position, eta_ms))
        finally:
            if not job.accepted.done():
                job.accepted.set_result(None)
        if lifecycle is not None:
            self.publisher.publish(lifecycle)
        self._maybe_schedule(job)

    def _maybe_schedule(self, job: Job) -> None:
        # Both halves are needed: the task accepted (QUEUED applied) and its job message
        # delivered (so it can be acked); they may arrive in either order.
        if job.scheduled or job.cancel_requested or job.msg is None:
            return
        if not job.accepted.done() or job.server.core.terminal:
            return
        job.scheduled = True
        self._scheduler(job.spec.queue).push(job.task_id, job.spec.priority)
        self._notify("scheduled", job.task_id)
        self._pump(job.spec.queue)

    def _pump(self, queue: str) -> None:
        if not self._intake_open:
            return  # stopping: what waits stays for redelivery
        scheduler = self._scheduler(queue)
        while (task_id := scheduler.next_ready()) is not None:
            job = self._jobs.get(task_id)
            if job is None:
                scheduler.finished(task_id)
                continue
            job.runner = asyncio.create_task(self._run(job), name=f"run:{task_id}")
            self._notify("started", task_id)

    async def _run(self, job: Job) -> None:
        """Own one task's run. The worker is its own asyncio task so that cancelling it (a
        user's Cancel, shutdown, a supervisor giving up) always lands in code that runs."""
        started = time.monotonic()
        lifecycle: events_pb2.LifecycleEvent | None = None
        try:
            if self._stopping:
                return  # shutdown came first: the job stays for redelivery
            if not job.cancel_requested:
                job.worker = asyncio.create_task(
                    run_task(job.server, self.llm, self.publisher.publish, self.retry_policy),
                    name=f"work:{job.task_id}",
                )
                try:
                    lifecycle = await job.worker
                except asyncio.CancelledError:
                    if job.stop_reason == "shutdown":
                        return  # the job stays unacked: shutdown naks it for redelivery
            if job.cancel_requested:
                cancelled = await self._apply_or_none(job, lambda core: core.cancelled())
                lifecycle = cancelled or lifecycle
        except TaskServerDown:
            pass  # the supervisor gave up: give_up failed the task
        except Exception as error:
            log.exception("task runner failed", extra={"task_id": job.task_id})
            failure = ServiceError(Code.ERROR_CODE_INTERNAL, f"task runner failed: {error!r}")
            lifecycle = await self._apply_or_none(job, lambda core: core.failed(failure.to_proto()))
        finally:
            self.meter.record(time.monotonic() - started)
            self._scheduler(job.spec.queue).finished(job.task_id)
            self._pump(job.spec.queue)
        await self._finish(job, lifecycle)

    async def _apply_or_none(self, job: Job, change: Any) -> events_pb2.LifecycleEvent | None:
        try:
            result: events_pb2.LifecycleEvent | None = await job.server.apply(change)
            return result
        except TaskServerDown:
            return None

    async def _finish(self, job: Job, lifecycle: events_pb2.LifecycleEvent | None) -> None:
        """Publish the terminal lifecycle event (await its PubAck), then ack the job."""
        core = job.server.core
        if lifecycle is None and core.terminal:
            lifecycle = core.lifecycle(_TERMINAL_KIND[core.status])
        if lifecycle is not None:
            await self.publisher.publish(lifecycle)
        if job.msg is not None:
            await self._ack(job.msg)
        if self._jobs.get(job.task_id) is job:
            del self._jobs[job.task_id]
        job.finished.set()
        self._notify("finished", job.task_id)

    def _notify(self, what: str, task_id: str) -> None:
        for observer in self.observers:
            observer(what, task_id)

    async def _ack(self, msg: Msg) -> None:
        try:
            # Confirmed, so a finished job is gone from the work queue once this returns.
            await msg.ack_sync(timeout=self.config.publish_timeout_s)
        except (nats.errors.Error, OSError) as error:
            # Not fatal: a redelivered job of a finished task is only acked (see _recover).
            log.warning("job ack failed", extra={"error": repr(error)})

    def _gave_up(self, server: TaskServer, error: BaseException) -> None:
        lifecycle = server.give_up(error)
        loop = asyncio.get_running_loop()
        loop.call_later(self.config.retain_s, self.registry.remove, server)
        job = self._jobs.get(server.task_id)
        if job is None:
            return
        if job.runner is not None:
            job.stop_reason = "failed"
            if job.worker is not None:
                job.worker.cancel()
        else:
            self._scheduler(job.spec.queue).remove(job.task_id)
            job.cancel_requested = True
            self._spawn(self._finish(job, lifecycle), f"finish:{job.task_id}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._owned.add(task)
        task.add_done_callback(self._owned.discard)

    # -- the consumer ------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self._sub is not None
        while self._intake_open:
            try:
                msgs = await self._sub.fetch(self.config.fetch_batch, timeout=FETCH_EXPIRES_S)
            except nats.errors.TimeoutError:
                continue
            except (nats.errors.Error, OSError) as error:
                log.warning("job fetch failed", extra={"error": repr(error)})
                await asyncio.sleep(0.5)  # NATS reconnecting: do not spin
                continue
            for msg in msgs:
                if self._intake_open:
                    self._on_msg(msg)
                else:
                    self._spawn(msg.nak(), "nak-late-job")

    def _on_msg(self, msg: Msg) -> None:
        try:
            job_pb = events_pb2.Job.FromString(msg.data)
            if not job_pb.task_id:
                raise DecodeError("job without task_id")
        except DecodeError:
            log.error("undecodable job terminated", extra={"subject": msg.subject})
            self._spawn(msg.term(), "term-bad-job")
            return
        job = self._jobs.get(job_pb.task_id)
        if job is not None:
            job.msg = msg  # the newest delivery is the one to ack
            if job.server.core.terminal or job.finished.is_set():
                self._spawn(self._ack(msg), f"ack:{job.task_id}")
            else:
                self._maybe_schedule(job)
            return
        server = self.registry.get(job_pb.task_id)
        if server is not None and server.core.terminal:
            self._spawn(self._ack(msg), f"ack:{job_pb.task_id}")
            return
        queue = msg.subject.removeprefix(f"{JOBS_SUBJECT_PREFIX}.")
        job = self._new_job(TaskSpec.from_job(job_pb, queue))
        job.msg = msg
        self._spawn(self._recover(job), f"recover:{job.task_id}")

    async def _recover(self, job: Job) -> None:
        """A job this process did not submit (redelivered after a restart)."""
        last = await self._last_lifecycle(job.task_id)
        # The server is not registered yet, so nothing else sees its state: set it directly.
        core = job.server.core
        finished = last is not None and last.status in TERMINAL
        if last is not None:
            core.seq = last.seq  # continue after what was published
            core.attempts = last.attempt
            if finished:
                core.restore_terminal(last)
        self._register(job)
        log.info("job recovered", extra={"task_id": job.task_id, "finished": finished})
        if finished:
            job.accepted.set_result(None)
            await self._finish(job, None)  # re-published: JetStream drops the duplicate id
            return
        await self._accept(job)

    async def _keep_alive_loop(self) -> None:
        # A held job's ack_wait runs from its delivery, queued or running: tell JetStream
        # we are still on it well before it would be redelivered.
        interval = max(self.config.ack_wait_s / 3, 0.1)
        while True:
            await asyncio.sleep(interval)
            for job in list(self._jobs.values()):
                if job.msg is not None and not job.finished.is_set():
                    with contextlib.suppress(nats.errors.Error, OSError):
                        await job.msg.in_progress()


async def _wait_quietly(task: asyncio.Task[Any] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
