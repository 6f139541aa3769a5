"""task_svc settings, from the environment (names as in the README's table), and the engine's
view of them.

Every default lives here, once, in `Settings`; `QueueConfig` and `EngineConfig` have none, so
a value the engine uses is always the one the environment (or a test) gave.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic_settings import BaseSettings, SettingsConfigDict

from svckit.requests import MAX_PROMPT_CHARS
from svckit.shards import node_key


class QueueSettings(BaseModel):
    """One job queue's overrides (TASK_QUEUES); unset fields take the TASK_* defaults."""

    concurrency: int | None = None
    max_attempts: int | None = None
    max_depth: int | None = None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    log_level: str = "INFO"
    nats_url: str = "nats://127.0.0.1:4222"  # a cluster's servers comma-separated
    nats_stream_replicas: int = 1  # JetStream replicas of the streams and buckets
    task_svc_listen: str = "127.0.0.1:7051"
    llm_svc_addr: str = "127.0.0.1:7052"
    # GenerateMany streams to llm_svc: as many as its replicas behind LLM_SVC_ADDR, so that
    # every replica gets generations (one replica: 1, every generation on one stream).
    task_llm_streams: int = 1

    # Per model class (the `queue` llm_svc's ListModels gives each model), as JSON, e.g.
    # TASK_QUEUES='{"local": {"concurrency": 64}, "openai": {"concurrency": 8, "max_attempts": 5}}'.
    task_queues: dict[str, QueueSettings] = {}
    task_concurrency: int = 16  # running tasks per job queue
    task_max_attempts: int = 3  # runs of a task with retryable errors before it dead-letters
    task_max_queue_depth: int = 10_000  # waiting tasks per queue before Submit is refused
    task_aging_s: float = 10.0  # a waiting task gains one priority level per this many seconds
    task_retry_base_s: float = 1.0  # retry backoff: base * 2^(attempt-1), full jitter ...
    task_retry_max_s: float = 60.0  # ... at most this, at least the provider's retry-after
    # While llm_svc is unreachable (down, restarting) a cut task reruns without spending an
    # attempt, for at most this long; then it fails with the error.
    task_outage_deadline_s: float = 600.0
    task_position_interval_s: float = 1.0  # how often watchers get their queue position
    task_max_prompt_chars: int = MAX_PROMPT_CHARS
    task_shutdown_grace_s: float = 10.0
    task_job_ack_wait_s: float = 60.0  # in-progress acks go out every third of it
    task_max_ack_pending: int = 100_000  # jobs held in memory (JetStream's default is 1000)
    task_consumer: str = "task_svc"  # SB_JOBS's consumers are named <this>-shard-<n>
    # This node in the cluster (svckit/shards.py): its id (a StatefulSet's pod name; the
    # default, host and port, is unique on one machine), the address gateways and other
    # nodes reach its TaskService at (default: TASK_SVC_LISTEN), how long its heartbeat
    # lives in NATS (a dead node's shards move after about this long), and how long a shard
    # it hands over lets its running tasks finish before they are cut and resumed elsewhere.
    task_node_id: str = ""
    task_advertise_addr: str = ""
    task_lease_s: float = 5.0
    task_handoff_grace_s: float = 10.0
    task_retain_finished_s: float = 300.0  # a finished task stays answerable this long
    task_watcher_queue: int = 1024  # events buffered per watcher before it is dropped
    task_max_restarts: int = 3  # a TaskServer crashing more than this ...
    task_restart_period_s: float = 5.0  # ... within this many seconds fails its task
    task_restart_backoff_s: float = 0.05  # first restart delay, doubling per recent crash
    # Events a task may emit past the last seq JetStream stored for it (checkpoints, every
    # half of it; lifecycle events count too). Large on purpose: while NATS is down a
    # running stream goes on for this many events before it waits; a task rebuilt after a
    # crash numbers its events from stored seq + this, above anything a watcher saw.
    task_seq_reserve: int = 4096
    task_models_cache_s: float = 10.0
    # How often the queues' state goes out to the gateways (QueueBoard, queue_board.py).
    task_queue_board_interval_s: float = 0.25
    # `host:port` of the Prometheus `/metrics` endpoint of `python -m task_svc` (metrics.py;
    # svckit/metrics.py): empty is off, `host:0` picks a free port (logged). Nodes started
    # side by side (make cluster) get a port each from the launcher (tools/cluster.py).
    task_metrics_listen: str = "127.0.0.1:9101"
    # OTLP/gRPC collector for traces (svckit/tracing.py); empty: no traces.
    otel_exporter_otlp_endpoint: str = ""


def node_id(settings: Settings) -> str:
    return node_key(settings.task_node_id or f"{socket.gethostname()}-{port_of(settings)}")


def advertise_addr(settings: Settings) -> str:
    if settings.task_advertise_addr:
        return settings.task_advertise_addr
    host, _, port = settings.task_svc_listen.rpartition(":")
    if host in ("0.0.0.0", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


def port_of(settings: Settings) -> str:
    return settings.task_svc_listen.rpartition(":")[2]


@dataclass(frozen=True)
class QueueConfig:
    """One job queue (model class)."""

    concurrency: int  # running tasks at once
    max_attempts: int  # runs of a task that keep failing with retryable errors
    max_depth: int  # waiting tasks before Submit is refused (load shedding)
    aging_s: float  # see scheduler.py: one priority level gained per aging_s waited


@dataclass(frozen=True)
class EngineConfig:
    """What the job engine needs from the settings (jobs.py)."""

    queues: Mapping[str, QueueConfig]  # by queue name; others get `default_queue`
    default_queue: QueueConfig
    retry_base_s: float
    retry_max_s: float
    outage_deadline_s: float
    position_interval_s: float
    retain_s: float
    watcher_limit: int
    seq_reserve: int
    max_restarts: int
    restart_period_s: float
    restart_backoff_s: float


def queue_config(settings: Settings, override: QueueSettings | None = None) -> QueueConfig:
    override = override or QueueSettings()
    return QueueConfig(
        concurrency=override.concurrency or settings.task_concurrency,
        max_attempts=override.max_attempts or settings.task_max_attempts,
        max_depth=override.max_depth or settings.task_max_queue_depth,
        aging_s=settings.task_aging_s,
    )


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        queues={name: queue_config(settings, q) for name, q in settings.task_queues.items()},
        default_queue=queue_config(settings),
        retry_base_s=settings.task_retry_base_s,
        retry_max_s=settings.task_retry_max_s,
        outage_deadline_s=settings.task_outage_deadline_s,
        position_interval_s=settings.task_position_interval_s,
        retain_s=settings.task_retain_finished_s,
        watcher_limit=settings.task_watcher_queue,
        seq_reserve=settings.task_seq_reserve,
        max_restarts=settings.task_max_restarts,
        restart_period_s=settings.task_restart_period_s,
        restart_backoff_s=settings.task_restart_backoff_s,
    )
