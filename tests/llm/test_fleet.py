"""Several llm_svc replicas keep to one budget (fleet.py): a provider's rpm is the fleet's,
not each replica's, and a user's daily quota is counted once for all of them, surviving a
replica's restart. Real NATS, real in-process servers over gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack

import pytest

from llm_svc.server import LlmServer
from svckit.grpc_server import insecure_channel
from switchboard.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from tests.conftest import timeout
from tests.llm.fakes import settings

Code = common_pb2.ErrorCode


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def replica(stack: AsyncExitStack, **overrides: object) -> LlmServer:
    server = LlmServer(settings(llm_cache_max_entries=0, **overrides))
    await server.start()
    stack.push_async_callback(server.shutdown)
    if server.fleet is not None:
        await asyncio.wait_for(server.fleet.joined.wait(), timeout(10))
    return server


async def outcome(server: LlmServer, prompt: str) -> str:
    """'final', or the error the generation ended with (its code's name and message)."""
    async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        request = llm_pb2.GenerateRequest(
            request_id=prompt, user_id="alice", model="local", prompt=prompt
        )
        async for event in stub.Generate(request, timeout=timeout(10)):
            if event.HasField("final"):
                return "final"
            if event.HasField("error"):
                return f"{Code.Name(event.error.code)}: {event.error.message}"
    raise AssertionError("the stream ended without a final event or an error")


async def test_replicas_keep_to_one_provider_rate_limit(
    nats_url: str, stack: AsyncExitStack
) -> None:
    limits = {"llm_provider_limits": {"local": {"rpm": 2}}, "llm_rate_limit_max_wait_ms": 0}
    a = await replica(stack, nats_url=nats_url, **limits)
    b = await replica(stack, nats_url=nats_url, **limits)
    alone = await replica(stack, **limits)  # no NATS: counts for itself only
    heard = 0
    both_heard = asyncio.Event()
    charge = b.limiter.charge

    def charged(spent: Mapping[str, Sequence[float]]) -> None:
        nonlocal heard
        charge(spent)
        heard += int(sum(amounts[0] for amounts in spent.values()))
        if heard >= 2:
            both_heard.set()

    assert b.fleet is not None and b.fleet.share is not None
    b.fleet.share.on_spent = charged

    assert [await outcome(a, f"a{i}") for i in range(2)] == ["final", "final"]
    await asyncio.wait_for(both_heard.wait(), timeout(10))
    # The chain's one model refused before calling: the answer says why.
    assert "rate limit of local reached" in await outcome(b, "b")
    assert await outcome(alone, "c") == "final"


async def test_replicas_count_one_daily_quota_which_a_new_replica_knows(
    nats_url: str, stack: AsyncExitStack
) -> None:
    quota = {"nats_url": nats_url, "llm_user_daily_requests": 3}
    a = await replica(stack, **quota)
    b = await replica(stack, **quota)
    assert [await outcome(a, f"a{i}") for i in range(2)] == ["final", "final"]
    await a.quota.flush()
    assert await outcome(b, "b1") == "final"  # the third of the day, wherever it runs
    assert (await outcome(b, "b2")).startswith("ERROR_CODE_QUOTA_EXCEEDED")
    await b.quota.flush()
    assert a.quota.usage("alice")[0] == 2  # a has not heard yet; it reads at its next flush
    await a.quota.flush()
    later = await replica(stack, **quota)  # started after: reads today's totals
    assert (await outcome(later, "c")).startswith("ERROR_CODE_QUOTA_EXCEEDED")
    assert later.quota.usage("alice")[0] == 3
