"""The repository on a real database (SQLite file and PostgreSQL, see conftest.py)."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import false, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence_svc import models
from persistence_svc.errors import InvalidEvent, StorageUnavailable, WriteConflict
from persistence_svc.events import parse_event
from persistence_svc.repository import Repository
from switchboard.v1 import common_pb2, events_pb2
from tests.persistence.factory import (
    T0,
    Kind,
    completed_lifecycle,
    event,
    new_task_id,
    slim_lifecycle,
)
from tests.persistence.helpers import statements


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


async def test_parsed_events_are_applied_as_handed_over(repository: Repository) -> None:
    """The consumer's entry: events parsed once, as it decoded them."""
    task_id = new_task_id()
    parsed = [parse_event(one) for one in completed_lifecycle(task_id)]
    result = await repository.apply_parsed(parsed + parsed[:1])  # a duplicate inside too
    assert (result.events_recorded, result.tasks_changed) == (3, 1)
    task = await repository.get_task(task_id, "alice")
    assert task is not None and (task.version, task.response) == (7, "Rayleigh.")


async def test_queued_after_a_later_event_still_sets_the_prompt(repository: Repository) -> None:
    """Slim events (prompt and priority on QUEUED only): a QUEUED redelivered after the later
    events fills the fields they left empty, and changes nothing else."""
    task_id = new_task_id()
    queued, started, done = slim_lifecycle(task_id)
    await repository.apply([started])
    await repository.apply([done])
    task = await repository.get_task(task_id, "alice")
    assert task is not None and (task.prompt, task.priority) == ("", 0)
    result = await repository.apply([queued])
    assert (result.events_recorded, result.tasks_changed) == (1, 1)
    task = await repository.get_task(task_id, "alice")
    assert task is not None
    assert (task.prompt, task.priority, task.model) == ("Why is the sky blue?", 1, "local-small")
    assert (task.status, task.version, task.response) == (
        common_pb2.TASK_STATUS_COMPLETED,
        7,
        "Rayleigh.",
    )
    assert task.created_at.ToDatetime().replace(tzinfo=T0.tzinfo) == T0
    # Delivered once more, it has no gap left to fill: nothing changes.
    again = await repository.apply([queued])
    assert (again.events_recorded, again.tasks_changed) == (0, 0)


async def test_known_owners_are_not_looked_up_again(repository: Repository) -> None:
    await repository.apply(completed_lifecycle(new_task_id()))
    with statements(repository) as sent:
        await repository.apply(completed_lifecycle(new_task_id()))
    assert not [text for text in sent if "users" in text]
    # (SQLite's writers begin with BEGIN IMMEDIATE: Repository._write_transaction.)
    sent = [text for text in sent if text != "BEGIN IMMEDIATE"]
    # Lock the task rows, upsert, look up the tombstone of the one it created, insert events.
    assert len(sent) == 4
    assert len([text for text in sent if "deleted_tasks" in text]) == 1
    task_id = new_task_id()
    await repository.apply(completed_lifecycle(task_id)[:1])
    with statements(repository) as sent:
        await repository.apply(completed_lifecycle(task_id)[1:])  # its row exists now
    sent = [text for text in sent if text != "BEGIN IMMEDIATE"]
    assert len(sent) == 3  # a task with a row has no tombstone: no lookup
    with statements(repository) as sent:
        await repository.apply(completed_lifecycle(new_task_id(), user="bob"))  # first sight
    assert [text for text in sent if "users" in text]
    assert await count(repository, models.users) == 2


class BlindRepository(Repository):
    """Finds no task row when it locks them: as if another writer had created each one
    between this batch's read and its write."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._sql.lock_tasks = select(models.tasks).where(false())


async def test_a_row_created_by_another_writer_is_never_overwritten(database_url: str) -> None:
    task_id = new_task_id()
    queued, started, done = completed_lifecycle(task_id)
    first = await Repository.open(database_url)
    blind = await BlindRepository.open(database_url)
    try:
        await first.apply([queued, done])
        with pytest.raises(WriteConflict):
            await blind.apply([started])  # would replace the row with one built from STARTED
        task = await first.get_task(task_id, "alice")
        assert task is not None and (task.status, task.version) == (
            common_pb2.TASK_STATUS_COMPLETED,
            7,
        )
        trail = await first.get_task_events(task_id, "alice")
        assert trail is not None and [e.seq for e in trail] == [1, 7]  # rolled back whole
        await first.apply([started])  # the retry reads the row and applies
        trail = await first.get_task_events(task_id, "alice")
        assert trail is not None and [e.seq for e in trail] == [1, 2, 7]
    finally:
        await first.close()
        await blind.close()


async def test_two_writers_on_the_same_tasks_converge(database_url: str) -> None:
    """Two replicas applying shuffled batches of the same tasks at once: locks, the upsert's
    guard and retries of what comes back as transient leave every task in its final state
    and every event recorded once, whatever the interleaving."""
    task_ids = [new_task_id() for _ in range(12)]
    events = [one for task_id in task_ids for one in completed_lifecycle(task_id)]
    random.Random(7).shuffle(events)
    batches = [events[start : start + 4] for start in range(0, len(events), 4)]
    writers = [await Repository.open(database_url) for _ in range(2)]

    async def write(repo: Repository, mine: list[list[events_pb2.LifecycleEvent]]) -> None:
        for batch in mine:
            for _ in range(50):
                try:
                    await repo.apply(batch)
                    break
                except StorageUnavailable:  # a lock timeout, a deadlock, a WriteConflict
                    await asyncio.sleep(0.01)
            else:
                raise AssertionError("a batch never applied")

    try:
        await asyncio.gather(write(writers[0], batches[0::2]), write(writers[1], batches[1::2]))
        for task_id in task_ids:
            task = await writers[0].get_task(task_id, "alice")
            assert task is not None
            assert (task.status, task.version, task.prompt, task.response) == (
                common_pb2.TASK_STATUS_COMPLETED,
                7,
                "Why is the sky blue?",
                "Rayleigh.",
            )
            assert task.HasField("started_at")
        assert await count(writers[0], models.task_events) == len(events)
    finally:
        for repo in writers:
            await repo.close()
