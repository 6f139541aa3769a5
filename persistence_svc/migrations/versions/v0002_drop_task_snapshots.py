"""Drop task_snapshots: task_svc reads its snapshots back from JetStream itself, so the
history keeps none (persistence_svc acks them and stores nothing).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

The downgrade recreates the table exactly as revision 0001 made it (empty: the snapshots it
held were checkpoints of tasks that have long ended or been recovered since).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# models.UtcDateTime stores this (naive UTC text on SQLite), as in revision 0001.
UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.drop_table("task_snapshots")


def downgrade() -> None:
    op.create_table(
        "task_snapshots",
        sa.Column("task_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("taken_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_task_snapshots_task_id_tasks")
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_task_snapshots")),
    )
