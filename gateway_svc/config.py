"""gateway_svc settings, from environment variables (every one is in the README)."""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from svckit.requests import MAX_PROMPT_CHARS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    log_level: str = "INFO"
    switchboard_env: Literal["development", "production"] = "development"
    switchboard_secret: SecretStr | None = None

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 4000
    gateway_grpc_listen: str = "127.0.0.1:7050"
    task_svc_addr: str = "127.0.0.1:7051"
    # How long a task_svc node's heartbeat lives (the same TASK_LEASE_S task_svc reads): a
    # node not heard from for this long is dead to the gateway's routes (routes.py).
    task_lease_s: float = 5.0
    # The ack's own path (direct_submit.py): the gateway stores an llm_generate's job in
    # JetStream itself; the model catalogue comes from llm_svc. Off: every Submit goes
    # through task_svc.
    gateway_direct_submit: bool = True
    nats_url: str = "nats://127.0.0.1:4222"
    llm_svc_addr: str = "127.0.0.1:7052"
    history_svc_addr: str = "127.0.0.1:7053"  # the user channel's history and preferences
    gateway_models_cache_s: float = 10.0

    # A socket that sends nothing (not even a heartbeat, every 30 s) for this long is closed.
    gateway_idle_timeout_s: float = 60.0
    # How long a close handshake may take before the TCP connection is aborted.
    gateway_close_timeout_s: float = 5.0
    gateway_max_frame_bytes: int = 64 * 1024
    gateway_max_channels: int = 100
    # Bounds the wait for TaskService.Watch's first message during a join; clients give up
    # on a push after 10 s.
    gateway_join_timeout_s: float = 10.0
    # On SIGTERM: time given to sockets to close (1001) before they are dropped.
    gateway_shutdown_grace_s: float = 5.0

    # Limits (each refusal is counted in gateway_limit_hits_total{limit=...}).
    # The same bound as task_svc's TASK_MAX_PROMPT_CHARS, checked here before any gRPC call.
    gateway_max_prompt_chars: int = MAX_PROMPT_CHARS
    # Beyond this many open sockets per user a connect gets HTTP 403 (0 = no limit).
    gateway_max_connections_per_user: int = 20
    # Token bucket per user on llm_generate: refilled at RATE per second up to BURST
    # (RATE 0 = no limit). Refusals carry retry_after_ms.
    gateway_generate_rate_per_s: float = 2.0
    gateway_generate_burst: int = 10
    # Token bucket per socket on its other events (joins, leaves, cancels, heartbeats):
    # a flood guard, generous enough for a client that runs a join and a leave per
    # generation hundreds of times a second; refusals carry retry_after_ms (RATE 0 = none).
    gateway_socket_events_per_s: float = 1000.0
    gateway_socket_events_burst: int = 2000
    # Outbound queue of one socket while its client is slow; beyond either bound (after
    # coalescing progress pushes) the socket is closed with 1008.
    gateway_outbound_max_frames: int = 1024
    gateway_outbound_max_bytes: int = 1024 * 1024
    # A channel stops reading its task's events while the outbound queue is half full (so
    # a client catching up is paced, not flooded); a client that does not drain it within
    # this many seconds is a slow consumer and is closed with 1008.
    gateway_slow_consumer_s: float = 10.0
    # SO_SNDBUF of each socket (0 = the kernel's autotuning, up to net.ipv4.tcp_wmem's max,
    # 4 MiB by default): what a stalled client can hold in kernel memory before the
    # outbound queue above starts to fill.
    gateway_socket_sndbuf: int = 0
    # Accept queue of the listening socket (capped by net.core.somaxconn).
    gateway_listen_backlog: int = 4096
    # SO_REUSEPORT on the listening socket: several gateway processes on one machine bind
    # the same port and Linux spreads new connections between them (by a hash of each
    # connection's addresses), so one port is served by as many event loops as there are
    # processes (`make cluster` runs two). Off, a second process on the port fails to bind.
    gateway_reuse_port: bool = False
    # `host:port` of the Prometheus /metrics endpoint (svckit.metrics); empty = off.
    gateway_metrics_listen: str = "127.0.0.1:9100"
    # Users (comma-separated) whose tokens may join the operator dashboard (GET /admin, the
    # `admin:dashboard` topic: admin.py).
    gateway_admin_users: str = "admin"
    # OTLP/gRPC collector for traces (svckit/tracing.py); empty: no traces.
    otel_exporter_otlp_endpoint: str = ""
