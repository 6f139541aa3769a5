"""The in-memory scheduler of one job queue, with no I/O: priorities 0 (highest) to 9, FIFO
within a priority, a concurrency limit, and aging against starvation. JetStream holds the jobs
durably but has no per-message priority (docs/architecture.md), so the order in which they run
is decided here.

Starvation: with strict priorities a steady stream of priority-0 work would keep a priority-9
task waiting forever. Each waiting task therefore gains one priority level per `aging_s`
seconds it has waited (its effective priority is `priority - waited // aging_s`, at best 0);
among equal effective priorities the one that has waited longest goes first. A priority-9 task
thus runs after at most about `9 * aging_s` seconds plus the work already at priority 0 ahead
of it. Within one priority the oldest task has the best effective priority, so only the ten
heads are compared to pick the next task (O(1)), and the whole order is a merge of ten
sorted lists.

`ThroughputMeter` turns measured run times into the eta of a queue position.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from svckit.queueing import eta_ms

PRIORITIES = 10

Clock = Callable[[], float]


class Scheduler:
    def __init__(
        self, concurrency: int, *, aging_s: float = 0.0, clock: Clock = time.monotonic
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.aging_s = aging_s  # 0: strict priorities, no aging
        self.clock = clock
        # One insertion-ordered dict per priority (task id -> enqueued at): FIFO, and O(1)
        # removal on cancel.
        self._waiting: list[dict[str, float]] = [{} for _ in range(PRIORITIES)]
        self._priority: dict[str, int] = {}
        self.running: set[str] = set()

    def push(self, task_id: str, priority: int) -> None:
        if task_id in self._priority or task_id in self.running:
            return
        priority = min(max(priority, 0), PRIORITIES - 1)
        self._waiting[priority][task_id] = self.clock()
        self._priority[task_id] = priority

    def remove(self, task_id: str) -> bool:
        """Take a waiting task out (cancel); False if it is not waiting."""
        priority = self._priority.pop(task_id, None)
        if priority is None:
            return False
        del self._waiting[priority][task_id]
        return True

    def is_waiting(self, task_id: str) -> bool:
        return task_id in self._priority

    @property
    def waiting(self) -> int:
        return len(self._priority)

    @property
    def free_slots(self) -> int:
        return max(0, self.concurrency - len(self.running))

    def _key(self, priority: int, enqueued: float, now: float) -> tuple[int, float]:
        if self.aging_s > 0:
            priority = max(0, priority - int((now - enqueued) // self.aging_s))
        return priority, enqueued

    def order(self) -> Iterator[str]:
        """Waiting task ids in the order they would start now."""
        now = self.clock()
        lists = [self._keyed(p, queue, now) for p, queue in enumerate(self._waiting) if queue]
        return (task_id for _, task_id in heapq.merge(*lists))

    def _keyed(
        self, priority: int, queue: dict[str, float], now: float
    ) -> Iterator[tuple[tuple[int, float], str]]:
        for task_id, enqueued in queue.items():
            yield self._key(priority, enqueued, now), task_id

    def position_for(self, priority: int) -> int:
        """The 1-based position a task pushed now with `priority` would have."""
        priority = min(max(priority, 0), PRIORITIES - 1)
        now = self.clock()
        ahead = sum(len(q) for q in self._waiting[: priority + 1])
        if self.aging_s > 0:
            # Lower priorities old enough to have aged up to `priority` are ahead too; each
            # list is oldest first, so stop at the first one still too young.
            for p in range(priority + 1, PRIORITIES):
                for t in self._waiting[p].values():
                    if self._key(p, t, now)[0] > priority:
                        break
                    ahead += 1
        return ahead + 1

    def oldest_wait_s(self) -> float:
        """How long the longest-waiting task has waited, 0 when none waits. Each priority's
        tasks are oldest first, so only the ten heads are read: cheap enough for a scrape."""
        heads = [next(iter(queue.values()), None) for queue in self._waiting if queue]
        enqueued = [t for t in heads if t is not None]
        return max(0.0, self.clock() - min(enqueued)) if enqueued else 0.0

    def waiting_by_priority(self) -> list[int]:
        return [len(q) for q in self._waiting]

    def position(self, task_id: str) -> int:
        """The 1-based position of a waiting task (0 if it is not waiting); O(n)."""
        if task_id not in self._priority:
            return 0
        for index, queued in enumerate(self.order(), start=1):
            if queued == task_id:
                return index
        return 0

    def next_ready(self) -> str | None:
        """The next task to start, if a slot is free (it then counts as running)."""
        if len(self.running) >= self.concurrency:
            return None
        now = self.clock()
        best: tuple[tuple[int, float], int, str] | None = None
        for p, queue in enumerate(self._waiting):
            if queue:
                task_id, t = next(iter(queue.items()))
                candidate = (self._key(p, t, now), p, task_id)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        _, p, task_id = best
        del self._waiting[p][task_id]
        del self._priority[task_id]
        self.running.add(task_id)
        return task_id

    def finished(self, task_id: str) -> None:
        self.running.discard(task_id)


@dataclass
class ThroughputMeter:
    """An exponentially weighted mean of how long a task runs, for eta estimates, and how
    many runs it has seen (`samples`: the queue's finished runs, QueueStats.finished)."""

    mean_s: float = 0.0
    samples: int = 0
    weight: float = 0.2

    def record(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.mean_s = (
            seconds if self.samples == 0 else self.mean_s + self.weight * (seconds - self.mean_s)
        )
        self.samples += 1

    def eta_ms(self, position: int, free_slots: int, concurrency: int) -> int:
        return eta_ms(position, free_slots, concurrency, self.mean_s)
