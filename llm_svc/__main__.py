"""`python -m llm_svc`: serve LlmService on LLM_SVC_LISTEN, and its metrics on
LLM_METRICS_LISTEN when set, until SIGTERM; then stop the server, then the exporter."""

from __future__ import annotations

import asyncio

from prometheus_client import REGISTRY

from llm_svc.config import Settings
from llm_svc.metrics import LlmMetrics
from llm_svc.server import LlmServer
from svckit import tracing
from svckit.lifecycle import freeze_startup_objects, run_service
from svckit.metrics import start_exporter


async def main(stop: asyncio.Event) -> None:
    settings = Settings()
    tracing.setup("llm_svc", settings.otel_exporter_otlp_endpoint)
    # The process-wide registry: it also holds the process collector (RSS, CPU, open fds).
    server = LlmServer(settings, LlmMetrics(REGISTRY))
    exporter = None
    try:
        # Bound before serving: a taken metrics port fails the start-up, as it should.
        exporter = start_exporter(
            settings.llm_metrics_listen, server.metrics.registry, service="llm_svc"
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
    run_service("llm_svc", main, Settings().log_level)
