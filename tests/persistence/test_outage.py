"""A real PostgreSQL outage: the test starts its own cluster, stops it while lifecycle events
keep arriving on JetStream, starts it again, and checks every row: each event written once,
every task in its final state."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import func, select

from persistence_svc import models
from persistence_svc.config import Settings
from persistence_svc.consumer import DURABLE_NAME
from persistence_svc.database import create_engine
from persistence_svc.errors import StorageUnavailable
from persistence_svc.repository import Repository
from persistence_svc.server import PersistenceServer
from persistence_svc.service import RETRY_AFTER_MS
from svckit.errors import Code, ServiceError
from svckit.grpc_server import insecure_channel
from svckit.nats import TASK_EVENTS_STREAM
from switchboard.v1 import common_pb2, events_pb2, history_pb2, history_pb2_grpc
from tests.conftest import eventually, timeout, until
from tests.persistence.factory import T0, Kind, completed_lifecycle, event, new_task_id
from tests.persistence.helpers import Bus, fresh_database_settings, publish, rpc_error, served
from tests.postgres import Cluster, own_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One cluster for this module (initdb takes a second or two); each test stops and
    starts it, and leaves it running."""
    with own_cluster() as cluster:
        yield cluster


@pytest.fixture
async def outage_settings(cluster: Cluster, nats_url: str) -> Settings:
    return await fresh_database_settings(cluster, nats_url, "sb_outage")


HISTORY = history_pb2.DESCRIPTOR.services_by_name["HistoryService"].full_name
Serving = health_pb2.HealthCheckResponse


async def health_of(health: health_pb2_grpc.HealthStub, service: str) -> int:
    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


def lifecycle(task_id: str, user: str, minute: int) -> list[events_pb2.LifecycleEvent]:
    return completed_lifecycle(task_id, user=user, at=T0 + timedelta(minutes=minute))


async def test_events_published_while_postgres_is_down_are_all_written_once(
    cluster: Cluster, bus: Bus, outage_settings: Settings
) -> None:
    settings = outage_settings
    url = settings.database_url
    users = ("alice", "bob")
    before = [(new_task_id(), users[i % 2]) for i in range(10)]  # all done before the outage
    spanning = [(new_task_id(), users[i % 2]) for i in range(10)]  # started before, done during
    during = [(new_task_id(), users[i % 2]) for i in range(10)]  # wholly during the outage
    expected: dict[str, list[events_pb2.LifecycleEvent]] = {}
    for minute, (task_id, user) in enumerate(before + spanning + during):
        expected[task_id] = lifecycle(task_id, user, minute)

    server = PersistenceServer(settings)
    try:
        await server.start()
        assert server.consumer is not None
        consumer = server.consumer
        for task_id, _ in before:
            for one in expected[task_id]:
                await publish(bus.js, one)
        for task_id, _ in spanning:
            for one in expected[task_id][:2]:  # QUEUED, STARTED
                await publish(bus.js, one)
        await until(lambda: consumer.stats.acked == 50, seconds=20)

        cluster.stop()
        outage_events = [one for task_id, _ in spanning for one in expected[task_id][2:]]
        outage_events += [one for task_id, _ in during for one in expected[task_id]]
        for one in outage_events:
            await publish(bus.js, one)
        # The consumer tried them and could not write them: each one is still unacked.
        await until(lambda: consumer.stats.nacked >= len(outage_events), seconds=20)
        assert consumer.stats.acked == 50
        info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
        assert info.num_pending + info.num_ack_pending == len(outage_events)
        # Reads answer a typed, retryable error meanwhile.
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = history_pb2_grpc.HistoryServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetTask(
                    history_pb2.GetHistoryTaskRequest(task_id=before[0][0], user_id="alice"),
                    timeout=timeout(10),
                )
            error = ServiceError.from_rpc_error(caught.value)
            assert (error.code, error.retryable) == (Code.ERROR_CODE_UNAVAILABLE, True)
            assert error.kind.status == grpc.StatusCode.UNAVAILABLE and error.retry_after_ms > 0
            # Health says so on HistoryService's own entry; the process is alive ("").
            health = health_pb2_grpc.HealthStub(channel)
            assert await health_of(health, HISTORY) == Serving.NOT_SERVING
            assert await health_of(health, "") == Serving.SERVING

        cluster.start()

        async def all_applied() -> bool:
            info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await eventually(all_applied, seconds=30)
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert await health_of(health, HISTORY) == Serving.SERVING
    finally:
        await server.shutdown()

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(select(models.task_events.c.task_id, models.task_events.c.seq))
            ).all()
            tasks = {
                str(row.id): row
                for row in await conn.execute(
                    select(models.tasks, models.users.c.external_id).join(models.users)
                )
            }
            user_count = (
                await conn.execute(select(func.count()).select_from(models.users))
            ).scalar_one()
    finally:
        await engine.dispose()
    # Every event once, none twice, none missing.
    written = [(str(task_id), seq) for task_id, seq in rows]
    assert len(written) == len(set(written))
    assert sorted(written) == sorted((t, e.seq) for t, evs in expected.items() for e in evs)
    assert set(tasks) == set(expected)
    for task_id, user in before + spanning + during:
        row = tasks[task_id]
        assert (row.status, row.version, row.response) == ("completed", 7, "Rayleigh.")
        assert row.external_id == user
        assert row.started_at is not None and row.completed_at is not None
    assert user_count == 2


