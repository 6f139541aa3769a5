"""The process lifecycle every service follows:
settings → open dependencies → serve → wait for SIGTERM/SIGINT → ordered shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from svckit import service_auth
from svckit.logs import configure_logging

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # prctl(2)

Main = Callable[[asyncio.Event], Coroutine[Any, Any, None]]

# A shutdown still going after this long is waiting on running work (task_svc's graces add up
# to more) or stuck: what every task is waiting on is logged, and every thread's stack is
# written to stderr a second later (faulthandler's own thread, so even a blocked event loop is
# seen), before a launcher's kill (tests: 20 s, Kubernetes: terminationGracePeriodSeconds)
# leaves nothing to read.
SLOW_SHUTDOWN_S = 15.0

# A cancel can be lost: on Python 3.11, asyncio.wait_for (under every nats-py request, KV
# operation and fetch) returns the result instead of raising when the future it waits on
# completes in the loop turn the cancel comes in, and a loop around it goes on. A shutdown
# that waited for such a loop waited forever; `cancel_and_wait` cancels again after this.
CANCEL_AGAIN_S = 1.0


def install_stop_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


def exit_with_parent(parent: int) -> None:
    """Linux: get SIGTERM when the parent process dies, even by SIGKILL, so a killed
    launcher leaves no service behind. Done here, in the service itself, before any thread
    starts: a `preexec_fn` in a launcher that has threads is not safe after fork."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


# Every event on the hot path allocates futures, tasks and messages that die young; with the
# default thresholds (700, 10, 10) the collector ran often enough to cost ~10 % of the CPU of
# a generation (zero-delay generations through the whole stack: 5.4-5.7 against 4.8-5.1 ms).
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_objects() -> None:
    """Move everything allocated so far (modules, gRPC, protobuf descriptors, the service's
    own long-lived parts: 45-90k objects) out of the cyclic collector's reach. They live as
    long as the process, and every full collection would otherwise walk them again while the
    event loop, and every stream on it, waits. Call it once the service has started."""
    gc.collect()
    gc.freeze()


def lower_priority(nice: int) -> None:
    """Make this process `nice` steps less urgent for the kernel's scheduler (os.nice), before
    any thread starts (on Linux a thread inherits the nice value of the one that creates it).
    A launcher that runs every service on one machine uses it so the acks' path (gateway_svc
    and nats-server) is served first when the CPUs are busy: tools/stack.py."""
    if nice > 0:
        os.nice(nice)


def run_service(name: str, main: Main, log_level: str = "INFO") -> None:
    """Run `main(stop)` on uvloop until it returns; `stop` is set on SIGTERM or SIGINT.
    With SB_PARENT_PID set (by the launcher) it also stops when that parent dies; with SB_NICE
    it runs at that lower CPU priority (`lower_priority`).

    `main` owns every task it spawns and must cancel and await them before returning.
    """
    configure_logging(name, log_level)
    service_auth.CALLER = name  # the caller its service tokens name
    tune_gc()
    lower_priority(int(os.environ.get("SB_NICE") or 0))
    if parent := os.environ.get("SB_PARENT_PID"):
        exit_with_parent(int(parent))

    async def entry() -> None:
        stop = asyncio.Event()
        install_stop_handlers(stop)
        watchdog = asyncio.create_task(report_slow_shutdown(stop), name="shutdown watchdog")
        try:
            await main(stop)
        finally:
            faulthandler.cancel_dump_traceback_later()
            await cancel_and_wait(watchdog)

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(entry())
    log.info("stopped")


async def report_slow_shutdown(stop: asyncio.Event, after_s: float = SLOW_SHUTDOWN_S) -> None:
    """Once `stop` is set, wait `after_s`; if the process is still shutting down by then,
    log what each asyncio task is waiting on (and have faulthandler dump the threads)."""
    await stop.wait()
    faulthandler.dump_traceback_later(after_s + 1, exit=False)
    await asyncio.sleep(after_s)
    current = asyncio.current_task()
    waiting = [_where(task) for task in asyncio.all_tasks() if task is not current]
    log.warning("shutdown still running", extra={"after_s": after_s, "tasks": waiting})


def _where(task: asyncio.Task[Any]) -> str:
    frames = task.get_stack()
    where = " <- ".join(
        f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
        for frame in reversed(frames)
    )
    return f"{task.get_name()}: {where or 'not started'}"


async def cancel_and_wait(
    *tasks: asyncio.Task[Any] | None, again_after_s: float = CANCEL_AGAIN_S
) -> None:
    """Cancel tasks and wait for them to finish; one still running `again_after_s` after
    its cancel is cancelled again (a cancel can be lost: CANCEL_AGAIN_S). Exceptions other
    than cancellation are logged, since shutdown must go on."""
    live = {t for t in tasks if t is not None and not t.done()}
    ended: list[asyncio.Task[Any]] = []
    while live:
        for task in live:
            task.cancel()
        done, live = await asyncio.wait(live, timeout=again_after_s)
        ended += done
        if live:
            log.warning("a cancel was lost; cancelling again", extra={"tasks": _names(live)})
    for task in ended:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("task failed during shutdown", exc_info=error)


def _names(tasks: set[asyncio.Task[Any]]) -> list[str]:
    return sorted(task.get_name() for task in tasks)
