"""Helpers the persistence tests share: bounded polling, publishing as task_svc does, and
watching the SQL a repository sends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.js.client import JetStreamContext
from sqlalchemy import event as sa_event

from persistence_svc.consumer import EventConsumer
from persistence_svc.repository import Repository
from svckit.lifecycle import cancel_and_wait
from switchboard.v1 import events_pb2, history_pb2
from tests.conftest import eventually, timeout

T = TypeVar("T")

# Short fetches so that stop() (which lets the fetch in flight end) is quick in tests.
FETCH_S = 0.2


@asynccontextmanager
async def running(consumer: EventConsumer) -> AsyncIterator[EventConsumer]:
    await consumer.start()
    task = asyncio.create_task(consumer.run(), name="test-consumer")
    try:
        yield consumer
    finally:
        consumer.stop()
        await asyncio.wait_for(asyncio.shield(task), timeout(10))
        await cancel_and_wait(task)


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    async def probe() -> bool:
        return condition()

    await eventually(probe, seconds)


async def publish(js: JetStreamContext, event: events_pb2.LifecycleEvent) -> None:
    """As task_svc publishes: subject switchboard.tasks.<task_id>.<kind>, id <task_id>:<seq>."""
    kind = events_pb2.LifecycleKind.Name(event.kind).removeprefix("LIFECYCLE_KIND_").lower()
    await js.publish(
        f"switchboard.tasks.{event.task_id}.{kind}",
        event.SerializeToString(),
        headers={"Nats-Msg-Id": f"{event.task_id}:{event.seq}"},
    )


async def publish_snapshot(js: JetStreamContext, snapshot: history_pb2.TaskSnapshot) -> None:
    """As task_svc publishes a snapshot (history.proto): subject
    switchboard.tasks.<task_id>.snapshot, id <task_id>:snapshot:<seq>."""
    task_id, seq = snapshot.state.task_id, snapshot.state.seq
    await js.publish(
        f"switchboard.tasks.{task_id}.snapshot",
        snapshot.SerializeToString(),
        headers={"Nats-Msg-Id": f"{task_id}:snapshot:{seq}"},
    )


@dataclass
class Bus:
    nc: Client
    js: JetStreamContext


@contextmanager
def statements(repo: Repository) -> Iterator[list[str]]:
    """Every SQL statement the repository's engine sends while the block runs."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    sa_event.listen(repo.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa_event.remove(repo.engine.sync_engine, "before_cursor_execute", record)
