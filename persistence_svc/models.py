"""The history schema (docs/architecture.md, persistence_svc) as SQLAlchemy 2 declarative tables.

Types are portable: `Uuid` is a native uuid on PostgreSQL and CHAR(32) on SQLite, `JSON` is
json on PostgreSQL and text on SQLite, `UtcDateTime` stores UTC everywhere. Every constraint
and index has a name (the naming convention below) so Alembic migrations can refer to them.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    Uuid,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

STATUSES = ("queued", "processing", "completed", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


class UtcDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime in and out. SQLite has no time zones: it stores naive UTC text,
    which still sorts and compares correctly because every value is UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    external_id: Mapped[str] = mapped_column(String(255), unique=True)
    name: Mapped[str] = mapped_column(String(255), default="")
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    preferences: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')",
            name="status",
        ),
        # ListTasks: a user's tasks, newest first, keyset pagination on (created_at, id).
        Index(None, "user_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"))
    status: Mapped[str] = mapped_column(String(16))
    prompt: Mapped[str] = mapped_column(Text, default="")
    response: Mapped[str] = mapped_column(Text, default="")
    # Text, not String(n): a value from upstream must never be refused for its length.
    model: Mapped[str] = mapped_column(Text, default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    error_message: Mapped[str] = mapped_column(Text, default="")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    finish_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # The seq of the last event whose fields were applied: an event with seq <= version is
    # older than the row and only joins the audit trail.
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class TaskEvent(Base):
    """The append-only audit trail: one row per (task, seq), whatever the delivery count."""

    __tablename__ = "task_events"

    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class DeletedTask(Base):
    """A tombstone: a task removed from history for good (DeleteTask, DeleteAllTasks), for
    one user.

    Its lifecycle events may still arrive afterwards (a running task's `cancelled`, a
    redelivery, a backlog the database had not caught up with): the write path drops the
    events of a task id found here under the events' own user instead of creating the task
    again. Keyed by (task, user), so that a user deleting an id that history holds nothing of
    yet (a task whose first event is still on its way) tombstones it for themselves only:
    another user's task of that id is never touched. No foreign key to tasks: the row it
    names is gone, or never came. Pruned once no event of the task can arrive any more
    (Repository.prune_tombstones).
    """

    __tablename__ = "deleted_tasks"
    __table_args__ = (Index(None, "deleted_at"),)  # the pruning's range scan

    task_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # True: the task was known to be the user's when deleted (its row was removed, or its
    # events were found on their way); False: an id with nothing of the user's in history
    # yet, tombstoned in case a task of theirs is still on its way. DeleteTask answers a
    # repeated call from it.
    confirmed: Mapped[bool] = mapped_column(Boolean, server_default=true())


# The Core tables, for the repository's statements.
users: Table = User.__table__  # type: ignore[assignment]
tasks: Table = Task.__table__  # type: ignore[assignment]
task_events: Table = TaskEvent.__table__  # type: ignore[assignment]
deleted_tasks: Table = DeletedTask.__table__  # type: ignore[assignment]
