"""The in-memory scheduler of one job queue, with no I/O: priorities 0 (highest) to 9, FIFO
within a priority, and a concurrency limit. JetStream holds the jobs durably but has no
per-message priority (DESIGN.md, decisions), so the order in which they run is decided here.

`ThroughputMeter` turns measured run times into the eta of a queue position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRIORITIES = 10


class Scheduler:
    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        # One insertion-ordered dict per priority: FIFO, and O(1) removal on cancel.
        self._waiting: list[dict[str, None]] = [{} for _ in range(PRIORITIES)]
        self._priority: dict[str, int] = {}
        self.running: set[str] = set()

    def push(self, task_id: str, priority: int) -> None:
        if task_id in self._priority or task_id in self.running:
            return
        priority = min(max(priority, 0), PRIORITIES - 1)
        self._waiting[priority][task_id] = None
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

    def position_for(self, priority: int) -> int:
        """The 1-based position a task pushed now with `priority` would have."""
        priority = min(max(priority, 0), PRIORITIES - 1)
        return 1 + sum(len(q) for q in self._waiting[: priority + 1])

    def position(self, task_id: str) -> int:
        priority = self._priority.get(task_id)
        if priority is None:
            return 0
        ahead = sum(len(q) for q in self._waiting[:priority])
        for index, queued in enumerate(self._waiting[priority]):
            if queued == task_id:
                return ahead + index + 1
        return 0

    def next_ready(self) -> str | None:
        """The next task to start, if a slot is free (it then counts as running)."""
        if len(self.running) >= self.concurrency:
            return None
        for queue in self._waiting:
            if queue:
                task_id = next(iter(queue))
                del queue[task_id]
                del self._priority[task_id]
                self.running.add(task_id)
                return task_id
        return None

    def finished(self, task_id: str) -> None:
        self.running.discard(task_id)


@dataclass
class ThroughputMeter:
    """An exponentially weighted mean of how long a task runs, for eta estimates."""

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
        """Wait before the task at `position` starts: every `concurrency` tasks ahead of it
        take one mean run time; 0 if it gets a free slot at once."""
        if position <= free_slots:
            return 0
        rounds = math.ceil((position - free_slots) / concurrency)
        return int(rounds * self.mean_s * 1000)
