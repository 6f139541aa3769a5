"""Lifecycle events to task rows, without a database: validation (once per message, in the
consumer) and the fold that applies an event's fields to a task's state (inside the
repository's transaction)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from persistence_svc.errors import InvalidEvent
from persistence_svc.models import TERMINAL_STATUSES
from persistence_svc.payload import to_json
from switchboard.v1 import common_pb2, events_pb2

Kind = events_pb2.LifecycleKind
Status = common_pb2.TaskStatus

STATUS_NAMES: dict[common_pb2.TaskStatus.ValueType, str] = {
    Status.TASK_STATUS_QUEUED: "queued",
    Status.TASK_STATUS_PROCESSING: "processing",
    Status.TASK_STATUS_COMPLETED: "completed",
    Status.TASK_STATUS_FAILED: "failed",
    Status.TASK_STATUS_CANCELLED: "cancelled",
}
STATUS_VALUES = {name: value for value, name in STATUS_NAMES.items()}

# The status an event implies when task_svc left `status` unset.
KIND_STATUS: dict[events_pb2.LifecycleKind.ValueType, str] = {
    Kind.LIFECYCLE_KIND_QUEUED: "queued",
    Kind.LIFECYCLE_KIND_STARTED: "processing",
    Kind.LIFECYCLE_KIND_COMPLETED: "completed",
    Kind.LIFECYCLE_KIND_FAILED: "failed",
    Kind.LIFECYCLE_KIND_CANCELLED: "cancelled",
}

# task_events.kind of each known kind; proto3 enums are open, so a newer task_svc may send a
# kind missing here: it is stored as "unknown" and its status still says what happened.
KIND_NAMES: dict[int, str] = {
    value: name.removeprefix("LIFECYCLE_KIND_").lower() for name, value in Kind.items()
}

MAX_USER_ID = 255


@dataclass(frozen=True, slots=True)
class ParsedEvent:
    """A LifecycleEvent checked once, with its ids and time in database form."""

    task_id: uuid.UUID
    user_id: str  # the app's external user id
    seq: int
    at: datetime
    kind: str
    status: str
    event: events_pb2.LifecycleEvent

    def payload(self) -> dict[str, Any]:
        # The proto's own JSON mapping, so that GetTaskEvents gives back the same message.
        return to_json(self.event)


def clean_text(text: str) -> str:
    """PostgreSQL text cannot hold NUL; a model's output could. Replace it on both databases
    so that they store the same thing."""
    return text.replace("\x00", "\ufffd")


def parse_event(event: events_pb2.LifecycleEvent, now: datetime | None = None) -> ParsedEvent:
    """Check an event can be applied; raise InvalidEvent when it never can."""
    try:
        task_id = uuid.UUID(event.task_id)
    except ValueError:
        raise InvalidEvent(
            f"task id {event.task_id!r} is not a UUID", task_id=event.task_id, seq=event.seq
        ) from None
    if not event.user_id or len(event.user_id) > MAX_USER_ID or "\x00" in event.user_id:
        raise InvalidEvent("missing or malformed user id", task_id=event.task_id, seq=event.seq)
    if event.seq < 1:
        raise InvalidEvent("seq must be 1 or more", task_id=event.task_id, seq=event.seq)
    status = STATUS_NAMES.get(event.status) or KIND_STATUS.get(event.kind)
    if status is None:
        raise InvalidEvent("event has no kind and no status", task_id=event.task_id, seq=event.seq)
    kind = KIND_NAMES.get(event.kind, "unknown")
    try:
        # An event without a time (a bug upstream) is dated when we first see it.
        at = event.at.ToDatetime(tzinfo=UTC) if event.HasField("at") else now or datetime.now(UTC)
    except (ValueError, OverflowError):
        raise InvalidEvent(
            "event time out of range", task_id=event.task_id, seq=event.seq
        ) from None
    return ParsedEvent(task_id, event.user_id, event.seq, at, kind, status, event)


def new_task_row(first: ParsedEvent, user_pk: uuid.UUID, now: datetime) -> dict[str, Any]:
    """The row of a task first seen through `first` (any kind: events can arrive out of order),
    before any event's fields are applied (version 0)."""
    return {
        "id": first.task_id,
        "user_id": user_pk,
        "status": first.status,
        "prompt": "",
        "response": "",
        "model": "",
        "progress": 0.0,
        "priority": 0,
        "attempts": 0,
        "started_at": None,
        "completed_at": None,
        "error_message": "",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "finish_reason": "",
        "created_at": first.at,
        "updated_at": now,
        "version": 0,
    }


def apply_event(row: dict[str, Any], parsed: ParsedEvent) -> bool:
    """Apply one event to a task row in place; return whether the row changed.

    Ordering rule (docs/architecture.md, persistence_svc): an event whose seq is not above the
    row's version is older than the state we hold and changes nothing, except that it may fill
    the gaps of write-once fields (`fill_gaps`).
    """
    changed = fill_gaps(row, parsed)
    if parsed.seq <= row["version"]:
        return changed
    event = parsed.event
    row["version"] = parsed.seq
    row["status"] = parsed.status
    # task_svc sets the creation fields on QUEUED (earlier releases repeated them on every
    # event): whichever event carries them sets them.
    if event.prompt:
        row["prompt"] = clean_text(event.prompt)
    if event.model:
        row["model"] = clean_text(event.model)
    if event.priority:
        row["priority"] = event.priority
    row["attempts"] = max(row["attempts"], event.attempt)
    # Progress never goes backwards (common.proto, TaskState.progress) and stays in 0..1;
    # NaN compares false and is ignored (SQLite would store it as NULL).
    if event.progress > row["progress"]:
        row["progress"] = min(event.progress, 1.0)
    if parsed.status in TERMINAL_STATUSES:
        row["completed_at"] = row["completed_at"] or parsed.at
    if parsed.status == "completed":
        row["progress"] = 1.0
        row["response"] = clean_text(event.content)
        row["finish_reason"] = clean_text(event.finish_reason)
        if event.HasField("usage"):
            row["prompt_tokens"] = event.usage.prompt_tokens
            row["completion_tokens"] = event.usage.completion_tokens
            row["total_tokens"] = event.usage.total_tokens
    if event.HasField("error"):
        row["error_message"] = clean_text(event.error.message)
    return True


def fill_gaps(row: dict[str, Any], parsed: ParsedEvent) -> bool:
    """Fill the write-once fields the row lacks from any event, older ones included: events
    arrive out of order (a redelivered QUEUED after COMPLETED), and only QUEUED carries the
    prompt. A gap holds no state yet, so filling it never overwrites newer state; a field
    already set is left alone. The creation time is the earliest event time seen."""
    changed = False
    event = parsed.event
    if parsed.at < row["created_at"]:
        row["created_at"] = parsed.at
        changed = True
    if parsed.status == "processing" and row["started_at"] is None:
        row["started_at"] = parsed.at
        changed = True
    if event.prompt and not row["prompt"]:
        row["prompt"] = clean_text(event.prompt)
        changed = True
    if event.priority and not row["priority"]:
        row["priority"] = event.priority
        changed = True
    if event.model and not row["model"]:
        row["model"] = clean_text(event.model)
        changed = True
    return changed
