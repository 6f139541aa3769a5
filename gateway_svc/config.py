"""gateway_svc settings, from environment variables (names in the shared brief)."""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    log_level: str = "INFO"
    switchboard_env: Literal["development", "production"] = "development"
    switchboard_secret: SecretStr | None = None

    gateway_host: str = "127.0.0.1"
    gateway_port: int = 4000
    gateway_grpc_listen: str = "127.0.0.1:50050"
    task_svc_addr: str = "127.0.0.1:50051"

    # A socket that sends nothing (not even a heartbeat, every 30 s) for this long is closed.
    gateway_idle_timeout_s: float = 60.0
    gateway_max_frame_bytes: int = 64 * 1024
    gateway_max_channels: int = 100
    # Bounds the wait for TaskService.Watch's first message during a join; clients give up
    # on a push after 10 s.
    gateway_join_timeout_s: float = 10.0
    # On SIGTERM: time given to sockets to close (1001) before they are dropped.
    gateway_shutdown_grace_s: float = 5.0
