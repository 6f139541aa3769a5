"""`python -m task_svc`: settings → NATS and streams → engine and gRPC → wait for SIGTERM
(or for the engine to break: then exit non-zero) → shutdown."""

from __future__ import annotations

import asyncio

from svckit.lifecycle import freeze_startup_objects, run_service
from task_svc.app import TaskApp
from task_svc.config import Settings


async def main(stop: asyncio.Event) -> None:
    app = await TaskApp.start(Settings())
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
