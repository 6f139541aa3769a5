"""Helpers the persistence tests share: bounded polling, and publishing as task_svc does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from nats.aio.client import Client
from nats.js.client import JetStreamContext

from persistence_svc.consumer import EventConsumer
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
