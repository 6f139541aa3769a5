"""`python -m gateway_svc`: settings → gRPC channel to task_svc → metrics exporter (when
GATEWAY_METRICS_LISTEN is set) → health server → WebSocket server → wait for SIGTERM →
NOT_SERVING, close sockets with 1001, close the channel, stop the exporter."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys

from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY

from gateway_svc.config import Settings
from gateway_svc.metrics import GatewayMetrics
from gateway_svc.server import Gateway
from gateway_svc.tokens import SecretConfigError, secret_from
from svckit.grpc_server import GrpcServer, insecure_channel
from svckit.lifecycle import run_service
from svckit.metrics import start_exporter
from switchboard.v1 import tasks_pb2_grpc

log = logging.getLogger("gateway_svc")

SERVICE_NAME = "switchboard.gateway"  # what the health check reports on; no gRPC API


async def serve(settings: Settings, secret: bytes, stop: asyncio.Event) -> None:
    channel = insecure_channel(settings.task_svc_addr)  # every socket's Watch streams
    # Submits (one SubmitMany stream) and Cancel on a connection of their own: an ack never
    # queues behind the watches' traffic.
    control = insecure_channel(settings.task_svc_addr, own_connection=True)
    health = GrpcServer(settings.gateway_grpc_listen, lambda _server: None, [SERVICE_NAME])
    # The process-wide registry: it also holds the process collector (RSS, CPU, open fds).
    metrics = GatewayMetrics(REGISTRY)
    gateway = Gateway(
        settings,
        secret,
        tasks_pb2_grpc.TaskServiceStub(channel),
        metrics,
        control=tasks_pb2_grpc.TaskServiceStub(control),
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
        if exporter is not None:
            exporter.close()


def freeze_startup_objects() -> None:
    """Move everything allocated so far (modules, gRPC, protobuf descriptors: ~45k objects)
    out of the cyclic collector's reach. They live as long as the process, and every full
    collection would otherwise walk them again while holding up every socket."""
    gc.collect()
    gc.freeze()


def main() -> None:
    settings = Settings()
    try:
        secret = secret_from(settings)
    except SecretConfigError as error:
        sys.exit(f"gateway_svc: {error}")
    run_service("gateway_svc", lambda stop: serve(settings, secret, stop), settings.log_level)


if __name__ == "__main__":
    main()
