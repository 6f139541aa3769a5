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
    history_svc_listen: str = "127.0.0.1:50053"
    database_url: str = "sqlite+aiosqlite:///var/switchboard.db"

    # Our own knobs (prefix PERSISTENCE_).
    persistence_batch_size: int = Field(default=256, ge=1, le=10_000)
    # Milliseconds to let events gather after a small batch before taking the next (history
    # lags by at most about this; 0: take each as soon as it is there).
    persistence_linger_ms: float = Field(default=50.0, ge=0)
    # Seconds JetStream waits for our ack before redelivering a message.
    persistence_ack_wait_s: float = Field(default=60.0, gt=0)
    # The longest pause between retries while the database is down (the back-off starts at
    # 1 s and grows to this): how long history may lag behind a database that came back.
    persistence_retry_max_s: float = Field(default=30.0, gt=0)
    # UserService's write-through cache of preferences: its size, and how long an entry is
    # trusted (the staleness bound when several replicas serve writes).
    persistence_preferences_cache_size: int = Field(default=10_000, ge=0)
    persistence_preferences_cache_ttl_s: float = Field(default=30.0, ge=0)
    # Bounded grace for in-flight gRPC calls and the in-flight batch at shutdown.
    persistence_shutdown_grace_s: float = Field(default=5.0, ge=0)
    # `host:port` of the Prometheus /metrics endpoint (svckit.metrics); empty = off, `host:0`
    # = a free port (logged).
    persistence_metrics_listen: str = "127.0.0.1:9103"
    # OTLP/gRPC collector for traces (svckit/tracing.py); empty: no traces.
    otel_exporter_otlp_endpoint: str = ""
