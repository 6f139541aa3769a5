"""Scale-out, through real processes (`make cluster`, tools/cluster.py): three NATS nodes, three
task_svc, two gateways on one port, two llm_svc, one persistence_svc.

- kill -9 one task_svc and one NATS node while generations stream: the dead node's shards
  move to the others, its jobs are redelivered there and run again, and every gateway
  watches each task at its new node from the client's last seq: every client sees one
  strictly increasing sequence ending in its answer, on the channel it joined (no phx_error),
  and every task has exactly one terminal history row;
- a fourth task_svc joins under load: shards are handed over (drained first), and no task
  runs twice (one STARTED in each task's trail)."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway_svc.phoenix_client import Channel, PhoenixClient
from switchboard.v1 import events_pb2
from tests.conftest import eventually, timeout
from tests.e2e.conftest import TEST_ENV
from tests.e2e.history import terminal_history_at
from tools.cluster import Cluster, ClusterConfig
from tools.stack import dev_token

pytestmark = pytest.mark.e2e

Kind = events_pb2.LifecycleKind
TASKS = 24
SOCKETS = 4  # spread over both gateways by the kernel
ENV = {
    **TEST_ENV,
    "LOG_LEVEL": "INFO",
    "LOCAL_MODEL_TOKEN_DELAY_MS": "60",  # a few seconds per answer: killed mid-stream
    "TASK_LEASE_S": "6",  # a dead node's shards move after about this long
    "GATEWAY_GENERATE_RATE_PER_S": "0",
}
TERMINAL = ("llm_response", "error")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    config = ClusterConfig.on_free_ports(tmp_path / "var", extra_env=dict(ENV))
    running = Cluster(config)
    try:
        await running.start(timeout=timeout(90))
        yield running
    finally:
        await running.stop()
        for log in sorted((config.var_dir / "logs").glob("task_svc*.log")):
            lines = log.read_text(errors="replace").splitlines()
            print(f"----- {log.name} (warnings and errors, last 15)")
            print("\n".join([line for line in lines if '"level":"info"' not in line][-15:]))


@pytest.fixture
async def clients(cluster: Cluster) -> AsyncIterator[list[PhoenixClient]]:
    """Alice's sockets, spread over both gateways by the kernel."""
    token = dev_token("alice")
    opened = [await PhoenixClient.connect(cluster.socket_url, token=token) for _ in range(SOCKETS)]
    try:
        yield opened
    finally:
        for client in opened:
            await client.close()


class Follower:
    """One task's channel, every push it gets until the task's answer."""

    def __init__(self, task_id: str, channel: Channel) -> None:
        self.task_id = task_id
        self.channel = channel
        self.pushes: list[tuple[str, dict[str, Any]]] = []
        self.streaming = asyncio.Event()  # a chunk came

    async def follow(self) -> None:
        async for message in self.channel.messages():
            self.pushes.append((message.event, message.payload))
            if message.event == "chunk":
                self.streaming.set()
            if message.event in TERMINAL or message.event == "phx_error":
                return

    def check(self) -> None:
        events = [event for event, _ in self.pushes]
        assert "phx_error" not in events, (self.task_id, events)
        assert events[-1] == "llm_response", (self.task_id, self.pushes[-1])
        seqs = [payload["seq"] for _, payload in self.pushes if "seq" in payload]
        assert seqs == sorted(set(seqs)), (self.task_id, seqs)  # strictly increasing

    @property
    def restarted(self) -> bool:
        return any(payload.get("reset") for event, payload in self.pushes if event == "progress")


async def generate(clients: list[PhoenixClient], count: int) -> list[Follower]:
    followers = []
    for i in range(count):
        task_id = str(uuid.uuid4())
        channel = await clients[i % len(clients)].join(f"task:{task_id}")
        reply = await channel.push("llm_generate", {"prompt": f"Tell me about {task_id}"})
        assert reply.ok, reply.response
        followers.append(Follower(task_id, channel))
    return followers


async def finish(running: list[asyncio.Task[None]], followers: list[Follower]) -> None:
    """Every follower at its task's end, or a failure that says which are not and where
    they stopped."""
    done, pending = await asyncio.wait(running, timeout=timeout(120))
    if pending:
        stuck = [
            (f.task_id, f.pushes[-3:])
            for f, t in zip(followers, running, strict=True)
            if t in pending
        ]
        raise AssertionError(f"{len(stuck)} tasks never ended: {stuck}")
    for task in done:
        task.result()


async def history_is_once(
    cluster: Cluster, followers: list[Follower]
) -> list[list[events_pb2.LifecycleKind.ValueType]]:
    """Every task's trail holds exactly one COMPLETED; returns the kinds of each trail."""
    address = f"127.0.0.1:{cluster.config.persistence_port}"
    trails = []
    for follower in followers:
        _, events = await terminal_history_at(address, follower.task_id, "alice", timeout(60))
        kinds = [event.kind for event in events]
        passing = (Kind.LIFECYCLE_KIND_QUEUED, Kind.LIFECYCLE_KIND_STARTED)
        terminal = [k for k in kinds if k not in passing]
        assert terminal == [Kind.LIFECYCLE_KIND_COMPLETED], [Kind.Name(k) for k in kinds]
        trails.append(kinds)
    return trails


async def test_a_task_svc_and_a_nats_node_killed_mid_stream_lose_nothing(
    cluster: Cluster, clients: list[PhoenixClient]
) -> None:
    followers = await generate(clients, TASKS)
    running = [asyncio.create_task(f.follow()) for f in followers]

    async def half_streaming() -> bool:
        return sum(f.streaming.is_set() for f in followers) >= TASKS // 2

    await eventually(half_streaming, 30)
    await asyncio.gather(
        cluster.kill("task_svc-2", signal.SIGKILL), cluster.kill("nats-2", signal.SIGKILL)
    )
    await finish(running, followers)
    for follower in followers:
        follower.check()
    # The dead node's running tasks ran again elsewhere (their first event reset the text).
    assert any(f.restarted for f in followers)
    await history_is_once(cluster, followers)


async def test_a_joining_task_svc_takes_shards_over_without_running_any_task_twice(
    cluster: Cluster, clients: list[PhoenixClient]
) -> None:
    followers = await generate(clients, TASKS)
    running = [asyncio.create_task(f.follow()) for f in followers]
    await asyncio.wait_for(followers[0].streaming.wait(), timeout(30))
    await cluster.add_task_svc(timeout=timeout(60))
    later = await generate(clients, TASKS // 2)  # stored while shards move
    running += [asyncio.create_task(f.follow()) for f in later]
    await finish(running, followers + later)
    for follower in followers + later:
        follower.check()
        assert not follower.restarted, follower.pushes  # drained, not cut
    for kinds in await history_is_once(cluster, followers + later):
        assert kinds.count(Kind.LIFECYCLE_KIND_STARTED) == 1, kinds  # ran once
