"""A live gateway for tests: the real `Gateway` on a free port, in front of `FakeTasks` on a
real gRPC server, plus small helpers to speak raw V2 frames to it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection

from gateway_svc import tokens
from gateway_svc.config import Settings
from gateway_svc.direct_submit import DirectSubmit
from gateway_svc.server import Gateway
from svckit.grpc_server import GrpcServer, insecure_channel
from svckit.lifecycle import cancel_and_wait
from svckit.metrics import sample
from switchboard.v1 import tasks_pb2_grpc
from tests.conftest import timeout
from tests.gateway.fake_tasks import FakeTasks

KEY = b"test-secret-of-at-least-32-bytes!!"


@dataclass
class Stack:
    fake: FakeTasks
    gateway: Gateway
    base: str  # ws://127.0.0.1:<port>/socket

    def token(self, user: str = "alice") -> str:
        return tokens.mint(user, KEY, ttl=60)

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.gateway.metrics.registry, name, **labels)

    def url(self, user: str = "alice", vsn: str | None = "2.0.0") -> str:
        query = f"token={self.token(user)}" + (f"&vsn={vsn}" if vsn else "")
        return f"{self.base}/websocket?{query}"

    async def wait_drained(self, seconds: float = 5) -> None:
        """Wait until the gateway holds no socket, no channel and no Watch stream."""
        try:
            async with asyncio.timeout(timeout(seconds)):
                await self.gateway.wait_idle()
                await self.fake.wait_watches(0)
        except TimeoutError:
            raise AssertionError(
                "not drained: "
                f"sockets={self.metric('switchboard_sockets')} "
                f"channels={self.metric('switchboard_channels')} "
                f"user_slots={self.gateway.user_connections.open} "
                f"watches={self.fake.active_watches}"
            ) from None
        assert self.metric("switchboard_sockets") == 0
        assert self.metric("switchboard_channels") == 0
        assert self.gateway.user_connections.open == {}


@contextlib.asynccontextmanager
async def running_stack(
    clock: Callable[[], float] = time.monotonic,
    *,
    direct: DirectSubmit | None = None,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    fake = FakeTasks()
    grpc_server = GrpcServer(
        "127.0.0.1:0",
        lambda s: tasks_pb2_grpc.add_TaskServiceServicer_to_server(fake, s),
        ["switchboard.v1.TaskService"],
    )
    await grpc_server.start()
    channel = insecure_channel(f"127.0.0.1:{grpc_server.port}")
    settings = Settings(gateway_port=0, gateway_shutdown_grace_s=timeout(5), **overrides)
    stub = tasks_pb2_grpc.TaskServiceStub(channel)
    gateway = Gateway(settings, KEY, stub, clock=clock, direct=direct)
    await gateway.start()
    try:
        yield Stack(fake, gateway, f"ws://127.0.0.1:{gateway.port}/socket")
    finally:
        await cancel_and_wait(*fake.runs)
        await gateway.stop()
        await channel.close()
        await grpc_server.stop(0)


async def recv(ws: ClientConnection) -> list[Any]:
    async with asyncio.timeout(timeout(5)):
        return orjson.loads(await ws.recv())  # type: ignore[no-any-return]


async def send(ws: ClientConnection, frame: list[Any]) -> None:
    await ws.send(orjson.dumps(frame).decode())


def topic() -> str:
    return f"task:{uuid.uuid4()}"


async def until(
    messages: AsyncIterator[Any], event: str, status: str | None = None
) -> AsyncIterator[Any]:
    """A channel's pushes up to the first `event` (with that `status`), bounded in time."""
    async with asyncio.timeout(timeout(5)):
        async for message in messages:
            yield message
            if message.event == event and status in (None, message.payload.get("status")):
                return
