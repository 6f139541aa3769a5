"""A queue's estimates, in one place for the two services that make them: task_svc, which
knows its queues, and the gateway, which answers from task_svc's last QueueBoard when it stores
a job itself (gateway_svc/direct_submit.py)."""

from __future__ import annotations

import math

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2

MIN_RETRY_AFTER_MS = 1000


def eta_ms(position: int, free_slots: int, concurrency: int, mean_s: float) -> int:
    """Wait before the task at 1-based `position` starts: every `concurrency` tasks ahead of
    it take one mean run time; 0 if it gets a free slot at once."""
    if position <= free_slots:
        return 0
    rounds = math.ceil((position - free_slots) / max(concurrency, 1))
    return int(rounds * mean_s * 1000)


def queue_full(
    queue: str, depth: int, max_depth: int, concurrency: int, mean_s: float
) -> ServiceError | None:
    """OVERLOADED with a retry-after when `depth` waiting tasks fill the queue (never a
    silent loss): the time for it to drain back below its limit, at least 1 s."""
    over = depth - max_depth + 1
    if over <= 0:
        return None
    rounds = math.ceil(over / max(concurrency, 1))
    return ServiceError(
        common_pb2.ERROR_CODE_OVERLOADED,
        f"queue {queue} is full ({depth} waiting); try again later",
        retryable=True,
        retry_after_ms=max(MIN_RETRY_AFTER_MS, int(rounds * mean_s * 1000)),
    )
