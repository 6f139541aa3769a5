"""task_svc settings, from the environment (names as in the shared brief)."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    log_level: str = "INFO"
    nats_url: str = "nats://127.0.0.1:4222"
    task_svc_listen: str = "127.0.0.1:50051"
    llm_svc_addr: str = "127.0.0.1:50052"

    task_concurrency: int = 16  # running tasks per job queue
    task_max_prompt_chars: int = 32_000
    task_shutdown_grace_s: float = 10.0
    task_job_ack_wait_s: float = 60.0  # in-progress acks go out every third of it
    task_max_ack_pending: int = 100_000  # jobs held in memory (JetStream's default is 1000)
    task_consumer: str = "task_svc"  # the durable consumer name on SB_JOBS
    task_retain_finished_s: float = 300.0  # a finished task stays answerable this long
    task_watcher_queue: int = 1024  # events buffered per watcher before it is dropped
    task_max_restarts: int = 3  # a TaskServer crashing more than this ...
    task_restart_period_s: float = 5.0  # ... within this many seconds fails its task
    task_models_cache_s: float = 10.0
