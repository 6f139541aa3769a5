"""Tombstones per (task, user), whether the task was confirmed, and an index to prune them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09

A delete may now leave a tombstone for a task id history holds no row of yet (its first
lifecycle event still on its way): such a tombstone drops that user's events only, so a
user cannot tombstone another user's task, and two users may each hold one for one id.
Existing tombstones all removed a row: `confirmed` is true for them. `deleted_at` is indexed
for the pruning (Repository.prune_tombstones).

The downgrade keeps one tombstone per task id, a confirmed one first (revision 0003 drops
every user's events of a tombstoned id, and allows one row per id).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "deleted_tasks"
PK = "pk_deleted_tasks"
INDEX = "ix_deleted_tasks_deleted_at"


def upgrade() -> None:
    # Batch mode: on SQLite, which cannot alter a primary key, the table is copied into a new
    # one and renamed (env.py); on PostgreSQL these are plain ALTERs.
    with op.batch_alter_table(TABLE) as batch:
        batch.add_column(
            sa.Column("confirmed", sa.Boolean(), server_default=sa.true(), nullable=False)
        )
        batch.drop_constraint(PK, type_="primary")
        batch.create_primary_key(PK, ["task_id", "user_id"])
        batch.create_index(INDEX, ["deleted_at"])


def downgrade() -> None:
    tombstones = sa.table(
        TABLE,
        sa.column("task_id", sa.Uuid()),
        sa.column("user_id", sa.Uuid()),
        sa.column("confirmed", sa.Boolean()),
    )
    keeper = sa.alias(tombstones, "keeper")
    # Another row of the same task id that sorts first (confirmed first, then by user id).
    preferred = (
        sa.select(sa.literal(1))
        .select_from(keeper)
        .where(
            keeper.c.task_id == tombstones.c.task_id,
            sa.or_(
                sa.and_(keeper.c.confirmed, sa.not_(tombstones.c.confirmed)),
                sa.and_(
                    keeper.c.confirmed == tombstones.c.confirmed,
                    keeper.c.user_id < tombstones.c.user_id,
                ),
            ),
        )
    )
    op.execute(sa.delete(tombstones).where(preferred.exists()))
    with op.batch_alter_table(TABLE) as batch:
        batch.drop_index(INDEX)
        batch.drop_constraint(PK, type_="primary")
        batch.create_primary_key(PK, ["task_id"])
        batch.drop_column("confirmed")
