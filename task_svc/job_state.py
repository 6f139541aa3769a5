"""The life of one job in the engine, as a pure transition table (no I/O, no event loop).

A job is the engine's record of one accepted task, from the moment a Submit, a requeued dead
letter or a job left in the store by a previous incarnation creates it, until the engine is
done with it. Its state is the one answer every part of the engine reads: whether it may be
started, whether it counts towards its queue's depth (load shedding), and who ends it.

    ACCEPTING --accept--> QUEUED --start--> RUNNING --retry--> RETRY_WAIT
                            ^                                      |
                            +---------------- due -----------------+

    ACCEPTING, QUEUED, RUNNING, RETRY_WAIT --finish--> FINISHING --removed--> DONE
    ACCEPTING --drop--> DONE                  (never stored, or a duplicate of a finished task)
    QUEUED, RUNNING, RETRY_WAIT --release--> DONE  (shutdown: it stays in the store)

The task's own state (queued, processing, completed...) is TaskCore's (task_state.py); a job
is FINISHING once its task's outcome is decided, and DONE once the dead letter (if due), the
terminal lifecycle event and the removal from the store are stored, in that order.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class JobState(enum.Enum):
    ACCEPTING = "accepting"  # being stored, or read back after a restart; not queued yet
    QUEUED = "queued"  # in its queue's scheduler, waiting for a free slot
    RUNNING = "running"  # a worker runs it
    RETRY_WAIT = "retry_wait"  # failed with a retryable error; queued again after a backoff
    FINISHING = "finishing"  # outcome decided: dead letter, terminal event, removal under way
    DONE = "done"  # nothing left to do here (removed from the store, or left in it)


class Step(enum.Enum):
    ACCEPT = "accept"  # stored, and its task put in QUEUED
    DROP = "drop"  # nothing to run: not stored, or a duplicate of a task that had finished
    START = "start"  # a free slot took it
    RETRY = "retry"  # its run failed and will be tried again after a backoff
    DUE = "due"  # the backoff is over
    FINISH = "finish"  # its task completed, failed or was cancelled (or must be)
    REMOVED = "removed"  # dead letter, terminal event and removal are stored
    RELEASE = "release"  # shutdown: left in the store for the next start


S = JobState
TRANSITIONS: Mapping[tuple[JobState, Step], JobState] = {
    (S.ACCEPTING, Step.ACCEPT): S.QUEUED,
    (S.ACCEPTING, Step.DROP): S.DONE,
    (S.ACCEPTING, Step.FINISH): S.FINISHING,
    (S.QUEUED, Step.START): S.RUNNING,
    (S.QUEUED, Step.FINISH): S.FINISHING,
    (S.QUEUED, Step.RELEASE): S.DONE,
    (S.RUNNING, Step.RETRY): S.RETRY_WAIT,
    (S.RUNNING, Step.FINISH): S.FINISHING,
    (S.RUNNING, Step.RELEASE): S.DONE,
    (S.RETRY_WAIT, Step.DUE): S.QUEUED,
    (S.RETRY_WAIT, Step.FINISH): S.FINISHING,
    (S.RETRY_WAIT, Step.RELEASE): S.DONE,
    (S.FINISHING, Step.REMOVED): S.DONE,
}

# Jobs in these states count towards their queue's depth, which load shedding limits.
# ACCEPTING counts too, so that concurrent Submits cannot overshoot the limit.
WAITING: frozenset[JobState] = frozenset({S.ACCEPTING, S.QUEUED, S.RETRY_WAIT})


class IllegalTransition(Exception):
    """A step the table does not allow from the job's state: a bug in the engine."""


def advance(state: JobState, step: Step) -> JobState:
    """The state after `step`; IllegalTransition if `step` is not allowed from `state`."""
    try:
        return TRANSITIONS[state, step]
    except KeyError:
        raise IllegalTransition(f"{step.value} is not allowed from {state.value}") from None
