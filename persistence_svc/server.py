"""The whole persistence service as one object: open dependencies, serve, shut down in order.

Start order: database engine and Alembic migrations (retried before the first use if the
database is down) → NATS → ensure the SB_TASK_EVENTS stream (so it does not matter whether
task_svc started first) → durable consumer → gRPC HistoryService and UserService on one
server. Shutdown is the reverse, idempotent, and bounded.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from nats.aio.client import Client

from persistence_svc.config import Settings
from persistence_svc.consumer import RETRY_DELAYS_S, EventConsumer
from persistence_svc.repository import Repository
from persistence_svc.service import HistoryService
from persistence_svc.users import PreferencesCache, UserService
from svckit.grpc_server import GrpcServer
from svckit.lifecycle import cancel_and_wait
from svckit.nats import close_nats, connect_nats, ensure_stream, task_events_stream_config
from switchboard.v1 import history_pb2, history_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = history_pb2.DESCRIPTOR.services_by_name["HistoryService"].full_name
USER_SERVICE_NAME = history_pb2.DESCRIPTOR.services_by_name["UserService"].full_name


class PersistenceServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repository: Repository | None = None
        self.nc: Client | None = None
        self.consumer: EventConsumer | None = None
        self.grpc: GrpcServer | None = None
        self._consumer_task: asyncio.Task[None] | None = None
        self._shutdown_done = False

    @property
    def port(self) -> int:
        return self.grpc.port if self.grpc else 0

    async def start(self) -> None:
        settings = self.settings
        self.repository = await Repository.open(settings.database_url)
        self.nc = await connect_nats(settings.nats_url, "persistence_svc")
        js = self.nc.jetstream()
        await ensure_stream(js, task_events_stream_config(settings.nats_stream_replicas))
        self.consumer = EventConsumer(
            js,
            self.repository,
            batch_size=settings.persistence_batch_size,
            linger_s=settings.persistence_linger_ms / 1000,
            ack_wait_s=settings.persistence_ack_wait_s,
            retry_delays_s=[min(d, settings.persistence_retry_max_s) for d in RETRY_DELAYS_S],
            on_database=self._database,
        )
        await self.consumer.start()
        self._consumer_task = asyncio.create_task(self.consumer.run(), name="persistence-consumer")
        history = HistoryService(self.repository)
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

    async def _database(self, up: bool) -> None:
        # History reads need the database; the process itself goes on (events wait in
        # JetStream), so only the HistoryService entry says so, not "" (liveness).
        if self.grpc is not None:
            await self.grpc.set_ready(up, [SERVICE_NAME])

    async def shutdown(self) -> None:
        """Health NOT_SERVING and drain gRPC → stop fetching and finish the batch in flight
        (bounded) → close NATS → dispose the engine. Safe to call twice or after a failed
        start."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        grace = self.settings.persistence_shutdown_grace_s
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
