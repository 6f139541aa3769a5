"""`python -m task_svc`: settings → metrics exporter (when TASK_METRICS_LISTEN is set) → NATS
and streams → engine and gRPC → wait for SIGTERM (or for the engine to break: then exit
non-zero) → shutdown → stop the exporter."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from svckit import tracing
from svckit.lifecycle import freeze_startup_objects, run_service
from svckit.metrics import start_exporter
from task_svc.app import TaskApp
from task_svc.config import Settings


async def main(stop: asyncio.Event) -> None:
    settings = Settings()
    tracing.setup("task_svc", settings.otel_exporter_otlp_endpoint)
    # Bound before the node joins the cluster, so a taken port fails the start-up without
    # shards moving here and away again. The process-wide registry: it also holds the
    # process collector (RSS, CPU, open fds) and the GC one.
    exporter = start_exporter(settings.task_metrics_listen, REGISTRY, service="task_svc")
    try:
        app = await TaskApp.start(settings, REGISTRY)
        await serve(app, stop)
    finally:
        if exporter is not None:
            exporter.close()
        tracing.shutdown()


async def serve(app: TaskApp, stop: asyncio.Event) -> None:
    """Run until SIGTERM or a broken engine, then shut the app down."""
    freeze_startup_objects()
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(app.engine.broken.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await app.shutdown()
    if app.engine.broken.is_set():  # let it crash: the launcher starts a new one
        raise SystemExit("task_svc: an engine loop kept crashing")


if __name__ == "__main__":
    run_service("task_svc", main, Settings().log_level)
