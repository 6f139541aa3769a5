"""Job queues, one per model class: each with its own concurrency, attempts and depth limit
(config.QueueConfig), its scheduler, its measured throughput and its load shedding."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from svckit.backoff import exponential, full_jitter
from svckit.errors import ServiceError
from svckit.queueing import queue_full
from switchboard.v1 import common_pb2, events_pb2
from task_svc.config import EngineConfig, QueueConfig
from task_svc.scheduler import Scheduler, ThroughputMeter

Code = common_pb2.ErrorCode
OUTAGE_BASE_DELAY_S = 0.2
OUTAGE_MAX_DELAY_S = 5.0


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed run is tried again: exponential backoff with full jitter
    (svckit/backoff.py), never sooner than the provider's
    retry-after; only for retryable errors (rate limited, overloaded, timeout, network: see
    svckit.errors), never for permanent ones (invalid request, auth, ...)."""

    max_attempts: int
    base_delay_s: float
    max_delay_s: float
    outage_deadline_s: float = 600.0

    def delay_s(self, attempt: int, error: ServiceError) -> float | None:
        """The delay before the next attempt after `attempt` failed with `error`; None when
        the task must fail now."""
        if not error.retryable or attempt >= self.max_attempts:
            return None
        backoff = full_jitter(attempt, self.base_delay_s, self.max_delay_s)
        return max(backoff, error.retry_after_ms / 1000)

    def outage_delay_s(self, outages: int, waited_s: float) -> float | None:
        """The delay before rerunning a task cut by our own outage (llm_svc unreachable or
        restarting) for the `outages`-th time, `waited_s` after the first: short, since it
        costs no attempt (a restart takes about a second), capped, with jitter; None once
        the outage has lasted `outage_deadline_s`."""
        if waited_s >= self.outage_deadline_s:
            return None
        backoff = exponential(outages, OUTAGE_BASE_DELAY_S, OUTAGE_MAX_DELAY_S)
        return random.uniform(backoff / 2, backoff)


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
        """OVERLOADED with a retry-after when the queue is full (svckit/queueing.py)."""
        scheduler = self.scheduler
        return queue_full(
            self.name, self.depth, self.config.max_depth, scheduler.concurrency, self.meter.mean_s
        )

    def stats(self) -> events_pb2.QueueStats:
        """What a gateway needs to answer for this queue (events.proto, QueueBoard)."""
        scheduler = self.scheduler
        return events_pb2.QueueStats(
            queue=self.name,
            waiting_by_priority=scheduler.waiting_by_priority(),
            free_slots=scheduler.free_slots,
            concurrency=scheduler.concurrency,
            mean_run_s=self.meter.mean_s,
            max_depth=self.config.max_depth,
            oldest_s=scheduler.oldest_wait_s(),  # ten heads read: cheap at 4 boards a second
            finished=self.meter.samples,
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
                config.max_attempts,
                self.config.retry_base_s,
                self.config.retry_max_s,
                self.config.outage_deadline_s,
            )
            queue = self._queues[name] = JobQueue(name, config, retry)
        return queue

    def __iter__(self) -> Iterator[JobQueue]:
        return iter(list(self._queues.values()))
