"""The Alembic migrations: on an empty database they produce exactly the SQLAlchemy metadata,
on SQLite and on PostgreSQL; they go down to base and up again; concurrent starts are safe."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
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
    delete,
    false,
    insert,
    inspect,
    null,
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
    repo._sql.find_deleted = select(models.tasks.c.id, models.tasks.c.user_id).where(false())


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


def _tombstones_table(connection: Connection) -> dict[str, Any] | None:
    """deleted_tasks' key, columns and indexes as the database describes them, or None."""
    inspector = inspect(connection)
    if not inspector.has_table("deleted_tasks"):
        return None
    return {
        "pk": inspector.get_pk_constraint("deleted_tasks")["constrained_columns"],
        "columns": {c["name"] for c in inspector.get_columns("deleted_tasks")},
        "indexes": {i["name"] for i in inspector.get_indexes("deleted_tasks")},
    }


async def _tombstone_rows(url: str) -> set[tuple[str, str, bool | None]]:
    """(task id, owner, confirmed) of every tombstone; confirmed None before revision 0004."""
    deleted, users = models.deleted_tasks, models.users

    def read(connection: Connection) -> set[tuple[str, str, bool | None]]:
        has_flag = "confirmed" in {
            c["name"] for c in inspect(connection).get_columns("deleted_tasks")
        }
        flag = deleted.c.confirmed if has_flag else null().label("confirmed")
        query = select(deleted.c.task_id, users.c.external_id, flag).join(
            users, users.c.id == deleted.c.user_id
        )
        return {
            (str(task_id), owner, None if confirmed is None else bool(confirmed))
            for task_id, owner, confirmed in connection.execute(query)
        }

    result: set[tuple[str, str, bool | None]] = await _inspect(url, read)
    return result


async def _delete_as_0003_did(url: str, task_id: str) -> None:
    """A DeleteTask of alice's task at revision 0003: row and trail gone, a tombstone keyed by
    the task id alone (no `confirmed` column yet)."""
    engine = create_engine(url)
    pk = uuid.UUID(task_id)
    try:
        async with engine.begin() as conn:
            owner = (
                await conn.execute(
                    select(models.users.c.id).where(models.users.c.external_id == "alice")
                )
            ).scalar_one()
            await conn.execute(
                insert(models.deleted_tasks).values(
                    task_id=pk, user_id=owner, deleted_at=datetime.now(UTC)
                )
            )
            await conn.execute(delete(models.task_events).where(models.task_events.c.task_id == pk))
            await conn.execute(delete(models.tasks).where(models.tasks.c.id == pk))
    finally:
        await engine.dispose()


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
    made = await _inspect(empty_database_url, _tombstones_table)
    assert made == {
        "pk": ["task_id"],
        "columns": {"task_id", "user_id", "deleted_at"},
        "indexes": set(),
    }
    await _delete_as_0003_did(empty_database_url, deleted)
    assert await _tombstone_rows(empty_database_url) == {(deleted, "alice", None)}

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


async def test_0004_keys_tombstones_by_task_and_user_and_its_downgrade_keeps_one_per_task(
    empty_database_url: str,
) -> None:
    await migrate.upgrade(empty_database_url, "0003")
    repo = await Repository.open(empty_database_url, create_schema=False)
    bobs, deleted = new_task_id(), new_task_id()
    try:
        as_before_tombstones(repo)  # write at revision 0003
        await repo.apply(completed_lifecycle(bobs, user="bob") + completed_lifecycle(deleted))
    finally:
        await repo.close()
    await _delete_as_0003_did(empty_database_url, deleted)

    await migrate.upgrade(empty_database_url, "0004")
    assert await _inspect(empty_database_url, _tombstones_table) == {
        "pk": ["task_id", "user_id"],
        "columns": {"task_id", "user_id", "deleted_at", "confirmed"},
        "indexes": {"ix_deleted_tasks_deleted_at"},
    }
    assert await _inspect(empty_database_url, _diff) == []
    # The tombstone of 0003 removed a row: confirmed, and it still drops alice's events.
    assert await _tombstone_rows(empty_database_url) == {(deleted, "alice", True)}
    repo = await Repository.open(empty_database_url)
    try:
        assert (await repo.apply(completed_lifecycle(deleted))).events_dropped == 3
        # Two users' tombstones of one id: bob's (his id to him, nothing of his) beside alice's.
        assert await repo.delete_task(deleted, "bob") is False
        assert await repo.delete_task(bobs, "alice") is False  # bob's task stays his
        task = await repo.get_task(bobs, "bob")
        assert task is not None and task.version == 7
    finally:
        await repo.close()
    assert await _tombstone_rows(empty_database_url) == {
        (deleted, "alice", True),
        (deleted, "bob", False),
        (bobs, "alice", False),
    }

    await migrate.downgrade(empty_database_url, "0003")
    assert await _inspect(empty_database_url, _revision) == "0003"
    assert (await _inspect(empty_database_url, _tombstones_table))["pk"] == ["task_id"]
    # One per task id, the confirmed one first: 0003 drops every user's events of an id.
    assert await _tombstone_rows(empty_database_url) == {
        (deleted, "alice", None),
        (bobs, "alice", None),
    }
    await migrate.upgrade(empty_database_url)
    assert await _inspect(empty_database_url, _diff) == []


async def test_0005_clears_the_names_that_were_copies_of_the_external_id(
    empty_database_url: str,
) -> None:
    await migrate.upgrade(empty_database_url, "0004")
    engine = create_engine(empty_database_url)
    users = models.users
    try:
        async with engine.begin() as conn:
            now = datetime.now(UTC)
            for external_id, name in (("alice", "alice"), ("bob", "Bob B.")):
                await conn.execute(
                    insert(users).values(
                        id=uuid.uuid4(),
                        external_id=external_id,
                        name=name,
                        created_at=now,
                        updated_at=now,
                    )
                )
    finally:
        await engine.dispose()
    await migrate.upgrade(empty_database_url)

    def names(connection: Connection) -> dict[str, str]:
        rows = connection.execute(select(users.c.external_id, users.c.name))
        return {external_id: name for external_id, name in rows}

    # alice's name was her id, as rows were created before: cleared; bob's own is kept.
    assert await _inspect(empty_database_url, names) == {"alice": "", "bob": "Bob B."}
