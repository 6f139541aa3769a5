"""task_svc's Prometheus metrics, on one registry per `TaskApp` (tests start several apps in
one process; `python -m task_svc` passes the process-wide `REGISTRY`).

Two kinds, so that the hot path pays nothing it does not have to:
- gauges (queue depth, oldest wait, running tasks, TaskServers, shards) are read from the
  engine's state when Prometheus scrapes, by `EngineCollector`; nothing updates them;
- counters (outcomes, retries, dead letters) go up once per task step, from the engine's
  observers (`JobEngine.observers`), never per token or event. TaskServer restarts are the
  supervisor's own count, read at scrape time too.

Label values come from small fixed sets only (queue names: the model classes llm_svc
configures; terminal statuses), never a task or user id, so cardinality stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from switchboard.v1 import common_pb2
from task_svc.jobs import JobEngine

Status = common_pb2.TaskStatus
T = TypeVar("T")

# `status` label values of switchboard_task_outcomes_total.
OUTCOME_STATUS = {
    Status.TASK_STATUS_COMPLETED: "completed",
    Status.TASK_STATUS_FAILED: "failed",
    Status.TASK_STATUS_CANCELLED: "cancelled",
}
# A scrape runs on the exporter's thread while the event loop changes the engine's dicts: a
# read that meets "dictionary changed size during iteration" is simply made again.
READ_ATTEMPTS = 5


class EngineCollector(Collector):
    """The engine's gauges, computed at scrape time from its state (nothing on the hot path)."""

    def __init__(self, engine: JobEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        return consistent(self._families)

    def _families(self) -> list[Metric]:
        return [*self._queue_families(), *self._server_families()]

    def _queue_families(self) -> list[Metric]:
        depth = GaugeMetricFamily(
            "switchboard_queue_depth", "Jobs waiting in the queue.", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "switchboard_queue_oldest_seconds",
            "How long the oldest job waiting for a slot has waited (0 when none waits).",
            labels=["queue"],
        )
        running = GaugeMetricFamily(
            "switchboard_tasks_running", "Jobs running now.", labels=["queue"]
        )
        for queue in self.engine.queues:
            scheduler = queue.scheduler
            depth.add_metric([queue.name], queue.depth)
            oldest.add_metric([queue.name], scheduler.oldest_wait_s())
            running.add_metric([queue.name], len(scheduler.running))
        return [depth, oldest, running]

    def _server_families(self) -> list[Metric]:
        engine = self.engine
        servers = engine.registry.servers()
        restarts = CounterMetricFamily(
            "switchboard_task_server_restarts",
            "TaskServer actors restarted by their supervisor after a crash.",
            value=engine.supervisor.restarted,
        )
        return [
            restarts,
            GaugeMetricFamily(
                "switchboard_task_servers",
                "TaskServers in memory (running, waiting, or finished and retained).",
                value=len(servers),
            ),
            GaugeMetricFamily(
                "switchboard_task_servers_hibernated",
                "TaskServers without a running loop (hibernating: only their state).",
                value=sum(1 for server in servers if server.hibernating),
            ),
            GaugeMetricFamily(
                "switchboard_shards_held", "Shards this node holds.", value=len(engine.shards)
            ),
        ]


def consistent(read: Callable[[], T]) -> T:
    """`read()`, made again if the event loop changed a dict it was iterating."""
    for _ in range(READ_ATTEMPTS - 1):
        try:
            return read()
        except RuntimeError:
            continue
    return read()


class TaskMetrics:
    """Every task_svc metric on `registry` (a new one by default), fed by `engine`."""

    def __init__(self, engine: JobEngine, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.engine = engine
        r = self.registry
        self.outcomes = Counter(
            "switchboard_task_outcomes",
            "Finished tasks, by queue and terminal status.",
            ["queue", "status"],
            registry=r,
        )
        self.retries = Counter(
            "switchboard_task_retries",
            "Runs that failed and wait to run again (retryable errors and llm_svc outages).",
            ["queue"],
            registry=r,
        )
        self.dead_letters = Counter(
            "switchboard_dead_letters", "Dead letters stored.", ["queue"], registry=r
        )
        self._children: dict[tuple[Counter, tuple[str, ...]], Any] = {}
        r.register(EngineCollector(engine))
        engine.observers.append(self.observe)

    def observe(self, what: str, task_id: str) -> None:
        """An engine step (jobs.py `observers`): once per task step, never per event."""
        if what == "finished":
            self._finished(task_id)
        elif what in ("retrying", "dead"):
            job = self.engine.jobs.get(task_id)  # still the engine's at these steps
            if job is not None:
                counter = self.retries if what == "retrying" else self.dead_letters
                self._inc(counter, job.queue.name)

    def _finished(self, task_id: str) -> None:
        """The job is gone from `engine.jobs` by now; its server stays registered (retained
        for `retain_s`), and its core has the queue and the terminal status."""
        server = self.engine.registry.get(task_id)
        if server is None:  # its shard moved away while it finished: counted nowhere
            return
        status = OUTCOME_STATUS.get(server.core.status)
        if status is not None:
            self._inc(self.outcomes, server.core.spec.queue, status)

    def _inc(self, counter: Counter, *labels: str) -> None:
        """`labels()` takes a lock and a lookup each time: the children are kept."""
        key = (counter, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc()
