"""The engine's record of one job (job_state.py: its life), from its creation to DONE."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from opentelemetry.trace import Span

from svckit import tracing
from switchboard.v1 import common_pb2
from task_svc.job_state import WAITING, JobState, Step, advance
from task_svc.queues import JobQueue
from task_svc.task_server import TaskServer
from task_svc.task_state import TaskSpec
from task_svc.worker import Outcome

# How a task's first event says it runs again from the start (watchers drop their text).
RESTARTED = "restarted"
# How a task's event says it runs again and continues the text watchers have.
RESUMING = "resuming"


@dataclass(eq=False, slots=True)  # slots: 100k queued jobs must fit in memory
class Job:
    spec: TaskSpec
    server: TaskServer
    queue: JobQueue
    seq: int = 0  # where the store holds it (0 until stored)
    state: JobState = JobState.ACCEPTING
    runner: asyncio.Task[None] | None = None  # RUNNING: the run, from start to its outcome
    worker: asyncio.Task[Outcome] | None = None  # RUNNING: the generation itself
    retry_timer: asyncio.TimerHandle | None = None  # RETRY_WAIT
    outage_since: float | None = None  # when llm_svc first failed it, since its last good run
    outages: int = 0  # reruns after llm_svc was unreachable (they cost no attempt)
    released: bool = False  # its shard is being handed over: it ends here unfinished
    accepted: asyncio.Event = field(default_factory=asyncio.Event)  # no longer ACCEPTING
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # DONE
    span: Span | None = None  # the `task` span, from creation to DONE (None: not traced)
    traceparent: str = ""  # the span's, which its events and its generation carry

    def __post_init__(self) -> None:
        self.queue.depth += 1  # ACCEPTING is one of the WAITING states
        if tracing.enabled():
            attributes = {"task_id": self.task_id, "queue": self.queue.name}
            self.span = tracing.start("task", self.spec.traceparent, attributes)
            self.traceparent = tracing.traceparent(self.span)

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    def move(self, step: Step) -> None:
        """Take `step` (job_state.IllegalTransition if the table refuses it), keeping the
        queue's depth and the two events in line with the new state."""
        before, self.state = self.state, advance(self.state, step)
        self.queue.depth += (self.state in WAITING) - (before in WAITING)
        if before is JobState.ACCEPTING:
            self.accepted.set()
        if self.state is JobState.DONE:
            self.finished.set()
            if self.span is not None:
                failed = self.server.core.status == common_pb2.TASK_STATUS_FAILED
                tracing.end(self.span, error="failed" if failed else "")
