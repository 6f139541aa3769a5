"""DeleteTask and DeleteAllTasks on both databases: rows and trail gone (read from the tables
themselves), a tombstone left, another user's task untouched, and a deleted task's late
lifecycle events (through JetStream and the consumer) acked and dropped, never written; the
same for a task deleted before any of its events was written (its events still in the
JetStream backlog), tombstoned for the deleting user only; and the pruning of old
tombstones."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from sqlalchemy import func, select, update

from persistence_svc import models
from persistence_svc import repository as repository_module
from persistence_svc.backlog import Backlog
from persistence_svc.config import Settings
from persistence_svc.consumer import DURABLE_NAME, EventConsumer, consumer_config
from persistence_svc.errors import StorageUnavailable
from persistence_svc.repository import Repository
from persistence_svc.server import PersistenceServer
from svckit.errors import Code
from svckit.nats import TASK_EVENTS_STREAM, task_events_stream_config
from switchboard.v1 import common_pb2, events_pb2, history_pb2, history_pb2_grpc
from task_svc.deadletters import dead_letters_stream_config
from tests.conftest import eventually, timeout, until
from tests.persistence.factory import (
    T0,
    Kind,
    completed_lifecycle,
    event,
    lifecycle_ending,
    new_task_id,
)
from tests.persistence.helpers import FETCH_S, Bus, publish, rpc_error, running, served

T = TypeVar("T")


@dataclass(frozen=True)
class Tables:
    """What the history holds, read straight from its tables."""

    tasks: dict[str, tuple[str, str, int]]  # task id: (owner, status, version)
    events: set[tuple[str, int]]  # (task id, seq)
    tombstones: dict[tuple[str, str], tuple[datetime, bool]]  # (task id, owner): (at, confirmed)
    users: int

    def events_of(self, task_id: str) -> set[int]:
        return {seq for task, seq in self.events if task == task_id}

    @property
    def tombstoned(self) -> set[str]:
        return {task for task, _ in self.tombstones}


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
            select(
                deleted.c.task_id, users.c.external_id, deleted.c.deleted_at, deleted.c.confirmed
            ).join(users, users.c.id == deleted.c.user_id)
        )
        user_count = (await conn.execute(select(func.count()).select_from(users))).scalar_one()
        return Tables(
            tasks={str(r.id): (r.external_id, r.status, r.version) for r in task_rows},
            events={(str(r.task_id), r.seq) for r in event_rows},
            tombstones={
                (str(r.task_id), r.external_id): (r.deleted_at, bool(r.confirmed))
                for r in tombstone_rows
            },
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
    assert set(after.tombstones) == {(gone, "alice")}
    deleted_at, confirmed = after.tombstones[gone, "alice"]
    assert confirmed
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
    # No such task: false, and again on a retry; nothing of anyone's touched, but a tombstone
    # of alice's own is left, since such a task of hers may be on its way.
    stray = new_task_id()
    assert await delete(history, stray, "alice") is False
    assert await delete(history, stray, "alice") is False
    assert await delete(history, "not-a-uuid", "alice") is False
    final = await tables(repository)
    assert (final.tasks, final.events, final.users) == (after.tasks, after.events, after.users)
    assert set(final.tombstones) == {(gone, "alice"), (stray, "alice")}
    assert final.tombstones[stray, "alice"][1] is False  # not confirmed: never seen as hers


async def test_another_users_delete_touches_nothing_of_the_owners(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    alices = new_task_id()
    await repository.apply(completed_lifecycle(alices))
    await repository.apply(completed_lifecycle(new_task_id(), user="bob"))
    before = await tables(repository)

    assert await delete(history, alices, "bob") is False  # bob exists, the task is not his
    assert await delete(history, alices, "carol") is False  # carol has never been seen
    assert await delete_all(history, "carol") == 0
    after = await tables(repository)
    assert (after.tasks, after.events) == (before.tasks, before.events)
    # Each left a tombstone of the id for themselves (as for any id they hold no row of),
    # which drops only their own events of it: none.
    assert set(after.tombstones) == {(alices, "bob"), (alices, "carol")}
    assert after.users == before.users + 1  # carol, the owner of her tombstone
    task = await history.GetTask(history_pb2.GetHistoryTaskRequest(task_id=alices, user_id="alice"))
    assert task.response == "Rayleigh."
    # A later lifecycle event of alice's task still applies: she never deleted it.
    late = event(alices, 9, Kind.LIFECYCLE_KIND_COMPLETED, content="Rayleigh, again.")
    assert (await repository.apply([late])).events_dropped == 0
    assert (await tables(repository)).tasks[alices] == ("alice", "completed", 9)
    # Her own delete still leaves her own tombstone beside theirs.
    assert await delete(history, alices, "alice") is True
    final = await tables(repository)
    assert alices not in final.tasks
    assert set(final.tombstones) == {(alices, "bob"), (alices, "carol"), (alices, "alice")}


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
    assert set(after.tombstones) == {(task_id, "alice") for task_id in alices}
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
    consumer = EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)
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
    assert set(after.tombstones) == {(running_task, "alice")}
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
        assert set(after.tombstones) == {(task_id, "alice") for task_id in task_ids}
    finally:
        await deleter.close()
        await writer.close()


# -- tasks deleted before any of their events was written -------------------------------


async def test_a_task_deleted_before_its_first_event_is_written_never_appears(
    bus: Bus, repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    """The app deletes a task at once, while its QUEUED event still waits in JetStream (the
    database behind): history holds no row of it, yet the delete leaves alice's tombstone,
    and her task's events, that one and the later ones, are acked and dropped. Bob deleting
    another task of hers in the same state tombstones it for himself only: it is written."""
    hers, kept = new_task_id(), new_task_id()
    queued, *later = completed_lifecycle(hers)
    await publish(bus.js, queued)  # no consumer yet: the backlog
    kept_events = completed_lifecycle(kept)
    await publish(bus.js, kept_events[0])

    assert await delete(history, hers, "alice") is False  # history has nothing of it yet
    assert await delete(history, kept, "bob") is False  # not his: touches nothing of hers

    consumer = EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)
    async with running(consumer):
        for one in [*later, *kept_events[1:]]:
            await publish(bus.js, one)
        await until(lambda: consumer.stats.acked == 6)
    assert consumer.stats.dropped == 3
    assert (consumer.stats.nacked, consumer.stats.terminated) == (0, 0)
    after = await tables(repository)
    assert set(after.tasks) == {kept}
    assert after.tasks[kept] == ("alice", "completed", 7)
    assert after.events == {(kept, seq) for seq in (1, 2, 7)}
    assert set(after.tombstones) == {(hers, "alice"), (kept, "bob")}
    assert await repository.get_task(hers, "alice") is None
    # The delete now finds it deleted: the tombstone stays unconfirmed (history never held
    # it as hers), so the answer does not change.
    assert await delete(history, hers, "alice") is False


async def test_delete_all_tombstones_the_tasks_whose_events_are_on_their_way(
    bus: Bus, repository: Repository
) -> None:
    """delete_all while the database is behind: the tasks in history go, and so do the
    user's tasks whose first events still wait in JetStream (found there, backlog.py);
    bob's and a task alice submits afterwards are written as usual."""
    written, bobs_written = new_task_id(), new_task_id()
    on_way = [new_task_id() for _ in range(2)]
    bobs_on_way, afterwards = new_task_id(), new_task_id()
    consumer = EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)
    async with running(consumer):
        for one in completed_lifecycle(written) + completed_lifecycle(bobs_written, user="bob"):
            await publish(bus.js, one)
        await until(lambda: consumer.stats.acked == 6)
    # Behind: what is published now waits for the next run.
    lifecycles = {task_id: completed_lifecycle(task_id) for task_id in on_way}
    lifecycles[bobs_on_way] = completed_lifecycle(bobs_on_way, user="bob")
    for task_id in [*on_way, bobs_on_way]:
        await publish(bus.js, lifecycles[task_id][0])  # QUEUED
    await publish(bus.js, lifecycles[on_way[0]][1])  # and one STARTED

    async with served(repository, Backlog(bus.js)) as stubs:
        assert await delete_all(stubs.history, "alice") == 3

    consumer = EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)
    async with running(consumer):
        for one in lifecycles[on_way[0]][2:] + lifecycles[on_way[1]][1:]:
            await publish(bus.js, one)
        for one in lifecycles[bobs_on_way][1:] + completed_lifecycle(afterwards):
            await publish(bus.js, one)
        await until(lambda: consumer.stats.acked == 12)
    assert consumer.stats.dropped == 6
    after = await tables(repository)
    assert set(after.tasks) == {bobs_written, bobs_on_way, afterwards}
    assert after.tombstones.keys() == {(t, "alice") for t in (written, *on_way)}
    assert all(confirmed for _, confirmed in after.tombstones.values())


