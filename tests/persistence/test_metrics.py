"""persistence_svc's Prometheus metrics: what the write path counts and times (in process, on
each server's own registry), and `/metrics` served by `python -m persistence_svc`.

The metrics during a real PostgreSQL outage (write errors, the consumer's pending gauges,
switchboard_database_up) are in test_health.py, with the outage itself."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from persistence_svc.config import Settings
from persistence_svc.consumer import EventConsumer
from persistence_svc.errors import StorageUnavailable
from persistence_svc.events import ParsedEvent
from persistence_svc.metrics import EVENT_KINDS, PersistenceMetrics
from persistence_svc.repository import ApplyResult, Repository
from persistence_svc.server import SERVICE_NAME, PersistenceServer
from svckit.grpc_server import insecure_channel
from svckit.metrics import sample
from switchboard.v1 import common_pb2
from tests.conftest import eventually, timeout, until
from tests.persistence.factory import Kind, completed_lifecycle, event, new_task_id, snapshot
from tests.persistence.helpers import FETCH_S, Bus, publish, publish_snapshot, running
from tools.natsserver import free_port

EVENTS = "switchboard_history_events_total"
LAG = "switchboard_history_lag_seconds"
BATCH = "switchboard_history_batch_size"
WRITE_ERRORS = "switchboard_history_write_errors_total"
DATABASE_UP = "switchboard_database_up"


def kinds(registry: CollectorRegistry) -> dict[str, float]:
    return {kind: sample(registry, EVENTS, kind=kind) for kind in EVENT_KINDS}


async def test_written_events_are_counted_by_kind_and_timed(
    bus: Bus, nats_url: str, database_url: str
) -> None:
    settings = Settings(
        nats_url=nats_url, database_url=database_url, history_svc_listen="127.0.0.1:0"
    )
    server = PersistenceServer(settings)
    registry = server.metrics.registry
    try:
        await server.start()
        assert server.consumer is not None
        consumer = server.consumer
        done, failed, cancelled = [new_task_id() for _ in range(4)], new_task_id(), new_task_id()
        published_from = time.time()
        for task_id in done:
            for one in completed_lifecycle(task_id):
                await publish(bus.js, one)
        error = common_pb2.Error(code=common_pb2.ERROR_CODE_TIMEOUT, message="timed out")
        await publish(bus.js, event(failed, 1, Kind.LIFECYCLE_KIND_QUEUED))
        await publish(bus.js, event(failed, 4, Kind.LIFECYCLE_KIND_FAILED, error=error))
        await publish(bus.js, event(cancelled, 1, Kind.LIFECYCLE_KIND_QUEUED))
        await publish(bus.js, event(cancelled, 2, Kind.LIFECYCLE_KIND_CANCELLED))
        for seq in (3, 4):  # task_svc's checkpoints: acked, never stored
            await publish_snapshot(bus.js, snapshot(done[0], seq))
        await until(lambda: consumer.stats.acked == 18)
        elapsed = time.time() - published_from
    finally:
        await server.shutdown()

    written = 16
    assert kinds(registry) == {
        "unspecified": 0,
        "queued": 6,
        "started": 4,
        "completed": 4,
        "failed": 1,
        "cancelled": 1,
        "unknown": 0,
        "snapshot": 2,
    }
    # One lag per lifecycle event written (none for snapshots), each measured from its
    # publication moments ago, not from the event's own time (T0 in the factory).
    assert sample(registry, f"{LAG}_count") == written
    assert sample(registry, f"{LAG}_bucket", le="+Inf") == written
    assert 0 < sample(registry, f"{LAG}_sum") <= written * elapsed
    # Every event in exactly one written batch.
    assert sample(registry, f"{BATCH}_sum") == written
    assert sample(registry, f"{BATCH}_count") == consumer.stats.batches
    assert sample(registry, WRITE_ERRORS) == 0
    assert sample(registry, DATABASE_UP) == 1


class DownRepository(Repository):
    """The real repository, with a switch that makes the database look down."""

    down = True

    async def apply_parsed(self, events: Sequence[ParsedEvent]) -> ApplyResult:
        if self.down:
            raise StorageUnavailable("connection refused (test)")
        return await super().apply_parsed(events)


async def test_failed_writes_are_counted_and_the_lag_spans_the_outage(
    bus: Bus, database_url: str
) -> None:
    repo = await DownRepository.open(database_url)
    metrics = PersistenceMetrics()
    registry = metrics.registry
    consumer = EventConsumer(
        bus.nc, repo, fetch_timeout_s=FETCH_S, retry_delays_s=(0.1,), metrics=metrics
    )
    try:
        async with running(consumer):
            for one in completed_lifecycle(new_task_id()):
                await publish(bus.js, one)
            published_by = time.time()
            # Delivered, refused, nak'ed, delivered again, refused again...
            await until(lambda: consumer.stats.failed_writes >= 2)
            assert sample(registry, WRITE_ERRORS) == consumer.stats.failed_writes
            assert sample(registry, DATABASE_UP) == 0
            assert sample(registry, f"{LAG}_count") == 0
            assert sum(kinds(registry).values()) == 0

            repo.down = False  # no write can fail after this
            back_at = time.time()
            errors = sample(registry, WRITE_ERRORS)
            await until(lambda: consumer.stats.acked == 3)
        # Successful writes are not errors; each event is counted once however often it
        # was delivered.
        assert sample(registry, WRITE_ERRORS) == errors
        assert sample(registry, DATABASE_UP) == 1
        once = {"queued": 1, "started": 1, "completed": 1}
        assert kinds(registry) == {**dict.fromkeys(EVENT_KINDS, 0), **once}
        # Measured from the publication (JetStream's timestamp, the same on every
        # redelivery), so each event's lag covers the whole time the database was down.
        assert sample(registry, f"{LAG}_count") == 3
        assert sample(registry, f"{LAG}_sum") >= 3 * (back_at - published_by)
    finally:
        await repo.close()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, by name and labels."""
    with urllib.request.urlopen(url, timeout=timeout(5)) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# SQLite only: this is about the process entry exporting the metrics (test_server.py tests the
# process itself).
@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
async def test_process_serves_metrics(
    bus: Bus, nats_url: str, empty_database_url: str, port: int, tmp_path: Path
) -> None:
    metrics_port = free_port()
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "DATABASE_URL": empty_database_url,
        "HISTORY_SVC_LISTEN": f"127.0.0.1:{port}",
        "PERSISTENCE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
    }
    log_path = tmp_path / "persistence.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "persistence_svc"], cwd=tmp_path, env=env, stderr=log, stdout=log
        )
    try:
        await eventually(lambda: _serving(f"127.0.0.1:{port}"), seconds=30)
        for one in completed_lifecycle(new_task_id()):
            await publish(bus.js, one)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        completed = (EVENTS, frozenset({("kind", "completed")}))

        async def written() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            values = await asyncio.to_thread(scrape, url)
            return values if values.get(completed) == 1 else None

        values = await eventually(written, seconds=20)
        assert values[(DATABASE_UP, frozenset())] == 1
        assert values[(f"{LAG}_count", frozenset())] == 3
        # The process-wide registry: the process collector's samples come along.
        assert ("process_resident_memory_bytes", frozenset()) in values

        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, timeout(20))
        assert code == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        print(log_path.read_text())  # shown by pytest when the test fails


async def _serving(target: str) -> bool:
    async with insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout(1)
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
