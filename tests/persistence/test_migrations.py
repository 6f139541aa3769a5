"""The Alembic migrations: on an empty database they produce exactly the SQLAlchemy metadata,
on SQLite and on PostgreSQL; they go down to base and up again; concurrent starts are safe."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from persistence_svc import migrate, models
from persistence_svc.database import create_engine
from persistence_svc.repository import Repository
from tests.persistence.factory import completed_lifecycle, new_task_id


async def _inspect(url: str, probe: Any) -> Any:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(probe)
    finally:
        await engine.dispose()


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, models.Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _revision(connection: Connection) -> str | None:
    return migrate.current_revision(connection)


async def test_upgrade_head_equals_the_metadata(empty_database_url: str) -> None:
    await migrate.upgrade(empty_database_url)
    assert await _inspect(empty_database_url, _diff) == []
    assert await _inspect(empty_database_url, _revision) == migrate.head_revision()
    assert await _inspect(empty_database_url, _tables) == {
        "alembic_version",
        "users",
        "tasks",
        "task_events",
        "task_snapshots",
    }


async def test_downgrade_to_base_and_up_again(empty_database_url: str) -> None:
    await migrate.upgrade(empty_database_url)
    await migrate.downgrade(empty_database_url, "base")
    assert await _inspect(empty_database_url, _tables) == {"alembic_version"}
    assert await _inspect(empty_database_url, _revision) is None
    await migrate.upgrade(empty_database_url)
    assert await _inspect(empty_database_url, _diff) == []


async def test_upgrade_is_idempotent_and_concurrent_starts_are_safe(
    empty_database_url: str,
) -> None:
    # Four "processes" migrating the same empty database at once: one migrates, the others
    # wait for the lock and find nothing to do.
    await asyncio.gather(*(migrate.upgrade(empty_database_url) for _ in range(4)))
    await migrate.upgrade(empty_database_url)
    assert await _inspect(empty_database_url, _diff) == []
    assert await _inspect(empty_database_url, _revision) == migrate.head_revision()


async def test_database_made_by_create_all_is_adopted(empty_database_url: str) -> None:
    """Before migrations, the service ran create_all: such a database is stamped, not
    recreated, and keeps its rows."""
    engine = create_engine(empty_database_url)
    async with engine.begin() as conn:
        await conn.run_sync(models.Base.metadata.create_all)
    await engine.dispose()
    repo = await Repository.open(empty_database_url, create_schema=False)
    task_id = new_task_id()
    try:
        repo._schema_ready = True  # write with the create_all schema, as the old service did
        await repo.apply(completed_lifecycle(task_id))
    finally:
        await repo.close()

    await migrate.upgrade(empty_database_url)
    assert await _inspect(empty_database_url, _revision) == migrate.head_revision()
    assert await _inspect(empty_database_url, _diff) == []
    repo = await Repository.open(empty_database_url)
    try:
        task = await repo.get_task(task_id, "alice")
        assert task is not None and task.version == 7
    finally:
        await repo.close()


async def test_repository_migrates_at_open(empty_database_url: str) -> None:
    repo = await Repository.open(empty_database_url)
    await repo.close()
    assert await _inspect(empty_database_url, _revision) == migrate.head_revision()
