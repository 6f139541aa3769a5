"""persistence_svc's Prometheus metrics, on one registry per `PersistenceServer` (tests build
several; `python -m persistence_svc` passes the process-wide REGISTRY and exports it on
PERSISTENCE_METRICS_LISTEN).

Every label value comes from a small fixed set (lifecycle kinds, the one durable consumer),
never a task or user id. The write path pays, per event, one histogram observe (and the
parse of the message's JetStream metadata it needs); the counters move once per batch.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from persistence_svc.events import KIND_NAMES, ParsedEvent

# `kind` label values of switchboard_history_events_total: every lifecycle kind events.py
# stores (a kind newer than this release is stored as "unknown"), and task_svc's snapshots,
# which are acked without being stored.
KIND_SNAPSHOT = "snapshot"
KIND_UNKNOWN = "unknown"
EVENT_KINDS = (*KIND_NAMES.values(), KIND_UNKNOWN, KIND_SNAPSHOT)

# History normally lags by the linger (PERSISTENCE_LINGER_MS, 200 ms) plus a transaction;
# after an outage, by as long as the database was gone.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
# Up to PERSISTENCE_BATCH_SIZE's ceiling (10 000).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 10_000)


class PersistenceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.lag = Histogram(
            "switchboard_history_lag_seconds",
            "From a lifecycle event's publication (its JetStream timestamp) to its commit.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "switchboard_history_batch_size",
            "Lifecycle events per committed batch.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.write_errors = Counter(
            "switchboard_history_write_errors",
            "Batch writes that failed (database unavailable, rows refused); retried.",
            registry=r,
        )
        self.events = Counter(
            "switchboard_history_events",
            "Lifecycle events committed, by kind; `snapshot`: acked without being stored.",
            ["kind"],
            registry=r,
        )
        self.pending = Gauge(
            "switchboard_jetstream_consumer_pending",
            "Messages in the stream not yet delivered to the durable consumer.",
            ["consumer"],
            registry=r,
        )
        self.ack_pending = Gauge(
            "switchboard_jetstream_consumer_ack_pending",
            "Messages delivered to the durable consumer and not yet acked.",
            ["consumer"],
            registry=r,
        )
        self.database_up = Gauge(
            "switchboard_database_up",
            "1 if the last database write or check succeeded, else 0.",
            registry=r,
        )
        # Children made once: `labels()` takes a lock and a lookup on every call, and every
        # kind shows (as 0) from the first scrape, which rate() needs.
        self._events = {kind: self.events.labels(kind) for kind in EVENT_KINDS}

    def written(self, batch: Sequence[tuple[Msg, ParsedEvent]], committed: float) -> None:
        """Record one committed batch; `committed` is the commit's wall-clock time
        (`time.time()`), compared with each message's JetStream timestamp."""
        kinds: collections.Counter[str] = collections.Counter()
        for msg, parsed in batch:
            # max(0): the NATS server's clock may run slightly ahead of ours.
            self.lag.observe(max(0.0, committed - msg.metadata.timestamp.timestamp()))
            kinds[parsed.kind] += 1
        for kind, count in kinds.items():
            self._event(kind).inc(count)
        self.batch_size.observe(len(batch))

    def snapshot(self) -> None:
        self._events[KIND_SNAPSHOT].inc()

    def consumer(self, name: str, pending: int, ack_pending: int) -> None:
        self.pending.labels(name).set(pending)
        self.ack_pending.labels(name).set(ack_pending)

    def _event(self, kind: str) -> Counter:
        # Only events.py's kinds reach here; anything else is folded into "unknown" so a
        # bug can never add a label value.
        return self._events.get(kind) or self._events[KIND_UNKNOWN]
