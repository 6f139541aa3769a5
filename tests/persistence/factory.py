"""LifecycleEvents as task_svc publishes them (docs/architecture.md): seq counts every
TaskEvent of the task, so lifecycle events have gaps (chunks between STARTED and COMPLETED)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from switchboard.v1 import common_pb2, events_pb2, history_pb2

Kind = events_pb2.LifecycleKind
Status = common_pb2.TaskStatus

T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)

_KIND_STATUS = {
    Kind.LIFECYCLE_KIND_QUEUED: Status.TASK_STATUS_QUEUED,
    Kind.LIFECYCLE_KIND_STARTED: Status.TASK_STATUS_PROCESSING,
    Kind.LIFECYCLE_KIND_COMPLETED: Status.TASK_STATUS_COMPLETED,
    Kind.LIFECYCLE_KIND_FAILED: Status.TASK_STATUS_FAILED,
    Kind.LIFECYCLE_KIND_CANCELLED: Status.TASK_STATUS_CANCELLED,
}


def new_task_id() -> str:
    return str(uuid.uuid4())


def event(
    task_id: str,
    seq: int,
    kind: events_pb2.LifecycleKind.ValueType,
    *,
    user: str = "alice",
    at: datetime = T0,
    prompt: str = "Why is the sky blue?",
    model: str = "local-small",
    priority: int = 1,
    **fields: object,
) -> events_pb2.LifecycleEvent:
    message = events_pb2.LifecycleEvent(
        task_id=task_id,
        user_id=user,
        seq=seq,
        kind=kind,
        status=_KIND_STATUS[kind],
        prompt=prompt,
        model=model,
        priority=priority,
        attempt=1,
        **fields,  # type: ignore[arg-type]
    )
    message.at.FromDatetime(at)
    return message


def completed_lifecycle(
    task_id: str, *, user: str = "alice", at: datetime = T0, content: str = "Rayleigh."
) -> list[events_pb2.LifecycleEvent]:
    """QUEUED (seq 1), STARTED (seq 2), COMPLETED (seq 7, after four chunks and a progress)."""
    return [
        event(task_id, 1, Kind.LIFECYCLE_KIND_QUEUED, user=user, at=at),
        event(task_id, 2, Kind.LIFECYCLE_KIND_STARTED, user=user, at=at + timedelta(seconds=1)),
        event(
            task_id,
            7,
            Kind.LIFECYCLE_KIND_COMPLETED,
            user=user,
            at=at + timedelta(seconds=3),
            progress=1.0,
            content=content,
            finish_reason="stop",
            usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8),
        ),
    ]


def slim_lifecycle(
    task_id: str, *, user: str = "alice", at: datetime = T0
) -> list[events_pb2.LifecycleEvent]:
    """As completed_lifecycle, the way task_svc is moving to: the prompt and priority only on
    QUEUED, the answer (content, usage, finish_reason) only on COMPLETED."""
    queued, started, done = completed_lifecycle(task_id, user=user, at=at)
    for later in (started, done):
        later.prompt, later.priority = "", 0
    return [queued, started, done]


def snapshot(
    task_id: str,
    seq: int,
    *,
    status: common_pb2.TaskStatus.ValueType = Status.TASK_STATUS_PROCESSING,
    content: str = "Rayl",
    user: str = "alice",
    at: datetime = T0,
) -> history_pb2.TaskSnapshot:
    """A TaskSnapshot as task_svc publishes it for an active task (history.proto)."""
    message = history_pb2.TaskSnapshot(
        state=common_pb2.TaskState(
            task_id=task_id,
            user_id=user,
            status=status,
            progress=0.4,
            content=content,
            model="local-small",
            seq=seq,
            prompt="Why is the sky blue?",
            priority=1,
            attempts=1,
        )
    )
    message.state.created_at.FromDatetime(at)
    message.state.started_at.FromDatetime(at + timedelta(seconds=1))
    message.taken_at.FromDatetime(at + timedelta(seconds=2))
    return message


def lifecycle_ending(
    status: str, task_id: str, *, user: str = "alice", at: datetime = T0, content: str = "Rayleigh."
) -> list[events_pb2.LifecycleEvent]:
    """The events of a task that is now `status` (a stored status name), created at `at`."""
    queued = event(task_id, 1, Kind.LIFECYCLE_KIND_QUEUED, user=user, at=at)
    later = at + timedelta(seconds=1)
    if status == "queued":
        return [queued]
    if status == "processing":
        return [queued, event(task_id, 2, Kind.LIFECYCLE_KIND_STARTED, user=user, at=later)]
    if status == "completed":
        return completed_lifecycle(task_id, user=user, at=at, content=content)
    if status == "failed":
        error = common_pb2.Error(code=common_pb2.ERROR_CODE_TIMEOUT, message="timed out")
        failed = event(task_id, 4, Kind.LIFECYCLE_KIND_FAILED, user=user, at=later, error=error)
        return [queued, failed]
    if status == "cancelled":
        return [queued, event(task_id, 2, Kind.LIFECYCLE_KIND_CANCELLED, user=user, at=later)]
    raise ValueError(status)
