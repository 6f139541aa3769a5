"""task_svc's snapshots on the lifecycle stream: its own checkpoints, which it reads back from
JetStream itself. persistence_svc acks them without decoding or storing them (snapshots.py),
and serves no SnapshotService."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select

from persistence_svc import models
from persistence_svc.consumer import DURABLE_NAME, EventConsumer
from persistence_svc.errors import StorageUnavailable
from persistence_svc.events import ParsedEvent
from persistence_svc.repository import ApplyResult, Repository
from svckit.nats import TASK_EVENTS_STREAM, is_snapshot
from switchboard.v1 import history_pb2
from tests.conftest import until
from tests.persistence.factory import Kind, event, new_task_id, snapshot
from tests.persistence.helpers import FETCH_S, Bus, publish, publish_snapshot, running, statements


async def row_counts(repo: Repository) -> dict[str, int]:
    async with repo.engine.connect() as conn:
        return {
            table.name: int(
                (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            )
            for table in (models.users, models.tasks, models.task_events)
        }


def test_snapshot_subjects() -> None:
    task_id = new_task_id()
    assert is_snapshot(f"switchboard.tasks.{task_id}.snapshot")
    for kind in ("queued", "started", "completed", "failed", "cancelled"):
        assert not is_snapshot(f"switchboard.tasks.{task_id}.{kind}")


def test_the_snapshot_service_is_gone_but_the_message_stays() -> None:
    services = history_pb2.DESCRIPTOR.services_by_name
    assert "SnapshotService" not in services and "HistoryService" in services
    assert "ListSnapshotsRequest" not in history_pb2.DESCRIPTOR.message_types_by_name
    assert snapshot(new_task_id(), 3).state.seq == 3  # task_svc still publishes TaskSnapshot


async def test_a_snapshot_is_acked_and_writes_nothing(bus: Bus, repository: Repository) -> None:
    task_id = new_task_id()
    consumer = EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)
    with statements(repository) as sent:
        async with running(consumer):
            await publish_snapshot(bus.js, snapshot(task_id, 6))  # before any event of its task
            # Not decoded at all: even bytes that are no TaskSnapshot are simply acked.
            await bus.js.publish(f"switchboard.tasks.{task_id}.snapshot", b"\xff not protobuf")
            await until(lambda: consumer.stats.acked == 2)
    assert sent == []  # not one statement: the database was never touched
    stats = consumer.stats
    assert (stats.snapshots, stats.terminated, stats.batches) == (2, 0, 0)
    assert await row_counts(repository) == {"users": 0, "tasks": 0, "task_events": 0}
    info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_snapshots_beside_events_leave_only_the_events(
    bus: Bus, repository: Repository
) -> None:
    task_id = new_task_id()
    consumer = EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)
    async with running(consumer):
        await publish(bus.js, event(task_id, 1, Kind.LIFECYCLE_KIND_QUEUED))
        await publish_snapshot(bus.js, snapshot(task_id, 6, content="Rayleigh"))
        await publish(bus.js, event(task_id, 8, Kind.LIFECYCLE_KIND_STARTED))
        await until(lambda: consumer.stats.acked == 3)
    assert consumer.stats.snapshots == 1
    task = await repository.get_task(task_id, "alice")
    assert task is not None and task.version == 8  # a snapshot is not an event of the trail
    trail = await repository.get_task_events(task_id, "alice")
    assert trail is not None and [e.seq for e in trail] == [1, 8]
    assert await row_counts(repository) == {"users": 1, "tasks": 1, "task_events": 2}


class DownRepository(Repository):
    """The real repository, with the database looking down."""

    async def apply_parsed(self, events: Sequence[ParsedEvent]) -> ApplyResult:
        raise StorageUnavailable("connection refused (test)")


async def test_snapshots_do_not_wait_for_a_database_outage(bus: Bus, database_url: str) -> None:
    repo = await DownRepository.open(database_url)
    try:
        task_id = new_task_id()
        consumer = EventConsumer(bus.nc, repo, fetch_timeout_s=FETCH_S, retry_delays_s=(0.1,))
        async with running(consumer):
            await publish(bus.js, event(task_id, 1, Kind.LIFECYCLE_KIND_QUEUED))
            await publish_snapshot(bus.js, snapshot(task_id, 4))
            await until(lambda: consumer.stats.snapshots == 1 and consumer.stats.nacked >= 2)
            # The event is still held for the database; the snapshot went.
            assert consumer.stats.acked == 1
        info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
        assert info.num_pending + info.num_ack_pending == 1
    finally:
        await repo.close()
