"""Job queues, one per model class: each with its own concurrency, attempts and depth limit
(config.QueueConfig), its scheduler, its measured throughput and its load shedding."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2
from task_svc.config import EngineConfig, QueueConfig
from task_svc.scheduler import Scheduler, ThroughputMeter

Code = common_pb2.ErrorCode


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed run is tried again: exponential backoff with full jitter (AWS
    architecture blog, "Exponential Backoff And Jitter"), never sooner than the provider's
    retry-after; only for retryable errors (rate limited, overloaded, timeout, network: see
    svckit.errors), never for permanent ones (invalid request, auth, ...)."""

    max_attempts: int
    base_delay_s: float
    max_delay_s: float

    def delay_s(self, attempt: int, error: ServiceError) -> float | None:
        """The delay before the next attempt after `attempt` failed with `error`; None when
        the task must fail now."""
        if not error.retryable or attempt >= self.max_attempts:
            return None
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** max(attempt - 1, 0))
        return max(random.uniform(0, backoff), error.retry_after_ms / 1000)


class JobQueue:
    """The in-memory side of one queue. `depth` counts its jobs that wait (job_state.WAITING):
    what load shedding limits. Jobs keep it up to date as they change state (job.py)."""

    def __init__(self, name: str, config: QueueConfig, retry: RetryPolicy) -> None:
        self.name = name
        self.config = config
        self.retry = retry
        self.scheduler = Scheduler(config.concurrency, aging_s=config.aging_s)
        self.meter = ThroughputMeter()
        self.depth = 0

    def eta_ms(self, position: int) -> int:
        scheduler = self.scheduler
        return self.meter.eta_ms(position, scheduler.free_slots, scheduler.concurrency)

    def refuse(self) -> ServiceError | None:
        """OVERLOADED with a retry-after when the queue is full (never a silent loss): the
        time for it to drain back below its limit at the measured throughput, at least 1 s."""
        over = self.depth - self.config.max_depth + 1
        if over <= 0:
            return None
        rounds = math.ceil(over / self.scheduler.concurrency)
        retry_after_ms = max(1000, int(rounds * self.meter.mean_s * 1000))
        return ServiceError(
            Code.ERROR_CODE_OVERLOADED,
            f"queue {self.name} is full ({self.depth} waiting); try again later",
            retryable=True,
            retry_after_ms=retry_after_ms,
        )


class Queues:
    """Every job queue, created on first use from its configuration (or the default one)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._queues: dict[str, JobQueue] = {}

    def __getitem__(self, name: str) -> JobQueue:
        queue = self._queues.get(name)
        if queue is None:
            config = self.config.queues.get(name, self.config.default_queue)
            retry = RetryPolicy(
                config.max_attempts, self.config.retry_base_s, self.config.retry_max_s
            )
            queue = self._queues[name] = JobQueue(name, config, retry)
        return queue

    def __iter__(self) -> Iterator[JobQueue]:
        return iter(list(self._queues.values()))
