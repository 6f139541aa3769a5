"""The job state machine (job_state.py) and the Job record that follows it (job.py)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from task_svc.config import QueueConfig
from task_svc.job import Job
from task_svc.job_state import (
    TRANSITIONS,
    WAITING,
    IllegalTransition,
    JobState,
    Step,
    advance,
)
from task_svc.queues import JobQueue, RetryPolicy
from task_svc.task_server import Host, TaskServer
from task_svc.task_state import TaskCore, TaskSpec

S = JobState


def new_job() -> Job:
    spec = TaskSpec("00000000-0000-0000-0000-000000000001", "alice", "p", "m", 0)
    queue = JobQueue(
        "q",
        QueueConfig(concurrency=1, max_attempts=3, max_depth=10, aging_s=0),
        RetryPolicy(max_attempts=3, base_delay_s=1, max_delay_s=1),
    )
    return Job(spec, TaskServer(TaskCore(spec), Host()), queue)


def walk(steps: list[Step]) -> JobState:
    state = S.ACCEPTING
    for step in steps:
        state = advance(state, step)
    return state


def test_the_ways_a_job_goes() -> None:
    assert walk([Step.ACCEPT, Step.START, Step.FINISH, Step.REMOVED]) is S.DONE
    retried = [Step.ACCEPT, Step.START, Step.RETRY, Step.DUE, Step.START, Step.FINISH]
    assert walk(retried) is S.FINISHING
    assert walk([Step.ACCEPT, Step.FINISH, Step.REMOVED]) is S.DONE  # cancelled while queued
    assert walk([Step.FINISH, Step.REMOVED]) is S.DONE  # recovered, its task had finished
    assert walk([Step.DROP]) is S.DONE  # never stored
    assert walk([Step.ACCEPT, Step.START, Step.RELEASE]) is S.DONE  # shutdown


def test_every_pair_not_in_the_table_is_refused() -> None:
    for state, step in itertools.product(JobState, Step):
        if (state, step) in TRANSITIONS:
            assert advance(state, step) is TRANSITIONS[state, step]
        else:
            with pytest.raises(IllegalTransition):
                advance(state, step)


def test_done_is_final_and_reachable_from_every_state() -> None:
    assert not [step for step in Step if (S.DONE, step) in TRANSITIONS]
    reaches_done = {S.DONE}
    while True:  # states with a path to DONE, growing backwards through the table
        more = {state for (state, _), after in TRANSITIONS.items() if after in reaches_done}
        if more <= reaches_done:
            break
        reaches_done |= more
    assert reaches_done == set(JobState)


def test_a_job_finishes_only_once() -> None:
    finishing = walk([Step.ACCEPT, Step.START, Step.FINISH])
    for step in (Step.FINISH, Step.RETRY, Step.RELEASE, Step.START):
        with pytest.raises(IllegalTransition):
            advance(finishing, step)


@given(st.lists(st.sampled_from(list(Step)), max_size=20))
def test_a_jobs_depth_and_events_follow_its_state(steps: list[Step]) -> None:
    job = new_job()
    for step in steps:
        before = job.state
        if (before, step) in TRANSITIONS:
            job.move(step)
        else:
            with pytest.raises(IllegalTransition):
                job.move(step)
            assert job.state is before  # a refused step changes nothing
        assert job.queue.depth == (1 if job.state in WAITING else 0)
        assert job.accepted.is_set() == (job.state is not S.ACCEPTING)
        assert job.finished.is_set() == (job.state is S.DONE)
