"""The repository on a real database (SQLite file and PostgreSQL, see conftest.py)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from persistence_svc import models
from persistence_svc.errors import InvalidEvent, StorageUnavailable
from persistence_svc.repository import Repository
from switchboard.v1 import common_pb2
from tests.persistence.factory import T0, Kind, completed_lifecycle, event, new_task_id


async def count(repo: Repository, table: object) -> int:
    async with repo.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())  # type: ignore[arg-type]


async def test_apply_writes_user_task_and_trail(repository: Repository) -> None:
    task_id = new_task_id()
    result = await repository.apply(completed_lifecycle(task_id))
    assert (result.events_recorded, result.tasks_changed) == (3, 1)

    task = await repository.get_task(task_id, "alice")
    assert task is not None
    assert task.status == common_pb2.TASK_STATUS_COMPLETED
    assert (task.prompt, task.response, task.model) == (
        "Why is the sky blue?",
        "Rayleigh.",
        "local-small",
    )
    assert (task.version, task.progress, task.attempts, task.priority) == (7, 1.0, 1, 1)
    assert (task.usage.prompt_tokens, task.usage.completion_tokens, task.usage.total_tokens) == (
        5,
        3,
        8,
    )
    assert task.created_at.ToDatetime().replace(tzinfo=T0.tzinfo) == T0
    assert task.started_at.ToDatetime().replace(tzinfo=T0.tzinfo) == T0 + timedelta(seconds=1)
    assert task.completed_at.ToDatetime().replace(tzinfo=T0.tzinfo) == T0 + timedelta(seconds=3)
    trail = await repository.get_task_events(task_id, "alice")
    assert trail is not None
    assert [e.seq for e in trail] == [1, 2, 7]
    assert trail == completed_lifecycle(task_id)  # the stored payload is the same message


async def test_duplicates_are_recorded_once(repository: Repository) -> None:
    task_id = new_task_id()
    events = completed_lifecycle(task_id)
    await repository.apply(events)
    again = await repository.apply(events + events)  # a redelivered batch, duplicated inside too
    assert again.events_recorded == 0
    assert again.tasks_changed == 0
    assert await count(repository, models.task_events) == 3
    assert await count(repository, models.tasks) == 1


async def test_older_event_does_not_overwrite_newer_state(repository: Repository) -> None:
    task_id = new_task_id()
    queued, started, completed = completed_lifecycle(task_id)
    await repository.apply([completed])  # the terminal event arrives first and creates the row
    await repository.apply([started])
    await repository.apply([queued])
    task = await repository.get_task(task_id, "alice")
    assert task is not None
    assert task.status == common_pb2.TASK_STATUS_COMPLETED
    assert task.version == 7
    assert task.response == "Rayleigh."
    # The trail still holds every event, in seq order, whatever the arrival order.
    trail = await repository.get_task_events(task_id, "alice")
    assert trail is not None and [e.seq for e in trail] == [1, 2, 7]
    # Write-once times that only the older events knew are filled in.
    assert task.created_at.ToDatetime().replace(tzinfo=T0.tzinfo) == T0
    assert task.HasField("started_at")


async def test_user_created_once_on_first_sight(repository: Repository) -> None:
    await repository.apply(completed_lifecycle(new_task_id()))
    await repository.apply(completed_lifecycle(new_task_id()) + completed_lifecycle(new_task_id()))
    await repository.apply(completed_lifecycle(new_task_id(), user="bob"))
    assert await count(repository, models.users) == 2
    assert await count(repository, models.tasks) == 4


async def test_snapshots_hold_active_tasks_only(repository: Repository) -> None:
    task_id = new_task_id()
    queued, started, completed = completed_lifecycle(task_id)
    await repository.apply([queued, started])
    async with repository.engine.connect() as conn:
        row = (await conn.execute(select(models.task_snapshots))).one()
    assert (row.task_id, row.seq) == (uuid.UUID(task_id), 2)
    (snapshot,) = (await repository.list_snapshots()).snapshots
    assert snapshot.state.status == common_pb2.TASK_STATUS_PROCESSING
    assert (snapshot.state.task_id, snapshot.state.user_id) == (task_id, "alice")
    assert (snapshot.state.seq, snapshot.state.prompt) == (2, "Why is the sky blue?")
    await repository.apply([completed])
    assert await count(repository, models.task_snapshots) == 0


async def test_invalid_event_rejects_the_batch_and_writes_nothing(repository: Repository) -> None:
    good = completed_lifecycle(new_task_id())
    bad = event("not-a-uuid", 1, Kind.LIFECYCLE_KIND_QUEUED)
    with pytest.raises(InvalidEvent):
        await repository.apply([*good, bad])
    assert await count(repository, models.task_events) == 0


async def test_another_users_task_is_not_found(repository: Repository) -> None:
    task_id = new_task_id()
    await repository.apply(completed_lifecycle(task_id, user="alice"))
    assert await repository.get_task(task_id, "bob") is None
    assert await repository.get_task_events(task_id, "bob") is None
    assert await repository.get_task(new_task_id(), "alice") is None
    assert await repository.get_task("not-a-uuid", "alice") is None


async def test_list_tasks_newest_first_with_cursor_pages(repository: Repository) -> None:
    expected: list[tuple[object, str]] = []
    events = []
    for minute in range(7):
        task_id = new_task_id()
        at = T0 + timedelta(minutes=minute)
        events += completed_lifecycle(task_id, at=at)
        expected.append((at, task_id))
    # Two tasks created in the same microsecond: the id breaks the tie, so none is lost.
    for _ in range(2):
        task_id = new_task_id()
        events += completed_lifecycle(task_id, at=T0 + timedelta(minutes=3))
        expected.append((T0 + timedelta(minutes=3), task_id))
    events += completed_lifecycle(new_task_id(), user="bob", at=T0 + timedelta(hours=1))
    await repository.apply(events)
    expected.sort(key=lambda item: (item[0], uuid.UUID(item[1])), reverse=True)

    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = await repository.list_tasks("alice", page_size=4, after=after)
        pages += 1
        assert len(page.tasks) <= 4
        seen += [task.task_id for task in page.tasks]
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert seen == [task_id for _, task_id in expected]
    assert pages == 3
    everything = await repository.list_tasks("alice")
    assert [t.task_id for t in everything.tasks] == seen and everything.next_cursor is None
    assert (await repository.list_tasks("nobody")).tasks == []


async def test_unreachable_database_is_storage_unavailable() -> None:
    repo = await Repository.open("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    try:
        with pytest.raises(StorageUnavailable):
            await repo.apply(completed_lifecycle(new_task_id()))
        with pytest.raises(StorageUnavailable):
            await repo.list_tasks("alice")
    finally:
        await repo.close()


async def test_nul_in_text_is_stored_on_every_database(repository: Repository) -> None:
    # PostgreSQL text cannot hold NUL; a model's output could contain one.
    task_id = new_task_id()
    await repository.apply(completed_lifecycle(task_id, content="a\x00b"))
    task = await repository.get_task(task_id, "alice")
    assert task is not None and task.response == "a\ufffdb"
    trail = await repository.get_task_events(task_id, "alice")
    assert trail is not None and trail[-1].content == "a\x00b"  # the audit trail is verbatim
