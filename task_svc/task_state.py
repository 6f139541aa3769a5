"""The state of one task and its event log, with no I/O and no event loop.

`TaskCore` is what a TaskServer owns: every change is one method that assigns the next seq,
appends one entry to the log and returns a `Transition` (the `TaskEvent` to fan out to
watchers and, for lifecycle changes, the `LifecycleEvent` to publish on NATS). Once the task
is terminal every further change is refused (returns None), so races between a finishing
worker and a cancel resolve to whichever came first through the mailbox.

The log stays compact for long texts: a chunk entry holds its delta string, and the content
so far is those same strings joined (each delta is stored once); the Completed event's content
is rendered from them on demand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from switchboard.v1 import common_pb2, events_pb2, history_pb2, tasks_pb2

Status = common_pb2.TaskStatus
Kind = events_pb2.LifecycleKind
TERMINAL: frozenset[common_pb2.TaskStatus.ValueType] = frozenset(
    {Status.TASK_STATUS_COMPLETED, Status.TASK_STATUS_FAILED, Status.TASK_STATUS_CANCELLED}
)


def now_ns() -> int:
    return time.time_ns()


def timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


@dataclass(frozen=True)
class TaskSpec:
    """What was submitted: everything needed to run the task again after a crash."""

    task_id: str
    user_id: str
    prompt: str
    model: str
    priority: int
    queue: str = "default"
    options: common_pb2.GenerationOptions = field(default_factory=common_pb2.GenerationOptions)
    submitted_ns: int = 0
    traceparent: str = ""  # the submitter's span (svckit/tracing.py)

    def to_job(self) -> events_pb2.Job:
        return events_pb2.Job(
            task_id=self.task_id,
            user_id=self.user_id,
            prompt=self.prompt,
            model=self.model,
            priority=self.priority,
            options=self.options,
            submitted_at=timestamp(self.submitted_ns),
            traceparent=self.traceparent,
        )

    @classmethod
    def from_job(cls, job: events_pb2.Job, queue: str) -> TaskSpec:
        return cls(
            task_id=job.task_id,
            user_id=job.user_id,
            prompt=job.prompt,
            model=job.model,
            priority=job.priority,
            queue=queue,
            options=job.options,
            submitted_ns=job.submitted_at.ToNanoseconds(),
            traceparent=job.traceparent,
        )


@dataclass(slots=True)
class LogEntry:
    seq: int
    at_ns: int
    kind: str  # "progress" | "position" (a Progress, coalesced) | "chunk" | "completed" | "error"
    status: common_pb2.TaskStatus.ValueType = Status.TASK_STATUS_UNSPECIFIED
    progress: float = 0.0
    queue_position: int = 0
    eta_ms: int = 0
    message: str = ""
    delta: str = ""
    error: common_pb2.Error | None = None
    reset: tasks_pb2.Reset | None = None  # a QUEUED that restarts the task
    fallback_model: str = ""  # a model that took over mid-stream


@dataclass(frozen=True)
class Transition:
    event: tasks_pb2.TaskEvent
    lifecycle: events_pb2.LifecycleEvent | None = None

    @property
    def terminal(self) -> bool:
        return ends_task(self.event)


def ends_task(event: tasks_pb2.TaskEvent) -> bool:
    """Whether `event` is its task's last: completed, failed, or a terminal progress."""
    kind = event.WhichOneof("kind")
    if kind in ("completed", "error"):
        return True
    return kind == "progress" and event.progress.status in TERMINAL


