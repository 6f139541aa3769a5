"""Per-user limits hold across gateway replicas (gateway_svc/shared_limits.py): two replicas
on a real nats-server tell each other what their users hold and spend, so one user's
connections and `llm_generate` tokens are one budget, and a replica that stops talking stops
counting."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.aio.client import Client
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway_svc.direct_submit import DirectSubmit
from gateway_svc.limits import ConnectionCounter, RateLimiter
from gateway_svc.shared_limits import SharedLimits
from svckit.catalog import ModelCatalog
from svckit.nats import connect_nats
from tests.conftest import eventually
from tests.gateway.live import running_stack
from tests.gateway.test_direct_submit import Models

QUICK = {"interval_s": 0.02, "full_every_s": 0.2, "peer_ttl_s": 0.5}


@pytest.fixture
async def two_connections(nats_url: str) -> AsyncIterator[tuple[Client, Client]]:
    a, b = await connect_nats(nats_url, "replica-a"), await connect_nats(nats_url, "replica-b")
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


class Replica:
    def __init__(self, nc: Client, connections: int = 0, rate: float = 0.0, burst: int = 1):
        self.connections = ConnectionCounter(connections)
        self.generate = RateLimiter(rate, burst)
        self.shared = SharedLimits(nc, self.connections, self.generate, **QUICK)  # type: ignore[arg-type]


async def test_the_generate_budget_is_one_across_replicas(
    two_connections: tuple[Client, Client],
) -> None:
    a, b = (
        Replica(two_connections[0], rate=0.001, burst=2),
        Replica(two_connections[1], rate=0.001, burst=2),
    )
    for replica in (a, b):
        await replica.shared.start()
    try:
        assert a.generate.take("alice", time.monotonic()) == 0
        assert (
            b.generate.take("alice", time.monotonic()) == 0
        )  # each replica alone would allow one more

        async def both_charged() -> bool:
            return all(r.generate.buckets["alice"].tokens < 1 for r in (a, b))

        await eventually(both_charged)
        assert (
            a.generate.take("alice", time.monotonic()) > 0
            and b.generate.take("alice", time.monotonic()) > 0
        )
        assert a.generate.take("bob", time.monotonic()) == 0  # others are not touched
    finally:
        for replica in (a, b):
            await replica.shared.close()


async def test_connections_count_across_replicas_until_a_replica_falls_silent(
    two_connections: tuple[Client, Client],
) -> None:
    a, b = Replica(two_connections[0], connections=2), Replica(two_connections[1], connections=2)
    for replica in (a, b):
        await replica.shared.start()
    try:
        assert a.connections.acquire("alice", a.shared.elsewhere("alice"))
        assert b.connections.acquire("alice", b.shared.elsewhere("alice"))

        async def a_sees_b() -> bool:
            return a.shared.elsewhere("alice") == 1

        await eventually(a_sees_b)
        assert not a.connections.acquire("alice", a.shared.elsewhere("alice"))
        b.connections.release("alice")

        async def a_sees_b_release() -> bool:
            return a.shared.elsewhere("alice") == 0

        await eventually(a_sees_b_release)
        assert a.connections.acquire("alice", a.shared.elsewhere("alice"))
        # b holds a connection again, then dies without a word: after peer_ttl_s it counts
        # for nothing (its sockets died with it).
        assert b.connections.acquire("alice", b.shared.elsewhere("alice"))
        await eventually(lambda: _equals(a.shared.elsewhere("alice"), 1))
        await b.shared.close()
        await eventually(lambda: _equals(a.shared.elsewhere("alice"), 0), seconds=5)
    finally:
        for replica in (a, b):
            await replica.shared.close()


async def _equals(value: int, expected: int) -> bool:
    return value == expected


async def test_a_user_over_the_limit_across_two_gateways_is_refused_with_403(
    nats_url: str,
) -> None:
    directs = []
    for name in ("gateway-a", "gateway-b"):
        direct = DirectSubmit(await connect_nats(nats_url, name), ModelCatalog(Models()))  # type: ignore[arg-type]
        await direct.start()
        directs.append(direct)
    try:
        limits: dict[str, Any] = {"gateway_max_connections_per_user": 1}
        async with (
            running_stack(direct=directs[0], **limits) as first,
            running_stack(direct=directs[1], **limits) as second,
            connect(first.url("alice")),
        ):
            shared = second.gateway.shared
            assert shared is not None
            await eventually(lambda: _equals(shared.elsewhere("alice"), 1))
            with pytest.raises(InvalidStatus) as refused:
                async with connect(second.url("alice")):
                    pass  # pragma: no cover - refused before the upgrade
            assert refused.value.response.status_code == 403
            async with connect(second.url("bob")):
                pass  # another user is not touched
        unlimited: dict[str, Any] = {
            "gateway_max_connections_per_user": 0,
            "gateway_generate_rate_per_s": 0,
        }
        async with running_stack(direct=directs[0], **unlimited) as free:
            assert free.gateway.shared is None  # nothing to keep: nothing told
    finally:
        for direct in directs:
            await direct.close()
