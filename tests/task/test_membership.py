"""task_svc's membership (task_svc/membership.py) on a real nats-server: nodes take their
shards, hand them over when a node joins or leaves, take a dead node's over once NATS has
expired its heartbeat, and a node cut off from NATS stops its shards by itself. Throughout,
no shard is ever held by two nodes at once."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from nats.aio.client import Client

from svckit.lifecycle import cancel_and_wait
from svckit.nats import close_nats, connect_nats
from svckit.shards import (
    NODES_BUCKET,
    SHARD_COUNT,
    SHARDS_BUCKET,
    Lease,
    Member,
    assignment,
    shard_key,
)
from task_svc.membership import NodeMembership
from tests.conftest import eventually, timeout, until
from tools.natsserver import start_nats

LEASE_S = 1.0


class Holders:
    """Who runs which shard, across every node of a test: two at once is the failure."""

    def __init__(self) -> None:
        self.by_shard: dict[int, str] = {}
        self.overlaps: list[tuple[int, str, str]] = []

    def of(self, node: str) -> set[int]:
        return {shard for shard, holder in self.by_shard.items() if holder == node}


class Owner:
    """A ShardOwner that records what it holds (the engine's part, without an engine)."""

    def __init__(self, node: str, holders: Holders, drain_s: float = 0.0) -> None:
        self.node = node
        self.holders = holders
        self.drain_s = drain_s
        self.lost: set[int] = set()
        self.refused: set[int] = set()  # shards whose take-over fails (NATS timing out)
        self.refusals = 0

    async def acquire(self, shard: int) -> None:
        if shard in self.refused:
            self.refusals += 1
            raise TimeoutError
        other = self.holders.by_shard.get(shard)
        if other is not None and other != self.node:
            self.holders.overlaps.append((shard, other, self.node))
        self.holders.by_shard[shard] = self.node

    async def release(self, shard: int, grace_s: float) -> None:
        await asyncio.sleep(self.drain_s)  # running tasks finishing
        if self.holders.by_shard.get(shard) == self.node:
            del self.holders.by_shard[shard]

    async def lose(self, shard: int) -> None:
        self.lost.add(shard)
        await self.release(shard, 0.0)


@asynccontextmanager
async def node(
    url: str, name: str, holders: Holders, drain_s: float = 0.0
) -> AsyncIterator[tuple[NodeMembership, Owner, Client]]:
    nc = await connect_nats(url, name)
    owner = Owner(name, holders, drain_s)
    membership = NodeMembership(
        nc.jetstream(),
        owner,
        node=name,
        address=f"{name}:7051",
        lease_s=LEASE_S,
        replicas=1,
        handoff_grace_s=0.0,
    )
    await membership.start()
    try:
        yield membership, owner, nc
    finally:
        await membership.close()
        await close_nats(nc)  # the server may be gone (the cut-off test)


def settled(holders: Holders, nodes: list[str]) -> Callable[[], asyncio.Future[bool]]:
    """Every shard held by the node rendezvous hashing prefers, and by that one only."""
    wanted = assignment(nodes)

    async def probe() -> bool:
        return holders.by_shard == wanted

    return probe  # type: ignore[return-value]


async def test_nodes_share_the_shards_and_hand_them_over(tmp_path: Path) -> None:
    server = await start_nats(tmp_path / "nats")
    holders = Holders()
    try:
        async with node(server.url, "task-1", holders, drain_s=0.05) as (one, _, _):
            assert holders.of("task-1") == set(range(SHARD_COUNT))  # all, before start returns
            async with node(server.url, "task-2", holders, drain_s=0.05) as (two, _, _):
                await eventually(settled(holders, ["task-1", "task-2"]), timeout(10))
                async with node(server.url, "task-3", holders) as (three, _, _):
                    await eventually(settled(holders, ["task-1", "task-2", "task-3"]), 10)
                    await three.leave()  # SIGTERM: drained and handed over
                    assert holders.of("task-3") == set()
                    await eventually(settled(holders, ["task-1", "task-2"]), timeout(10))
                assert set(one.held) | set(two.held) == set(range(SHARD_COUNT))
                assert not set(one.held) & set(two.held)
        assert holders.overlaps == []
    finally:
        server.stop()


async def test_a_dead_nodes_shards_move_once_its_heartbeat_expires(tmp_path: Path) -> None:
    server = await start_nats(tmp_path / "nats")
    holders = Holders()
    try:
        async with node(server.url, "task-1", holders) as (one, _, _):
            async with node(server.url, "task-2", holders) as (two, _, _):
                await eventually(settled(holders, ["task-1", "task-2"]), timeout(10))
                dead = set(two.held)
            # task-2 died without a word (its membership and connection just stopped): what
            # it ran is gone with it, and its leases still name it.
            for shard in dead:
                del holders.by_shard[shard]
            loop = asyncio.get_running_loop()
            died = loop.time()
            await eventually(settled(holders, ["task-1"]), timeout(10))
            moved_after = loop.time() - died
            assert set(one.held) == set(range(SHARD_COUNT))
            # Not before NATS forgot task-2's heartbeat: about one lease.
            assert moved_after >= LEASE_S * 0.5, moved_after
        assert holders.overlaps == []
    finally:
        server.stop()


async def test_a_node_cut_off_from_nats_stops_its_shards(tmp_path: Path) -> None:
    server = await start_nats(tmp_path / "nats")
    holders = Holders()
    try:
        async with node(server.url, "task-1", holders) as (one, owner, _):
            assert len(one.held) == SHARD_COUNT
            server.stop()

            async def all_lost() -> bool:
                return owner.lost == set(range(SHARD_COUNT)) and not one.held

            await eventually(all_lost, timeout(10))
            assert holders.of("task-1") == set()
    finally:
        server.stop()


@asynccontextmanager
async def intruder(nc: Client, shard: int) -> AsyncIterator[None]:
    """Another node, alive (heartbeats every tenth of the lease), that takes `shard`'s lease
    over by compare-and-set, as a node whose view had lost the holder would."""
    js = nc.jetstream()
    nodes, shards = await js.key_value(NODES_BUCKET), await js.key_value(SHARDS_BUCKET)

    async def beat() -> None:
        for count in itertools.count(1):
            await nodes.put("intruder", Member("intruder", "intruder:7051", beat=count).encode())
            await asyncio.sleep(LEASE_S / 10)

    beating = asyncio.create_task(beat())
    try:
        current = await shards.get(shard_key(shard))
        lease = Lease("intruder", "intruder:7051").encode()
        await shards.update(shard_key(shard), lease, last=current.revision)
        yield
    finally:
        await cancel_and_wait(beating)


async def test_a_shard_another_node_took_over_is_stopped_here(tmp_path: Path) -> None:
    server = await start_nats(tmp_path / "nats")
    holders = Holders()
    try:
        async with node(server.url, "task-1", holders) as (one, owner, nc):
            assert 3 in one.held
            async with intruder(nc, 3):

                async def stopped() -> bool:
                    return 3 in owner.lost and 3 not in one.held

                await eventually(stopped, timeout(10))
                assert 3 not in holders.of("task-1")
                assert owner.lost == {3}  # what it hands the live intruder goes drained
    finally:
        server.stop()


async def test_a_take_over_that_keeps_failing_ends_once_another_node_has_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start_nats(tmp_path / "nats")
    holders = Holders()
    try:
        async with node(server.url, "task-1", holders) as (one, owner, nc):
            owner.refused.add(3)  # the store cannot take shard 3 over: asked again and again
            async with intruder(nc, 3):
                await until(lambda: 3 in owner.lost)
            # The intruder stopped: its heartbeat expires, and task-1 takes shard 3 back.
            await until(lambda: owner.refusals > 0)
            assert 3 in one.held
            gave_up = "shard taken over by another node first"
            with caplog.at_level(logging.WARNING, logger="task_svc.membership"):
                async with intruder(nc, 3):  # ...until the intruder is first again

                    async def given_up() -> bool:
                        return gave_up in caplog.messages and 3 not in one.held

                    await eventually(given_up, timeout(10))
    finally:
        server.stop()
