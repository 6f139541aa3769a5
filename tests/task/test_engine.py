"""The job engine against the in-memory store (memory_store.py): no NATS, no gRPC. The store's
log shows what was stored, in order: ("put", task id), ("lifecycle", kind), ("dead", task
id), ("remove" | "ack" | "nak", seq)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from svckit import tracing
from svckit.errors import ServiceError
from svckit.shards import shard_of
from switchboard.v1 import common_pb2
from task_svc import intake
from task_svc.config import Settings, engine_config
from task_svc.events import Stored
from task_svc.intake import LOOKUP_ATTEMPTS
from task_svc.jobs import JobEngine
from task_svc.memory_store import MemoryJobStore
from task_svc.store import Pending, StoreUnavailable
from task_svc.task_state import TaskCore, TaskSpec
from tests.conftest import eventually, timeout
from tests.task.fakes import Recorder, ScriptedLlm
from tests.traces import in_memory_traces, json_lines, trace_id

Code = common_pb2.ErrorCode
Status = common_pb2.TaskStatus


class Engine:
    """A started engine on `store`, with its recorder and a way to await its steps."""

    def __init__(self, store: MemoryJobStore, llm: ScriptedLlm, **settings: Any) -> None:
        self.store = store
        self.llm = llm
        self.recorder = Recorder(store)
        settings.setdefault("task_position_interval_s", 60.0)
        config = engine_config(Settings(**settings))
        self.engine = JobEngine(store, self.recorder, llm, config)
        self.steps: defaultdict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        self.engine.observers.append(lambda what, task_id: self.steps[what, task_id].set())

    async def reached(self, what: str, task_id: str) -> None:
        async with asyncio.timeout(timeout(5)):
            await self.steps[what, task_id].wait()

    async def submit(
        self, prompt: str = "one two", *, task_id: str = "", user: str = "alice"
    ) -> common_pb2.TaskState:
        state, _ = await self.engine.submit(spec(prompt, task_id=task_id, user=user))
        return state

    async def state(self, task_id: str) -> common_pb2.TaskState:
        return await self.engine.state(task_id, "alice")


MakeEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
def store() -> MemoryJobStore:
    return MemoryJobStore()


@pytest.fixture
def llm() -> ScriptedLlm:
    return ScriptedLlm()


@pytest.fixture
async def make_engine(store: MemoryJobStore, llm: ScriptedLlm) -> AsyncIterator[MakeEngine]:
    started: list[Engine] = []

    async def make(**settings: Any) -> Engine:
        engine = Engine(store, llm, **settings)
        await engine.engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        await engine.engine.shutdown(0)


def spec(prompt: str, *, task_id: str = "", user: str = "alice") -> TaskSpec:
    return TaskSpec(task_id or str(uuid.uuid4()), user, prompt, "m", 0)


async def error_of(awaitable: Awaitable[object]) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        await awaitable
    return caught.value


async def test_a_job_is_stored_then_run_then_removed_after_its_terminal_event(
    make_engine: MakeEngine, store: MemoryJobStore
) -> None:
    e = await make_engine()
    state = await e.submit("one two")
    assert state.status == Status.TASK_STATUS_QUEUED and state.seq == 1
    await e.reached("finished", state.task_id)
    assert store.log == [
        ("put", state.task_id),
        ("lifecycle", "queued"),
        ("lifecycle", "started"),
        ("lifecycle", "completed"),
        ("remove", 1),
    ]
    assert store.jobs == {} and e.engine.jobs == {}
    assert (await e.state(state.task_id)).content == "one two"
    # The queue board counts the finished run (the dashboard's throughput reads it).
    assert e.engine.queues["default"].stats().finished == 1


async def test_a_repeated_submit_is_answered_from_memory(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    e = await make_engine()
    first = await e.submit("hold on")
    again, duplicate = await e.engine.submit(spec("hold on", task_id=first.task_id))
    assert duplicate and again.created_at == first.created_at
    error = await error_of(e.submit("hold on", task_id=first.task_id, user="bob"))
    assert error.code == Code.ERROR_CODE_FORBIDDEN
    llm.release(first.task_id)
    await e.reached("finished", first.task_id)
    after, duplicate = await e.engine.submit(spec("hold on", task_id=first.task_id))
    assert duplicate and after.status == Status.TASK_STATUS_COMPLETED
    assert llm.order == [first.task_id] and [w for w, _ in store.log].count("put") == 1


async def test_a_submit_the_store_cannot_take_is_overloaded_and_forgotten(
    make_engine: MakeEngine, store: MemoryJobStore
) -> None:
    e = await make_engine()
    store.unavailable = True
    task_id = str(uuid.uuid4())
    error = await error_of(e.submit(task_id=task_id))
    assert error.code == Code.ERROR_CODE_OVERLOADED and error.retryable
    assert e.engine.jobs == {} and e.engine.registry.get(task_id) is None
    assert e.engine.queues["default"].depth == 0
    store.unavailable = False
    assert (await e.submit(task_id=task_id)).status == Status.TASK_STATUS_QUEUED


async def test_a_full_queue_sheds_load(make_engine: MakeEngine, llm: ScriptedLlm) -> None:
    e = await make_engine(task_concurrency=1, task_max_queue_depth=1)
    running = await e.submit("hold running")
    await llm.started[running.task_id].wait()
    waiting = await e.submit("hold waiting")
    error = await error_of(e.submit())
    assert error.code == Code.ERROR_CODE_OVERLOADED and error.retry_after_ms >= 1000
    assert e.engine.queues["default"].depth == 1
    llm.release(running.task_id)
    llm.release(waiting.task_id)
    await e.reached("finished", waiting.task_id)
    assert e.engine.queues["default"].depth == 0


async def test_after_a_restart_a_finished_task_is_restored_not_rerun(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    first = await make_engine()
    done = await first.submit("only once")
    await first.reached("finished", done.task_id)
    await first.engine.shutdown(0)
    second = await make_engine()  # nothing in memory; the store knows the message id
    error = await error_of(second.submit("only once", task_id=done.task_id, user="bob"))
    assert error.code == Code.ERROR_CODE_FORBIDDEN
    state, duplicate = await second.engine.submit(spec("only once", task_id=done.task_id))
    assert duplicate and state.status == Status.TASK_STATUS_COMPLETED
    assert state.content == "only once" and llm.order == [done.task_id]
    assert second.engine.jobs == {}


async def test_after_a_restart_an_unfinished_task_runs_on_above_its_stored_seq(
    make_engine: MakeEngine, store: MemoryJobStore
) -> None:
    # Stored by a previous incarnation, its job removed, only a snapshot at seq 10 left.
    task = spec("run on")
    put = await store.put(task, task.task_id)
    await store.done(put.seq)
    store.stored[task.task_id] = Stored(seq=10, user_id="alice", attempts=1)
    e = await make_engine()
    state, duplicate = await e.engine.submit(task)
    reserve = Settings().task_seq_reserve
    assert duplicate and state.seq == 10 + reserve + 1 and state.attempts == 1
    await e.reached("finished", task.task_id)
    final = await e.state(task.task_id)
    assert final.status == Status.TASK_STATUS_COMPLETED and final.attempts == 2


def stored_as_ended(store: MemoryJobStore, task: TaskSpec) -> None:
    """What SB_TASK_EVENTS holds of `task` once it ended (cancelled) in an earlier run."""
    core = TaskCore(task)
    core.started()
    ended = core.cancelled()
    assert ended is not None and ended.lifecycle is not None
    store.stored[task.task_id] = Stored(3, "alice", 1, ended.lifecycle)


async def test_jobs_left_in_the_store_are_rebuilt_before_start_returns(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    left, finished = spec("hold left"), spec("finished before")
    left_seq = (await store.put(left, left.task_id)).seq
    finished_seq = (await store.put(finished, finished.task_id)).seq
    store.stored[left.task_id] = Stored(seq=5, user_id="alice", attempts=1)
    stored_as_ended(store, finished)
    del store.log[:]
    e = await make_engine()
    rebuilt = await e.state(left.task_id)  # known as soon as start returns
    assert rebuilt.status in (Status.TASK_STATUS_QUEUED, Status.TASK_STATUS_PROCESSING)
    server = e.engine.registry.get(left.task_id)
    assert server is not None
    first = server.core.events_after(0)[0]
    assert first.seq == 5 + Settings().task_seq_reserve + 1
    assert first.progress.message == "restarted"
    assert first.progress.reset.reason == "recovered" and first.progress.reset.attempt == 2
    # The job of a task that had finished is only acknowledged, never run.
    assert ("ack", finished_seq) in store.log and finished.task_id not in llm.order
    assert (await e.state(finished.task_id)).status == Status.TASK_STATUS_CANCELLED
    llm.release(left.task_id)
    await e.reached("finished", left.task_id)
    assert store.log[-2:] == [("lifecycle", "completed"), ("ack", left_seq)]
    assert store.jobs == {}


async def test_retries_then_a_dead_letter_stored_before_the_removal_then_requeue(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    e = await make_engine(task_max_attempts=2, task_retry_base_s=0.01)
    state = await e.submit("flaky answer")
    task_id = state.task_id
    await e.reached("retrying", task_id)
    await e.reached("finished", task_id)
    assert llm.order == [task_id, task_id]
    assert e.recorder.kinds(task_id) == ["queued", "started", "queued", "started", "failed"]
    assert store.log[-3:] == [("dead", task_id), ("lifecycle", "failed"), ("remove", 1)]
    letters = await e.engine.list_dead_letters("", 0)
    assert [d.task_id for d in letters] == [task_id] and letters[0].attempts == 2
    last_seq = (await e.state(task_id)).seq
    e.steps.pop(("finished", task_id))
    requeued = await e.engine.requeue_dead_letter(task_id)
    assert requeued.seq > last_seq
    await e.reached("finished", task_id)
    final = await e.state(task_id)
    assert final.status == Status.TASK_STATUS_COMPLETED and final.content == "flaky answer"
    assert await e.engine.list_dead_letters("", 0) == []


async def test_cancel_a_queued_task_and_a_running_one(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    e = await make_engine(task_concurrency=1)
    running = await e.submit("hold the slot")
    await llm.started[running.task_id].wait()
    queued = await e.submit("never runs")
    cancelled = await e.engine.cancel(queued.task_id, "alice")
    assert cancelled.status == Status.TASK_STATUS_CANCELLED
    assert e.recorder.kinds(queued.task_id) == ["queued", "cancelled"]
    assert ("remove", 2) in store.log and queued.task_id not in llm.order
    stopped = await e.engine.cancel(running.task_id, "alice")
    assert stopped.status == Status.TASK_STATUS_CANCELLED and stopped.content == "hold"
    assert running.task_id in llm.cancelled  # its generation was closed
    assert store.jobs == {} and e.engine.jobs == {}
    again = await e.engine.cancel(running.task_id, "alice")
    assert again.status == Status.TASK_STATUS_CANCELLED


async def test_shutdown_leaves_unfinished_jobs_stored_and_gives_pending_ones_back(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    first = await make_engine(task_concurrency=1)
    running = await first.submit("hold running")
    await llm.started[running.task_id].wait()
    queued = await first.submit("hold queued")
    await first.engine.shutdown(0)
    assert running.task_id in llm.cancelled
    assert sorted(store.jobs) == [1, 2]  # nothing removed: both run at the next start
    assert not [w for w, _ in store.log if w in ("remove", "ack")]
    second = await make_engine(task_concurrency=1)
    assert (await second.state(queued.task_id)).status == Status.TASK_STATUS_QUEUED
    await second.engine.shutdown(0)
    assert store.log[-2:] == [("nak", 1), ("nak", 2)]


def crash(core: TaskCore) -> None:
    raise RuntimeError(f"injected crash in {core.task_id}")


async def test_a_task_server_crashing_too_often_fails_and_is_dead_lettered(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    e = await make_engine(task_concurrency=1, task_max_restarts=1, task_restart_period_s=60)
    running = await e.submit("hold running")
    await llm.started[running.task_id].wait()
    queued = await e.submit("hold queued")
    for victim in (queued, running):  # the queued one first: it never gets the slot
        server = e.engine.registry.get(victim.task_id)
        assert server is not None
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await server.call(crash)
        await e.reached("finished", victim.task_id)
        state = await e.state(victim.task_id)
        assert state.status == Status.TASK_STATUS_FAILED and "crashed" in state.error.message
        assert ("dead", victim.task_id) in store.log
    assert running.task_id in llm.cancelled and queued.task_id not in llm.order
    assert store.jobs == {}


async def test_a_submit_repeated_while_the_first_is_being_stored_waits_for_it(
    make_engine: MakeEngine, store: MemoryJobStore
) -> None:
    e = await make_engine()
    task = spec("one two")
    (first, first_dup), (again, again_dup) = await asyncio.gather(
        e.engine.submit(task), e.engine.submit(task)
    )
    assert not first_dup and again_dup and again.task_id == first.task_id
    assert [w for w, _ in store.log].count("put") == 1


async def test_cancel_during_the_retry_backoff(
    make_engine: MakeEngine, store: MemoryJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("task_svc.queues.random.uniform", lambda low, high: high)  # no jitter
    e = await make_engine(task_max_attempts=3, task_retry_base_s=60)
    state = await e.submit("flaky answer")
    await e.reached("retrying", state.task_id)
    cancelled = await e.engine.cancel(state.task_id, "alice")
    assert cancelled.status == Status.TASK_STATUS_CANCELLED
    assert e.recorder.kinds(state.task_id) == ["queued", "started", "queued", "cancelled"]
    assert store.log[-1] == ("remove", 1) and ("dead", state.task_id) not in store.log
    assert e.engine.queues["default"].depth == 0 and e.engine.jobs == {}


# -- jobs the engine did not store itself ------------------------------------------------
# Those a gateway stored to acknowledge an `llm_generate` at once (gateway_svc/direct_submit.py),
# handed over by the store's `arrivals`; and its own, which JetStream's consumer hands back too
# (`echo_puts`).


async def test_a_job_a_gateway_stored_runs_once_and_is_acknowledged(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    e = await make_engine()
    task = spec("one two")
    put = store.store_elsewhere(task)
    await e.reached("finished", task.task_id)
    assert store.log == [
        ("put elsewhere", task.task_id),
        ("lifecycle", "queued"),
        ("lifecycle", "started"),
        ("lifecycle", "completed"),
        ("ack", put.seq),
    ]
    assert llm.order == [task.task_id] and store.jobs == {} and e.engine.jobs == {}
    assert (await e.state(task.task_id)).content == "one two"


async def test_a_watcher_that_joined_before_the_job_was_stored_follows_it(
    make_engine: MakeEngine, store: MemoryJobStore
) -> None:
    e = await make_engine()
    task = spec("hello")
    claim = e.engine.registry.claim(task.task_id, "alice")  # what a join does (service.py)
    store.store_elsewhere(task)
    async with asyncio.timeout(timeout(5)):
        server = await claim.submitted
    assert server.task_id == task.task_id and server.user_id == "alice"
    e.engine.registry.release(claim)


async def test_its_own_jobs_come_back_from_the_store_and_run_once(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    store.echo_puts = True
    e = await make_engine()
    tasks = [await e.submit(f"echo {i}") for i in range(5)]
    for state in tasks:
        await e.reached("finished", state.task_id)
    assert sorted(llm.order) == sorted(s.task_id for s in tasks)  # once each
    assert store.jobs == {} and e.engine.jobs == {}


async def test_a_job_stored_for_a_task_finished_here_is_only_removed(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    e = await make_engine()
    done = await e.submit("only once")
    await e.reached("finished", done.task_id)
    again = spec("only once", task_id=done.task_id)
    await e.engine.intake.arrived(Pending(again, seq=99))
    assert store.log[-1] == ("remove", 99) and llm.order == [done.task_id]


async def test_a_redelivered_job_of_a_finished_task_is_restored_not_rerun(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    e = await make_engine()
    task = spec("finished elsewhere")
    stored_as_ended(store, task)
    await e.engine.intake.arrived(Pending(task, seq=7, redelivered=True))
    assert task.task_id not in llm.order
    assert (await e.state(task.task_id)).status == Status.TASK_STATUS_CANCELLED
    assert ("remove", 7) in store.log


@pytest.fixture
def quick_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake, "LOOKUP_RETRY_S", 0.001)


@pytest.mark.usefixtures("quick_lookups")
async def test_a_finished_task_whose_stored_state_is_slow_to_read_is_still_not_rerun(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    """Its lookup fails twice (a NATS node killed): asked again, not read as nothing."""
    e = await make_engine()
    task = spec("finished elsewhere")
    stored_as_ended(store, task)
    store.lookups_failing = 2
    await e.engine.intake.arrived(Pending(task, seq=7, redelivered=True))
    assert task.task_id not in llm.order
    assert (await e.state(task.task_id)).status == Status.TASK_STATUS_CANCELLED
    assert ("remove", 7) in store.log


@pytest.mark.usefixtures("quick_lookups")
async def test_a_job_whose_stored_state_cannot_be_read_is_left_stored_for_another_try(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    e = await make_engine()
    task = spec("finished elsewhere")
    stored_as_ended(store, task)
    store.lookups_failing = LOOKUP_ATTEMPTS
    with pytest.raises(StoreUnavailable):
        await e.engine.intake.arrived(Pending(task, seq=7, redelivered=True))
    assert task.task_id not in llm.order and task.task_id not in e.engine.jobs
    assert ("remove", 7) not in store.log  # held: it comes back
    # Delivered again once the store answers: restored, not run.
    await e.engine.intake.arrived(Pending(task, seq=7, redelivered=True))
    assert task.task_id not in llm.order
    assert (await e.state(task.task_id)).status == Status.TASK_STATUS_CANCELLED


@pytest.mark.usefixtures("quick_lookups")
async def test_a_resubmit_whose_stored_state_cannot_be_read_is_refused_not_run(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    first = await make_engine()
    done = await first.submit("only once")
    await first.reached("finished", done.task_id)
    await first.engine.shutdown(0)
    second = await make_engine()
    store.lookups_failing = LOOKUP_ATTEMPTS
    error = await error_of(second.submit("only once", task_id=done.task_id))
    assert error.code == Code.ERROR_CODE_OVERLOADED and error.retryable
    assert llm.order == [done.task_id] and second.engine.jobs == {}
    state, duplicate = await second.engine.submit(spec("only once", task_id=done.task_id))
    assert duplicate and state.status == Status.TASK_STATUS_COMPLETED
    assert llm.order == [done.task_id]


async def test_a_job_for_an_id_another_user_claimed_is_dropped(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    e = await make_engine()
    task = spec("not yours", user="alice")
    claim = e.engine.registry.claim(task.task_id, "bob")
    await e.engine.intake.arrived(Pending(task, seq=5))
    assert store.log[-1] == ("remove", 5) and task.task_id not in llm.order
    assert e.engine.registry.get(task.task_id) is None
    e.engine.registry.release(claim)


# -- the engine's own loops ----------------------------------------------------------------


class LoopingStore(MemoryJobStore):
    """A store with a loop of its own that crashes its first `crashes` runs."""

    def __init__(self, crashes: int) -> None:
        super().__init__()
        self.crashes = crashes
        self.runs = 0
        self.running = asyncio.Event()

    def loops(self) -> dict[str, Any]:
        return {"flaky": self.flaky}

    async def flaky(self) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise RuntimeError(f"crash {self.runs}")
        self.running.set()
        await asyncio.Event().wait()


async def test_a_loop_that_crashes_is_restarted_and_the_engine_goes_on(
    llm: ScriptedLlm, caplog: pytest.LogCaptureFixture
) -> None:
    store = LoopingStore(crashes=2)
    e = Engine(store, llm)
    await e.engine.start()
    try:
        async with asyncio.timeout(timeout(5)):
            await store.running.wait()
        assert store.runs == 3 and e.engine.loops.restarts("flaky") == 2
        assert not e.engine.broken.is_set()
        assert "child crashed, restarting" in caplog.text
        done = await e.submit("still running")
        await e.reached("finished", done.task_id)
    finally:
        await e.engine.shutdown(0)


async def test_a_loop_crashing_past_the_intensity_breaks_the_engine(llm: ScriptedLlm) -> None:
    store = LoopingStore(crashes=100)
    e = Engine(store, llm)
    await e.engine.start()
    try:
        async with asyncio.timeout(timeout(10)):
            await e.engine.broken.wait()  # task_svc's main then exits non-zero
        assert store.runs == 6  # the first run and five restarts
    finally:
        await e.engine.shutdown(0)


async def test_a_run_cut_by_a_hand_over_continues_its_text_at_the_next_holder(
    make_engine: MakeEngine, store: MemoryJobStore, llm: ScriptedLlm
) -> None:
    first = await make_engine()
    task = await first.submit("hold on to this")
    server = await first.engine.find(task.task_id)
    assert server is not None

    async def first_word_streamed() -> bool:  # then the run holds
        return server.core.content == "hold"

    await eventually(first_word_streamed)
    seen = server.core.seq
    await first.engine.release(shard_of(task.task_id), grace_s=0.0)
    assert task.task_id in llm.cancelled
    assert ("snapshot", "hold") in store.log  # checkpointed before the shard was let go

    second = await make_engine()  # the shard's next holder, on the same store
    await second.reached("finished", task.task_id)
    done = await second.engine.find(task.task_id)
    assert done is not None and done.core.content == "hold on to this"
    assert llm.continued[task.task_id] == ["", "hold"]  # not generated again
    events = done.core.events_after(seen)
    restart, replay = events[0], events[1]
    assert restart.progress.HasField("reset") and restart.seq > seen
    assert replay.chunk.delta == "hold"  # the text so far, back at once after the reset
    assert "".join(e.chunk.delta for e in events) == "hold on to this"


async def test_what_the_runner_and_the_worker_log_for_a_traced_job_carries_its_trace_id(
    make_engine: MakeEngine,
) -> None:
    # One slot: the second job is started from the first one's runner, and must not take
    # the first one's trace with it.
    with in_memory_traces() as exported, json_lines("task_svc.runner", "task_svc.worker") as logs:
        e = await make_engine(task_concurrency=1, task_max_attempts=1)
        flaky = await e.submit("flaky answer")  # rate limited, no attempt left: dead-lettered
        failing = await e.submit("fail now")  # refused: failed
        await e.reached("finished", flaky.task_id)
        await e.reached("finished", failing.task_id)
    spans = exported.get_finished_spans()
    trace_of = {
        str((s.attributes or {})["task_id"]): trace_id(s) for s in spans if s.name == "task"
    }
    assert set(trace_of) == {flaky.task_id, failing.task_id}
    assert len(set(trace_of.values())) == 2
    assert sorted(trace_id(s) for s in spans if s.name == "generate") == sorted(trace_of.values())
    lines = {
        (line["msg"], line["task_id"]): line.get("trace_id")
        for line in logs.lines
        if line.get("task_id") in trace_of
    }
    assert lines == {
        ("generation failed", flaky.task_id): trace_of[flaky.task_id],  # the worker's
        ("generation failed", failing.task_id): trace_of[failing.task_id],
        ("task dead-lettered", flaky.task_id): trace_of[flaky.task_id],  # the runner's
        ("task finished", flaky.task_id): trace_of[flaky.task_id],
        ("task finished", failing.task_id): trace_of[failing.task_id],
    }


async def test_a_job_ended_outside_its_runner_logs_in_its_trace_too(
    make_engine: MakeEngine, llm: ScriptedLlm
) -> None:
    with in_memory_traces() as exported, json_lines("task_svc.runner") as logs:
        e = await make_engine(task_concurrency=1)
        running = await e.submit("hold the slot")
        async with asyncio.timeout(timeout(5)):
            await llm.started[running.task_id].wait()
        queued = await e.submit("one two")
        await e.engine.cancel(queued.task_id, "alice")  # ended here, in no span of its own
        llm.release(running.task_id)
        await e.reached("finished", running.task_id)
    trace_of = {
        str((s.attributes or {})["task_id"]): trace_id(s)
        for s in exported.get_finished_spans()
        if s.name == "task"
    }
    finished = {line["task_id"]: line.get("trace_id") for line in logs.written("task finished")}
    assert finished == trace_of and len(trace_of) == 2


async def test_what_intake_logs_of_a_traced_job_carries_its_trace_id(
    make_engine: MakeEngine, store: MemoryJobStore
) -> None:
    with in_memory_traces() as exported, json_lines("task_svc.intake") as logs:
        e = await make_engine()
        store.unavailable = True
        refused = spec("not stored")
        await error_of(e.engine.submit(refused))
        store.unavailable = False
        recovered = spec("recovered")
        await e.engine.intake.arrived(Pending(recovered, seq=3, redelivered=True))
        await e.reached("finished", recovered.task_id)
        gateway = tracing.start("llm_generate")  # the span a gateway sent the job in
        foreign = replace(spec("not yours"), traceparent=tracing.traceparent(gateway))
        claim = e.engine.registry.claim(foreign.task_id, "bob")
        await e.engine.intake.arrived(Pending(foreign, seq=9))  # dropped: no job, no span
        e.engine.registry.release(claim)
        tracing.end(gateway)
    trace_of = {
        str((s.attributes or {}).get("task_id", s.name)): trace_id(s)
        for s in exported.get_finished_spans()
        if s.name in ("task", "llm_generate")
    }
    assert set(trace_of) == {refused.task_id, recovered.task_id, "llm_generate"}
    assert len(set(trace_of.values())) == 3
    lines = {(line["msg"], line["task_id"]): line.get("trace_id") for line in logs.lines}
    assert lines == {
        ("job not stored", refused.task_id): trace_of[refused.task_id],
        ("job recovered", recovered.task_id): trace_of[recovered.task_id],
        ("job of another user's task dropped", foreign.task_id): trace_of["llm_generate"],
    }


async def test_without_tracing_intake_logs_no_trace_id(
    make_engine: MakeEngine, store: MemoryJobStore
) -> None:
    with json_lines("task_svc.intake") as logs:
        e = await make_engine()
        store.unavailable = True
        await error_of(e.submit("not stored"))
    (line,) = logs.written("job not stored")
    assert "trace_id" not in line
