"""DeleteTask and DeleteAllTasks on both databases: rows and trail gone (read from the tables
themselves), a tombstone left, another user's task untouched, and a deleted task's late
lifecycle events (through JetStream and the consumer) acked and dropped, never written."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from sqlalchemy import func, select

from persistence_svc import models
from persistence_svc import repository as repository_module
from persistence_svc.consumer import DURABLE_NAME, EventConsumer
from persistence_svc.errors import StorageUnavailable
from persistence_svc.repository import Repository
from svckit.errors import Code
from svckit.nats import TASK_EVENTS_STREAM
from switchboard.v1 import common_pb2, events_pb2, history_pb2, history_pb2_grpc
from tests.conftest import eventually, timeout
from tests.persistence.factory import (
    T0,
    Kind,
    completed_lifecycle,
    event,
    lifecycle_ending,
    new_task_id,
)
from tests.persistence.helpers import FETCH_S, Bus, publish, rpc_error, running, served, until

T = TypeVar("T")


@dataclass(frozen=True)
class Tables:
    """What the history holds, read straight from its tables."""

    tasks: dict[str, tuple[str, str, int]]  # task id: (owner, status, version)
    events: set[tuple[str, int]]  # (task id, seq)
    tombstones: dict[str, tuple[str, datetime]]  # task id: (owner, deleted_at)
    users: int

    def events_of(self, task_id: str) -> set[int]:
        return {seq for task, seq in self.events if task == task_id}


async def tables(repo: Repository) -> Tables:
    tasks, events, deleted, users = (
        models.tasks,
        models.task_events,
        models.deleted_tasks,
        models.users,
    )
    async with repo.engine.connect() as conn:
        task_rows = await conn.execute(
            select(tasks.c.id, users.c.external_id, tasks.c.status, tasks.c.version).join(
                users, users.c.id == tasks.c.user_id
            )
        )
        event_rows = await conn.execute(select(events.c.task_id, events.c.seq))
        tombstone_rows = await conn.execute(
            select(deleted.c.task_id, users.c.external_id, deleted.c.deleted_at).join(
                users, users.c.id == deleted.c.user_id
            )
        )
        user_count = (await conn.execute(select(func.count()).select_from(users))).scalar_one()
        return Tables(
            tasks={str(r.id): (r.external_id, r.status, r.version) for r in task_rows},
            events={(str(r.task_id), r.seq) for r in event_rows},
            tombstones={str(r.task_id): (r.external_id, r.deleted_at) for r in tombstone_rows},
            users=int(user_count),
        )


@pytest.fixture
async def history(repository: Repository) -> AsyncIterator[history_pb2_grpc.HistoryServiceStub]:
    async with served(repository) as stubs:
        yield stubs.history


async def delete(history: history_pb2_grpc.HistoryServiceStub, task_id: str, user: str) -> bool:
    request = history_pb2.DeleteTaskRequest(task_id=task_id, user_id=user)
    return bool((await history.DeleteTask(request, timeout=timeout(5))).deleted)


async def delete_all(history: history_pb2_grpc.HistoryServiceStub, user: str) -> int:
    request = history_pb2.DeleteAllTasksRequest(user_id=user)
    return int((await history.DeleteAllTasks(request, timeout=timeout(5))).deleted)


async def test_delete_task_removes_its_row_and_trail_and_leaves_a_tombstone(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    gone, kept, bobs = new_task_id(), new_task_id(), new_task_id()
    await repository.apply(completed_lifecycle(gone) + completed_lifecycle(kept))
    await repository.apply(completed_lifecycle(bobs, user="bob"))
    before = datetime.now(UTC)

    assert await delete(history, gone, "alice") is True

    after = await tables(repository)
    assert set(after.tasks) == {kept, bobs}
    assert after.events_of(gone) == set()
    assert after.events_of(kept) == after.events_of(bobs) == {1, 2, 7}
    assert set(after.tombstones) == {gone}
    owner, deleted_at = after.tombstones[gone]
    assert owner == "alice"
    assert before - timedelta(seconds=1) <= deleted_at <= datetime.now(UTC)
    # Gone from every read.
    for call in (
        history.GetTask(history_pb2.GetHistoryTaskRequest(task_id=gone, user_id="alice")),
        history.GetTaskEvents(history_pb2.GetTaskEventsRequest(task_id=gone, user_id="alice")),
    ):
        assert (await rpc_error(call)).code == Code.ERROR_CODE_NOT_FOUND
    page = await history.ListTasks(history_pb2.ListTasksRequest(user_id="alice"))
    assert [t.task_id for t in page.tasks] == [kept]
    counts = await history.CountTasks(history_pb2.CountTasksRequest(user_id="alice"))
    assert counts.total == 1

    # Idempotent: a retried delete (its first answer lost) says deleted again, changes nothing.
    assert await delete(history, gone, "alice") is True
    assert await tables(repository) == after
    # No such task: false, nothing touched.
    assert await delete(history, new_task_id(), "alice") is False
    assert await delete(history, "not-a-uuid", "alice") is False
    assert await tables(repository) == after


async def test_another_users_delete_touches_nothing(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    alices = new_task_id()
    await repository.apply(completed_lifecycle(alices))
    await repository.apply(completed_lifecycle(new_task_id(), user="bob"))
    before = await tables(repository)

    assert await delete(history, alices, "bob") is False  # bob exists, the task is not his
    assert await delete(history, alices, "carol") is False  # carol has never been seen
    assert await delete_all(history, "carol") == 0
    assert await tables(repository) == before  # no tombstone, no user created
    task = await history.GetTask(history_pb2.GetHistoryTaskRequest(task_id=alices, user_id="alice"))
    assert task.response == "Rayleigh."
    # A later lifecycle event of alice's task still applies: it was never tombstoned.
    late = event(alices, 9, Kind.LIFECYCLE_KIND_COMPLETED, content="Rayleigh, again.")
    assert (await repository.apply([late])).events_dropped == 0
    assert (await tables(repository)).tasks[alices] == ("alice", "completed", 9)


async def test_delete_all_removes_every_task_of_that_user_only(
    repository: Repository,
    history: history_pb2_grpc.HistoryServiceStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(repository_module, "DELETE_CHUNK", 3)  # several chunks in one call
    statuses = ["completed", "failed", "cancelled", "queued", "processing", "completed", "failed"]
    alices = [new_task_id() for _ in statuses]
    for minute, (status, task_id) in enumerate(zip(statuses, alices, strict=True)):
        await repository.apply(lifecycle_ending(status, task_id, at=T0 + timedelta(minutes=minute)))
    bobs = [new_task_id() for _ in range(2)]
    for task_id in bobs:
        await repository.apply(completed_lifecycle(task_id, user="bob"))
    bob_events = {(t, seq) for t in bobs for seq in (1, 2, 7)}

    assert await delete_all(history, "alice") == len(alices)

    after = await tables(repository)
    assert set(after.tasks) == set(bobs)
    assert after.events == bob_events
    assert set(after.tombstones) == set(alices)
    assert {owner for owner, _ in after.tombstones.values()} == {"alice"}
    alice_counts = await history.CountTasks(history_pb2.CountTasksRequest(user_id="alice"))
    bob_counts = await history.CountTasks(history_pb2.CountTasksRequest(user_id="bob"))
    assert (alice_counts.total, bob_counts.total) == (0, 2)
    assert await delete_all(history, "alice") == 0  # again: nothing left
    assert await tables(repository) == after
    # Each deleted task stays deleted; a new task of the same user is history as usual.
    for task_id in alices:
        assert (await repository.apply(completed_lifecycle(task_id))).events_dropped == 3
    fresh = new_task_id()
    assert (await repository.apply(completed_lifecycle(fresh))).events_recorded == 3
    final = await tables(repository)
    assert set(final.tasks) == {*bobs, fresh}
    assert final.events == bob_events | {(fresh, seq) for seq in (1, 2, 7)}


async def test_a_batch_drops_only_the_events_of_deleted_tasks(repository: Repository) -> None:
    deleted, other = new_task_id(), new_task_id()
    await repository.apply(completed_lifecycle(deleted)[:2])
    assert await repository.delete_task(deleted, "alice")
    cancelled = event(deleted, 3, Kind.LIFECYCLE_KIND_CANCELLED)
    result = await repository.apply([cancelled, *completed_lifecycle(other)])
    assert (result.events_recorded, result.tasks_changed, result.events_dropped) == (3, 1, 1)
    after = await tables(repository)
    assert set(after.tasks) == {other}
    assert after.events == {(other, seq) for seq in (1, 2, 7)}


async def status_of(repo: Repository, task_id: str, status: int) -> history_pb2.HistoryTask | None:
    task = await repo.get_task(task_id, "alice")
    return task if task is not None and task.status == status else None


async def test_a_late_event_of_a_deleted_task_is_acked_and_dropped(
    bus: Bus, repository: Repository
) -> None:
    """The app deletes a running task: the gateway cancels it, and its `cancelled` event
    comes through JetStream after the delete. It is acked (nothing left pending) and the
    task is not written again; a redelivered older event neither."""
    running_task, other = new_task_id(), new_task_id()
    queued, started, _ = completed_lifecycle(running_task)
    consumer = EventConsumer(bus.js, repository, fetch_timeout_s=FETCH_S)
    async with running(consumer):
        await publish(bus.js, queued)
        await publish(bus.js, started)
        processing = common_pb2.TASK_STATUS_PROCESSING
        await eventually(functools.partial(status_of, repository, running_task, processing))
        await until(lambda: consumer.stats.acked == 2)

        assert await repository.delete_task(running_task, "alice")

        await publish(bus.js, event(running_task, 3, Kind.LIFECYCLE_KIND_CANCELLED))
        # QUEUED again, published anew (another message id: not deduplicated by JetStream).
        await bus.js.publish(f"switchboard.tasks.{running_task}.queued", queued.SerializeToString())
        for one in completed_lifecycle(other):
            await publish(bus.js, one)
        await until(lambda: consumer.stats.dropped == 2 and consumer.stats.acked == 7)
        completed = common_pb2.TASK_STATUS_COMPLETED
        await eventually(functools.partial(status_of, repository, other, completed))
    assert (consumer.stats.nacked, consumer.stats.terminated) == (0, 0)
    info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    after = await tables(repository)
    assert set(after.tasks) == {other}
    assert after.events_of(running_task) == set()
    assert set(after.tombstones) == {running_task}
    assert await repository.get_task(running_task, "alice") is None


async def retried(call: Callable[[], Awaitable[T]]) -> T:
    """A call retried, as the consumer does, while it fails transiently (a lock held by the
    other writer for longer than the wait, a deadlock chosen as victim)."""
    for _ in range(100):
        try:
            return await call()
        except StorageUnavailable:
            await asyncio.sleep(0.01)
    raise AssertionError("never succeeded")


async def test_deletes_racing_another_writer_leave_nothing_behind(database_url: str) -> None:
    """Two replicas: one deletes all of a user's tasks while the other writes their last
    events. Whichever goes first, the tasks end deleted: a batch either lands before the
    delete (and is deleted with them) or after it (and is dropped)."""
    task_ids = [new_task_id() for _ in range(12)]
    deleter, writer = await Repository.open(database_url), await Repository.open(database_url)
    try:
        for task_id in task_ids:
            await deleter.apply(completed_lifecycle(task_id)[:2])
        last: list[events_pb2.LifecycleEvent] = [completed_lifecycle(t)[2] for t in task_ids]
        batches = [last[i : i + 2] for i in range(0, len(last), 2)]

        async def write_all() -> None:
            for batch in batches:
                await retried(lambda b=batch: writer.apply(b))  # type: ignore[misc]
                await asyncio.sleep(0)

        removed, _ = await asyncio.gather(
            retried(lambda: deleter.delete_all_tasks("alice")), write_all()
        )
        assert removed == len(task_ids)  # every task existed before either started
        after = await tables(deleter)
        assert after.tasks == {} and after.events == set()
        assert set(after.tombstones) == set(task_ids)
    finally:
        await deleter.close()
        await writer.close()
