"""Snapshots of active tasks, without a database: validation of the TaskSnapshot messages that
task_svc publishes (history.proto), the snapshot derived from a task row, and the rule that
picks the one to keep.

The contract (history.proto, TaskSnapshot): task_svc publishes a snapshot of each active task
periodically on `switchboard.tasks.<task_id>.snapshot`, message id
`<task_id>:snapshot:<state.seq>`. We keep ONE snapshot per active task: the one with the
highest state.seq (on a tie, task_svc's own, which holds the text so far, wins over the one
derived here from a lifecycle event), and drop it once the task reaches a terminal status.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from persistence_svc.errors import InvalidEvent, StorageRejected
from persistence_svc.events import MAX_USER_ID, STATUS_NAMES, STATUS_VALUES, clean_text
from persistence_svc.models import TERMINAL_STATUSES
from switchboard.v1 import common_pb2, history_pb2

SNAPSHOT_SUBJECT_SUFFIX = ".snapshot"


@dataclass(frozen=True)
class ParsedSnapshot:
    task_id: uuid.UUID
    user_id: str
    seq: int
    status: str
    taken_at: datetime
    snapshot: history_pb2.TaskSnapshot
    published: bool  # from task_svc (True) or derived from a task row here (False)

    def replaces(self, stored_seq: int | None) -> bool:
        """Whether this snapshot replaces the stored one (taken at `stored_seq`). On a tie a
        published snapshot wins (it may hold text the derived one cannot) and a derived one
        never does, so the source of the stored one need not be recorded."""
        if stored_seq is None:
            return True
        return self.seq > stored_seq or (self.seq == stored_seq and self.published)

    def state_json(self) -> dict[str, Any]:
        return MessageToDict(self.snapshot, preserving_proto_field_name=True)


def parse_snapshot(
    snapshot: history_pb2.TaskSnapshot, now: datetime | None = None
) -> ParsedSnapshot:
    """Check a published snapshot can be stored; raise InvalidEvent when it never can."""
    state = snapshot.state
    try:
        task_id = uuid.UUID(state.task_id)
    except ValueError:
        raise InvalidEvent(
            f"snapshot task id {state.task_id!r} is not a UUID", task_id=state.task_id
        ) from None
    if not state.user_id or len(state.user_id) > MAX_USER_ID or "\x00" in state.user_id:
        raise InvalidEvent("snapshot without a valid user id", task_id=state.task_id)
    if state.seq < 1:
        raise InvalidEvent("snapshot seq must be 1 or more", task_id=state.task_id)
    status = STATUS_NAMES.get(state.status)
    if status is None:
        raise InvalidEvent("snapshot without a status", task_id=state.task_id, seq=state.seq)
    try:
        taken_at = (
            snapshot.taken_at.ToDatetime(tzinfo=UTC)
            if snapshot.HasField("taken_at")
            else now or datetime.now(UTC)
        )
        if state.HasField("created_at"):
            state.created_at.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidEvent("snapshot time out of range", task_id=state.task_id) from None
    clean = history_pb2.TaskSnapshot()
    clean.CopyFrom(snapshot)
    # PostgreSQL cannot store NUL in text; the partial text is a model's output.
    for field in ("content", "prompt", "model", "finish_reason"):
        setattr(clean.state, field, clean_text(getattr(clean.state, field)))
    return ParsedSnapshot(task_id, state.user_id, state.seq, status, taken_at, clean, True)


def snapshot_task_row(parsed: ParsedSnapshot, user_pk: uuid.UUID, now: datetime) -> dict[str, Any]:
    """The row of a task first seen through a snapshot (its lifecycle events are late): the
    creation fields only, at version 0, so that every lifecycle event still applies."""
    state = parsed.snapshot.state
    created = state.created_at.ToDatetime(tzinfo=UTC) if state.HasField("created_at") else None
    return {
        "id": parsed.task_id,
        "user_id": user_pk,
        "status": parsed.status,
        "prompt": state.prompt,
        "response": "",
        "model": state.model,
        "progress": 0.0,
        "priority": state.priority,
        "attempts": 0,
        "started_at": None,
        "completed_at": None,
        "error_message": "",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "finish_reason": "",
        "created_at": created or parsed.taken_at,
        "updated_at": now,
        "version": 0,
    }


def derived_snapshot(row: dict[str, Any], external_user_id: str, now: datetime) -> ParsedSnapshot:
    """The snapshot of an active task as its row knows it (no partial text: lifecycle events
    do not carry it)."""
    snapshot = history_pb2.TaskSnapshot(
        state=common_pb2.TaskState(
            task_id=str(row["id"]),
            user_id=external_user_id,
            status=STATUS_VALUES[row["status"]],
            progress=row["progress"],
            model=row["model"],
            seq=row["version"],
            prompt=row["prompt"],
            priority=row["priority"],
            attempts=row["attempts"],
        )
    )
    snapshot.state.created_at.FromDatetime(row["created_at"])
    if row["started_at"] is not None:
        snapshot.state.started_at.FromDatetime(row["started_at"])
    snapshot.state.updated_at.FromDatetime(now)
    snapshot.taken_at.FromDatetime(now)
    return ParsedSnapshot(
        row["id"], external_user_id, row["version"], row["status"], now, snapshot, False
    )


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES


def snapshot_from_json(state: dict[str, Any]) -> history_pb2.TaskSnapshot:
    try:
        return ParseDict(state, history_pb2.TaskSnapshot(), ignore_unknown_fields=True)
    except ParseError as error:
        raise StorageRejected(f"unreadable snapshot: {error}") from error