async def test_delete_all_is_refused_while_the_backlog_cannot_be_read(
    bus: Bus, repository: Repository
) -> None:
    """Unable to see the tasks on their way (here: more of them than it reads for one
    call), delete_all answers UNAVAILABLE, retryable, and removes nothing."""
    task_id = new_task_id()
    await repository.apply(completed_lifecycle(task_id))
    # The durable consumer, with nothing acked yet.
    await bus.js.add_consumer(TASK_EVENTS_STREAM, config=consumer_config(60))
    for one in completed_lifecycle(new_task_id()):
        await publish(bus.js, one)
    async with served(repository, Backlog(bus.js, max_scan=2)) as stubs:
        call = stubs.history.DeleteAllTasks(
            history_pb2.DeleteAllTasksRequest(user_id="alice"), timeout=timeout(5)
        )
        error = await rpc_error(call)
    assert (error.code, error.retryable) == (Code.ERROR_CODE_UNAVAILABLE, True)
    assert error.retry_after_ms > 0
    assert set((await tables(repository)).tasks) == {task_id}


async def test_deletes_of_tasks_with_no_row_racing_their_first_events(database_url: str) -> None:
    """Two replicas: one deletes tasks history has no row of yet while the other writes their
    events, each delete started together with its task's write. Whichever goes first, each
    task ends deleted: its events either land before the delete (and go with it) or after
    (and are dropped)."""
    task_ids = [new_task_id() for _ in range(12)]
    deleter, writer = await Repository.open(database_url), await Repository.open(database_url)
    try:
        await writer.apply(completed_lifecycle(new_task_id()))  # alice is known
        for task_id in task_ids:
            await asyncio.gather(
                retried(lambda t=task_id: deleter.delete_task(t, "alice")),  # type: ignore[misc]
                retried(lambda t=task_id: writer.apply(completed_lifecycle(t))),  # type: ignore[misc]
            )
        after = await tables(deleter)
        assert not after.tasks.keys() & set(task_ids)
        assert not {task for task, _ in after.events} & set(task_ids)
        assert after.tombstones.keys() == {(task_id, "alice") for task_id in task_ids}
    finally:
        await deleter.close()
        await writer.close()


