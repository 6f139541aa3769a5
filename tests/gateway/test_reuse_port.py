"""GATEWAY_REUSE_PORT: two gateways listen on one port and Linux (SO_REUSEPORT) spreads new
connections between them; without it the second cannot bind. Two real `Gateway` servers in
one process, over real sockets, as the other gateway tests run them (live.py)."""

from __future__ import annotations

import asyncio
import errno
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
from websockets.asyncio.client import ClientConnection, connect

from gateway_svc import tokens
from gateway_svc.config import Settings
from gateway_svc.server import Gateway
from svckit.grpc_server import GrpcServer, insecure_channel
from svckit.metrics import sample
from switchboard.v1 import tasks_pb2_grpc
from tests.conftest import timeout
from tests.gateway.fake_tasks import FakeTasks
from tests.gateway.live import KEY, recv, send

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT spreading")

SOCKETS = 40  # all on one of two gateways has odds of 2 in 2^40


@asynccontextmanager
async def task_service() -> AsyncIterator[tasks_pb2_grpc.TaskServiceStub]:
    fake = FakeTasks()
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: tasks_pb2_grpc.add_TaskServiceServicer_to_server(fake, s),
        ["switchboard.v1.TaskService"],
    )
    await server.start()
    channel = insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield tasks_pb2_grpc.TaskServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


def gateway(stub: tasks_pb2_grpc.TaskServiceStub, port: int, reuse: bool) -> Gateway:
    settings = Settings(
        gateway_port=port, gateway_reuse_port=reuse, gateway_shutdown_grace_s=timeout(5)
    )
    return Gateway(settings, KEY, stub)


async def open_sockets(port: int, count: int, first: int = 0) -> list[ClientConnection]:
    sockets = []
    for i in range(first, first + count):
        token = tokens.mint(f"user-{i}", KEY, ttl=60)
        url = f"ws://127.0.0.1:{port}/socket/websocket?token={token}&vsn=2.0.0"
        ws = await connect(url, open_timeout=timeout(5))
        sockets.append(ws)
        await send(ws, [None, "1", "phoenix", "heartbeat", {}])
        assert (await recv(ws))[4]["status"] == "ok"  # a Phoenix socket, not just a TCP one
    return sockets


def connects(g: Gateway) -> float:
    return sample(g.metrics.registry, "gateway_connects_total")


def test_the_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().gateway_reuse_port is False
    monkeypatch.setenv("GATEWAY_REUSE_PORT", "1")
    assert Settings().gateway_reuse_port is True


async def test_without_it_a_second_gateway_cannot_bind_the_port() -> None:
    async with task_service() as stub:
        first = gateway(stub, 0, reuse=False)
        await first.start()
        try:
            with pytest.raises(OSError) as refused:
                await gateway(stub, first.port, reuse=False).start()
            assert refused.value.errno == errno.EADDRINUSE
        finally:
            await first.stop()


async def test_two_gateways_share_one_port_and_both_take_connections() -> None:
    async with task_service() as stub, AsyncExitStack() as cleanup:
        first = gateway(stub, 0, reuse=True)
        await first.start()
        cleanup.push_async_callback(first.stop)
        second = gateway(stub, first.port, reuse=True)
        await second.start()
        cleanup.push_async_callback(second.stop)
        assert second.port == first.port

        sockets = await open_sockets(first.port, SOCKETS)
        spread = [connects(first), connects(second)]
        assert sum(spread) == SOCKETS and min(spread) > 0, spread
        await asyncio.gather(*(ws.close() for ws in sockets))

        # One of them stopping (a rolling restart) leaves the port served by the other.
        await second.stop()
        sockets = await open_sockets(first.port, 10, first=SOCKETS)
        assert connects(first) == spread[0] + 10
        await asyncio.gather(*(ws.close() for ws in sockets))
