"""The OpenAI-compatible provider over real HTTP, against a local server speaking the exact
wire format; and llm_svc serving it (OPENAI_API_KEY / OPENAI_BASE_URL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from llm_svc.providers.base import (
    CONTINUE_INSTRUCTION,
    Finish,
    ProviderError,
    ProviderRequest,
    TextDelta,
    TokenUsage,
)
from llm_svc.providers.openai import OpenAIProvider
from llm_svc.providers.openai_wire import request_body
from llm_svc.providers.registry import tls_context
from llm_svc.server import LlmServer
from svckit.grpc_server import insecure_channel
from switchboard.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from tests.conftest import timeout
from tests.llm.fakes import settings
from tests.llm.openai_server import FakeOpenAI, Reply, api_error, chunk, completion
from tests.llm.streams import check_stream
from tools.natsserver import free_port

Code = common_pb2.ErrorCode
REQUEST = ProviderRequest(model="gpt-4o-mini", prompt="Say hello", max_tokens=20, system="short")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=tls_context(), timeout=timeout(10)) as client:
        yield client


async def serve(*replies: Reply) -> tuple[FakeOpenAI, str]:
    server = FakeOpenAI(*replies)
    return server, await server.start()


async def collect(provider: OpenAIProvider) -> list[object]:
    return [event async for event in provider.stream(REQUEST)]


async def test_streams_deltas_and_finish_with_usage(http: httpx.AsyncClient) -> None:
    server, base_url = await serve(Reply(payloads=completion(["Hi", " there", "!"], "stop", 7)))
    try:
        events = await collect(OpenAIProvider(http, "sk-test", base_url))
    finally:
        await server.stop()
    assert events == [
        TextDelta("Hi"),
        TextDelta(" there"),
        TextDelta("!"),
        Finish("stop", TokenUsage(7, 3)),
    ]
    [sent] = server.requests
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.headers["content-type"] == "application/json"
    assert sent.body["stream"] is True
    assert sent.body["stream_options"] == {"include_usage": True}
    assert sent.body["model"] == "gpt-4o-mini" and sent.body["max_tokens"] == 20
    assert sent.body["messages"][0] == {"role": "system", "content": "short"}


async def test_text_split_anywhere_on_the_wire_arrives_whole(http: httpx.AsyncClient) -> None:
    tokens = ["Caf\u00e9", " \u2615", " \U0001f600"]
    server, base_url = await serve(Reply(payloads=completion(tokens), byte_by_byte=True))
    try:
        events = await collect(OpenAIProvider(http, "sk-test", base_url))
    finally:
        await server.stop()
    assert events[:-1] == [TextDelta(token) for token in tokens]


KEY = api_error("bad key", "invalid_request_error", "invalid_api_key")


@pytest.mark.parametrize(
    ("status", "body", "headers", "code", "retryable", "after"),
    [
        (401, KEY, {}, Code.ERROR_CODE_AUTH, False, 0),
        (
            400,
            api_error("bad", "invalid_request_error"),
            {},
            Code.ERROR_CODE_INVALID_REQUEST,
            False,
            0,
        ),
        (
            429,
            api_error("slow", "requests"),
            {"retry-after": "2"},
            Code.ERROR_CODE_RATE_LIMITED,
            True,
            2000,
        ),
        (500, api_error("oops", "server_error"), {}, Code.ERROR_CODE_INTERNAL, True, 0),
        (503, b"overloaded", {"retry-after-ms": "250"}, Code.ERROR_CODE_OVERLOADED, True, 250),
    ],
)
async def test_http_errors_are_typed(
    http: httpx.AsyncClient,
    status: int,
    body: bytes,
    headers: dict[str, str],
    code: int,
    retryable: bool,
    after: int,
) -> None:
    reply = Reply(status, body=body, headers=headers)
    server, base_url = await serve(reply)
    try:
        with pytest.raises(ProviderError) as caught:
            await collect(OpenAIProvider(http, "sk-test", base_url))
    finally:
        await server.stop()
    error = caught.value
    assert (error.code, error.retryable, error.retry_after_ms) == (code, retryable, after)
    assert error.provider == "openai" and f"HTTP {reply.status}" in error.message
    assert "sk-test" not in error.message


async def test_a_stream_cut_before_done_is_a_network_error(http: httpx.AsyncClient) -> None:
    server, base_url = await serve(Reply(payloads=[chunk({"content": "par"})], done=False))
    provider = OpenAIProvider(http, "sk-test", base_url)
    events: list[object] = []
    try:
        with pytest.raises(ProviderError) as caught:
            async for event in provider.stream(REQUEST):
                events.append(event)
    finally:
        await server.stop()
    assert events == [TextDelta("par")]
    assert caught.value.code == Code.ERROR_CODE_NETWORK and caught.value.retryable


async def test_an_unreachable_server_is_a_network_error(http: httpx.AsyncClient) -> None:
    provider = OpenAIProvider(http, "sk-test", f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ProviderError) as caught:
        await collect(provider)
    assert caught.value.code == Code.ERROR_CODE_NETWORK and caught.value.retryable


async def test_closing_the_stream_aborts_the_http_request(http: httpx.AsyncClient) -> None:
    server, base_url = await serve(Reply(payloads=[chunk({"content": "a"})], hang=True))
    try:
        stream = OpenAIProvider(http, "sk-test", base_url).stream(REQUEST)
        assert await anext(stream) == TextDelta("a")
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.wait_for(server.streaming.wait(), timeout(5))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.wait_for(server.client_left.wait(), timeout(5))
    finally:
        await server.stop()


@pytest.fixture
async def fake_openai() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    server, base_url = await serve(Reply(payloads=completion(["Hello", " from", " OpenAI"])))
    try:
        yield server, base_url
    finally:
        await server.stop()


async def start_llm(base_url: str) -> LlmServer:
    server = LlmServer(settings(openai_api_key="sk-test", openai_base_url=base_url))
    await server.start()
    return server


async def test_llm_svc_offers_and_serves_openai_models(
    fake_openai: tuple[FakeOpenAI, str],
) -> None:
    fake, base_url = fake_openai
    server = await start_llm(base_url)
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub: llm_pb2_grpc.LlmServiceAsyncStub = llm_pb2_grpc.LlmServiceStub(channel)  # type: ignore[assignment]
            models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=timeout(5))
            by_id = {m.id: m for m in models.models}
            assert set(by_id) == {"local", "gpt-4o-mini", "gpt-4o"}
            assert by_id["gpt-4o-mini"].is_default and not by_id["local"].is_default
            call = stub.Generate(llm_pb2.GenerateRequest(prompt="Hi"), timeout=timeout(10))
            final = check_stream([event async for event in call]).final
    finally:
        await server.shutdown()
    assert (final.content, final.model, final.finish_reason) == (
        "Hello from OpenAI",
        "gpt-4o-mini",
        "stop",
    )
    assert final.usage.completion_tokens == 3 and not final.from_fallback
    assert fake.requests[0].body["model"] == "gpt-4o-mini"


async def test_llm_svc_never_answers_an_openai_request_with_the_echo_model() -> None:
    fake, base_url = await serve(Reply(401, body=KEY))
    server = await start_llm(base_url)
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub: llm_pb2_grpc.LlmServiceAsyncStub = llm_pb2_grpc.LlmServiceStub(channel)  # type: ignore[assignment]
            call = stub.Generate(llm_pb2.GenerateRequest(prompt="Hi"), timeout=timeout(10))
            error = check_stream([event async for event in call]).error
    finally:
        await server.shutdown()
        await fake.stop()
    assert error.code == common_pb2.ERROR_CODE_AUTH and not error.retryable
    assert len(fake.requests) == 1  # AUTH is not retried


def test_a_continuation_gives_the_text_so_far_as_the_assistants_turn() -> None:
    request = ProviderRequest(model="m", prompt="Hi", max_tokens=5, continue_from="Hello the")
    assert request_body(request)["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello the"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