# -- pruning ------------------------------------------------------------------------------


async def age_tombstones(repo: Repository, ages: dict[str, timedelta]) -> None:
    """Date the tombstones of these tasks (any owner) back by each one's age."""
    deleted = models.deleted_tasks
    now = datetime.now(UTC)
    async with repo.engine.begin() as conn:
        for task_id, age in ages.items():
            await conn.execute(
                update(deleted)
                .where(deleted.c.task_id == uuid.UUID(task_id))
                .values(deleted_at=now - age)
            )


async def test_prune_removes_only_tombstones_past_the_age(repository: Repository) -> None:
    old = [new_task_id() for _ in range(5)]
    young = new_task_id()
    for task_id in [*old, young]:
        await repository.apply(completed_lifecycle(task_id))
        assert await repository.delete_task(task_id, "alice")
    assert await repository.delete_task(old[0], "bob") is False  # bob's, just as old
    await age_tombstones(repository, {t: timedelta(days=40) for t in old})
    await age_tombstones(repository, {young: timedelta(days=2)})

    cutoff = datetime.now(UTC) - timedelta(days=38)
    assert await repository.prune_tombstones(cutoff, chunk=2) == 6  # in several chunks
    assert set((await tables(repository)).tombstones) == {(young, "alice")}
    assert await repository.prune_tombstones(cutoff) == 0
    # The young one still drops its task's events.
    assert (await repository.apply(completed_lifecycle(young))).events_dropped == 3


async def test_the_server_prunes_tombstones_in_the_background(
    nats_url: str, database_url: str
) -> None:
    settings = Settings(
        nats_url=nats_url,
        database_url=database_url,
        history_svc_listen="127.0.0.1:0",
        persistence_tombstone_retention_s=3600,
        persistence_tombstone_prune_interval_s=0.1,
    )
    server = PersistenceServer(settings)
    try:
        await server.start()
        assert server.repository is not None
        repo = server.repository
        old, young = new_task_id(), new_task_id()
        for task_id in (old, young):
            await repo.apply(completed_lifecycle(task_id))
            assert await repo.delete_task(task_id, "alice")
        await age_tombstones(repo, {old: timedelta(hours=2)})

        async def pruned() -> bool:
            return set((await tables(repo)).tombstones) == {(young, "alice")}

        await eventually(pruned)
        prune_task = server._prune_task
        assert prune_task is not None and not prune_task.done()
    finally:
        await server.shutdown()
    assert prune_task.done()  # owned by the server, ended with it


def test_tombstones_outlive_every_event_of_their_task() -> None:
    """The default retention covers an event published before the delete (kept in
    SB_TASK_EVENTS for its max_age) and a task re-run from the dead letters (kept for theirs),
    with a margin."""
    events_max_age = task_events_stream_config().max_age
    dead_letters_max_age = dead_letters_stream_config().max_age
    assert events_max_age and dead_letters_max_age
    retention = Settings().persistence_tombstone_retention_s
    assert retention > events_max_age + dead_letters_max_age
