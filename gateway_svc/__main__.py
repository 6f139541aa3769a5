"""`python -m gateway_svc`: settings → gRPC channels to task_svc → NATS and llm_svc for the
acks' own path (GATEWAY_DIRECT_SUBMIT) → metrics exporter (when GATEWAY_METRICS_LISTEN is set)
→ health server → WebSocket server → wait for SIGTERM → NOT_SERVING, close sockets with 1001,
close the channels and NATS, stop the exporter."""

from __future__ import annotations

import asyncio
import logging
import sys

from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from gateway_svc.config import Settings
from gateway_svc.direct_submit import DirectSubmit
from gateway_svc.metrics import GatewayMetrics
from gateway_svc.server import Gateway
from gateway_svc.tokens import SecretConfigError, secret_from
from svckit import tracing
from svckit.catalog import ModelCatalog
from svckit.direct_publisher import DirectPublisher
from svckit.grpc_server import GrpcServer, insecure_channel
from svckit.lifecycle import freeze_startup_objects, run_service
from svckit.membership import MembershipView
from svckit.metrics import start_exporter
from svckit.nats import NatsVersionError, connect_nats
from switchboard.v1 import llm_pb2_grpc, tasks_pb2_grpc

log = logging.getLogger("gateway_svc")

SERVICE_NAME = "switchboard.gateway"  # what the health check reports on; no gRPC API
DIRECT_CONNECT_TIMEOUT_S = 10.0


async def serve(settings: Settings, secret: bytes, stop: asyncio.Event) -> None:
    tracing.setup("gateway_svc", settings.otel_exporter_otlp_endpoint)
    channel = insecure_channel(settings.task_svc_addr)  # every socket's Watch streams
    # Submits (one SubmitMany stream) and Cancel on a connection of their own: an ack never
    # queues behind the watches' traffic.
    control = insecure_channel(settings.task_svc_addr)
    direct = await direct_submit(settings)
    health = GrpcServer(settings.gateway_grpc_listen, lambda _server: None, [SERVICE_NAME])
    # The process-wide registry: it also holds the process collector (RSS, CPU, open fds).
    metrics = GatewayMetrics(REGISTRY)
    gateway = Gateway(
        settings,
        secret,
        tasks_pb2_grpc.TaskServiceStub(channel),
        metrics,
        control=tasks_pb2_grpc.TaskServiceStub(control),
        direct=direct,
        membership=await membership(settings, direct),
    )
    exporter = None
    try:
        exporter = start_exporter(
            settings.gateway_metrics_listen, metrics.registry, service="gateway_svc"
        )
        await health.start()
        await gateway.start()
        freeze_startup_objects()
        await stop.wait()
        log.info("shutting down")
    finally:
        # Ordered and idempotent: NOT_SERVING first, then every socket closed with 1001,
        # then the health server and the channel to task_svc.
        for name in ("", SERVICE_NAME):
            await health.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await gateway.stop()
        await health.stop(0)
        await channel.close()
        await control.close()
        if direct is not None:
            await direct.close()
        if exporter is not None:
            exporter.close()
        tracing.shutdown()


async def direct_submit(settings: Settings) -> DirectSubmit | None:
    """The acks' own path, or None (off, or NATS unreachable: task_svc stores every job)."""
    if not settings.gateway_direct_submit:
        return None
    try:
        nc = await connect_nats(settings.nats_url, "gateway_svc", DIRECT_CONNECT_TIMEOUT_S)
    except (ConnectionError, NatsVersionError) as error:
        log.warning("acks go through task_svc", extra={"error": str(error)})
        return None
    llm_channel = insecure_channel(settings.llm_svc_addr)
    catalog = ModelCatalog(
        llm_pb2_grpc.LlmServiceStub(llm_channel), settings.gateway_models_cache_s
    )
    publisher = DirectPublisher(settings.nats_url, "gateway_svc acks")
    direct = DirectSubmit(nc, catalog, llm_channel=llm_channel, publisher=publisher)
    await direct.start()
    return direct


async def membership(settings: Settings, direct: DirectSubmit | None) -> MembershipView | None:
    """Where each task's task_svc node is (routes.py), read over the acks' NATS connection;
    None without one (every call then goes to TASK_SVC_ADDR)."""
    if direct is None:
        return None
    view = MembershipView(direct.nc.jetstream(), settings.task_lease_s)
    await view.open()
    return view


def main() -> None:
    settings = Settings()
    try:
        secret = secret_from(settings)
    except SecretConfigError as error:
        sys.exit(f"gateway_svc: {error}")
    run_service("gateway_svc", lambda stop: serve(settings, secret, stop), settings.log_level)


if __name__ == "__main__":
    main()
