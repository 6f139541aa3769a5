"""Database rows to the protobuf messages HistoryService and UserService return (the
repository's reads), and the task query they share."""

from __future__ import annotations

import uuid
from typing import Any

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError
from sqlalchemy import Row, Text, func, select

from persistence_svc import models
from persistence_svc.errors import StorageRejected
from persistence_svc.events import STATUS_VALUES
from switchboard.v1 import common_pb2, events_pb2, history_pb2


def uuid_or_none(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def task_select(preview_chars: int = 0) -> Any:
    """A task row with its owner's external id. `preview_chars` > 0: `response` is cut to at
    most that many characters by the database (substr counts characters on both SQLite and
    PostgreSQL), so a page of previews never carries the whole texts."""
    columns: list[Any] = [
        func.substr(column, 1, preview_chars, type_=Text).label("response")
        if column.name == "response" and preview_chars > 0
        else column
        for column in models.tasks.c
    ]
    return select(*columns, models.users.c.external_id).join(
        models.users, models.users.c.id == models.tasks.c.user_id
    )


def to_history_task(row: Row[Any]) -> history_pb2.HistoryTask:
    task = history_pb2.HistoryTask(
        task_id=str(row.id),
        user_id=row.external_id,
        status=STATUS_VALUES.get(row.status, common_pb2.TaskStatus.TASK_STATUS_UNSPECIFIED),
        prompt=row.prompt,
        response=row.response,
        model=row.model,
        progress=row.progress,
        priority=row.priority,
        attempts=row.attempts,
        error_message=row.error_message,
        version=row.version,
        usage=common_pb2.Usage(
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            total_tokens=row.total_tokens,
        ),
    )
    task.created_at.FromDatetime(row.created_at)
    task.updated_at.FromDatetime(row.updated_at)
    if row.started_at is not None:
        task.started_at.FromDatetime(row.started_at)
    if row.completed_at is not None:
        task.completed_at.FromDatetime(row.completed_at)
    return task


def to_lifecycle_event(payload: dict[str, Any]) -> events_pb2.LifecycleEvent:
    try:
        return ParseDict(payload, events_pb2.LifecycleEvent(), ignore_unknown_fields=True)
    except ParseError as error:
        raise StorageRejected(f"unreadable event payload: {error}") from error


def to_preferences(
    stored: dict[str, Any] | None, name: str | None = "", email: str | None = None
) -> history_pb2.Preferences:
    """A user's Preferences from the row: the preferences JSON, and name and email from
    their own columns (email NULL when none is given)."""
    try:
        preferences = ParseDict(stored or {}, history_pb2.Preferences(), ignore_unknown_fields=True)
    except ParseError as error:
        raise StorageRejected(f"unreadable preferences: {error}") from error
    # The columns win over anything the JSON held: they are where these are written.
    preferences.name, preferences.email = name or "", email or ""
    return preferences


def preferences_json(preferences: history_pb2.Preferences) -> dict[str, Any]:
    """What users.preferences holds of `preferences`: all but name and email, which have
    columns of their own (one place each, so the two can never disagree)."""
    rest = history_pb2.Preferences()
    rest.CopyFrom(preferences)
    rest.ClearField("name")
    rest.ClearField("email")
    return MessageToDict(rest, preserving_proto_field_name=True)
