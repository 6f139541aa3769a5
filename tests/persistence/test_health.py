"""HistoryService's health entry and the database metrics through a real PostgreSQL outage:
the test's own cluster is stopped and started again. "" (liveness) stays SERVING throughout;
HistoryService's entry says NOT_SERVING while the database is gone, whether a write found it
gone, the server's own check did (nothing to write), or it was gone at start."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from persistence_svc.config import Settings
from persistence_svc.consumer import DURABLE_NAME
from persistence_svc.server import SERVICE_NAME, PersistenceServer
from svckit.grpc_server import insecure_channel
from svckit.metrics import sample
from tests.conftest import eventually, timeout, until
from tests.persistence.factory import completed_lifecycle, new_task_id
from tests.persistence.helpers import Bus, fresh_database_settings, publish
from tests.postgres import Cluster, own_cluster

WATCH_S = 0.1  # the server's watch interval here: outages are seen within a few polls
Serving = health_pb2.HealthCheckResponse

EVENTS = "switchboard_history_events_total"
WRITE_ERRORS = "switchboard_history_write_errors_total"
DATABASE_UP = "switchboard_database_up"
PENDING = "switchboard_jetstream_consumer_pending"
ACK_PENDING = "switchboard_jetstream_consumer_ack_pending"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One cluster for this module (initdb takes a second or two); each test may stop it,
    and its settings fixture has it running again afterwards."""
    with own_cluster() as cluster:
        yield cluster


@pytest.fixture
async def settings(cluster: Cluster, nats_url: str) -> AsyncIterator[Settings]:
    yield await fresh_database_settings(cluster, nats_url, "sb_health")
    with contextlib.suppress(RuntimeError):  # already running: the test started it again
        cluster.start()


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[PersistenceServer, Health]]:
    server = PersistenceServer(settings, watch_interval_s=WATCH_S)
    try:
        await server.start()
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, Health(health_pb2_grpc.HealthStub(channel))
    finally:
        await server.shutdown()


class Health:
    def __init__(self, stub: health_pb2_grpc.HealthStub) -> None:
        self.stub = stub

    async def of(self, service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return int((await self.stub.Check(request, timeout=timeout(5))).status)

    async def until(self, service: str, status: int, seconds: float = 20) -> None:
        async def reached() -> bool:
            return await self.of(service) == status

        await eventually(reached, seconds)


def waiting(registry: CollectorRegistry) -> float:
    """Messages the durable consumer has yet to settle, as the server's watch last read."""
    pending = sample(registry, PENDING, consumer=DURABLE_NAME)
    return pending + sample(registry, ACK_PENDING, consumer=DURABLE_NAME)


async def stop(cluster: Cluster) -> None:
    # In a thread: the server's loop keeps running (and noticing) while pg_ctl waits.
    await asyncio.to_thread(cluster.stop)


async def start(cluster: Cluster) -> None:
    await asyncio.to_thread(cluster.start)


async def test_an_idle_database_going_away_is_found_by_the_check(
    cluster: Cluster, settings: Settings
) -> None:
    async with served(settings) as (server, health):
        registry = server.metrics.registry
        assert await health.of(SERVICE_NAME) == Serving.SERVING
        assert sample(registry, DATABASE_UP) == 1

        await stop(cluster)
        # No event arrives, so no write can tell: the server's own check does.
        await health.until(SERVICE_NAME, Serving.NOT_SERVING)
        assert await health.of("") == Serving.SERVING
        assert sample(registry, DATABASE_UP) == 0
        assert sample(registry, WRITE_ERRORS) == 0

        await start(cluster)
        await health.until(SERVICE_NAME, Serving.SERVING)
        assert sample(registry, DATABASE_UP) == 1


async def test_an_outage_under_writes_counts_errors_and_waiting_messages(
    cluster: Cluster, bus: Bus, settings: Settings
) -> None:
    async with served(settings) as (server, health):
        assert server.consumer is not None
        consumer, registry = server.consumer, server.metrics.registry
        before, during = [new_task_id() for _ in range(2)], [new_task_id() for _ in range(3)]
        for task_id in before:
            for one in completed_lifecycle(task_id):
                await publish(bus.js, one)
        await until(lambda: consumer.stats.acked == 6)

        await stop(cluster)
        for task_id in during:
            for one in completed_lifecycle(task_id):
                await publish(bus.js, one)
        await until(lambda: sample(registry, WRITE_ERRORS) >= 1)
        await health.until(SERVICE_NAME, Serving.NOT_SERVING)
        assert await health.of("") == Serving.SERVING
        assert sample(registry, DATABASE_UP) == 0
        # All nine wait in JetStream (undelivered, or nak'ed until their redelivery), as the
        # watch last read the durable consumer.
        await until(lambda: waiting(registry) == 9)
        assert sample(registry, EVENTS, kind="queued") == 2

        await start(cluster)
        await until(lambda: consumer.stats.acked == 15, seconds=30)
        await health.until(SERVICE_NAME, Serving.SERVING)
        assert sample(registry, DATABASE_UP) == 1
        await until(lambda: waiting(registry) == 0)
        for kind in ("queued", "started", "completed"):
            assert sample(registry, EVENTS, kind=kind) == 5
        assert sample(registry, "switchboard_history_lag_seconds_count") == 15


async def test_a_database_down_at_start_is_reported_at_once(
    cluster: Cluster, bus: Bus, settings: Settings
) -> None:
    await stop(cluster)
    async with served(settings) as (server, health):
        assert server.consumer is not None
        consumer, registry = server.consumer, server.metrics.registry
        # Right after start(), without waiting: start() checks the database itself.
        assert await health.of(SERVICE_NAME) == Serving.NOT_SERVING
        assert await health.of("") == Serving.SERVING
        assert sample(registry, DATABASE_UP) == 0

        await start(cluster)
        await health.until(SERVICE_NAME, Serving.SERVING)
        # The schema missed at start is applied on first use; events are written.
        for one in completed_lifecycle(new_task_id()):
            await publish(bus.js, one)
        await until(lambda: consumer.stats.acked == 3)
        assert sample(registry, EVENTS, kind="completed") == 1
