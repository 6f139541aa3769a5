"""Schema migrations (Alembic, revisions in persistence_svc/migrations/versions), applied by the
service at start instead of create_all. The same revisions run on SQLite and PostgreSQL.

Concurrency: two processes starting at once must not both migrate. On PostgreSQL the upgrade
runs in one transaction holding a transaction-level advisory lock (released at commit or on a
dropped connection, so a crashed migrator never leaves it held); on SQLite the transaction
starts with BEGIN IMMEDIATE, SQLite's single write lock (database.create_migration_engine).
In both, DDL is transactional: a failed upgrade leaves the schema as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, Connection

from persistence_svc.database import create_migration_engine

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key: any constant 64-bit value unique to this use.
LOCK_KEY = 0x5B_4849_5354_4F52  # "SB" "HISTOR"
# The revision whose schema is exactly what create_all made before migrations existed.
FIRST_REVISION = "0001"


def alembic_config(connection: Connection | None = None) -> Config:
    """An in-memory Alembic config (no alembic.ini, so it works from any cwd)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {MIGRATIONS_DIR}")
    return head


async def run_locked(url: str | URL, work: Callable[[Connection], None]) -> None:
    """Run `work` on one connection, in one transaction, holding the migration lock.
    Driver errors propagate (the repository's boundary translates them)."""
    engine = create_migration_engine(url)
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            await conn.run_sync(work)
    finally:
        await engine.dispose()


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection, revision: str) -> None:
    before = current_revision(connection)
    if before is None and inspect(connection).has_table("tasks"):
        # A database made by create_all before migrations existed: same schema as the
        # first revision, so record it as such instead of failing on "table exists".
        log.warning("adopting an unversioned history schema", extra={"revision": FIRST_REVISION})
        command.stamp(alembic_config(connection), FIRST_REVISION)
        before = FIRST_REVISION
    command.upgrade(alembic_config(connection), revision)
    after = current_revision(connection)
    if after != before:
        log.info("history schema migrated", extra={"from": before, "to": after})


async def upgrade(url: str | URL, revision: str = "head") -> None:
    """Bring the schema to `revision` (a no-op when it is there already)."""
    await run_locked(url, lambda connection: _upgrade(connection, revision))


async def downgrade(url: str | URL, revision: str) -> None:
    """Take the schema back to `revision` ("base": no tables left but alembic_version)."""
    await run_locked(
        url, lambda connection: command.downgrade(alembic_config(connection), revision)
    )