async def test_a_crash_of_the_database_mid_task(
    cluster: Cluster, bus: Bus, outage_settings: Settings
) -> None:
    """PostgreSQL killed (immediate stop: no clean shutdown) between two events of a task:
    the task ends cancelled once it is back, not left processing."""
    task_id = new_task_id()
    server = PersistenceServer(outage_settings)
    try:
        await server.start()
        assert server.consumer is not None and server.repository is not None
        consumer, repo = server.consumer, server.repository
        await publish(bus.js, event(task_id, 1, Kind.LIFECYCLE_KIND_QUEUED))
        await until(lambda: consumer.stats.acked == 1)
        cluster.stop("immediate")  # as if the machine had lost power
        await publish(bus.js, event(task_id, 2, Kind.LIFECYCLE_KIND_STARTED))
        await publish(bus.js, event(task_id, 3, Kind.LIFECYCLE_KIND_CANCELLED))
        await until(lambda: consumer.stats.nacked >= 2)
        cluster.start()
        task = await eventually(functools.partial(_at_version, repo, task_id, 3), seconds=30)
        assert task.status == common_pb2.TASK_STATUS_CANCELLED
        assert task.started_at.seconds > 0
        trail = await repo.get_task_events(task_id, "alice")
        assert trail is not None and [e.seq for e in trail] == [1, 2, 3]
    finally:
        await server.shutdown()


async def _at_version(
    repo: Repository, task_id: str, version: int
) -> history_pb2.HistoryTask | None:
    try:
        task = await repo.get_task(task_id, "alice")
    except StorageUnavailable:
        return None
    return task if task is not None and task.version == version else None


async def test_history_calls_answer_unavailable_with_a_retry_after_while_postgres_is_down(
    cluster: Cluster, outage_settings: Settings
) -> None:
    """Every HistoryService and UserService call, the new ones included, answers UNAVAILABLE
    (typed, retryable, with a retry-after) while the database is stopped, deletes nothing,
    and works again once it is back."""
    repo = await Repository.open(outage_settings.database_url)
    doomed, kept = new_task_id(), new_task_id()
    try:
        await repo.apply(lifecycle(doomed, "alice", 1) + lifecycle(kept, "alice", 2))
        async with served(repo) as stubs:
            history, users = stubs.history, stubs.users
            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "DeleteTask": lambda: history.DeleteTask(
                    history_pb2.DeleteTaskRequest(task_id=doomed, user_id="alice"),
                    timeout=timeout(10),
                ),
                "DeleteAllTasks": lambda: history.DeleteAllTasks(
                    history_pb2.DeleteAllTasksRequest(user_id="alice"), timeout=timeout(10)
                ),
                "CountTasks": lambda: history.CountTasks(
                    history_pb2.CountTasksRequest(user_id="alice"), timeout=timeout(10)
                ),
                "ListTasks": lambda: history.ListTasks(
                    history_pb2.ListTasksRequest(
                        user_id="alice",
                        status=common_pb2.TASK_STATUS_COMPLETED,
                        preview_chars=3,
                    ),
                    timeout=timeout(10),
                ),
                "GetTask": lambda: history.GetTask(
                    history_pb2.GetHistoryTaskRequest(task_id=kept, user_id="alice"),
                    timeout=timeout(10),
                ),
                "GetTaskEvents": lambda: history.GetTaskEvents(
                    history_pb2.GetTaskEventsRequest(task_id=kept, user_id="alice"),
                    timeout=timeout(10),
                ),
                "GetPreferences": lambda: users.GetPreferences(
                    history_pb2.GetPreferencesRequest(user_id="alice"), timeout=timeout(10)
                ),
                "SetPreferences": lambda: users.SetPreferences(
                    history_pb2.SetPreferencesRequest(
                        user_id="alice", preferences=history_pb2.Preferences(default_model="m")
                    ),
                    timeout=timeout(10),
                ),
            }
            await calls["CountTasks"]()  # the pool and the writer's connection are open now
            cluster.stop()
            try:
                for name, call in calls.items():
                    error = await rpc_error(call())
                    assert error.kind.status == grpc.StatusCode.UNAVAILABLE, name
                    assert (error.code, error.retryable) == (Code.ERROR_CODE_UNAVAILABLE, True)
                    assert error.retry_after_ms == RETRY_AFTER_MS, name
            finally:
                cluster.start()

            async def counted() -> history_pb2.CountTasksResponse | None:
                try:
                    reply: history_pb2.CountTasksResponse = await history.CountTasks(
                        history_pb2.CountTasksRequest(user_id="alice"), timeout=timeout(10)
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.UNAVAILABLE:
                        return None
                    raise
                return reply

            counts = await eventually(counted, seconds=30)
            assert counts.total == 2  # the refused deletes removed nothing
            reply = await calls["DeleteTask"]()
            assert reply.deleted
            counts = await calls["CountTasks"]()
            assert (counts.total, counts.by_status["completed"]) == (1, 1)
    finally:
        await repo.close()
