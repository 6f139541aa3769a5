"""`python -m persistence_svc`: migrate the history database, consume lifecycle events into
it, and serve HistoryService and UserService on HISTORY_SVC_LISTEN until SIGTERM; Prometheus
metrics on PERSISTENCE_METRICS_LISTEN (empty: none), stopped last."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from persistence_svc.config import Settings
from persistence_svc.metrics import PersistenceMetrics
from persistence_svc.server import PersistenceServer
from svckit import tracing
from svckit.lifecycle import freeze_startup_objects, run_service
from svckit.metrics import start_exporter


async def main(stop: asyncio.Event) -> None:
    settings = Settings()
    tracing.setup("persistence_svc", settings.otel_exporter_otlp_endpoint)
    # The process-wide registry: it also holds the process collector (RSS, CPU, open fds).
    server = PersistenceServer(settings, PersistenceMetrics(REGISTRY))
    exporter = None
    try:
        # Bound first: a taken port fails the start before anything else is opened.
        exporter = start_exporter(
            settings.persistence_metrics_listen, server.metrics.registry, service="persistence_svc"
        )
        await server.start()
        freeze_startup_objects()
        await stop.wait()
    finally:
        await server.shutdown()
        if exporter is not None:
            exporter.close()
        tracing.shutdown()


if __name__ == "__main__":
    run_service("persistence_svc", main, Settings().log_level)
