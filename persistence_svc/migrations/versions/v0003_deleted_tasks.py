"""Add deleted_tasks: the tombstones of tasks removed from history (DeleteTask,
DeleteAllTasks), so that their late lifecycle events are dropped instead of creating the
task again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08

The downgrade drops the table: the tasks it names are gone already, and without it a late
event of one of them would write it again (the behaviour before this revision).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# models.UtcDateTime stores this (naive UTC text on SQLite), as in revision 0001.
UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "deleted_tasks",
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("deleted_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_deleted_tasks_user_id_users")
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_deleted_tasks")),
    )


def downgrade() -> None:
    op.drop_table("deleted_tasks")
