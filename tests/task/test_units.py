"""The parts without sockets: task state, scheduler, supervisor, the TaskServer actor."""

from __future__ import annotations

import asyncio
import itertools
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from svckit import tracing
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, history_pb2, llm_pb2
from task_svc.config import QueueConfig
from task_svc.queues import JobQueue, RetryPolicy
from task_svc.scheduler import Scheduler, ThroughputMeter
from task_svc.supervisor import Supervisor
from task_svc.task_server import DROPPED, Host, TaskServer, TaskServerDown
from task_svc.task_state import TaskCore, TaskSpec
from tests.conftest import timeout
from tests.traces import in_memory_traces, json_lines, trace_id

Status = common_pb2.TaskStatus


def core(**kwargs) -> TaskCore:
    spec = TaskSpec("00000000-0000-0000-0000-000000000001", "alice", "p", "m", 2)
    return TaskCore(spec, **kwargs)


# -- TaskCore ----------------------------------------------------------------------------


def test_seq_increments_per_event_and_content_is_the_chunks() -> None:
    c = core()
    transitions = [c.queued(1, 0), c.started(), c.chunk("Hel"), c.chunk("lo"), c.progressed(0.5)]
    assert [t.event.seq for t in transitions if t] == [1, 2, 3, 4, 5]
    assert c.content == "Hello" and c.seq == 5
    done = c.completed(llm_pb2.GenerationFinal(content="Hello", model="m2", finish_reason="stop"))
    assert done is not None and done.terminal and done.event.completed.content == "Hello"
    assert (
        done.lifecycle is not None and done.lifecycle.seq == 6 and done.lifecycle.content == "Hello"
    )
    assert c.snapshot().model == "m2" and c.progress == 1.0
    assert not done.event.completed.from_fallback and not done.event.completed.from_cache


def test_the_answer_says_whether_a_fallback_or_the_cache_gave_it() -> None:
    c = core()
    c.started()
    final = llm_pb2.GenerationFinal(
        content="x", model="backup", from_fallback=True, from_cache=True
    )
    done = c.completed(final)
    assert done is not None and done.event.completed.model == "backup"
    assert done.event.completed.from_fallback and done.event.completed.from_cache


def test_a_chunk_carries_the_progress_made_with_it_and_never_lowers_it() -> None:
    c = core()
    c.started()
    first = c.chunk("a", progress=0.4)
    assert first is not None and first.event.chunk.progress == 0.4 and c.progress == 0.4
    later = c.chunk("b", progress=0.2)  # a lower report keeps the higher value
    assert later is not None and later.event.chunk.progress == 0.4
    assert [e.chunk.progress for e in c.events_after(0) if e.HasField("chunk")] == [0.4, 0.4]


async def test_casts_apply_in_order_with_calls_and_nobody_waits_for_them() -> None:
    sup = Supervisor("test")
    server = TaskServer(core(), Host(sup))
    await server.apply(lambda c: c.started())
    watcher, _, _ = await server.subscribe(1)
    assert watcher is not None
    server.cast(lambda c: c.chunk("a", progress=0.5))
    server.cast(lambda c: c.chunk("b"))
    await server.apply(lambda c: c.progressed(0.9))  # queued behind both casts
    kinds = [(await watcher.get()).WhichOneof("kind") for _ in range(3)]  # type: ignore[union-attr]
    assert kinds == ["chunk", "chunk", "progress"] and server.core.content == "ab"
    await sup.stop()


async def test_a_cast_to_a_parked_running_server_is_applied_at_once() -> None:
    # The loop is awake (running task) with an empty mailbox: the cast needs no turn of the
    # event loop, and the watcher has the event before cast returns.
    sup = Supervisor("test")
    server = TaskServer(core(), Host(sup))
    await server.apply(lambda c: c.started())
    watcher, _, _ = await server.subscribe(1)
    assert watcher is not None
    await settle()  # the loop parks, waiting for mail
    server.cast(lambda c: c.chunk("a"))
    assert server.core.content == "a" and len(watcher.queue) == 1
    await sup.stop()


