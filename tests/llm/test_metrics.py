"""llm_svc's Prometheus metrics (llm_svc/metrics.py): read off each server's own registry
in process, then scraped from `python -m llm_svc` on LLM_METRICS_LISTEN."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_svc.breaker import Breakers
from llm_svc.cache import MemoryResponseCache
from llm_svc.catalogue import Catalogue, Limits, ModelEntry
from llm_svc.generation import Generator
from llm_svc.limits import RateLimiter
from llm_svc.metrics import LlmMetrics
from llm_svc.policy import Attempt, RetryPolicy
from llm_svc.providers.base import Provider, ProviderRequest
from llm_svc.server import LlmServer
from svckit.errors import ServiceError
from svckit.grpc_server import insecure_channel
from svckit.metrics import sample
from switchboard.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from tests.conftest import eventually, timeout
from tests.llm.fakes import HangingProvider, Script, ScriptedProvider, failure, settings
from tests.llm.streams import check_stream
from tests.llm.test_llm_svc_providers import CASES, serving
from tests.llm.test_service import PROVIDER_ENV
from tools.natsserver import free_port

Code = common_pb2.ErrorCode
REQUESTS = "switchboard_provider_requests_total"
LATENCY = "switchboard_provider_latency_seconds"
BREAKER = "switchboard_breaker_state"
LOCAL = {"provider": "local", "model": "local"}

CATALOGUE: dict[str, Any] = {
    "models": [
        {"id": "primary", "provider": "alpha", "max_tokens": 100, "fallback": ["secondary"]},
        {"id": "secondary", "provider": "beta", "max_tokens": 100},
    ],
}


def value(server: LlmServer, name: str, **labels: str) -> float:
    return sample(server.metrics.registry, name, **labels)


def request(user: str = "alice") -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(request_id="m1", user_id=user, prompt="Hello there")


async def run(generator: Generator, req: llm_pb2.GenerateRequest) -> llm_pb2.GenerateEvent:
    async with aclosing(generator.generate(req)) as events:
        return check_stream([event async for event in events])


def chain_of(providers: Mapping[str, Provider], **kwargs: Any) -> Generator:
    """primary (alpha) falling back to secondary (beta); one attempt each."""
    catalogue = Catalogue.from_dict(CATALOGUE, providers.keys())
    return Generator(catalogue, providers, retry=RetryPolicy(max_attempts=1), **kwargs)


@pytest.fixture
async def stub(server: LlmServer) -> AsyncIterator[llm_pb2_grpc.LlmServiceAsyncStub]:
    async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)  # type: ignore[misc]


async def test_a_local_generation_counts_one_ok_call_and_times_both_phases(
    server: LlmServer, stub: llm_pb2_grpc.LlmServiceAsyncStub
) -> None:
    events = [e async for e in stub.Generate(request(), timeout=timeout(10))]
    assert check_stream(events).HasField("final")
    assert value(server, REQUESTS, **LOCAL, outcome="ok") == 1
    for phase in ("first_token", "total"):
        assert value(server, f"{LATENCY}_count", **LOCAL, phase=phase) == 1
    first = value(server, f"{LATENCY}_sum", **LOCAL, phase="first_token")
    assert 0 < first <= value(server, f"{LATENCY}_sum", **LOCAL, phase="total")
    assert value(server, "switchboard_generations_active") == 0
    assert value(server, BREAKER, provider="local") == 0  # configured: reported before a failure
    assert value(server, "switchboard_fallbacks_total", model="local") == 0


async def test_a_running_generation_is_active_and_a_cancelled_call_says_so(
    server: LlmServer, stub: llm_pb2_grpc.LlmServiceAsyncStub
) -> None:
    hanging = HangingProvider()
    server.generator.providers = {"local": hanging}
    call = stub.Generate(request())
    assert (await asyncio.wait_for(call.read(), timeout(5))).delta.text == "thinking"
    assert value(server, "switchboard_generations_active") == 1
    call.cancel()  # the servicer's task is cancelled, and the provider call with it
    await asyncio.wait_for(hanging.stopped.wait(), timeout(5))

    async def cancelled() -> float:
        return value(server, REQUESTS, **LOCAL, outcome="cancelled")

    assert await eventually(cancelled) == 1
    assert value(server, "switchboard_generations_active") == 0
    assert value(server, f"{LATENCY}_count", **LOCAL, phase="total") == 0  # successes only


async def test_our_rate_limit_counts_a_refusal_and_no_provider_call() -> None:
    server = LlmServer(
        settings(
            llm_provider_limits={"local": {"rpm": 1}},
            llm_rate_limit_max_wait_ms=0,
            llm_cache_max_entries=0,
        )
    )
    try:
        assert (await run(server.generator, request())).HasField("final")
        error = (await run(server.generator, request())).error
    finally:
        await server.shutdown()
    assert error.code == Code.ERROR_CODE_UNAVAILABLE
    assert value(server, "switchboard_rate_limit_refusals_total", provider="local") == 1
    assert value(server, "switchboard_rate_limit_waits_total", provider="local") == 0
    assert value(server, REQUESTS, **LOCAL, outcome="ok") == 1
    assert value(server, REQUESTS, **LOCAL, outcome="rate_limited") == 0  # never called


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)  # the clock stands still: callers queue at one instant


async def test_a_call_that_queues_for_our_limit_counts_a_wait() -> None:
    metrics, clock = LlmMetrics(), Clock()
    model = ModelEntry("m", "alpha", "alpha-1", "standard", 10)
    limiter = RateLimiter(
        lambda _: {"alpha": Limits(rpm=1)},
        max_wait_s=90,
        clock=clock,
        sleep=clock.sleep,
        on_wait=metrics.rate_limit_waited,
        on_refusal=metrics.rate_limit_refused,
    )
    attempt = Attempt(model, ProviderRequest(model="alpha-1", prompt="hi", max_tokens=10))
    for _ in range(2):  # the first goes at once, the second waits its minute
        async with limiter.admit(attempt):
            pass
    with pytest.raises(ServiceError):  # two minutes away: past max_wait_s
        async with limiter.admit(attempt):
            pass
    assert clock.slept == [pytest.approx(60)]
    assert sample(metrics.registry, "switchboard_rate_limit_waits_total", provider="alpha") == 1
    refusals = sample(metrics.registry, "switchboard_rate_limit_refusals_total", provider="alpha")
    assert refusals == 1


async def test_a_spent_quota_counts_a_refusal() -> None:
    server = LlmServer(settings(llm_user_daily_requests=1))
    try:
        assert (await run(server.generator, request())).HasField("final")
        error = (await run(server.generator, request())).error
    finally:
        await server.shutdown()
    assert error.code == Code.ERROR_CODE_QUOTA_EXCEEDED
    assert value(server, "switchboard_quota_refusals_total") == 1
    assert value(server, REQUESTS, **LOCAL, outcome="ok") == 1
    assert value(server, "switchboard_generations_active") == 0


async def test_the_breaker_gauge_reads_open_once_the_provider_kept_failing() -> None:
    case = CASES[0]
    labels = {"provider": case.provider, "model": case.model}
    async with serving(
        case, case.unavailable, llm_breaker_failures=2, llm_retry_max_attempts=2
    ) as (stub, fake, server):
        assert value(server, BREAKER, provider=case.provider) == 0
        for _ in range(2):  # two failed calls open it; then it refuses without calling
            request = llm_pb2.GenerateRequest(model=case.model, prompt="Hi")
            check_stream([e async for e in stub.Generate(request, timeout=timeout(10))])
        assert value(server, BREAKER, provider=case.provider) == 2
        assert value(server, BREAKER, provider="local") == 0
    assert len(fake.requests) == 2
    assert value(server, REQUESTS, **labels, outcome="overloaded") == 2


def test_an_open_breaker_reads_half_open_once_its_probe_is_due() -> None:
    clock, metrics = Clock(), LlmMetrics()
    breakers = Breakers(failure_threshold=1, reset_after_s=30, clock=clock)
    metrics.watch_breakers(breakers, ["alpha", "beta"])
    breakers.breaker("alpha").failure(clock())
    assert sample(metrics.registry, BREAKER, provider="alpha") == 2
    clock.now += 30
    assert sample(metrics.registry, BREAKER, provider="alpha") == 1
    assert sample(metrics.registry, BREAKER, provider="beta") == 0


@pytest.mark.parametrize(
    ("failing", "outcome"),
    [
        (Script(deltas=(), error=failure(Code.ERROR_CODE_OVERLOADED)), "overloaded"),
        (Script(deltas=("par",), error=failure(Code.ERROR_CODE_NETWORK)), "network"),
    ],
    ids=["before_text", "mid_stream"],
)
async def test_a_fallback_answer_counts_for_the_model_that_took_over(
    failing: Script, outcome: str
) -> None:
    metrics = LlmMetrics()
    providers = {"alpha": ScriptedProvider("alpha", failing), "beta": ScriptedProvider("beta")}
    final = (await run(chain_of(providers, metrics=metrics), request())).final
    assert (final.model, final.from_fallback) == ("secondary", True)
    assert sample(metrics.registry, "switchboard_fallbacks_total", model="secondary") == 1
    assert sample(metrics.registry, "switchboard_fallbacks_total", model="primary") == 0
    labels = {"provider": "alpha", "model": "primary"}
    assert sample(metrics.registry, REQUESTS, **labels, outcome=outcome) == 1
    assert sample(metrics.registry, REQUESTS, provider="beta", model="secondary", outcome="ok") == 1


async def test_a_cache_answer_counts_for_the_model_it_kept() -> None:
    metrics = LlmMetrics()
    alpha = ScriptedProvider(
        "alpha", Script(), Script(deltas=(), error=failure(Code.ERROR_CODE_OVERLOADED))
    )
    generator = chain_of({"alpha": alpha}, metrics=metrics, cache=MemoryResponseCache())
    assert not (await run(generator, request())).final.from_cache
    assert (await run(generator, request())).final.from_cache
    assert sample(metrics.registry, "switchboard_cache_answers_total", model="primary") == 1
    assert sample(metrics.registry, "switchboard_fallbacks_total", model="primary") == 0


# `python -m llm_svc`


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    """Every sample of the endpoint by (name, labels); None while it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=timeout(2), trust_env=False) as client:
            response = await client.get(url)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


