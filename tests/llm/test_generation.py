"""Generator: provider streams → GenerateEvents, with retries, fallbacks, guards, cache."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any

import pytest

from llm_svc.catalogue import Catalogue, ModelEntry
from llm_svc.coalesce import Window, coalesce
from llm_svc.generation import Generator
from llm_svc.policy import Attempt, CachedAnswer, RetryPolicy
from llm_svc.providers.base import (
    Finish,
    Provider,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    TokenUsage,
)
from llm_svc.providers.local import TOKENS_PER_DELTA, LocalProvider, complete, compose_answer
from svckit import tracing
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, llm_pb2
from tests.conftest import timeout
from tests.llm.fakes import HangingProvider, Script, ScriptedProvider, failure
from tests.llm.streams import check_stream, kinds, progress_reports, progress_values
from tests.traces import in_memory_traces, json_lines, trace_id

Code = common_pb2.ErrorCode

CATALOGUE: dict[str, Any] = {
    "default_order": ["primary", "local"],
    "models": [
        {"id": "local", "provider": "local", "queue": "local", "max_tokens": 256},
        {
            "id": "primary",
            "provider": "alpha",
            "upstream": "alpha-1",
            "max_tokens": 100,
            "fallback": ["secondary", "local"],
        },
        {"id": "secondary", "provider": "beta", "max_tokens": 100},
        {"id": "unconfigured", "provider": "gamma", "max_tokens": 100},
    ],
}


def make(providers: Mapping[str, Provider], **kwargs: Any) -> tuple[Generator, list[float]]:
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    catalogue = Catalogue.from_dict(CATALOGUE, providers.keys())
    kwargs.setdefault("retry", RetryPolicy(max_attempts=3, base_delay_s=0.1, max_delay_s=2.0))
    return Generator(catalogue, providers, sleep=sleep, **kwargs), delays


def request(
    prompt: str = "Hello there", model: str = "", **options: Any
) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(
        request_id="t1",
        user_id="alice",
        model=model,
        prompt=prompt,
        options=common_pb2.GenerationOptions(**options),
    )


async def run(generator: Generator, req: llm_pb2.GenerateRequest) -> list[llm_pb2.GenerateEvent]:
    async with aclosing(generator.generate(req)) as events:
        return [event async for event in events]


def local() -> LocalProvider:
    return LocalProvider(token_delay_s=0)


async def test_local_generation_streams_deltas_progress_and_final() -> None:
    generator, _ = make({"local": local()})
    events = await run(generator, request("Write a haiku about the sea"))
    final = check_stream(events).final
    expected = complete("Write a haiku about the sea", 256)
    assert final.content == expected.content
    # At zero delay the model's deltas carry TOKENS_PER_DELTA tokens each (the last, the rest).
    n, step = len(expected.tokens), TOKENS_PER_DELTA
    starts = range(0, n, step)
    texts = ["".join(expected.tokens[i : i + step]) for i in starts]
    assert [e.delta.text for e in events if e.HasField("delta")] == texts
    assert (final.model, final.finish_reason) == ("local", "stop")
    assert final.usage.completion_tokens == len(expected.tokens)
    assert final.usage.total_tokens == expected.usage.total_tokens
    assert not final.from_fallback and not final.from_cache
    # The local model announces its length, so progress moves with every delta.
    tokens = [report.tokens for report in progress_reports(events)]
    assert tokens == [*(min(i + step, n) for i in starts), n]


async def test_max_tokens_truncates_with_length_and_is_capped_by_the_model() -> None:
    generator, _ = make({"local": local()})
    final = check_stream(await run(generator, request("Hi", max_tokens=5))).final
    assert final.content == "".join(compose_answer("Hi", 5))
    assert final.finish_reason == "length"
    provider = ScriptedProvider("alpha")
    generator, _ = make({"local": local(), "alpha": provider})
    await run(generator, request(model="primary", max_tokens=10_000))
    await run(generator, request(model="primary"))
    assert [r.max_tokens for r in provider.requests] == [100, 100]
    assert provider.requests[0].model == "alpha-1"


async def test_options_reach_the_provider() -> None:
    provider = ScriptedProvider("alpha")
    generator, _ = make({"local": local(), "alpha": provider})
    await run(generator, request(model="primary", max_tokens=7, temperature=0.5, system="terse"))
    sent = provider.requests[0]
    assert (sent.max_tokens, sent.temperature, sent.system) == (7, 0.5, "terse")
    assert (sent.user_id, sent.request_id, sent.prompt) == ("alice", "t1", "Hello there")
    await run(generator, request(model="primary"))
    assert provider.requests[1].temperature is None


@pytest.mark.parametrize(
    ("req", "code", "text"),
    [
        (request(model="nope"), Code.ERROR_CODE_MODEL_NOT_FOUND, "no such model"),
        (request(model="unconfigured"), Code.ERROR_CODE_MODEL_NOT_FOUND, "gamma"),
        (request(prompt="  "), Code.ERROR_CODE_INVALID_REQUEST, "empty"),
        (request(max_tokens=-1), Code.ERROR_CODE_INVALID_REQUEST, "max_tokens"),
        (request(temperature=3.0), Code.ERROR_CODE_INVALID_REQUEST, "temperature"),
    ],
)
async def test_bad_requests_end_with_one_error_event(
    req: llm_pb2.GenerateRequest, code: int, text: str
) -> None:
    generator, _ = make({"local": local()})
    events = await run(generator, req)
    assert kinds(events) == ["error"]
    assert events[0].error.code == code and text in events[0].error.message
    assert not events[0].error.retryable


async def test_progress_without_an_estimate_uses_max_tokens() -> None:
    provider = ScriptedProvider("alpha", Script(deltas=["a"] * 10))
    generator, _ = make({"local": local(), "alpha": provider})
    events = await run(generator, request(model="primary", max_tokens=20))
    check_stream(events)
    progress = progress_values(events)
    assert progress[:2] == [0.05, 0.1] and progress[-2] == 0.5 and progress[-1] == 1.0


async def test_missing_usage_is_counted() -> None:
    provider = ScriptedProvider("alpha", Script(deltas=["a", " b"], finish=Finish("stop")))
    generator, _ = make({"local": local(), "alpha": provider})
    final = check_stream(await run(generator, request("one two", model="primary"))).final
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (2, 2)


async def test_retryable_failure_before_text_is_retried_after_retry_after() -> None:
    provider = ScriptedProvider(
        "alpha",
        Script(deltas=[], error=failure(Code.ERROR_CODE_RATE_LIMITED, retry_after_ms=1500)),
        Script(deltas=["ok"]),
    )
    generator, delays = make({"local": local(), "alpha": provider})
    final = check_stream(await run(generator, request(model="primary"))).final
    assert final.content == "ok" and final.model == "primary" and not final.from_fallback
    assert len(provider.requests) == 2
    assert delays == [1.5]


async def test_backoff_grows_then_falls_back_to_the_next_model() -> None:
    alpha = ScriptedProvider("alpha", Script(deltas=[], error=failure(Code.ERROR_CODE_OVERLOADED)))
    beta = ScriptedProvider("beta", Script(deltas=["from", " beta"]))
    generator, delays = make({"local": local(), "alpha": alpha, "beta": beta})
    final = check_stream(await run(generator, request(model="primary"))).final
    assert (final.content, final.model, final.from_fallback) == ("from beta", "secondary", True)
    assert len(alpha.requests) == 3 and len(beta.requests) == 1
    assert len(delays) == 2 and delays[0] <= 0.1 and delays[1] <= 0.2


async def test_a_long_retry_after_skips_to_the_fallback_at_once() -> None:
    alpha = ScriptedProvider(
        "alpha", Script(deltas=[], error=failure(Code.ERROR_CODE_RATE_LIMITED, 60_000))
    )
    generator, delays = make({"local": local(), "alpha": alpha})
    final = check_stream(await run(generator, request(model="primary"))).final
    assert final.model == "local" and final.from_fallback
    assert len(alpha.requests) == 1 and delays == []


@pytest.mark.parametrize(
    "code", [Code.ERROR_CODE_QUOTA_EXCEEDED, Code.ERROR_CODE_MODEL_NOT_FOUND, Code.ERROR_CODE_AUTH]
)
async def test_a_provider_side_refusal_falls_back_without_retrying(code: int) -> None:
    alpha = ScriptedProvider("alpha", Script(deltas=[], error=failure(code)))  # type: ignore[arg-type]
    generator, delays = make({"local": local(), "alpha": alpha})
    final = check_stream(await run(generator, request(model="primary"))).final
    assert final.model == "local" and final.from_fallback
    assert len(alpha.requests) == 1 and delays == []


async def test_a_chain_that_is_down_answers_unavailable_not_another_models_text() -> None:
    """No echo, no cache: an honest, retryable `unavailable` saying when to come back."""
    down = failure(Code.ERROR_CODE_RATE_LIMITED, retry_after_ms=60_000)
    alpha = ScriptedProvider("alpha", Script(deltas=[], error=down))
    generator, _ = make({"alpha": alpha})
    events = await run(generator, request(model="primary"))
    error = check_stream(events).error
    assert error.code == Code.ERROR_CODE_UNAVAILABLE and error.retryable
    assert error.retry_after_ms == 60_000 and "primary" in error.message
    assert not [e for e in events if e.HasField("delta")]


async def test_a_non_retryable_error_is_not_retried_nor_fallen_back() -> None:
    alpha = ScriptedProvider(
        "alpha", Script(deltas=[], error=failure(Code.ERROR_CODE_CONTENT_FILTERED))
    )
    generator, delays = make({"local": local(), "alpha": alpha})
    error = check_stream(await run(generator, request(model="primary"))).error
    assert error.code == Code.ERROR_CODE_CONTENT_FILTERED
    assert len(alpha.requests) == 1 and delays == []


async def test_a_failure_after_text_without_a_next_model_ends_with_that_error() -> None:
    alpha = ScriptedProvider(
        "alpha", Script(deltas=["partial"], error=failure(Code.ERROR_CODE_NETWORK))
    )
    generator, delays = make({"alpha": alpha})
    events = await run(generator, request(model="primary"))
    assert kinds(events)[0] == "delta"
    error = check_stream(events).error
    assert error.code == Code.ERROR_CODE_NETWORK and error.retryable
    assert len(alpha.requests) == 1 and delays == []


async def test_a_failure_after_text_continues_on_the_next_model_from_that_text() -> None:
    """Mid-stream fallback: the caller keeps "Hello there", is told who takes over, and the
    next model is asked to continue that text, not to start again."""
    alpha = ScriptedProvider(
        "alpha", Script(deltas=["Hello", " there"], error=failure(Code.ERROR_CODE_NETWORK))
    )
    beta = ScriptedProvider("beta", Script(deltas=[",", " world"]))
    generator, delays = make({"alpha": alpha, "beta": beta})
    events = await run(generator, request(model="primary"))
    final = check_stream(events).final  # progress monotonic, deltas joined == content
    assert (final.content, final.model, final.from_fallback) == (
        "Hello there, world",
        "secondary",
        True,
    )
    handover = [e.progress for e in events if e.HasField("progress") and e.progress.fallback_model]
    assert [p.fallback_model for p in handover] == ["secondary"]
    names = kinds(events)
    at = next(i for i, e in enumerate(events) if e.progress.fallback_model)
    assert names[:at] == ["delta", "delta"] and names[at + 1] == "delta"
    assert len(alpha.requests) == 1 and delays == []  # not retried from scratch
    assert beta.requests[0].continue_from == "Hello there"


async def test_the_local_model_continues_its_own_answer() -> None:
    provider = local()
    full = "".join(compose_answer("Hello there"))
    half = "".join(compose_answer("Hello there")[:5])
    req = ProviderRequest(model="m", prompt="Hello there", max_tokens=256, continue_from=half)
    rest = "".join([e.text async for e in provider.stream(req) if isinstance(e, TextDelta)])
    assert half + rest == full and rest


async def test_a_stream_without_finish_is_a_network_error() -> None:
    alpha = ScriptedProvider("alpha", Script(deltas=["a"], finish=None))
    generator, _ = make({"alpha": alpha})
    error = check_stream(await run(generator, request(model="primary"))).error
    assert error.code == Code.ERROR_CODE_NETWORK and "ended early" in error.message


async def test_a_provider_bug_becomes_an_internal_error_event() -> None:
    class Broken(ScriptedProvider):
        async def stream(self, request: ProviderRequest):  # type: ignore[override]
            raise RuntimeError("boom")
            yield  # pragma: no cover

    generator, _ = make({"local": local(), "alpha": Broken("alpha")})
    final = check_stream(await run(generator, request(model="primary"))).final
    assert final.model == "local" and final.from_fallback
    catalogue = Catalogue.from_dict(
        {"models": [CATALOGUE["models"][1] | {"fallback": []}]}, {"alpha"}
    )
    broken = Generator(catalogue, {"alpha": Broken("alpha")}, retry=RetryPolicy(max_attempts=1))
    error = check_stream(await run(broken, request())).error
    assert error.code == Code.ERROR_CODE_INTERNAL and "boom" in error.message


class RecordingGuard:
    def __init__(self, refuse: ServiceError | None = None) -> None:
        self.refuse = refuse
        self.seen: list[tuple[str, TokenUsage | None, str | None]] = []

    @asynccontextmanager
    async def admit(self, attempt: Attempt) -> AsyncIterator[None]:
        if self.refuse is not None:
            raise self.refuse
        error: str | None = None
        try:
            yield
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            self.seen.append((attempt.model.id, attempt.usage, error))


async def test_guards_see_each_attempt_and_may_refuse_it() -> None:
    guard = RecordingGuard()
    generator, _ = make({"local": local()}, guards=[guard])
    final = check_stream(await run(generator, request(max_tokens=3))).final
    assert guard.seen == [("local", TokenUsage(2, 3), None)]
    assert final.usage.completion_tokens == 3
    quota = RecordingGuard(ServiceError(Code.ERROR_CODE_QUOTA_EXCEEDED, "daily quota used"))
    generator, _ = make({"local": local()}, guards=[quota])
    error = check_stream(await run(generator, request())).error
    assert error.code == Code.ERROR_CODE_QUOTA_EXCEEDED


class MemoryCache:
    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], CachedAnswer] = {}

    async def get(self, model: ModelEntry, request: ProviderRequest) -> CachedAnswer | None:
        return self.answers.get((model.id, request.prompt))

    async def put(self, model: ModelEntry, request: ProviderRequest, answer: CachedAnswer) -> None:
        self.answers[(model.id, request.prompt)] = answer


async def test_a_cached_answer_is_the_last_resort() -> None:
    cache = MemoryCache()
    alpha = ScriptedProvider(
        "alpha", Script(deltas=["fresh"]), Script(deltas=[], error=failure(Code.ERROR_CODE_NETWORK))
    )
    catalogue_data = {"models": [CATALOGUE["models"][1] | {"fallback": []}]}
    catalogue = Catalogue.from_dict(catalogue_data, {"alpha"})
    generator = Generator(
        catalogue, {"alpha": alpha}, retry=RetryPolicy(max_attempts=1), cache=cache
    )
    first = check_stream(await run(generator, request())).final
    assert first.content == "fresh" and not first.from_cache
    again = check_stream(await run(generator, request())).final
    assert (again.content, again.from_cache, again.from_fallback) == ("fresh", True, True)


async def test_closing_the_generation_stops_the_provider_stream() -> None:
    provider = HangingProvider()
    generator, _ = make({"local": provider})
    events = generator.generate(request())
    first = await anext(events)
    assert first.delta.text == "thinking"
    task = asyncio.ensure_future(anext(events))
    await asyncio.wait_for(provider.first_delta_sent.wait(), timeout(5))
    task.cancel()
    await asyncio.wait_for(provider.stopped.wait(), timeout(5))
    assert provider.how == "cancelled"
    await events.aclose()


PROVIDER_LOG = "tests.llm.provider"


class LoggingProvider(ScriptedProvider):
    """Logs as its call starts and as its stream closes, as an HTTP provider might."""

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        logging.getLogger(PROVIDER_LOG).info("provider called")
        try:
            async with aclosing(super().stream(request)) as events:
                async for event in events:
                    yield event
        finally:
            logging.getLogger(PROVIDER_LOG).info("provider closed")


async def test_what_llm_svc_logs_during_a_traced_generation_carries_its_trace_id() -> None:
    provider = LoggingProvider(
        "alpha",
        Script(deltas=[], error=failure(Code.ERROR_CODE_RATE_LIMITED)),
        Script(deltas=["o", "k"]),
    )
    generator, _ = make({"local": local(), "alpha": provider})
    with (
        in_memory_traces() as exported,
        json_lines("llm_svc.generation", PROVIDER_LOG) as logs,
    ):
        caller = tracing.start("generate")  # task_svc's span, which its request carries
        traced = request(model="primary")
        traced.traceparent = tracing.traceparent(caller)
        between = set()
        # As LlmServicer.events serves it: coalesced, so read by a task of coalesce's own.
        async with aclosing(coalesce(generator.generate(traced), Window(0.01))) as events:
            async for _ in events:
                between.add(tracing.current_trace_id())
        tracing.end(caller)
    spans = exported.get_finished_spans()
    assert sorted(s.name for s in spans) == ["generate", "generation", "provider", "provider"]
    (expected,) = {trace_id(s) for s in spans}
    assert [(line["msg"], line.get("trace_id")) for line in logs.lines] == [
        ("provider called", expected),
        ("provider closed", expected),
        ("generation attempt failed", expected),
        ("provider called", expected),
        ("provider closed", expected),
        ("generation finished", expected),
    ]
    assert between == {""}  # the span is current in the generation's steps only