async def test_a_cast_that_raises_crashes_the_actor_and_it_is_restarted() -> None:
    sup = Supervisor("test", max_restarts=3, period_s=60)
    server = TaskServer(core(), Host(sup))
    await server.apply(lambda c: c.started())
    await settle()

    def broken(c: TaskCore) -> None:
        raise RuntimeError("bug")

    server.cast(broken)  # type: ignore[arg-type]
    server.cast(lambda c: c.chunk("b"))  # behind the crash, applied by the restarted loop
    state = await server.call(lambda c: c.snapshot())
    assert sup.restarts(server.task_id) == 1 and not server.down
    assert state.content == "b" and state.status == Status.TASK_STATUS_PROCESSING
    await sup.stop()


async def test_a_task_servers_loop_runs_in_its_own_trace_whoever_wakes_it() -> None:
    with in_memory_traces() as exported, json_lines("task_svc.supervisor") as logs:
        sup = Supervisor("test", max_restarts=3, period_s=60)
        other_task = TaskSpec("00000000-0000-0000-0000-000000000002", "bob", "p", "m", 0)
        traced, untraced = (
            TaskServer(core(), Host(sup)),
            TaskServer(TaskCore(other_task), Host(sup)),
        )
        traced.span = tracing.start("task")
        other = tracing.start("another job's task")

        def crash_once(c: TaskCore) -> str:
            if not crashed:
                crashed.append(True)
                raise RuntimeError("bug")
            return tracing.current_trace_id()

        crashed: list[bool] = []
        with tracing.current(other):  # woken from inside another job's run
            with pytest.raises(RuntimeError):
                await traced.call(crash_once)  # its loop crashes, and is restarted
            in_traced = await traced.call(crash_once)
            in_untraced = await untraced.call(lambda c: tracing.current_trace_id())
        tracing.end(traced.span)
        tracing.end(other)
        await sup.stop()
    spans = {s.name: trace_id(s) for s in exported.get_finished_spans()}
    assert in_traced == spans["task"] != spans["another job's task"]
    assert in_untraced == ""  # a server with no span takes none, not its waker's
    (restart,) = logs.written("child crashed, restarting")
    assert restart["trace_id"] == spans["task"]  # the supervisor's line about its loop too


def test_progress_never_goes_backwards_and_equal_reports_add_nothing() -> None:
    c = core()
    c.started()
    assert c.progressed(0.5) is not None
    assert c.progressed(0.4) is None and c.progressed(0.5) is None
    assert c.progress == 0.5 and c.seq == 2


def test_a_terminal_task_refuses_every_change() -> None:
    c = core()
    c.started()
    assert c.cancelled() is not None
    seq = c.seq
    assert c.chunk("x") is None and c.started() is None and c.failed(common_pb2.Error()) is None
    assert c.completed(llm_pb2.GenerationFinal()) is None and c.cancelled() is None
    assert c.seq == seq and c.status == Status.TASK_STATUS_CANCELLED


@given(st.lists(st.text(min_size=1, max_size=5), max_size=30), st.integers(0, 40))
def test_events_after_returns_exactly_the_later_events(deltas: list[str], after: int) -> None:
    c = core()
    c.started()
    for delta in deltas:
        c.chunk(delta)
    events = c.events_after(after)
    assert [e.seq for e in events] == list(range(after + 1, c.seq + 1))
    assert "".join(e.chunk.delta for e in c.events_after(1)) == "".join(deltas)


def test_a_rebuilt_core_continues_the_seq() -> None:
    c = core(seq_base=7, attempts=1)
    transition = c.queued(1, 0)
    assert transition is not None and transition.event.seq == 8
    started = c.started()
    assert started is not None and started.lifecycle is not None
    assert started.lifecycle.attempt == 2


# -- Scheduler ---------------------------------------------------------------------------


def test_scheduler_orders_by_priority_then_fifo_within_concurrency() -> None:
    s = Scheduler(concurrency=2)
    for task_id, priority in [("a", 5), ("b", 0), ("c", 5), ("d", 0), ("e", 9)]:
        s.push(task_id, priority)
    assert s.position("d") == 2 and s.position("a") == 3 and s.position("e") == 5
    assert s.position_for(0) == 3 and s.position_for(9) == 6
    assert [s.next_ready(), s.next_ready(), s.next_ready()] == ["b", "d", None]
    assert s.free_slots == 0
    s.finished("b")
    assert s.remove("a") and not s.remove("a")
    assert s.next_ready() == "c"
    s.finished("d")
    assert s.next_ready() == "e" and s.waiting == 0


