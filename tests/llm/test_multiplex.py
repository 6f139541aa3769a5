"""GenerateMany: many generations over one gRPC stream, through both real halves (llm_svc's
multiplex.py and task_svc's llm_client.py) and a real grpc.aio server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from llm_svc.providers.local import complete
from llm_svc.server import LlmServer
from svckit.errors import ServiceError
from svckit.grpc_server import insecure_channel
from switchboard.v1 import llm_pb2, llm_pb2_grpc
from task_svc.llm_client import LlmClient
from tests.conftest import eventually, timeout
from tests.llm.fakes import HangingProvider, settings
from tests.llm.streams import check_stream


@pytest.fixture
async def client(server: LlmServer) -> AsyncIterator[LlmClient]:
    async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
        client = LlmClient(llm_pb2_grpc.LlmServiceStub(channel))
        try:
            yield client
        finally:
            await client.close()


async def events_of(client: LlmClient, prompt: str) -> list[llm_pb2.GenerateEvent]:
    request = llm_pb2.GenerateRequest(request_id=prompt, user_id="alice", prompt=prompt)
    async with aclosing(client.generate(request)) as events:
        return [event async for event in events]


async def test_concurrent_generations_share_one_stream_and_each_gets_its_answer(
    client: LlmClient,
) -> None:
    prompts = [f"question number {i} about switchboards" for i in range(20)]
    results = await asyncio.wait_for(
        asyncio.gather(*(events_of(client, p) for p in prompts)), timeout(10)
    )
    for prompt, events in zip(prompts, results, strict=True):
        assert check_stream(events).final.content == complete(prompt, 256).content
    assert client.muxes[0].streams_opened == 1  # one stream carried them all


async def test_closing_one_generation_cancels_its_provider_and_not_the_others(
    server: LlmServer, client: LlmClient
) -> None:
    hanging = HangingProvider()
    local = server.generator.providers["local"]
    server.generator.providers = {"local": hanging}
    request = llm_pb2.GenerateRequest(request_id="h", user_id="alice", prompt="hold on")
    stream = client.generate(request)
    first = await asyncio.wait_for(anext(stream), timeout(5))
    assert first.delta.text == "thinking"
    server.generator.providers = {"local": local}  # later generations answer at once
    other = asyncio.ensure_future(events_of(client, "a second question"))
    await stream.aclose()  # a cancelled worker does this
    await asyncio.wait_for(hanging.stopped.wait(), timeout(5))
    assert hanging.how == "cancelled"
    assert check_stream(await asyncio.wait_for(other, timeout(5))).HasField("final")


async def test_closing_the_client_cancels_what_still_runs(
    server: LlmServer, client: LlmClient
) -> None:
    hanging = HangingProvider()
    server.generator.providers = {"local": hanging}
    stream = client.generate(llm_pb2.GenerateRequest(request_id="h", prompt="hold on"))
    await asyncio.wait_for(anext(stream), timeout(5))
    await client.close()  # the stream ends: nothing may outlive it in llm_svc
    await asyncio.wait_for(hanging.stopped.wait(), timeout(5))
    with pytest.raises(ServiceError) as broken:
        await asyncio.wait_for(anext(stream), timeout(5))
    assert broken.value.retryable


async def test_a_broken_stream_fails_its_generations_and_the_next_one_opens_a_new_stream(
    server: LlmServer,
) -> None:
    hanging = HangingProvider()
    server.generator.providers = {"local": hanging}
    second = LlmServer(settings())
    await second.start()
    try:
        async with insecure_channel(f"127.0.0.1:{second.port}") as channel:
            client = LlmClient(llm_pb2_grpc.LlmServiceStub(channel))
            second.generator.providers = {"local": hanging}
            stream = client.generate(llm_pb2.GenerateRequest(request_id="h", prompt="hold on"))
            await asyncio.wait_for(anext(stream), timeout(5))
            await second.shutdown()  # llm_svc goes away mid-generation
            with pytest.raises(ServiceError) as broken:
                await asyncio.wait_for(anext(stream), timeout(5))
            assert broken.value.retryable
            with pytest.raises(ServiceError):  # still down: the new stream fails too
                await asyncio.wait_for(events_of(client, "again"), timeout(5))
            assert client.muxes[0].streams_opened == 2
            await client.close()
    finally:
        await second.shutdown()


async def test_streams_spread_generations_over_the_replicas_of_one_target(
    server: LlmServer,
) -> None:
    second = LlmServer(settings())
    await second.start()
    replicas = (server, second)
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    try:
        async with insecure_channel(target) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)

            async def both_connected() -> bool:  # round_robin picks only among ready ones
                warm = llm_pb2.GenerateRequest(request_id="w", user_id="warm", prompt="w")
                async for _ in stub.Generate(warm, timeout=timeout(5)):
                    pass
                return all(r.quota.usage("warm")[0] > 0 for r in replicas)

            await eventually(both_connected)
            client = LlmClient(stub, streams=2)
            prompts = [f"spread {i}" for i in range(8)]
            answers = await asyncio.gather(*(events_of(client, p) for p in prompts))
            await client.close()
        assert [check_stream(a).final.content for a in answers] == [
            complete(p, 256).content for p in prompts
        ]
        served = [r.quota.usage("alice")[0] for r in replicas]
        assert sum(served) == 8 and min(served) > 0, served
    finally:
        await second.shutdown()
