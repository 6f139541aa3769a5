"""`python -m persistence_svc`: migrate the history database, consume lifecycle events into
it, and serve HistoryService and UserService on HISTORY_SVC_LISTEN until SIGTERM."""

from __future__ import annotations

import asyncio

from persistence_svc.config import Settings
from persistence_svc.server import PersistenceServer
from svckit.lifecycle import freeze_startup_objects, run_service


async def main(stop: asyncio.Event) -> None:
    server = PersistenceServer(Settings())
    try:
        await server.start()
        freeze_startup_objects()
        await stop.wait()
    finally:
        await server.shutdown()


if __name__ == "__main__":
    run_service("persistence_svc", main, Settings().log_level)