def test_throughput_meter_estimates_from_measured_runs() -> None:
    meter = ThroughputMeter()
    assert meter.eta_ms(5, 0, 2) == 0  # nothing measured yet
    meter.record(2.0)
    assert meter.eta_ms(1, 1, 2) == 0  # a free slot: starts at once
    assert meter.eta_ms(3, 0, 2) == 4000  # two rounds of 2 s


# -- Supervisor --------------------------------------------------------------------------


class Flaky:
    def __init__(self, crashes: int) -> None:
        self.crashes = crashes
        self.runs = 0
        self.release = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.crashes:
            raise RuntimeError(f"crash {self.runs}")
        await self.release.wait()


async def test_supervisor_restarts_a_crashing_child_without_touching_others() -> None:
    sup = Supervisor("test", max_restarts=3, period_s=60)
    flaky, steady = Flaky(crashes=2), Flaky(crashes=0)
    exited = asyncio.Event()
    sup.start_child("flaky", flaky.run, on_exit=exited.set)
    sup.start_child("steady", steady.run)
    flaky.release.set()
    async with asyncio.timeout(timeout(5)):
        await exited.wait()
    assert flaky.runs == 3 and sup.restarts("steady") == 0
    assert "steady" in sup and "flaky" not in sup and steady.runs == 1
    stopped = asyncio.Event()
    sup.start_child("other", Flaky(crashes=0).run, on_exit=stopped.set)
    sup.terminate("other")
    async with asyncio.timeout(timeout(5)):
        await stopped.wait()
    assert "other" not in sup and "steady" in sup
    await sup.stop()
    assert len(sup) == 0


async def test_supervisor_gives_up_after_too_many_crashes_in_the_period() -> None:
    sup = Supervisor("test", max_restarts=2, period_s=60)
    flaky = Flaky(crashes=10)
    gave_up: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    sup.start_child("flaky", flaky.run, on_give_up=gave_up.set_result)
    async with asyncio.timeout(timeout(5)):
        error = await gave_up
    assert flaky.runs == 3 and "crash 3" in str(error)
    await sup.stop()


# -- TaskServer --------------------------------------------------------------------------


async def test_task_server_drops_a_slow_watcher_without_blocking() -> None:
    sup = Supervisor("test")
    server = TaskServer(core(), Host(sup, watcher_limit=4))
    slow, _, _ = await server.subscribe(0)
    assert slow is not None
    await server.apply(lambda c: c.started())
    for index in range(10):  # never blocks although nobody reads
        await server.apply(partial(TaskCore.chunk, delta=str(index)))
    assert await slow.get() is DROPPED
    assert slow not in server.watchers
    # A new watcher picks up from where the slow one stopped.
    fresh, state, backlog = await server.subscribe(3)
    assert fresh is not None and state.seq == 11 and [e.seq for e in backlog] == list(range(4, 12))
    await sup.stop()


async def test_task_server_subscription_has_no_gap_between_replay_and_live() -> None:
    sup = Supervisor("test")
    server = TaskServer(core(), Host(sup))
    await server.apply(lambda c: c.started())
    # Changes queued before and after the subscribe all reach the watcher exactly once.
    first = asyncio.ensure_future(server.apply(lambda c: c.chunk("a")))
    subscribed = asyncio.ensure_future(server.subscribe(1))
    second = asyncio.ensure_future(server.apply(lambda c: c.chunk("b")))
    await asyncio.gather(first, second)
    watcher, _, backlog = await subscribed
    assert watcher is not None
    live = [await watcher.get() for _ in range(len(watcher.queue))]
    seqs = [e.seq for e in backlog] + [e.seq for e in live]  # type: ignore[union-attr]
    assert seqs == [2, 3]
    await sup.stop()


