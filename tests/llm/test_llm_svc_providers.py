"""llm_svc serving each real provider (keys and base URLs from settings, as from the
environment) over gRPC, against the local wire-format servers: ListModels, a generation with
progress, retries of a 5xx, an invalid key (AUTH, not retried, fallback), a stall before the
first token (TIMEOUT, retried, fallback), an error event after text (the stream's error)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from llm_svc.catalogue import DEFAULT_MODELS_FILE
from llm_svc.config import Settings
from llm_svc.providers.gemini import GeminiProvider
from llm_svc.server import LlmServer
from svckit.grpc_server import insecure_channel
from switchboard.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from tests.conftest import timeout
from tests.llm import anthropic_server as ant
from tests.llm import gemini_server as gem
from tests.llm import openai_server as oai
from tests.llm.fakes import settings
from tests.llm.http_fake import FakeSseServer, Reply
from tests.llm.streams import check_stream, progress_values

Code = common_pb2.ErrorCode
KEY = "test-key-123"


@dataclass(frozen=True)
class Case:
    provider: str
    model: str  # a model id of models.toml served by it
    server: Callable[..., FakeSseServer]  # (*replies, key=)
    reply: type[Reply]
    completion: object  # tokens → payloads
    unavailable: Reply  # a 5xx


CASES = [
    Case(
        "openai",
        "gpt-4o-mini",
        oai.FakeOpenAI,
        oai.Reply,
        oai.completion,
        oai.Reply(503, body=b"Service Unavailable"),
    ),
    Case(
        "gemini",
        "gemini-2.5-flash-lite",
        gem.FakeGemini,
        gem.Reply,
        gem.completion,
        gem.Reply(503, body=gem.api_error(503, "UNAVAILABLE", "The model is overloaded.")),
    ),
    Case(
        "anthropic",
        "claude-haiku-4-5",
        ant.FakeAnthropic,
        ant.Reply,
        ant.completion,
        ant.Reply(529, body=ant.OVERLOADED),
    ),
]


@pytest.fixture(params=CASES, ids=[c.provider for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@asynccontextmanager
async def serving(
    case: Case, *replies: Reply, key: str = KEY, **overrides: object
) -> AsyncIterator[tuple[llm_pb2_grpc.LlmServiceAsyncStub, FakeSseServer, LlmServer]]:
    fake = case.server(*replies, key=KEY)
    base_url = await fake.start()
    values: dict[str, object] = {
        f"{case.provider}_api_key": key,
        f"{case.provider}_base_url": base_url,
        "llm_http_read_timeout_s": 0.2,
    }
    server = LlmServer(settings(**(values | overrides)))
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield llm_pb2_grpc.LlmServiceStub(channel), fake, server  # type: ignore[misc]
    finally:
        await server.shutdown()
        await fake.stop()


async def generate(
    stub: llm_pb2_grpc.LlmServiceAsyncStub, model: str, prompt: str = "Hi"
) -> list[llm_pb2.GenerateEvent]:
    request = llm_pb2.GenerateRequest(request_id="r1", user_id="alice", model=model, prompt=prompt)
    return [event async for event in stub.Generate(request, timeout=timeout(10))]


async def test_a_provider_with_a_key_is_offered_and_serves(case: Case) -> None:
    tokens = [f" t{i}" for i in range(30)]
    reply = case.reply(payloads=case.completion(tokens))  # type: ignore[operator]
    async with serving(case, reply) as (stub, fake, _):
        models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=timeout(5))
        offered = {m.id: m.provider for m in models.models}
        assert offered[case.model] == case.provider and offered["local"] == "local"
        assert {p for p in offered.values()} == {case.provider, "local"}
        events = await generate(stub, case.model)
    final = check_stream(events).final
    assert final.content == "".join(tokens) and final.model == case.model
    assert final.finish_reason == "stop" and final.usage.completion_tokens == 30
    assert not final.from_fallback and not final.from_cache
    # Progress moved along the stream (not only the closing 1.0).
    progress = progress_values(events)
    assert len(progress) > 3 and progress[-1] == 1.0
    assert len(fake.requests) == 1


async def test_gemini_flash_lite_is_a_model_id_with_a_gemini_key() -> None:
    async with serving(CASES[1], gem.Reply()) as (stub, _, _):
        models = await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=timeout(5))
    ids = {m.id for m in models.models}
    assert {"gemini-2.5-flash-lite", "gemini-2.5-flash", "gemini-2.5-pro"} <= ids
    assert next(m for m in models.models if m.is_default).id == "gemini-2.5-flash"


async def test_a_5xx_is_retried(case: Case) -> None:
    ok = case.reply(payloads=case.completion(["fine"]))  # type: ignore[operator]
    async with serving(case, case.unavailable, ok) as (stub, fake, _):
        final = check_stream(await generate(stub, case.model)).final
    assert final.content == "fine" and final.model == case.model and not final.from_fallback
    assert len(fake.requests) == 2


async def test_an_invalid_key_is_not_retried_and_never_answered_by_the_echo_model(
    case: Case,
) -> None:
    async with serving(case, key="wrong-key") as (stub, fake, _):
        error = check_stream(await generate(stub, case.model)).error
    assert error.code == Code.ERROR_CODE_AUTH and not error.retryable
    assert len(fake.requests) == 1  # AUTH is not retried


async def test_an_invalid_key_alone_is_an_auth_error(case: Case) -> None:
    async with serving(case, key="wrong-key") as (stub, fake, server):
        server.generator.providers = {case.provider: server.providers[case.provider]}
        error = check_stream(await generate(stub, case.model)).error
    assert error.code == Code.ERROR_CODE_AUTH and not error.retryable
    assert len(fake.requests) == 1


async def test_a_stall_before_any_text_times_out_is_retried_then_unavailable(case: Case) -> None:
    stall = case.reply(payloads=[], hang=True)
    async with serving(case, stall, llm_retry_max_attempts=2) as (stub, fake, _):
        error = check_stream(await generate(stub, case.model)).error
    assert error.code == Code.ERROR_CODE_UNAVAILABLE and error.retryable
    assert len(fake.requests) == 2


async def test_a_failure_after_text_ends_the_stream_with_its_error(case: Case) -> None:
    cut = case.reply(payloads=case.completion(["par", "tial"])[:-1], drop=True)  # type: ignore[operator]
    async with serving(case, cut) as (stub, fake, _):
        events = await generate(stub, case.model)
    error = check_stream(events).error
    assert error.code == Code.ERROR_CODE_NETWORK and error.retryable
    assert "".join(e.delta.text for e in events if e.HasField("delta")).startswith("par")
    assert len(fake.requests) == 1


async def test_when_every_model_is_down_the_cache_answers(case: Case) -> None:
    ok = case.reply(payloads=case.completion(["cached", " answer"]))  # type: ignore[operator]
    async with serving(case, ok, case.unavailable) as (stub, _, server):
        first = check_stream(await generate(stub, case.model)).final
        assert not first.from_cache
        # Leave no fallback: only the provider, now failing.
        server.generator.providers = {case.provider: server.providers[case.provider]}
        again = check_stream(await generate(stub, case.model)).final
    assert (again.content, again.model) == ("cached answer", case.model)
    assert again.from_cache and again.from_fallback


async def test_cancelling_generate_aborts_the_upstream_request(case: Case) -> None:
    first = case.completion(["thinking"])[: 2 if case.provider == "openai" else 1]  # type: ignore[operator]
    if case.provider == "anthropic":
        first = [*ant.opening(), ant.text_delta("thinking")]
    hang = case.reply(payloads=first, hang=True)
    async with serving(case, hang, llm_http_read_timeout_s=30) as (stub, fake, _):
        request = llm_pb2.GenerateRequest(model=case.model, prompt="Hi")
        call = stub.Generate(request)
        first_event = await asyncio.wait_for(call.read(), timeout(5))
        assert first_event.delta.text == "thinking"
        await asyncio.wait_for(fake.streaming.wait(), timeout(5))
        call.cancel()
        await asyncio.wait_for(fake.client_left.wait(), timeout(5))


def models_file(tmp_path: Path, provider_limits: str) -> Path:
    """models.toml with extra `[providers.*]` limits."""
    text = DEFAULT_MODELS_FILE.read_text()
    text = re.sub(r"\[providers\.\w+\]\nrpm = \d+\ntpm = \d+\n", "", text)
    path = tmp_path / "models.toml"
    path.write_text(provider_limits + "\n" + text)
    return path


async def test_our_rate_limit_refuses_before_calling(tmp_path: Path) -> None:
    case = CASES[0]
    path = models_file(tmp_path, "[providers.openai]\nrpm = 2\n")
    async with serving(
        case, llm_models_file=path, llm_rate_limit_max_wait_ms=0, llm_retry_max_delay_ms=50
    ) as (stub, fake, _):
        answers = [check_stream(await generate(stub, case.model)).final for _ in range(3)]
    assert [a.model for a in answers] == [case.model] * 3
    # The third was refused before calling; the cache answered the same request, and says so.
    assert [a.from_cache for a in answers] == [False, False, True]
    assert len(fake.requests) == 2


async def test_a_spent_user_quota_fails_fast() -> None:
    case = CASES[1]
    async with serving(case, llm_user_daily_requests=2) as (stub, fake, _):
        for _ in range(2):
            assert check_stream(await generate(stub, case.model)).HasField("final")
        error = check_stream(await generate(stub, case.model)).error
    assert error.code == Code.ERROR_CODE_QUOTA_EXCEEDED and not error.retryable
    assert error.retry_after_ms > 0
    assert len(fake.requests) == 2


async def test_the_breaker_stops_calling_a_failing_provider(case: Case) -> None:
    async with serving(
        case, case.unavailable, llm_breaker_failures=2, llm_retry_max_attempts=2
    ) as (stub, fake, server):
        for _ in range(3):
            error = check_stream(await generate(stub, case.model)).error
            assert error.code == Code.ERROR_CODE_UNAVAILABLE and error.retryable
        assert len(fake.requests) == 2  # then the circuit opened: no more calls
        breaker = server.breakers.breaker(case.provider)
        assert breaker.state.value == "open"


async def test_keys_and_base_urls_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OPENAI", "GEMINI", "ANTHROPIC"):
        monkeypatch.delenv(f"{name}_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "g-key")
    monkeypatch.setenv("GEMINI_BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "  ")  # blank: not configured
    monkeypatch.setenv("LLM_PROVIDER_LIMITS", '{"gemini": {"rpm": 7}}')
    server = LlmServer(Settings(llm_svc_listen="127.0.0.1:0"))
    await server.shutdown()  # it never started: only its clients to close
    assert sorted(server.providers) == ["gemini", "local"]
    gemini = server.providers["gemini"]
    assert isinstance(gemini, GeminiProvider) and gemini.base_url == "http://127.0.0.1:9"
    assert "gemini-2.5-flash-lite" in server.catalogue.models
    assert "claude-haiku-4-5" in server.catalogue.unavailable
    assert server.catalogue.provider_limits["gemini"].rpm == 7


async def test_a_stream_cut_mid_answer_is_continued_by_the_next_model_of_the_chain() -> None:
    """OpenAI drops the connection after "partial"; Claude, next in gpt-4o-mini's chain, is
    asked to continue that text (an assistant prefill) and the caller keeps it."""
    openai_case, anthropic_case = CASES[0], CASES[2]
    cut = oai.Reply(payloads=oai.completion(["par", "tial"])[:-1], drop=True)
    rest = ant.Reply(payloads=ant.completion([" answer"]))
    cutting = openai_case.server(cut, key=KEY)
    continuing = anthropic_case.server(rest, key=KEY)
    values: dict[str, object] = {
        "openai_api_key": KEY,
        "openai_base_url": await cutting.start(),
        "anthropic_api_key": KEY,
        "anthropic_base_url": await continuing.start(),
        "llm_http_read_timeout_s": 5,
    }
    server = LlmServer(settings(**values))
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            events = await generate(stub, "gpt-4o-mini")  # type: ignore[arg-type]
    finally:
        await server.shutdown()
        await cutting.stop()
        await continuing.stop()
    final = check_stream(events).final
    assert (final.content, final.model, final.from_fallback) == (
        "partial answer",
        "claude-haiku-4-5",
        True,
    )
    handovers = [e.progress.fallback_model for e in events if e.progress.fallback_model]
    assert handovers == ["claude-haiku-4-5"]
    [asked] = continuing.requests
    assert asked.body["messages"][-1] == {"role": "assistant", "content": "partial"}
