"""Assembling task_svc from its parts, with one ordered, idempotent shutdown.

`TaskApp.start(settings)` opens NATS, ensures both streams, starts the lifecycle publisher,
the job engine, joins the cluster (membership.py: the node takes its shards, their jobs
rebuilt before it serves), then starts the gRPC server and the queue board; `shutdown()`
reports NOT_SERVING, hands every shard over (its running tasks may finish for
TASK_HANDOFF_GRACE_S, the rest are cut and resumed by the next holder), stops the engine,
then closes the gRPC server, the publisher, the LLM channel and NATS. Tests use it too.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2
from nats.aio.client import Client
from prometheus_client import CollectorRegistry

from svckit import tracing
from svckit.catalog import ModelCatalog
from svckit.grpc_server import GrpcServer, insecure_channel
from svckit.nats import (
    close_nats,
    connect_nats,
    ensure_stream,
    jobs_stream_config,
    task_events_stream_config,
)
from svckit.pubacks import AckedPublisher
from switchboard.v1 import llm_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from task_svc.config import Settings, advertise_addr, engine_config, node_id
from task_svc.events import LifecyclePublisher
from task_svc.jetstream_store import JetStreamJobStore
from task_svc.jobs import JobEngine
from task_svc.llm_client import LlmClient
from task_svc.membership import NodeMembership
from task_svc.metrics import TaskMetrics
from task_svc.queue_board import BoardPublisher
from task_svc.service import TaskService

log = logging.getLogger(__name__)

SERVICE_NAME = tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name


class TaskApp:
    def __init__(
        self,
        settings: Settings,
        nc: Client,
        llm_channel: grpc.aio.Channel,
        llm_client: LlmClient,
        publisher: LifecyclePublisher,
        engine: JobEngine,
        grpc_server: GrpcServer,
        catalog: ModelCatalog,
        board: BoardPublisher,
        membership: NodeMembership,
        metrics: TaskMetrics,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.llm_channel = llm_channel
        self.llm_client = llm_client
        self.publisher = publisher
        self.engine = engine
        self.grpc_server = grpc_server
        self.catalog = catalog
        self.board = board
        self.membership = membership
        self.metrics = metrics
        self._closed = False

    @property
    def port(self) -> int:
        return self.grpc_server.port

    @classmethod
    async def start(cls, settings: Settings, registry: CollectorRegistry | None = None) -> TaskApp:
        """Start every part; the metrics go on `registry` (a fresh one by default, so that
        apps started side by side in one process each have theirs). Nothing is exported
        here: `python -m task_svc` starts the exporter (TASK_METRICS_LISTEN)."""
        grpc_server: GrpcServer | None = None

        async def jetstream_link(up: bool) -> None:
            # Without NATS no job can be stored or taken: not ready, though alive.
            if grpc_server is not None:
                await grpc_server.set_ready(up)

        nc = await connect_nats(settings.nats_url, "task_svc", on_link=jetstream_link)
        js = nc.jetstream()
        replicas = settings.nats_stream_replicas
        await ensure_stream(js, jobs_stream_config(replicas))
        await ensure_stream(js, task_events_stream_config(replicas))
        llm_channel = insecure_channel(settings.llm_svc_addr)
        llm = llm_pb2_grpc.LlmServiceStub(llm_channel)
        acks = AckedPublisher(nc)  # one reply subscription for every publish of this node
        publisher = LifecyclePublisher(acks)
        llm_client = LlmClient(llm, settings.task_llm_streams)
        store = JetStreamJobStore(
            nc,
            acks,
            consumer=settings.task_consumer,
            ack_wait_s=settings.task_job_ack_wait_s,
            max_ack_pending=settings.task_max_ack_pending,
        )
        engine = JobEngine(store, publisher, llm_client, engine_config(settings))
        if tracing.enabled():  # each lifecycle event joins its job's trace
            publisher.trace_of = engine.traceparent_of
        metrics = TaskMetrics(engine, registry)
        catalog = ModelCatalog(llm, settings.task_models_cache_s)
        service = TaskService(
            engine, catalog, max_prompt_chars=settings.task_max_prompt_chars, node=node_id(settings)
        )
        board = BoardPublisher(
            nc, engine.queues, settings.task_queue_board_interval_s, node_id(settings)
        )
        grpc_server = GrpcServer(
            settings.task_svc_listen,
            lambda server: tasks_pb2_grpc.add_TaskServiceServicer_to_server(service, server),
            [SERVICE_NAME],
        )
        membership = NodeMembership(
            js,
            engine,
            node=node_id(settings),
            address=advertise_addr(settings),
            lease_s=settings.task_lease_s,
            replicas=replicas,
            handoff_grace_s=settings.task_handoff_grace_s,
        )
        app = cls(
            settings,
            nc,
            llm_channel,
            llm_client,
            publisher,
            engine,
            grpc_server,
            catalog,
            board,
            membership,
            metrics,
        )
        try:
            await engine.start(shards=())
            await membership.start()
            await grpc_server.start()
            board.start()
        except BaseException:
            await app.shutdown()
            raise
        return app

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        grace = self.settings.task_shutdown_grace_s
        for name in ["", SERVICE_NAME]:
            await self.grpc_server.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.board.close()
        await self.membership.leave()
        await self.engine.shutdown(grace)
        # Watch streams of finished tasks have ended; what is left gets a short grace.
        await self.grpc_server.stop(1.0)
        # Lifecycle events are never given up lightly: at least a few seconds to go out.
        await self.publisher.close(max(grace, 5.0))
        await self.catalog.close()
        await self.llm_client.close()
        await self.llm_channel.close()
        await close_nats(self.nc)
        log.info("task_svc stopped")
