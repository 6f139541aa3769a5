"""The Alembic migrations: on an empty database they produce exactly the SQLAlchemy metadata,
on SQLite and on PostgreSQL; they go down to base and up again; concurrent starts are safe."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    MetaData,
    Table,
    Uuid,
    false,
    inspect,
    select,
)
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


def _snapshots_table(connection: Connection) -> dict[str, Any] | None:
    """task_snapshots as the database describes it, or None if there is none."""
    inspector = inspect(connection)
    if not inspector.has_table("task_snapshots"):
        return None
    return {
        "columns": [
            (c["name"], str(c["type"]), c["nullable"])
            for c in inspector.get_columns("task_snapshots")
        ],
        "pk": inspector.get_pk_constraint("task_snapshots"),
        "fks": inspector.get_foreign_keys("task_snapshots"),
    }


def as_before_tombstones(repo: Repository) -> None:
    """Let `repo` write history on a schema older than revision 0003, as the service of then
    did: schema left as it is, no deleted_tasks to look up (none of its tasks has a tombstone)."""
    repo._schema_ready = True
    repo._sql.find_deleted = select(models.tasks.c.id).where(false())


def _create_all_as_before_migrations(connection: Connection) -> None:
    """What the service's create_all made before migrations existed: the models of then,
    which had task_snapshots too (revision 0001's schema)."""
    metadata = MetaData(naming_convention=models.NAMING_CONVENTION)
    for table in models.Base.metadata.sorted_tables:
        if table.name != "deleted_tasks":  # added by revision 0003
            table.to_metadata(metadata)
    Table(
        "task_snapshots",
        metadata,
        Column("task_id", Uuid, ForeignKey("tasks.id"), primary_key=True),
        Column("seq", BigInteger, nullable=False),
        Column("state", JSON, nullable=False),
        Column("taken_at", models.UtcDateTime, nullable=False),
    )
    metadata.create_all(connection)


async def test_upgrade_head_equals_the_metadata(empty_database_url: str) -> None:
    await migrate.upgrade(empty_database_url)
    assert await _inspect(empty_database_url, _diff) == []
    assert await _inspect(empty_database_url, _revision) == migrate.head_revision()
    assert await _inspect(empty_database_url, _tables) == {
        "alembic_version",
        "users",
        "tasks",
        "task_events",
        "deleted_tasks",
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
        await conn.run_sync(_create_all_as_before_migrations)
    await engine.dispose()
    repo = await Repository.open(empty_database_url, create_schema=False)
    task_id = new_task_id()
    try:
        as_before_tombstones(repo)  # write with the create_all schema, as the old service did
        await repo.apply(completed_lifecycle(task_id))
    finally:
        await repo.close()

    await migrate.upgrade(empty_database_url)
    assert await _inspect(empty_database_url, _revision) == migrate.head_revision()
    assert await _inspect(empty_database_url, _diff) == []
    assert await _inspect(empty_database_url, _snapshots_table) is None
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


async def test_0002_drops_task_snapshots_and_its_downgrade_restores_0001s(
    empty_database_url: str,
) -> None:
    await migrate.upgrade(empty_database_url, "0001")
    as_made_by_0001 = await _inspect(empty_database_url, _snapshots_table)
    assert as_made_by_0001 is not None
    repo = await Repository.open(empty_database_url, create_schema=False)
    task_id = new_task_id()
    try:
        as_before_tombstones(repo)  # write at revision 0001
        await repo.apply(completed_lifecycle(task_id))
    finally:
        await repo.close()
    await migrate.upgrade(empty_database_url, "0002")
    assert await _inspect(empty_database_url, _snapshots_table) is None
    await migrate.downgrade(empty_database_url, "0001")
    assert await _inspect(empty_database_url, _snapshots_table) == as_made_by_0001
    assert await _inspect(empty_database_url, _revision) == "0001"
    await migrate.upgrade(empty_database_url)
    assert await _inspect(empty_database_url, _diff) == []
    repo = await Repository.open(empty_database_url)
    try:
        task = await repo.get_task(task_id, "alice")  # the history went through untouched
        assert task is not None and task.version == 7
    finally:
        await repo.close()


async def test_0003_adds_deleted_tasks_and_its_downgrade_drops_it(
    empty_database_url: str,
) -> None:
    await migrate.upgrade(empty_database_url, "0002")
    assert "deleted_tasks" not in await _inspect(empty_database_url, _tables)
    repo = await Repository.open(empty_database_url, create_schema=False)
    kept, deleted = new_task_id(), new_task_id()
    try:
        as_before_tombstones(repo)  # write at revision 0002
        await repo.apply(completed_lifecycle(kept) + completed_lifecycle(deleted))
    finally:
        await repo.close()

    await migrate.upgrade(empty_database_url, "0003")
    assert "deleted_tasks" in await _inspect(empty_database_url, _tables)
    assert await _inspect(empty_database_url, _diff) == []
    repo = await Repository.open(empty_database_url)
    try:
        assert await repo.delete_task(deleted, "alice")
        assert (await repo.apply(completed_lifecycle(deleted))).events_dropped == 3
    finally:
        await repo.close()

    await migrate.downgrade(empty_database_url, "0002")
    assert await _inspect(empty_database_url, _revision) == "0002"
    assert "deleted_tasks" not in await _inspect(empty_database_url, _tables)
    await migrate.upgrade(empty_database_url)
    assert await _inspect(empty_database_url, _diff) == []
    repo = await Repository.open(empty_database_url)
    try:
        task = await repo.get_task(kept, "alice")  # the history went through untouched
        assert task is not None and task.version == 7
        assert await repo.get_task(deleted, "alice") is None
    finally:
        await repo.close()
