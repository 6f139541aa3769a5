"""`python -m task_svc`: settings → NATS and streams → engine and gRPC → wait → shutdown."""

from __future__ import annotations

import asyncio

from svckit.lifecycle import run_service
from task_svc.app import TaskApp
from task_svc.config import Settings


async def main(stop: asyncio.Event) -> None:
    app = await TaskApp.start(Settings())
    try:
        await stop.wait()
    finally:
        await app.shutdown()


if __name__ == "__main__":
    run_service("task_svc", main, Settings().log_level)
