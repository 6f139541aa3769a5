"""ListProviders (admin only): each configured provider's breaker, calls and failures since the
replica started, and the mean latencies of its successful calls, over real gRPC against the
in-process llm_svc (the local model) and the HTTP fakes of a provider's wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from llm_svc.breaker import Breakers
from llm_svc.metrics import LlmMetrics
from llm_svc.server import LlmServer
from llm_svc.service import list_providers
from svckit.grpc_server import insecure_channel
from switchboard.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from tests.conftest import timeout
from tests.llm.streams import check_stream
from tests.llm.test_llm_svc_providers import CASES, generate, serving

Code = common_pb2.ErrorCode


async def providers_of(port: int) -> dict[str, llm_pb2.ProviderStatus]:
    """ListProviders as the operator calls it (an `admin` token), by provider."""
    async with insecure_channel(f"127.0.0.1:{port}", caller="admin") as channel:
        stub: llm_pb2_grpc.LlmServiceAsyncStub = llm_pb2_grpc.LlmServiceStub(channel)  # type: ignore[assignment]
        reply = await stub.ListProviders(llm_pb2.ListProvidersRequest(), timeout=timeout(5))
    names = [p.provider for p in reply.providers]
    assert names == sorted(names)  # one line each, by name
    return {p.provider: p for p in reply.providers}


@pytest.fixture
async def stub(server: LlmServer) -> AsyncIterator[llm_pb2_grpc.LlmServiceAsyncStub]:
    """This process's own service token: a service, not the operator."""
    async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield llm_pb2_grpc.LlmServiceStub(channel)  # type: ignore[misc]


async def test_a_local_generation_is_counted_and_timed(
    server: LlmServer, stub: llm_pb2_grpc.LlmServiceAsyncStub
) -> None:
    before = await providers_of(server.port)
    assert list(before) == ["local"]  # no provider key configured
    local = before["local"]
    assert (local.breaker, local.requests, local.errors) == ("closed", 0, 0)
    assert (local.mean_first_token_s, local.mean_total_s) == (0.0, 0.0)
    request = llm_pb2.GenerateRequest(request_id="p1", user_id="alice", prompt="Hello there")
    events = [e async for e in stub.Generate(request, timeout=timeout(10))]
    assert check_stream(events).HasField("final")
    local = (await providers_of(server.port))["local"]
    assert (local.breaker, local.requests, local.errors) == ("closed", 1, 0)
    assert 0 < local.mean_first_token_s <= local.mean_total_s


async def test_failed_calls_are_errors_and_an_open_breaker_says_open() -> None:
    case = CASES[0]  # openai, answering 503 every time
    async with serving(
        case, case.unavailable, llm_breaker_failures=2, llm_retry_max_attempts=2
    ) as (stub, fake, server):
        before = await providers_of(server.port)
        assert sorted(before) == ["local", case.provider]
        assert before[case.provider].breaker == "closed"
        for _ in range(3):  # two failed calls open the circuit; the third never calls
            error = check_stream(await generate(stub, case.model)).error
            assert error.code == Code.ERROR_CODE_UNAVAILABLE
        statuses = await providers_of(server.port)
    assert len(fake.requests) == 2
    failing = statuses[case.provider]
    assert (failing.breaker, failing.requests, failing.errors) == ("open", 2, 2)
    assert (failing.mean_first_token_s, failing.mean_total_s) == (0.0, 0.0)  # none succeeded
    local = statuses["local"]
    assert (local.breaker, local.requests, local.errors) == ("closed", 0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_totals_are_summed_over_models_and_a_due_probe_reads_half_open() -> None:
    clock, metrics = Clock(), LlmMetrics()
    breakers = Breakers(failure_threshold=1, reset_after_s=30, clock=clock)
    breakers.breaker("alpha").failure(clock())
    clock.now += 30  # the probe is due
    for model, outcome, first, total in [
        ("a-1", "ok", 0.1, 1.0),
        ("a-2", "ok", 0.3, 2.0),
        ("a-2", "timeout", None, None),
        ("a-1", "cancelled", None, None),  # the caller left: no failure of the provider
    ]:
        metrics.requests.labels("alpha", model, outcome).inc()
        if first is not None and total is not None:
            metrics.latency.labels("alpha", model, "first_token").observe(first)
            metrics.latency.labels("alpha", model, "total").observe(total)
    reply = list_providers(["beta", "alpha"], breakers.states(), metrics.provider_totals())
    alpha, beta = reply.providers
    assert (alpha.provider, alpha.breaker, alpha.requests, alpha.errors) == (
        "alpha",
        "half_open",
        4,
        1,
    )
    assert alpha.mean_first_token_s == pytest.approx(0.2)
    assert alpha.mean_total_s == pytest.approx(1.5)
    assert (beta.provider, beta.breaker, beta.requests, beta.mean_total_s) == (
        "beta",
        "closed",
        0,
        0.0,
    )


async def test_list_providers_refuses_a_service_that_is_not_the_admin(
    stub: llm_pb2_grpc.LlmServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListProviders(llm_pb2.ListProvidersRequest(), timeout=timeout(5))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
