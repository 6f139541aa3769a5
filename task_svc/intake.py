"""The job engine's shared plumbing: its state (jobs, queues, registry, supervisor), and the
steps every path uses: create and register a task's server, put it in QUEUED and into its
queue's scheduler, count queue depth, ack, notify observers, own spawned tasks.

Layers (each module one concern, each class extending the previous):
`intake.EngineBase` → `runner.Runner` (running, retries, finishing, dead letters) →
`recovery.Recovery` (jobs from the stream, rebuilt after a restart) → `jobs.JobEngine`
(start/stop and the gRPC-facing operations).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, events_pb2
from task_svc.consumer import JobConsumer
from task_svc.deadletters import DeadLetters
from task_svc.events import LifecyclePublisher, Stored, read_stored
from task_svc.job import EngineConfig, Job
from task_svc.llm_client import LlmClient
from task_svc.positions import PositionReporter
from task_svc.queues import JobQueue, RetryPolicy
from task_svc.registry import Registry
from task_svc.supervisor import Supervisor
from task_svc.task_server import Host, TaskServer, TaskServerDown
from task_svc.task_state import TaskCore, TaskSpec

log = logging.getLogger(__name__)


class EngineBase:
    def __init__(
        self,
        nc: Client,
        publisher: LifecyclePublisher,
        llm: LlmClient,
        config: EngineConfig | None = None,
    ) -> None:
        self.js = js = nc.jetstream()
        self.publisher = publisher
        self.llm = llm
        self.config = config = config or EngineConfig()
        self.registry = Registry()
        self.supervisor = Supervisor(
            "tasks",
            max_restarts=config.max_restarts,
            period_s=config.restart_period_s,
            backoff_s=config.restart_backoff_s,
        )
        self.host = Host(
            supervisor=self.supervisor,
            watcher_limit=config.watcher_limit,
            checkpoint_every=config.seq_reserve,
            checkpoint=publisher.publish_snapshot,
            gave_up=self._gave_up,
        )
        self.dead_letters = DeadLetters(js, config.publish_timeout_s)
        self.consumer = JobConsumer(
            nc,
            name=config.consumer,
            ack_wait_s=config.ack_wait_s,
            max_ack_pending=config.max_ack_pending,
            batch=config.fetch_batch,
        )
        self._jobs: dict[str, Job] = {}
        self._queues: dict[str, JobQueue] = {}
        self._owned: set[asyncio.Task[Any]] = set()
        self.positions = PositionReporter(self._jobs, self._queues, config.position_interval_s)
        self._intake_open = False
        self._stopping = False
        # Called with (what, task_id) on "scheduled", "started", "retrying", "dead" and
        # "finished": for metrics and for tests that must await a step rather than sleep.
        self.observers: list[Callable[[str, str], None]] = []

    def queue(self, name: str) -> JobQueue:
        queue = self._queues.get(name)
        if queue is None:
            config = self.config.queues.get(name, self.config.default_queue)
            retry = RetryPolicy(
                config.max_attempts, self.config.retry_base_s, self.config.retry_max_s
            )
            queue = self._queues[name] = JobQueue(name, config, retry)
        return queue

    def _fresh(self, server: TaskServer) -> common_pb2.TaskState:
        return self.positions.fresh_state(server)

    def _held(self) -> Iterator[Msg]:
        for job in self._jobs.values():
            if job.msg is not None and not job.finished.is_set():
                yield job.msg

    def _new_job(self, spec: TaskSpec, *, seq_base: int = 0) -> Job:
        job = Job(spec, TaskServer(TaskCore(spec, seq_base=seq_base), self.host))
        self._jobs[spec.task_id] = job
        self._count(job)
        return job

    def _continue_seq(self, job: Job, stored: Stored) -> None:
        """Start above any seq a watcher may have seen (task_server.py, checkpoints): not
        registered yet, so nothing else sees the state; set it directly."""
        core = job.server.core
        core.seq = stored.seq + self.config.seq_reserve
        core.attempts = stored.attempts
        job.server.durable_seq = stored.seq

    def _count(self, job: Job) -> None:
        if not job.counted:
            job.counted = True
            self.queue(job.spec.queue).depth += 1

    def _uncount(self, job: Job) -> None:
        if job.counted:
            job.counted = False
            self.queue(job.spec.queue).depth -= 1

    def _register(self, job: Job) -> None:
        self.registry.add(job.server)

    def _expire_later(self, server: TaskServer) -> None:
        """A finished server leaves memory after `retain_s` (history keeps its state)."""

        def expire() -> None:
            if self.registry.get(server.task_id) is server:
                self.registry.remove(server)
            server.end()

        asyncio.get_running_loop().call_later(self.config.retain_s, expire)

    def _abandon(self, job: Job, error: ServiceError) -> None:
        """Forget a job that was never accepted (not registered yet)."""
        self._uncount(job)
        self._jobs.pop(job.task_id, None)
        job.accepted.set_exception(error)
        job.accepted.exception()  # retrieved: waiters re-raise it themselves
        job.finished.set()

    async def _stored(self, task_id: str) -> Stored | None:
        try:
            return await read_stored(self.js, task_id)
        except (nats.errors.Error, OSError, TimeoutError) as error:
            log.warning("stored state lookup failed", extra={"task_id": task_id, "e": repr(error)})
            return None

    async def _accept(self, job: Job, restart: str = "") -> None:
        """Put the task in QUEUED (seq, position, eta) and let it be scheduled."""
        queue = self.queue(job.spec.queue)
        position = queue.scheduler.position_for(job.spec.priority)
        eta_ms = queue.eta_ms(position)
        try:
            lifecycle = await job.server.apply(lambda core: core.queued(position, eta_ms, restart))
        finally:
            if not job.accepted.done():
                job.accepted.set_result(None)
        if lifecycle is not None:
            self.publisher.publish(lifecycle)
        self._maybe_schedule(job)

    def _maybe_schedule(self, job: Job) -> None:
        # Both halves are needed: the task accepted (QUEUED applied) and its job stored (so it
        # can be removed when done: stored by Submit here, or delivered at recovery).
        if job.scheduled or job.cancel_requested or (job.msg is None and not job.stream_seq):
            return
        if not job.accepted.done() or job.server.core.terminal or job.retry_timer is not None:
            return
        job.scheduled = True
        queue = self.queue(job.spec.queue)
        queue.scheduler.push(job.task_id, job.spec.priority)
        self._notify("scheduled", job.task_id)
        self._pump(queue)

    def _pump(self, queue: JobQueue) -> None:
        raise NotImplementedError  # runner.Runner

    def _gave_up(self, server: TaskServer, error: BaseException) -> None:
        raise NotImplementedError  # runner.Runner

    async def _apply_or_none(self, job: Job, change: Any) -> events_pb2.LifecycleEvent | None:
        try:
            result: events_pb2.LifecycleEvent | None = await job.server.apply(change)
            return result
        except TaskServerDown:
            return None

    def _notify(self, what: str, task_id: str) -> None:
        for observer in self.observers:
            observer(what, task_id)

    async def _done(self, job: Job) -> None:
        """The job is finished: take it off SB_JOBS (its delivery acked, or the message that
        Submit stored removed)."""
        if job.msg is not None:
            await self._ack(job.msg)
        elif job.stream_seq:
            try:
                await self.consumer.remove(job.stream_seq)
            except (nats.errors.Error, OSError) as error:
                # Not fatal: recovery acks a job of a finished task without running it.
                log.warning("job removal failed", extra={"error": repr(error)})

    async def _ack(self, msg: Msg) -> None:
        try:
            # Confirmed, so a finished job is gone from the work queue once this returns.
            await msg.ack_sync(timeout=self.config.publish_timeout_s)
        except (nats.errors.Error, OSError) as error:
            # Not fatal: a redelivered job of a finished task is only acked (see _recover).
            log.warning("job ack failed", extra={"error": repr(error)})

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._owned.add(task)
        task.add_done_callback(self._owned.discard)
        return task
