"""The process lifecycle every service follows:
settings → open dependencies → serve → wait for SIGTERM/SIGINT → ordered shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from svckit.logs import configure_logging

log = logging.getLogger(__name__)

Main = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def install_stop_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


def run_service(name: str, main: Main, log_level: str = "INFO") -> None:
    """Run `main(stop)` on uvloop until it returns; `stop` is set on SIGTERM or SIGINT.

    `main` owns every task it spawns and must cancel and await them before returning.
    """
    configure_logging(name, log_level)

    async def entry() -> None:
        stop = asyncio.Event()
        install_stop_handlers(stop)
        await main(stop)

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(entry())
    log.info("stopped")


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel tasks and wait for them to finish; exceptions other than cancellation are
    logged, since shutdown must go on."""
    live = [t for t in tasks if t is not None and not t.done()]
    for task in live:
        task.cancel()
    for result in await asyncio.gather(*live, return_exceptions=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            log.error("task failed during shutdown", exc_info=result)