class TaskCore:
    """The authoritative state of one task (docs/architecture.md)."""

    # Slots: a queued task is held in memory for as long as it waits (100k of them must fit).
    __slots__ = (
        "_final_content",
        "_joined",
        "_parts",
        "attempts",
        "completed_ns",
        "created_ns",
        "error",
        "eta_ms",
        "finish_reason",
        "from_cache",
        "from_fallback",
        "log",
        "model",
        "progress",
        "queue_position",
        "seq",
        "spec",
        "started_ns",
        "status",
        "updated_ns",
        "usage",
    )

    def __init__(self, spec: TaskSpec, *, seq_base: int = 0, attempts: int = 0) -> None:
        self.spec = spec
        self.status: common_pb2.TaskStatus.ValueType = Status.TASK_STATUS_UNSPECIFIED
        self.progress = 0.0
        self.seq = seq_base
        self.attempts = attempts
        self.model = spec.model
        self.usage: common_pb2.Usage | None = None
        self.error: common_pb2.Error | None = None
        self.finish_reason = ""
        self.from_fallback = False  # the answer came from a model of the fallback chain
        self.from_cache = False  # ... or from the response cache
        self.queue_position = 0
        self.eta_ms = 0
        self.created_ns = spec.submitted_ns or now_ns()
        self.started_ns = 0
        self.updated_ns = self.created_ns
        self.completed_ns = 0
        self.log: list[LogEntry] = []
        self._parts: list[str] = []
        self._joined: str | None = ""
        # Set only when the model's final content differs from the streamed deltas.
        self._final_content: str | None = None

    # -- reading ------------------------------------------------------------------------

    @property
    def task_id(self) -> str:
        return self.spec.task_id

    @property
    def user_id(self) -> str:
        return self.spec.user_id

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def content(self) -> str:
        if self._final_content is not None:
            return self._final_content
        if self._joined is None:
            self._joined = "".join(self._parts)
        return self._joined

    def snapshot(self) -> common_pb2.TaskState:
        state = common_pb2.TaskState(
            task_id=self.task_id,
            user_id=self.user_id,
            status=self.status,
            progress=self.progress,
            content=self.content,
            model=self.model,
            seq=self.seq,
            prompt=self.spec.prompt,
            priority=self.spec.priority,
            attempts=self.attempts,
            queue_position=self.queue_position,
            eta_ms=self.eta_ms,
            finish_reason=self.finish_reason,
            created_at=timestamp(self.created_ns),
            updated_at=timestamp(self.updated_ns),
        )
        if self.usage is not None:
            state.usage.CopyFrom(self.usage)
        if self.error is not None:
            state.error.CopyFrom(self.error)
        if self.started_ns:
            state.started_at.CopyFrom(timestamp(self.started_ns))
        if self.completed_ns:
            state.completed_at.CopyFrom(timestamp(self.completed_ns))
        return state

    def events_after(self, after_seq: int) -> list[tasks_pb2.TaskEvent]:
        # The log is in seq order: skip what the watcher has seen.
        return [self._render(entry) for entry in self.log if entry.seq > after_seq]

    def lifecycle(self, kind: events_pb2.LifecycleKind.ValueType) -> events_pb2.LifecycleEvent:
        event = events_pb2.LifecycleEvent(
            task_id=self.task_id,
            user_id=self.user_id,
            seq=self.seq,
            at=timestamp(self.updated_ns),
            kind=kind,
            status=self.status,
            model=self.model,
            attempt=self.attempts,
            progress=self.progress,
        )
        # What was submitted travels once, on QUEUED; the answer once, on COMPLETED.
        if kind == Kind.LIFECYCLE_KIND_QUEUED:
            event.prompt = self.spec.prompt
            event.priority = self.spec.priority
        if kind == Kind.LIFECYCLE_KIND_COMPLETED:
            event.content = self.content
            event.finish_reason = self.finish_reason
            if self.usage is not None:
                event.usage.CopyFrom(self.usage)
        if self.error is not None and kind in (
            Kind.LIFECYCLE_KIND_FAILED,
            Kind.LIFECYCLE_KIND_CANCELLED,
        ):
            event.error.CopyFrom(self.error)
        return event

    # -- changing -----------------------------------------------------------------------

    def queued(
        self,
        position: int,
        eta_ms: int,
        restart: str = "",
        reset: tasks_pb2.Reset | None = None,
        *,
        uncount: bool = False,
    ) -> Transition | None:
        """QUEUED (a lifecycle change). With `restart` (a message starting with "restarted")
        the task runs again from the start (recovered after a crash, or retried): its text
        and progress are reset, and the event tells watchers to reset theirs, `reset` saying
        why (by default: recovered). `uncount`: the attempt that was cut does not count."""
        if self.terminal:
            return None
        if uncount:
            self.attempts = max(self.attempts - 1, 0)
        if restart:
            self._reset_text()
            if reset is None:
                reset = tasks_pb2.Reset(attempt=self.attempts + 1, reason="recovered")
        self.status = Status.TASK_STATUS_QUEUED
        self.queue_position, self.eta_ms = position, eta_ms
        entry = self._append("progress", status=self.status, queue_position=position)
        entry.eta_ms = eta_ms
        entry.progress = self.progress
        entry.message = restart
        entry.reset = reset if restart else None
        return self._transition(entry, Kind.LIFECYCLE_KIND_QUEUED)

    def queued_to_resume(
        self, eta_ms: int, message: str, *, uncount: bool = False
    ) -> Transition | None:
        """QUEUED again after a cut run that had streamed text: unlike a restart, the text
        and progress stay, and the next run continues them (worker.py, `continue_from`).
        `uncount`: the attempt that was cut does not count (our own outage)."""
        if self.terminal:
            return None
        if uncount:
            self.attempts = max(self.attempts - 1, 0)
        self.status = Status.TASK_STATUS_QUEUED
        self.queue_position, self.eta_ms = 0, eta_ms
        entry = self._append("progress", status=self.status, progress=self.progress)
        entry.eta_ms = eta_ms
        entry.message = message
        return self._transition(entry, Kind.LIFECYCLE_KIND_QUEUED)

    def queue_moved(self, position: int, eta_ms: int, *, emit: bool) -> Transition | None:
        """A queued task's position or eta changed. With nobody watching (`emit` False) only
        the state changes (Get and a new Watch read it); otherwise one Progress event, which
        replaces a previous position update still at the end of the log (coalescing: a
        watcher replaying the log gets the newest position only)."""
        if self.status != Status.TASK_STATUS_QUEUED:
            return None
        if (position, eta_ms) == (self.queue_position, self.eta_ms):
            return None
        self.queue_position, self.eta_ms = position, eta_ms
        if not emit:
            return None
        last = self.log[-1] if self.log else None
        if last is not None and last.kind == "position":
            self.log.pop()
        entry = self._append("position", status=self.status, queue_position=position)
        entry.eta_ms = eta_ms
        return self._transition(entry)

    def started(self) -> Transition | None:
        if self.terminal:
            return None
        self.status = Status.TASK_STATUS_PROCESSING
        self.attempts += 1
        self.queue_position = self.eta_ms = 0
        entry = self._append("progress", status=self.status, progress=self.progress)
        self.started_ns = entry.at_ns
        return self._transition(entry, Kind.LIFECYCLE_KIND_STARTED)

    def chunk(self, delta: str, progress: float = 0.0) -> Transition | None:
        """Text, and the progress made with it (0: unchanged; it never goes backwards)."""
        if self.terminal or not delta:
            return None
        self._parts.append(delta)
        self._joined = None
        self.progress = max(self.progress, min(progress, 1.0))
        return self._transition(self._append("chunk", delta=delta, progress=self.progress))

    def progressed(self, progress: float) -> Transition | None:
        progress = min(max(progress, 0.0), 1.0)
        # Progress never goes backwards; an equal report adds nothing (coalescing).
        if self.terminal or progress <= self.progress:
            return None
        self.progress = progress
        entry = self._append("progress", status=self.status, progress=progress)
        return self._transition(entry)

    def handed_over(self, model: str) -> Transition | None:
        """Another model of the chain took over mid-stream: the text so far stays, its text
        follows. Watchers are told which model, and at which seq (this event's)."""
        if self.terminal:
            return None
        self.model = model
        entry = self._append("progress", status=self.status, progress=self.progress)
        entry.fallback_model = model
        return self._transition(entry)

    def completed(self, final: object) -> Transition | None:
        """`final` is an llm_pb2.GenerationFinal (typed loosely: this module stays free of
        the LLM contract)."""
        if self.terminal:
            return None
        content: str = getattr(final, "content", "")
        if content != self.content:
            self._final_content = content
        self.model = getattr(final, "model", "") or self.model
        self.finish_reason = getattr(final, "finish_reason", "")
        self.from_fallback = bool(getattr(final, "from_fallback", False))
        self.from_cache = bool(getattr(final, "from_cache", False))
        usage = getattr(final, "usage", None)
        self.usage = common_pb2.Usage()
        if usage is not None:
            self.usage.CopyFrom(usage)
        self.status = Status.TASK_STATUS_COMPLETED
        self.progress = 1.0
        entry = self._append("completed", status=self.status, progress=1.0)
        self.completed_ns = entry.at_ns
        return self._transition(entry, Kind.LIFECYCLE_KIND_COMPLETED)

    def failed(self, error: common_pb2.Error) -> Transition | None:
        if self.terminal:
            return None
        self.status = Status.TASK_STATUS_FAILED
        self.error = error
        entry = self._append("error", status=self.status, error=error)
        self.completed_ns = entry.at_ns
        return self._transition(entry, Kind.LIFECYCLE_KIND_FAILED)

    def cancelled(self, reason: str = "cancelled by the user") -> Transition | None:
        if self.terminal:
            return None
        self.status = Status.TASK_STATUS_CANCELLED
        self.error = common_pb2.Error(code=common_pb2.ERROR_CODE_CANCELLED, message=reason)
        self.queue_position = self.eta_ms = 0
        entry = self._append("progress", status=self.status, progress=self.progress)
        entry.message = reason
        self.completed_ns = entry.at_ns
        return self._transition(entry, Kind.LIFECYCLE_KIND_CANCELLED)

    def snapshot_message(self) -> history_pb2.TaskSnapshot:
        """A checkpoint of this task for SB_TASK_EVENTS (history.proto, TaskSnapshot): only
        what recovery reads back (events.read_stored): seq, owner, attempts, and the text so
        far with its progress, which the task's next run continues (intake.py)."""
        state = common_pb2.TaskState(
            task_id=self.task_id,
            user_id=self.user_id,
            status=self.status,
            seq=self.seq,
            attempts=self.attempts,
            content=self.content,
            progress=self.progress,
        )
        return history_pb2.TaskSnapshot(state=state, taken_at=timestamp(now_ns()))

    def restore_terminal(self, last: events_pb2.LifecycleEvent) -> None:
        """Rebuild a task that had finished before a restart, from its last lifecycle event
        (no log: a watcher gets the state, which holds the final content)."""
        self.seq = max(self.seq, last.seq)
        self.status = last.status
        self.progress = last.progress
        self.attempts = last.attempt
        self.model = last.model or self.model
        self._final_content = last.content
        self.finish_reason = last.finish_reason
        if last.HasField("usage"):
            self.usage = last.usage
        if last.HasField("error"):
            self.error = last.error
        self.updated_ns = self.completed_ns = last.at.ToNanoseconds()

    # -- internals ----------------------------------------------------------------------

    def _reset_text(self) -> None:
        self.progress = 0.0
        self._parts = []
        self._joined = ""
        self._final_content = None

    def _append(self, kind: str, **fields: object) -> LogEntry:
        self.seq += 1
        self.updated_ns = now_ns()
        entry = LogEntry(self.seq, self.updated_ns, kind, **fields)  # type: ignore[arg-type]
        self.log.append(entry)
        return entry

    def _transition(
        self, entry: LogEntry, kind: events_pb2.LifecycleKind.ValueType | None = None
    ) -> Transition:
        lifecycle = self.lifecycle(kind) if kind is not None else None
        return Transition(self._render(entry), lifecycle)

    def _render(self, entry: LogEntry) -> tasks_pb2.TaskEvent:
        event = tasks_pb2.TaskEvent(task_id=self.task_id, seq=entry.seq, at=timestamp(entry.at_ns))
        if entry.kind == "chunk":
            event.chunk.delta = entry.delta
            event.chunk.progress = entry.progress
        elif entry.kind == "completed":
            event.completed.content = self.content
            event.completed.model = self.model
            event.completed.finish_reason = self.finish_reason
            event.completed.from_fallback = self.from_fallback
            event.completed.from_cache = self.from_cache
            if self.usage is not None:
                event.completed.usage.CopyFrom(self.usage)
        elif entry.kind == "error":
            assert entry.error is not None
            event.error.CopyFrom(entry.error)
        else:
            event.progress.status = entry.status
            event.progress.progress = entry.progress
            event.progress.queue_position = entry.queue_position
            event.progress.eta_ms = entry.eta_ms
            event.progress.message = entry.message
            if entry.reset is not None:
                event.progress.reset.CopyFrom(entry.reset)
            event.progress.fallback_model = entry.fallback_model
        return event