async def test_the_process_serves_its_metrics(tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV}
    env |= {
        "LLM_SVC_LISTEN": f"127.0.0.1:{grpc_port}",
        "LLM_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "LOCAL_MODEL_TOKEN_DELAY_MS": "0",
    }
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    ok = (REQUESTS, tuple(sorted({**LOCAL, "outcome": "ok"}.items())))
    with (tmp_path / "llm_svc.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llm_svc", env=env, stderr=log
        )
    try:
        before = await eventually(lambda: scrape(url), seconds=15)
        assert ok not in before
        assert any(name == "python_info" for name, _ in before)  # the process-wide REGISTRY
        async with insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub: llm_pb2_grpc.LlmServiceAsyncStub = llm_pb2_grpc.LlmServiceStub(channel)  # type: ignore[assignment]
            call = stub.Generate(request(), timeout=timeout(10), wait_for_ready=True)
            assert check_stream([e async for e in call]).HasField("final")

        async def counted() -> dict[Any, float] | None:
            samples = await scrape(url)
            return samples if samples and samples.get(ok) == 1 else None

        after = await eventually(counted)
        assert after[(BREAKER, (("provider", "local"),))] == 0
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(timeout(10)):
            assert await process.wait() == 0, (tmp_path / "llm_svc.log").read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
