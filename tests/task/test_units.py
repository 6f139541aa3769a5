"""The parts without sockets: task state, scheduler, supervisor, the TaskServer actor."""

from __future__ import annotations

import asyncio
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switchboard.v1 import common_pb2, llm_pb2
from task_svc.scheduler import Scheduler, ThroughputMeter
from task_svc.supervisor import Supervisor
from task_svc.task_server import DROPPED, TaskServer
from task_svc.task_state import TaskCore, TaskSpec
from tests.conftest import timeout

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
    server = TaskServer(core(), watcher_limit=4)
    sup = Supervisor("test")
    sup.start_child("t", server.run)
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
    server = TaskServer(core())
    sup = Supervisor("test")
    sup.start_child("t", server.run)
    await server.apply(lambda c: c.started())
    # Changes queued before and after the subscribe all reach the watcher exactly once.
    first = asyncio.ensure_future(server.apply(lambda c: c.chunk("a")))
    subscribed = asyncio.ensure_future(server.subscribe(1))
    second = asyncio.ensure_future(server.apply(lambda c: c.chunk("b")))
    await asyncio.gather(first, second)
    watcher, _, backlog = await subscribed
    assert watcher is not None
    live = [await watcher.get() for _ in range(watcher.queue.qsize())]
    seqs = [e.seq for e in backlog] + [e.seq for e in live]  # type: ignore[union-attr]
    assert seqs == [2, 3]
    await sup.stop()


async def test_a_finished_task_server_ends_after_its_retention() -> None:
    server = TaskServer(core(), retain_s=0.0)
    ended = asyncio.Event()
    sup = Supervisor("test")
    sup.start_child("t", server.run, on_exit=ended.set)
    await server.apply(lambda c: c.cancelled())
    async with asyncio.timeout(timeout(5)):
        await ended.wait()
    watcher, state, _ = await server.subscribe(0)  # still readable, nothing follows
    assert watcher is None and state.status == Status.TASK_STATUS_CANCELLED
    await sup.stop()


@pytest.mark.parametrize("limit", [0])
def test_scheduler_refuses_zero_concurrency(limit: int) -> None:
    with pytest.raises(ValueError):
        Scheduler(limit)
