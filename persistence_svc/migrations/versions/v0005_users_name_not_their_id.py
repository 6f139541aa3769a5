"""A user's name is what they set (set_preferences), not a copy of their external id.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Until now a user row was created with `name` = its external id, and nothing ever set it, so
the user channel would show every user's id as their name. Those copies are cleared; a name a
user chose is kept. The downgrade has nothing to undo: an empty name was valid before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    users = sa.table("users", sa.column("name", sa.String()), sa.column("external_id", sa.String()))
    op.execute(sa.update(users).where(users.c.name == users.c.external_id).values(name=""))


def downgrade() -> None:
    pass