async def test_an_idle_task_server_hibernates_and_wakes_on_its_next_message() -> None:
    sup = Supervisor("test")
    server = TaskServer(core(), Host(sup))
    assert server.hibernating and server.task_id not in sup  # nothing runs for it
    await server.apply(lambda c: c.queued(1, 0))
    await settle()  # the loop ends once its mailbox is empty
    assert server.hibernating and server.task_id not in sup
    state = await server.call(lambda c: c.snapshot())
    assert state.status == Status.TASK_STATUS_QUEUED and state.seq == 1
    await server.apply(lambda c: c.started())
    await settle()
    assert not server.hibernating  # running: awake until it leaves PROCESSING
    await server.apply(lambda c: c.cancelled())
    await settle()
    assert server.hibernating
    server.end()  # retention over: only direct reads
    with pytest.raises(TaskServerDown):
        await server.call(lambda c: c.snapshot())
    watcher, state, _ = await server.subscribe(0)
    assert watcher is None and state.seq == 3
    await sup.stop()


async def settle() -> None:
    """Let every ready callback run (to check that something did NOT happen)."""
    for _ in range(20):
        await asyncio.sleep(0)


class Checkpoints:
    """Stores snapshots when told to, so a test decides when JetStream 'acks'."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, asyncio.Future[None]]] = []

    def publish(self, snapshot: history_pb2.TaskSnapshot) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pending.append((snapshot.state.seq, future))
        return future


async def test_events_never_run_more_than_the_reserve_ahead_of_a_stored_snapshot() -> None:
    sup = Supervisor("test")
    stored = Checkpoints()
    server = TaskServer(core(), Host(sup, checkpoint_every=4, checkpoint=stored.publish))
    await server.apply(lambda c: c.started())
    await server.apply(lambda c: c.chunk("a"))
    await server.apply(lambda c: c.chunk("b"))  # at seq 2 (half the reserve) a snapshot goes out
    await server.apply(lambda c: c.chunk("c"))
    assert server.core.seq == 4 and [seq for seq, _ in stored.pending] == [2]
    blocked = asyncio.ensure_future(server.apply(lambda c: c.chunk("d")))
    await settle()
    # Beyond 0 + 4 nothing is emitted until the snapshot at seq 2 is stored.
    assert server.core.seq == 4 and not blocked.done()
    stored.pending[0][1].set_result(None)
    await blocked
    assert server.core.seq == 5 and server.durable_seq == 2
    await sup.stop()


async def test_a_rebuilt_task_server_stores_a_checkpoint_before_its_first_event() -> None:
    sup = Supervisor("test")
    stored = Checkpoints()
    rebuilt = core(seq_base=49 + 4)  # stored seq 49, reserve 4
    server = TaskServer(
        rebuilt, Host(sup, checkpoint_every=4, checkpoint=stored.publish), durable_seq=49
    )
    first = asyncio.ensure_future(server.apply(lambda c: c.queued(1, 0, "restarted")))
    await settle()
    assert not first.done() and [seq for seq, _ in stored.pending] == [53]
    stored.pending[0][1].set_result(None)
    await first
    event = server.core.events_after(0)[0]
    assert event.seq == 54 and event.progress.message == "restarted"
    await sup.stop()


def test_a_restart_resets_the_text_and_says_so() -> None:
    c = core()
    c.queued(1, 0)
    c.started()
    c.chunk("half an ans")
    c.progressed(0.5)
    t = c.queued(2, 100, "restarted")
    assert t is not None and t.event.progress.message == "restarted"
    assert t.event.progress.progress == 0 and c.content == "" and c.progress == 0


def test_queue_position_updates_are_coalesced_in_the_log() -> None:
    c = core()
    c.queued(5, 500)
    assert c.queue_moved(4, 400, emit=False) is None  # nobody watching: state only
    assert c.snapshot().queue_position == 4 and c.seq == 1
    assert c.queue_moved(4, 400, emit=True) is None  # no change, no event
    assert c.queue_moved(3, 300, emit=True) is not None
    assert c.queue_moved(2, 200, emit=True) is not None
    replay = c.events_after(0)
    assert [e.seq for e in replay] == [1, 3] and replay[-1].progress.queue_position == 2


@pytest.mark.parametrize("limit", [0])
def test_scheduler_refuses_zero_concurrency(limit: int) -> None:
    with pytest.raises(ValueError):
        Scheduler(limit)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_aging_lets_a_long_waiting_low_priority_task_overtake_fresh_high_ones() -> None:
    clock = FakeClock()
    s = Scheduler(concurrency=1, aging_s=1.0, clock=clock)
    s.push("low", 9)
    clock.now = 8.5  # aged by 8 levels: effective priority 1
    s.push("p0", 0)
    s.push("p2", 2)
    assert list(s.order()) == ["p0", "low", "p2"] and s.position("low") == 2
    assert s.position_for(1) == 3  # behind "low", which waited longer at the same level
    clock.now = 9.0  # effective priority 0, and older than "p0"
    assert s.next_ready() == "low"


def test_without_aging_priorities_are_strict() -> None:
    clock = FakeClock()
    s = Scheduler(concurrency=1, clock=clock)
    s.push("low", 9)
    clock.now = 1e6
    s.push("high", 0)
    assert s.next_ready() == "high"


async def test_supervisor_backs_off_exponentially_between_restarts() -> None:
    sup = Supervisor("test", max_restarts=5, period_s=60, backoff_s=0.01, max_backoff_s=0.02)
    flaky = Flaky(crashes=3)
    stamps: list[float] = []
    original = flaky.run

    async def run() -> None:
        stamps.append(asyncio.get_running_loop().time())
        await original()

    exited = asyncio.Event()
    sup.start_child("flaky", run, on_exit=exited.set)
    flaky.release.set()
    async with asyncio.timeout(timeout(5)):
        await exited.wait()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(gaps) == 3 and gaps[0] >= 0.01 and all(g >= 0.02 for g in gaps[1:])
    assert sup.restarts("flaky") == 3  # remembered after the child ended, within the period
    await sup.stop()


def test_a_full_queue_refuses_with_a_retry_after() -> None:
    config = QueueConfig(concurrency=2, max_attempts=3, max_depth=3, aging_s=10.0)
    queue = JobQueue("q", config, RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=60))
    queue.depth = 2
    assert queue.refuse() is None
    queue.depth = 3
    queue.meter.record(4.0)
    error = queue.refuse()
    assert error is not None and error.code == common_pb2.ERROR_CODE_OVERLOADED
    assert error.retryable and error.retry_after_ms == 4000


def test_a_queues_stats_say_how_long_its_oldest_waiting_job_has_waited() -> None:
    config = QueueConfig(concurrency=1, max_attempts=3, max_depth=10, aging_s=0.0)
    queue = JobQueue("q", config, RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=60))
    clock = FakeClock()
    queue.scheduler.clock = clock
    assert queue.stats().oldest_s == 0.0  # none waits
    queue.scheduler.push("low", 9)
    clock.now = 2.0
    queue.scheduler.push("high", 0)
    clock.now = 3.5
    assert queue.stats().oldest_s == 3.5  # the longest wait, whatever its priority
    assert queue.scheduler.next_ready() == "high"
    queue.scheduler.remove("low")
    assert queue.stats().oldest_s == 0.0  # running is not waiting


def test_retry_policy_backs_off_with_jitter_honours_retry_after_and_stops() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=60)
    limited = ServiceError(common_pb2.ERROR_CODE_RATE_LIMITED, "slow down", retry_after_ms=7000)
    assert policy.delay_s(1, limited) == 7.0  # jitter is at most 1 s: retry-after wins
    network = ServiceError(common_pb2.ERROR_CODE_NETWORK, "reset")
    assert all(0 <= (policy.delay_s(2, network) or -1) <= 2.0 for _ in range(50))
    assert policy.delay_s(3, network) is None  # out of attempts
    auth = ServiceError(common_pb2.ERROR_CODE_AUTH, "bad key")
    assert policy.delay_s(1, auth) is None  # permanent: never retried


def test_a_model_taking_over_mid_stream_keeps_the_text_and_says_where() -> None:
    c = core()
    c.started()
    c.chunk("Hello", progress=0.4)
    handover = c.handed_over("backup")
    assert handover is not None and handover.lifecycle is None
    event = handover.event
    assert event.progress.fallback_model == "backup" and event.progress.progress == 0.4
    assert not event.progress.HasField("reset") and c.content == "Hello"
    c.chunk(" world")
    assert c.content == "Hello world" and c.snapshot().model == "backup"
