"""Settings from the environment (the README lists the variables the services share)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    log_level: str = "INFO"
    switchboard_env: str = "development"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_stream_replicas: int = 1  # JetStream replicas of the streams (3 on a NATS cluster)
    history_svc_listen: str = "127.0.0.1:7053"
    database_url: str = "sqlite+aiosqlite:///var/switchboard.db"

    # Our own knobs (prefix PERSISTENCE_).
    persistence_batch_size: int = Field(default=256, ge=1, le=10_000)
    # Milliseconds to let events gather after a small batch before taking the next (history
    # lags by at most about this; 0: take each as soon as it is there). 200, not 50: at 200
    # generations a second (zero-delay load, 2 cores) batches of about 120 events instead of
    # 30 cut persistence_svc's CPU per generation from 1.15-1.27 ms to 0.87-0.93 ms, and
    # nothing live reads history (the sockets' pushes come from task_svc and JetStream).
    persistence_linger_ms: float = Field(default=200.0, ge=0)
    # Seconds JetStream waits for our ack before redelivering a message.
    persistence_ack_wait_s: float = Field(default=60.0, gt=0)
    # The longest pause between retries while the database is down (the back-off starts at
    # 1 s and grows to this): how long history may lag behind a database that came back.
    persistence_retry_max_s: float = Field(default=30.0, gt=0)
    # UserService's write-through cache of preferences: its size, and how long an entry is
    # trusted (the staleness bound when several replicas serve writes).
    persistence_preferences_cache_size: int = Field(default=10_000, ge=0)
    persistence_preferences_cache_ttl_s: float = Field(default=30.0, ge=0)
    # How old a tombstone of a deleted task (deleted_tasks) gets before it is pruned: by then
    # no event of its task can arrive any more. SB_TASK_EVENTS keeps an event 7 days
    # (max_age, svckit/nats.py), so one published before the delete is gone from it 7 days
    # later; a deleted task publishes more only while it still runs (minutes), or when an
    # operator re-runs it from the dead letters, which are kept 30 days (SB_DEAD_LETTERS,
    # task_svc/deadletters.py): 30 + 7 days, and a day of margin.
    persistence_tombstone_retention_s: float = Field(default=38 * 24 * 3600.0, gt=0)
    # How often tombstones past that age are pruned (at start, then every this long).
    persistence_tombstone_prune_interval_s: float = Field(default=3600.0, gt=0)
    # Bounded grace for in-flight gRPC calls and the in-flight batch at shutdown.
    persistence_shutdown_grace_s: float = Field(default=5.0, ge=0)
    # `host:port` of the Prometheus /metrics endpoint (svckit.metrics); empty = off, `host:0`
    # = a free port (logged).
    persistence_metrics_listen: str = "127.0.0.1:9103"
    # OTLP/gRPC collector for traces (svckit/tracing.py); empty: no traces.
    otel_exporter_otlp_endpoint: str = ""
