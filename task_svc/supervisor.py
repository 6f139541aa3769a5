"""A small one-for-one supervisor for asyncio actors (OTP's `one_for_one` strategy).

Each child is a coroutine function (an actor's loop). If it raises, only that child is run
again, after an exponential backoff (`backoff_s`, doubling per recent crash, at most
`max_backoff_s`), so a child crashing on every start does not spin; if it crashes more than
`max_restarts` times within `period_s` seconds (OTP's restart intensity), the supervisor stops
restarting it and calls its `on_give_up`. A child that returns normally, or is cancelled, is
done and forgotten (`on_exit` is called). Restarting the *loop* rather than re-creating the
object lets an actor carry on from the state it holds.

A child may be started again under the same id once it has returned (a hibernating actor's
loop ends when its mailbox is empty and is started again by the next message): its recent
crashes are remembered across such runs, so the intensity limit still holds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from svckit.backoff import exponential
from svckit.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)

ChildFn = Callable[[], Coroutine[Any, Any, None]]


@dataclass
class _History:
    """Recent crashes of one child id (kept only while some are within the period)."""

    crashes: collections.deque[float] = field(default_factory=collections.deque)
    restarts: int = 0


@dataclass
class _Child:
    child_id: str
    run: ChildFn
    on_exit: Callable[[], None] | None
    on_give_up: Callable[[BaseException], None] | None
    task: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(
        self,
        name: str,
        *,
        max_restarts: int = 3,
        period_s: float = 5.0,
        backoff_s: float = 0.0,
        max_backoff_s: float = 2.0,
    ) -> None:
        self.name = name
        self.max_restarts = max_restarts
        self.period_s = period_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._children: dict[str, _Child] = {}
        self._history: dict[str, _History] = {}
        self._closed = False
        # Restarts of any child since start: a plain int a metrics collector reads at scrape
        # time (task_svc/metrics.py), so counting costs the crash path one addition.
        self.restarted = 0

    def start_child(
        self,
        child_id: str,
        run: ChildFn,
        *,
        on_exit: Callable[[], None] | None = None,
        on_give_up: Callable[[BaseException], None] | None = None,
    ) -> None:
        if self._closed:
            raise RuntimeError(f"supervisor {self.name} is stopped")
        existing = self._children.get(child_id)
        if existing is not None and not (existing.task is not None and existing.task.done()):
            raise ValueError(f"child {child_id} is already supervised")
        child = _Child(child_id, run, on_exit, on_give_up)
        self._children[child_id] = child
        child.task = asyncio.create_task(self._supervise(child), name=f"{self.name}:{child_id}")
        # A done callback, not a `finally`: a task cancelled before its first step never
        # enters its coroutine, and its child must still be forgotten.
        child.task.add_done_callback(lambda _: self._forget(child))

    def restarts(self, child_id: str) -> int:
        """Restarts of `child_id` while its crashes are recent (within the period)."""
        history = self._history.get(child_id)
        return history.restarts if history is not None else 0

    def __contains__(self, child_id: str) -> bool:
        return child_id in self._children

    def __len__(self) -> int:
        return len(self._children)

    def _forget(self, child: _Child) -> None:
        if self._children.get(child.child_id) is child:
            del self._children[child.child_id]
        history = self._history.get(child.child_id)
        if history is not None and self._prune(history, time.monotonic()) == 0:
            del self._history[child.child_id]
        if child.on_exit is not None:
            try:
                child.on_exit()
            except Exception:
                log.exception("on_exit failed", extra={"child": child.child_id})

    async def _supervise(self, child: _Child) -> None:
        while True:
            try:
                await child.run()
                return
            except Exception as error:
                now = time.monotonic()
                history = self._history.setdefault(child.child_id, _History())
                history.crashes.append(now)
                recent = self._prune(history, now)
                if recent > self.max_restarts:
                    log.error(
                        "child crashed too often, giving up",
                        extra={"supervisor": self.name, "child": child.child_id},
                        exc_info=error,
                    )
                    if child.on_give_up is not None:
                        child.on_give_up(error)
                    return
                history.restarts += 1
                self.restarted += 1
                delay = exponential(recent, self.backoff_s, self.max_backoff_s)
                log.warning(
                    "child crashed, restarting",
                    extra={"supervisor": self.name, "child": child.child_id, "delay_s": delay},
                    exc_info=error,
                )
                if delay > 0:
                    await asyncio.sleep(delay)

    def _prune(self, history: _History, now: float) -> int:
        while history.crashes and history.crashes[0] < now - self.period_s:
            history.crashes.popleft()
        return len(history.crashes)

    def terminate(self, child_id: str) -> None:
        """Stop one child (cancelled: not restarted); its `on_exit` runs."""
        child = self._children.get(child_id)
        if child is not None and child.task is not None:
            child.task.cancel()

    async def stop(self) -> None:
        """Cancel every child and wait for them (idempotent)."""
        self._closed = True
        await cancel_and_wait(*(child.task for child in self._children.values()))
