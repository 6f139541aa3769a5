"""LlmService over a real grpc.aio server on port 0, and `python -m llm_svc` as a process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import orjson
import pytest

from llm_svc.providers.local import complete
from llm_svc.server import LlmServer
from svckit.grpc_server import insecure_channel
from switchboard.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from tests.conftest import timeout
from tests.llm.fakes import HangingProvider
from tests.llm.streams import check_stream, kinds

Code = common_pb2.ErrorCode
PROVIDER_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "GEMINI_API_KEY",
    "GEMINI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "LLM_DEFAULT_MODEL",
    "LLM_MODELS_FILE",
)


@pytest.fixture
async def stub(server: LlmServer) -> AsyncIterator[llm_pb2_grpc.LlmServiceAsyncStub]:
    async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)  # type: ignore[misc]


async def generate(
    stub: llm_pb2_grpc.LlmServiceAsyncStub, request: llm_pb2.GenerateRequest
) -> list[llm_pb2.GenerateEvent]:
    call = stub.Generate(request, timeout=timeout(10))
    return [event async for event in call]


async def test_generate_streams_the_local_answer(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    prompt = "Explain gRPC streaming"
    events = await generate(
        stub, llm_pb2.GenerateRequest(request_id="t1", user_id="alice", prompt=prompt)
    )
    final = check_stream(events).final
    expected = complete(prompt, 256)
    assert final.content == expected.content
    assert (final.model, final.finish_reason) == ("local", "stop")
    assert final.usage.total_tokens == expected.usage.total_tokens


async def test_max_tokens_over_grpc(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    options = common_pb2.GenerationOptions(max_tokens=4)
    request = llm_pb2.GenerateRequest(model="local", prompt="Hi", options=options)
    final = check_stream(await generate(stub, request)).final
    assert final.finish_reason == "length"
    assert final.content == complete("Hi", 4).content


async def test_unknown_model_is_an_error_event_not_a_status(
    stub: llm_pb2_grpc.LlmServiceAsyncStub,
) -> None:
    call = stub.Generate(llm_pb2.GenerateRequest(model="gpt-4o", prompt="Hi"))
    events = [event async for event in call]
    assert kinds(events) == ["error"]
    assert events[0].error.code == Code.ERROR_CODE_MODEL_NOT_FOUND
    assert "openai is not configured" in events[0].error.message
    assert await call.code() == grpc.StatusCode.OK


async def test_list_models(stub: llm_pb2_grpc.LlmServiceAsyncStub) -> None:
    reply = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=timeout(5))
    assert list(reply.models) == [
        llm_pb2.ModelInfo(
            id="local", provider="local", queue="local", is_default=True, max_tokens=256
        )
    ]


async def test_client_cancellation_stops_the_provider_stream(
    server: LlmServer, stub: llm_pb2_grpc.LlmServiceAsyncStub
) -> None:
    hanging = HangingProvider()
    server.generator.providers = {"local": hanging}
    call = stub.Generate(llm_pb2.GenerateRequest(prompt="Hi"))
    first = await asyncio.wait_for(call.read(), timeout(5))
    assert first.delta.text == "thinking"
    assert not hanging.stopped.is_set()
    call.cancel()
    await asyncio.wait_for(hanging.stopped.wait(), timeout(5))
    assert hanging.how == "cancelled"


async def test_shutdown_cancels_generations_still_running_after_the_grace(
    server: LlmServer, stub: llm_pb2_grpc.LlmServiceAsyncStub
) -> None:
    hanging = HangingProvider()
    server.generator.providers = {"local": hanging}
    call = stub.Generate(llm_pb2.GenerateRequest(prompt="Hi"))
    await asyncio.wait_for(call.read(), timeout(5))
    await asyncio.wait_for(server.shutdown(), timeout(5))
    assert hanging.stopped.is_set()
    await server.shutdown()  # idempotent
    with pytest.raises(grpc.aio.AioRpcError):
        await call.read()


async def test_the_service_runs_as_a_process_and_stops_cleanly_on_sigterm() -> None:
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV}
    env |= {"LLM_SVC_LISTEN": "127.0.0.1:0", "LOCAL_MODEL_TOKEN_DELAY_MS": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_svc", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        port = 0
        async with asyncio.timeout(timeout(15)):
            while not port:
                line = await process.stderr.readline()
                assert line, "llm_svc exited before serving"
                record = orjson.loads(line)
                if record["msg"] == "grpc serving":
                    port = record["port"]
        async with insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: llm_pb2_grpc.LlmServiceAsyncStub = llm_pb2_grpc.LlmServiceStub(channel)  # type: ignore[assignment]
            events = await generate(stub, llm_pb2.GenerateRequest(prompt="Ping"))
            assert check_stream(events).final.content == complete("Ping", 256).content
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout(10)):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
