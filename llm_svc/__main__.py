"""`python -m llm_svc`: serve LlmService on LLM_SVC_LISTEN until SIGTERM."""

from __future__ import annotations

import asyncio

from llm_svc.config import Settings
from llm_svc.server import LlmServer
from svckit.lifecycle import freeze_startup_objects, run_service


async def main(stop: asyncio.Event) -> None:
    server = LlmServer(Settings())
    try:
        await server.start()
        freeze_startup_objects()
        await stop.wait()
    finally:
        await server.shutdown()


if __name__ == "__main__":
    run_service("llm_svc", main, Settings().log_level)
