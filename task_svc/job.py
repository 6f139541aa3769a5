"""The engine's records: its configuration, and one accepted task's job from Submit (or
redelivery) to ack."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from svckit.nats import JOBS_SUBJECT_PREFIX
from task_svc.queues import QueueConfig
from task_svc.task_server import TaskServer
from task_svc.task_state import TaskSpec

RESTARTED = "restarted"


@dataclass(frozen=True)
class EngineConfig:
    queues: Mapping[str, QueueConfig] = field(default_factory=dict)
    default_queue: QueueConfig = field(default_factory=QueueConfig)
    retry_base_s: float = 1.0
    retry_max_s: float = 60.0
    ack_wait_s: float = 60.0
    max_ack_pending: int = 100_000
    consumer: str = "task_svc"
    fetch_batch: int = 256
    publish_timeout_s: float = 5.0
    watcher_limit: int = 1024
    retain_s: float = 300.0
    max_restarts: int = 3
    restart_period_s: float = 5.0
    restart_backoff_s: float = 0.05
    seq_reserve: int = 64
    position_interval_s: float = 1.0


@dataclass
class Job:
    """The engine's record of one accepted task, from Submit (or redelivery) to ack."""

    spec: TaskSpec
    server: TaskServer
    accepted: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    msg: Msg | None = None  # the delivery, for a job recovered from the stream
    stream_seq: int = 0  # where Submit stored it in SB_JOBS (a job this process accepted)
    scheduled: bool = False
    counted: bool = False  # in its queue's depth
    cancel_requested: bool = False
    runner: asyncio.Task[None] | None = None
    worker: asyncio.Task[Any] | None = None
    retry_timer: asyncio.TimerHandle | None = None
    stop_reason: str = ""  # why the worker was cancelled: "cancel" | "shutdown" | "failed"

    @property
    def task_id(self) -> str:
        return self.spec.task_id


def job_subject(queue: str) -> str:
    return f"{JOBS_SUBJECT_PREFIX}.{queue}"
