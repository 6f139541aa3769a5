"""The whole persistence service as one object: open dependencies, serve, shut down in order.

Start order: database engine and Alembic migrations (retried before the first use if the
database is down) → NATS → ensure the SB_TASK_EVENTS stream (so it does not matter whether
task_svc started first) → durable consumer → gRPC HistoryService and UserService on one
server → the watch: every few seconds it refreshes the durable consumer's gauges and, while no
write is due to tell, checks the database (HistoryService's health entry follows the database,
whether a write or the check found it gone) → the pruning of tombstones past their retention
(PERSISTENCE_TOMBSTONE_RETENTION_S), at start and every PERSISTENCE_TOMBSTONE_PRUNE_INTERVAL_S.
Shutdown is the reverse, idempotent, and bounded.

Metrics live on `self.metrics` (persistence_svc.metrics); the process entry (__main__) exports
them, never this class: tests start several servers in one process.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import grpc
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.client import JetStreamContext

from persistence_svc.backlog import Backlog
from persistence_svc.config import Settings
from persistence_svc.consumer import DURABLE_NAME, RETRY_DELAYS_S, EventConsumer
from persistence_svc.errors import StorageUnavailable
from persistence_svc.metrics import PersistenceMetrics
from persistence_svc.repository import Repository
from persistence_svc.service import HistoryService
from persistence_svc.users import PreferencesCache, UserService
from svckit.grpc_server import GrpcServer
from svckit.lifecycle import cancel_and_wait
from svckit.nats import (
    TASK_EVENTS_STREAM,
    close_nats,
    connect_nats,
    ensure_stream,
    task_events_stream_config,
)
from switchboard.v1 import history_pb2, history_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = history_pb2.DESCRIPTOR.services_by_name["HistoryService"].full_name
USER_SERVICE_NAME = history_pb2.DESCRIPTOR.services_by_name["UserService"].full_name

# How often the watch runs: how stale the consumer gauges may be, and how long an outage of
# an idle database may go unreported.
WATCH_INTERVAL_S = 5.0
# A database that does not answer SELECT 1 within this is as good as down for reads.
CHECK_TIMEOUT_S = 5.0


class PersistenceServer:
    def __init__(
        self,
        settings: Settings,
        metrics: PersistenceMetrics | None = None,
        *,
        watch_interval_s: float = WATCH_INTERVAL_S,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else PersistenceMetrics()
        self.watch_interval_s = watch_interval_s
        self.repository: Repository | None = None
        self.nc: Client | None = None
        self.consumer: EventConsumer | None = None
        self.grpc: GrpcServer | None = None
        self._js: JetStreamContext | None = None
        self._consumer_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._prune_task: asyncio.Task[None] | None = None
        self._shutdown_done = False

    @property
    def port(self) -> int:
        return self.grpc.port if self.grpc else 0

    async def start(self) -> None:
        settings = self.settings
        self.repository = await Repository.open(settings.database_url)
        self.nc = await connect_nats(settings.nats_url, "persistence_svc")
        js = self._js = self.nc.jetstream()
        await ensure_stream(js, task_events_stream_config(settings.nats_stream_replicas))
        self.consumer = EventConsumer(
            self.nc,
            self.repository,
            batch_size=settings.persistence_batch_size,
            linger_s=settings.persistence_linger_ms / 1000,
            ack_wait_s=settings.persistence_ack_wait_s,
            retry_delays_s=[min(d, settings.persistence_retry_max_s) for d in RETRY_DELAYS_S],
            on_database=self._database,
            metrics=self.metrics,
        )
        await self.consumer.start()
        self._consumer_task = asyncio.create_task(self.consumer.run(), name="persistence-consumer")
        history = HistoryService(self.repository, Backlog(js))
        users = UserService(
            self.repository,
            PreferencesCache(
                settings.persistence_preferences_cache_size,
                settings.persistence_preferences_cache_ttl_s,
            ),
        )

        def register(server: grpc.aio.Server) -> None:
            history_pb2_grpc.add_HistoryServiceServicer_to_server(history, server)
            history_pb2_grpc.add_UserServiceServicer_to_server(users, server)

        self.grpc = GrpcServer(
            settings.history_svc_listen,
            register,
            [SERVICE_NAME, USER_SERVICE_NAME],
        )
        await self.grpc.start()
        # Once now, whatever is pending: the database may have been down since
        # Repository.open (which only logs it), and no write may come to say so.
        await self._watch_once(check=True)
        self._watch_task = asyncio.create_task(self._watch(), name="persistence-watch")
        self._prune_task = asyncio.create_task(self._prune(), name="persistence-prune")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval_s)
            try:
                await self._watch_once(check=False)
            except Exception:
                # A bug here must not end the watch (and freeze health) unnoticed.
                log.exception("persistence watch failed")

    async def _prune(self) -> None:
        settings = self.settings
        while True:
            await self.prune_once()
            await asyncio.sleep(settings.persistence_tombstone_prune_interval_s)

    async def prune_once(self) -> int:
        """Prune the tombstones past their retention; how many. A database that is down
        is tried again at the next round: a tombstone kept longer only costs its row."""
        assert self.repository is not None
        retention = timedelta(seconds=self.settings.persistence_tombstone_retention_s)
        try:
            pruned = await self.repository.prune_tombstones(datetime.now(UTC) - retention)
        except StorageUnavailable as error:
            log.info("tombstones not pruned this time", extra={"error": str(error)})
            return 0
        except Exception:
            # A bug here must not end the loop (tombstones would pile up unnoticed).
            log.exception("pruning tombstones failed")
            return 0
        if pruned:
            log.info("tombstones pruned", extra={"tombstones": pruned})
        return pruned

    async def _watch_once(self, *, check: bool) -> None:
        waiting = await self._refresh_consumer()
        # A write is the truest test of the database, and one is due while messages wait:
        # its outcome tells within a back-off. With none waiting (or NATS not answering),
        # nothing would tell: check with a SELECT 1.
        if check or not waiting:
            await self._check_database()

    async def _refresh_consumer(self) -> int | None:
        """Refresh the durable consumer's gauges; how many messages wait for a write (None:
        unknown). Here, not per scrape: the exporter thread never talks to NATS."""
        assert self._js is not None
        try:
            info = await self._js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
        except (NatsError, TimeoutError) as error:
            log.debug("consumer info unavailable", extra={"error": str(error)})
            return None  # the gauges keep their last values
        pending, ack_pending = info.num_pending or 0, info.num_ack_pending or 0
        self.metrics.consumer(DURABLE_NAME, pending, ack_pending)
        return pending + ack_pending

    async def _check_database(self) -> None:
        assert self.consumer is not None and self.repository is not None
        consumer, stats = self.consumer, self.consumer.stats
        writes_before = (stats.batches, stats.failed_writes)
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                await self.repository.ping()
            up = True
        except (StorageUnavailable, TimeoutError) as error:
            up = False
            if consumer.database_up:
                log.warning("database unavailable", extra={"error": str(error) or "timeout"})
        # A write that ended during the check saw the database later than it did: it wins.
        if (stats.batches, stats.failed_writes) == writes_before:
            await consumer.note_database(up)

    async def _database(self, up: bool) -> None:
        # History reads need the database; the process itself goes on (events wait in
        # JetStream), so only the HistoryService entry says so, not "" (liveness).
        if self.grpc is not None:
            await self.grpc.set_ready(up, [SERVICE_NAME])

    async def shutdown(self) -> None:
        """Stop the watch and the pruning → health NOT_SERVING and drain gRPC → stop fetching
        and finish the batch in flight (bounded) → close NATS → dispose the engine. Safe to
        call twice or after a failed start."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        grace = self.settings.persistence_shutdown_grace_s
        await cancel_and_wait(self._watch_task)  # before what it reads is closed
        await cancel_and_wait(self._prune_task)  # a chunk cut short is rolled back
        if self.grpc is not None:
            await self.grpc.stop(grace)
        if self.consumer is not None:
            self.consumer.stop()
        if self._consumer_task is not None:
            done, _ = await asyncio.wait({self._consumer_task}, timeout=grace + 1.0)
            if not done:
                log.warning("consumer did not stop in time; cancelling its batch")
            await cancel_and_wait(self._consumer_task)
        if self.nc is not None:
            await close_nats(self.nc)  # flushes the acks of the last batch
        if self.repository is not None:
            await self.repository.close()
        log.info("persistence_svc stopped")
