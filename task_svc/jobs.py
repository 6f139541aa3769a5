"""The job engine: durable intake, in-memory scheduling per queue, one supervised TaskServer
per task, retries, dead letters, recovery after a restart, and an ordered shutdown.

It is composed of small parts, each in its module:
- the `JobStore` (store.py): where jobs, dead letters and what was stored about a task live
  (JetStream in production, memory in tests);
- `Queues` (queues.py, scheduler.py): one queue per model class, with its concurrency,
  priorities with aging, throughput and load shedding;
- `Servers` (servers.py): the registry and the supervisor of the TaskServers;
- `Intake` (intake.py): Submit, requeue and recovery, which create jobs;
- `Runner` (runner.py): runs jobs, retries them and ends them;
- `PositionReporter` (positions.py): queue positions and etas for watchers.

Each job's life is the table in job_state.py; this class owns the map of jobs they share, and
answers the gRPC-facing calls (service.py).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable, Iterable
from functools import partial

from svckit.errors import ServiceError
from svckit.shards import SHARD_COUNT, shard_of
from switchboard.v1 import common_pb2, tasks_pb2
from task_svc.config import EngineConfig
from task_svc.intake import Intake
from task_svc.job import Job
from task_svc.job_state import JobState
from task_svc.llm_client import LlmClient
from task_svc.positions import PositionReporter
from task_svc.queues import Queues
from task_svc.registry import forbidden
from task_svc.runner import Runner
from task_svc.servers import Servers
from task_svc.store import JobStore, Lifecycle, StoreUnavailable
from task_svc.supervisor import Supervisor
from task_svc.task_server import TaskServer
from task_svc.task_state import TaskSpec

log = logging.getLogger(__name__)

Code = common_pb2.ErrorCode


ALL_SHARDS = range(SHARD_COUNT)
SHARD_READY_TIMEOUT_S = 10.0
# What ListActiveTasks lists: a job that has not ended (FINISHING has: its outcome is decided;
# ACCEPTING is not a task yet: its Submit has not been answered).
ACTIVE = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.RETRY_WAIT})
MAX_ACTIVE_LIST = 100  # as many as the dead-letter list: prompts of 32k fit one reply
# What ListUserTasks lists: ACCEPTING too, since a user's delete_all must cancel a task whose
# Submit is still being answered (a cancel waits for it to be accepted).
USER_ACTIVE = ACTIVE | {JobState.ACCEPTING}
MAX_USER_LIST = 1000  # ids only: a reply of some 40 kB


def shutting_down() -> ServiceError:
    return ServiceError(Code.ERROR_CODE_OVERLOADED, "task_svc is shutting down")


def not_here(task_id: str) -> ServiceError:
    """The task's shard is another node's (or no node's, for a moment): ask again where
    the membership says it lives."""
    return ServiceError(
        Code.ERROR_CODE_UNAVAILABLE,
        f"task {task_id} is served by another task_svc node",
        retry_after_ms=200,
    )


def not_here_for(shard: int) -> ServiceError:
    return ServiceError(
        Code.ERROR_CODE_UNAVAILABLE,
        f"shard {shard} moved to another task_svc node",
        retry_after_ms=200,
    )


class JobEngine:
    def __init__(
        self, store: JobStore, publisher: Lifecycle, llm: LlmClient, config: EngineConfig
    ) -> None:
        self.store = store
        self.jobs: dict[str, Job] = {}  # every job not DONE, by task id
        # Called with (what, task_id) on "scheduled", "started", "retrying", "dead" and
        # "finished": for metrics and for tests that must await a step rather than sleep.
        self.observers: list[Callable[[str, str], None]] = []
        self.queues = Queues(config)
        self.servers = Servers(config, publisher.publish_snapshot, self._gave_up)
        self.registry = self.servers.registry
        self.supervisor = self.servers.supervisor
        self.runner = Runner(
            self.jobs, store, publisher, llm, self.servers, self._notify, self.owns
        )
        self.intake = Intake(
            self.jobs, self.queues, store, publisher, self.servers, self.runner, config.seq_reserve
        )
        self.positions = PositionReporter(self.jobs, self.queues, config.position_interval_s)
        # The engine's own loops, one_for_one: none holds state another needs (they share
        # only the store, which each reads afresh). One that crashes past the intensity
        # leaves the engine `broken`: the process must go (and be started again).
        self.loops = Supervisor(
            "engine", max_restarts=5, period_s=60.0, backoff_s=0.1, max_backoff_s=5.0
        )
        self.broken = asyncio.Event()
        self.shards: dict[int, asyncio.Event] = {}  # held, each set once taken over
        self._open = False

    # -- start and stop ------------------------------------------------------------------

    async def start(self, shards: Iterable[int] = ALL_SHARDS) -> None:
        """Take `shards` over (their jobs rebuilt before this returns, so the first Watch
        or Get already knows them), then open intake. A node of a cluster starts with
        none: its membership acquires and releases them (task_svc/membership.py)."""
        await self.store.open()
        for shard in shards:
            await self.acquire(shard)
        self._open = self.runner.open = True
        for queue in self.queues:
            self.runner.pump(queue)
        loops = {"arrivals": self._take_arrivals, "positions": self.positions.run}
        for name, loop in {**loops, **self.store.loops()}.items():
            self.loops.start_child(name, loop, on_give_up=partial(self._loop_gave_up, name))

    # -- shards ----------------------------------------------------------------------

    async def acquire(self, shard: int) -> None:
        """Own `shard`: rebuild every job its store holds (a previous holder's: it may have
        run, and even finished), then take its new jobs as they come."""
        ready = self.shards.setdefault(shard, asyncio.Event())
        pending = await self.store.acquire(shard)
        await self.intake.recover(pending)
        ready.set()
        if pending:
            log.info("jobs recovered", extra={"shard": shard, "count": len(pending)})

    async def release(self, shard: int, grace_s: float, *, keep_text: bool = True) -> None:
        """Hand `shard` over: refuse its new work, give its waiting jobs back at once, let
        its running ones finish for `grace_s`, then cut them (the next holder continues
        their text), and forget its tasks (their watchers are told to watch elsewhere)."""
        self.shards.pop(shard, None)
        jobs = [job for job in self.jobs.values() if shard_of(job.task_id) == shard]
        await self.runner.release(jobs, grace_s, keep_text=keep_text)
        await self.store.release(shard)
        self.servers.move_away(shard, not_here_for(shard))

    async def lose(self, shard: int) -> None:
        """Stop `shard` at once (this node is cut off: another may own it already, and
        nothing more can be stored)."""
        await self.release(shard, 0.0, keep_text=False)

    def owns(self, task_id: str) -> bool:
        return shard_of(task_id) in self.shards

    async def check_owned(self, task_id: str) -> None:
        """Return once this node serves `task_id`'s shard (waiting while it is being taken
        over); raise UNAVAILABLE when another node does."""
        ready = self.shards.get(shard_of(task_id))
        if ready is None:
            raise not_here(task_id)
        if not ready.is_set():
            try:
                async with asyncio.timeout(SHARD_READY_TIMEOUT_S):
                    await ready.wait()
            except TimeoutError:
                raise not_here(task_id) from None

    def stop_intake(self) -> None:
        """Refuse new Submits and start no more jobs (idempotent)."""
        self._open = self.runner.open = False

    async def shutdown(self, grace_s: float) -> None:
        """Stop intake, let running tasks finish for `grace_s`, then cancel them; jobs not
        finished stay in the store (pending ones are given back), every actor stops.
        Idempotent."""
        self.stop_intake()
        # What arrives from now on stays stored for the next start; the store's own loops
        # (in-progress acks) go on while running tasks finish.
        for name in ("arrivals", "positions"):
            self.loops.terminate(name)
        await self.runner.stop(grace_s)
        await self.loops.stop()
        await self.store.close()
        await self.servers.stop()

    # -- the gRPC-facing operations ---------------------------------------------------

    async def submit(self, spec: TaskSpec) -> tuple[common_pb2.TaskState, bool]:
        """Accept a task durably; (its state, whether it had been submitted before)."""
        if not self._open:
            raise shutting_down()
        await self.check_owned(spec.task_id)
        server, duplicate = await self.intake.submit(spec)
        return self.positions.fresh_state(server), duplicate

    def traceparent_of(self, task_id: str) -> str:
        """The trace the task's job is part of ("" when none: svckit/tracing.py)."""
        job = self.jobs.get(task_id)
        return job.traceparent if job is not None else ""

    async def find(self, task_id: str) -> TaskServer | None:
        """The task's server; for a task finished before this process started (so not in
        memory), one rebuilt from its terminal lifecycle event."""
        server = self.registry.get(task_id)
        if server is not None or task_id in self.jobs:
            return server
        try:
            stored = await self.store.last_stored(task_id)
        except StoreUnavailable as error:  # read as not found: nothing runs on it
            log.warning("stored state lookup failed", extra={"task_id": task_id, "e": repr(error)})
            return None
        if stored is None or stored.lifecycle is None or not stored.terminal:
            return None
        server = self.registry.get(task_id)  # someone else may have rebuilt it meanwhile
        if server is not None or task_id in self.jobs:
            return server
        return self.servers.restore(stored.lifecycle)

    async def cancel(self, task_id: str, user_id: str) -> common_pb2.TaskState:
        server = await self._server_of(task_id, user_id)
        job = self.jobs.get(task_id)
        if job is not None and job.server is server:
            await self.runner.cancel(job)
        return server.core.snapshot()

    async def state(self, task_id: str, user_id: str) -> common_pb2.TaskState:
        return self.positions.fresh_state(await self._server_of(task_id, user_id))

    async def refresh_position(self, server: TaskServer) -> None:
        """Bring a queued task's position and eta up to date (before a Watch reads them)."""
        await self.positions.refresh(server)

    async def list_dead_letters(self, queue: str, limit: int) -> list[tasks_pb2.DeadLetter]:
        return await self.store.dead_letters(queue, limit)

    async def requeue_dead_letter(self, task_id: str) -> common_pb2.TaskState:
        """Run a dead-lettered task again (same id, seq continuing, attempts from zero)."""
        if not self._open:
            raise shutting_down()
        await self.check_owned(task_id)
        letter = await self.store.dead_letter(task_id)
        if letter is None:
            raise ServiceError(Code.ERROR_CODE_NOT_FOUND, f"no dead letter for task {task_id}")
        if task_id in self.jobs:
            raise ServiceError(Code.ERROR_CODE_INVALID_REQUEST, f"task {task_id} is active")
        old = await self.find(task_id)
        if old is not None:
            self.registry.remove(old)
            old.end()
        server = await self.intake.requeue(letter, seq_base=old.core.seq if old else 0)
        await self.store.remove_dead_letter(task_id)
        return server.core.snapshot()

    async def discard_dead_letter(self, task_id: str) -> bool:
        """Drop a dead letter for good (its task stays failed); whether there was one. Any
        node may: the dead-letter stream is shared and nothing of the task runs, so its
        shard's owner need not be asked."""
        try:
            return await self.store.remove_dead_letter(task_id)
        except StoreUnavailable as error:
            raise ServiceError(
                Code.ERROR_CODE_UNAVAILABLE, "the dead-letter queue cannot be reached"
            ) from error

    def active(self, limit: int = 0) -> list[common_pb2.TaskState]:
        """The tasks this node runs or holds queued (retry-waiting too), most recently
        updated first, at most `limit` (0, and anything past it: MAX_ACTIVE_LIST), for the
        operator dashboard. Without their text: an answer stays small whatever was
        generated, and an operator's list is not where users' answers are read. A queued
        task's position is the one it last reported (not computed afresh: that is O(queue)
        per task, too much for a dashboard polling a node holding 100k jobs)."""
        limit = min(limit or MAX_ACTIVE_LIST, MAX_ACTIVE_LIST)
        jobs = (
            job
            for job in self.jobs.values()
            if job.state in ACTIVE and not job.server.core.terminal
        )
        # nlargest: only `limit` of what may be 100k jobs are sorted and copied.
        latest = heapq.nlargest(limit, jobs, key=lambda job: job.server.core.updated_ns)
        states = [job.server.core.snapshot() for job in latest]
        for state in states:
            state.ClearField("content")
        return states

    def user_tasks(self, user_id: str, limit: int = 0) -> tuple[list[str], bool]:
        """The ids of `user_id`'s tasks here that have not ended, at most `limit` (0, and
        anything past it: MAX_USER_LIST), and whether there are more. One pass over the jobs:
        an account's removal is rare enough not to need an index by user."""
        limit = min(limit or MAX_USER_LIST, MAX_USER_LIST)
        ids: list[str] = []
        for job in self.jobs.values():
            server = job.server
            if server.user_id == user_id and job.state in USER_ACTIVE and not server.core.terminal:
                if len(ids) == limit:
                    return ids, True
                ids.append(job.task_id)
        return ids, False

    # -- internals ----------------------------------------------------------------------

    async def _server_of(self, task_id: str, user_id: str) -> TaskServer:
        """The task's server, for its owner only (NOT_FOUND, FORBIDDEN)."""
        await self.check_owned(task_id)
        server = await self.find(task_id)
        job = self.jobs.get(task_id)
        if server is None and job is not None:
            await job.accepted.wait()  # a Submit in flight: answer for what it accepts
            server = self.registry.get(task_id)
        if server is None:
            raise ServiceError(Code.ERROR_CODE_NOT_FOUND, f"no task {task_id}")
        if server.user_id != user_id:
            raise forbidden(task_id)
        return server

    async def _take_arrivals(self) -> None:
        """Run what gateways store (and see this engine's own jobs come back: ignored). The
        store follows each shard itself, again after NATS errors: arrivals never break."""
        async for item in self.store.arrivals():
            if not self.owns(item.spec.task_id):
                continue  # its shard was released meanwhile: held for the next owner
            try:
                await self.intake.arrived(item)
            except Exception:  # held still: it comes back to the shard's next holder
                log.exception("arrival failed", extra={"task_id": item.spec.task_id})

    def _loop_gave_up(self, name: str, error: BaseException) -> None:
        log.critical("engine loop crashed too often", extra={"loop": name}, exc_info=error)
        self.broken.set()

    def _notify(self, what: str, task_id: str) -> None:
        for observer in self.observers:
            observer(what, task_id)

    def _gave_up(self, server: TaskServer, error: BaseException) -> None:
        self.runner.gave_up(server, error)
