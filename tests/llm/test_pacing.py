"""A stalled provider fails over in seconds (llm_svc/pacing.py): no first token, an idle gap
after text, and a whole generation past its deadline, each against providers that never end
on their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import pytest

from llm_svc.catalogue import Catalogue, CatalogueError
from llm_svc.generation import Generator
from llm_svc.pacing import DeadlinePassed, Pacing, paced
from llm_svc.policy import RetryPolicy
from llm_svc.providers.base import (
    Finish,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
)
from switchboard.v1 import common_pb2, llm_pb2
from tests.conftest import timeout
from tests.llm.fakes import Script, ScriptedProvider
from tests.llm.streams import check_stream

Code = common_pb2.ErrorCode
QUICK = {"first_token_s": 0.2, "idle_s": 0.2, "deadline_s": 30}


class Stalling:
    """Streams `tokens` (a delay before each), then waits forever; records how it ended."""

    def __init__(self, name: str, tokens: int, every_s: float = 0.0) -> None:
        self.name = name
        self.tokens = tokens
        self.every_s = every_s
        self.calls = 0
        self.closed = asyncio.Event()

    def estimate_tokens(self, request: ProviderRequest) -> int | None:
        return None

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        self.calls += 1
        try:
            for i in range(self.tokens):
                await asyncio.sleep(self.every_s)
                yield TextDelta(f" t{i}")
            await asyncio.Event().wait()
            yield Finish("stop")  # pragma: no cover - never reached
        finally:
            self.closed.set()

    async def aclose(self) -> None:
        return None


def make(providers: dict[str, Any], **pacing: float) -> Generator:
    catalogue = Catalogue.from_dict(
        {
            "default_order": ["primary"],
            "models": [
                {
                    "id": "primary",
                    "provider": "alpha",
                    "max_tokens": 100,
                    "fallback": ["secondary"],
                    **(QUICK | pacing),
                },
                {"id": "secondary", "provider": "beta", "max_tokens": 100, **QUICK},
            ],
        },
        providers.keys(),
    )
    retry = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.01)
    return Generator(catalogue, providers, retry=retry)


async def run(generator: Generator) -> list[llm_pb2.GenerateEvent]:
    request = llm_pb2.GenerateRequest(request_id="r", user_id="u", prompt="Hi", model="primary")
    async with asyncio.timeout(timeout(10)), aclosing(generator.generate(request)) as events:
        return [event async for event in events]


async def test_no_first_token_is_retried_then_falls_back() -> None:
    alpha = Stalling("alpha", tokens=0)
    beta = ScriptedProvider("beta", Script(deltas=["from", " beta"]))
    final = check_stream(await run(make({"alpha": alpha, "beta": beta}))).final
    assert (final.content, final.model, final.from_fallback) == ("from beta", "secondary", True)
    assert alpha.calls == 2 and alpha.closed.is_set()


async def test_an_idle_gap_after_text_ends_the_stream_with_a_retryable_timeout() -> None:
    alpha = Stalling("alpha", tokens=3)
    events = await run(make({"alpha": alpha}))
    error = check_stream(events).error
    assert error.code == Code.ERROR_CODE_TIMEOUT and error.retryable
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == " t0 t1 t2"
    assert alpha.closed.is_set()  # the upstream request is aborted


async def test_a_generation_past_its_deadline_fails_for_good() -> None:
    """Tokens keep coming, each within the idle gap: only the deadline stops it."""
    alpha = Stalling("alpha", tokens=10_000, every_s=0.05)
    events = await run(make({"alpha": alpha}, deadline_s=0.5))
    error = check_stream(events).error
    assert error.code == Code.ERROR_CODE_TIMEOUT and not error.retryable
    assert "deadline" in error.message and alpha.calls == 1 and alpha.closed.is_set()


def test_the_catalogue_reads_pacing_and_refuses_nonsense() -> None:
    raw = {"id": "m", "provider": "local", "max_tokens": 5, "idle_s": 2.5}
    catalogue = Catalogue.from_dict({"default_order": ["m"], "models": [raw]}, {"local"})
    assert catalogue.models["m"].pacing == Pacing(idle_s=2.5)
    with pytest.raises(CatalogueError):
        Catalogue.from_dict({"models": [{**raw, "deadline_s": 0}]}, {"local"})


# -- paced() itself -------------------------------------------------------------------------


async def ticking(delays: list[float]) -> AsyncGenerator[int, None]:
    """Yields 0, 1, ... each after its delay, then waits forever."""
    for i, delay in enumerate(delays):
        await asyncio.sleep(delay)
        yield i
    await asyncio.Event().wait()


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_paced_times_out_an_idle_gap_even_after_a_longer_first_token_wait() -> None:
    """The first wait (1 s) arms the timer; the shorter idle gap after it must still count."""
    pacing = Pacing(first_token_s=1.0, idle_s=0.1, deadline_s=30)
    got: list[int] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ProviderError) as raised:
        async for i in paced(ticking([0.0, 0.02]), "p", pacing, deadline_in(30)):
            got.append(i)
    assert got == [0, 1] and raised.value.code == Code.ERROR_CODE_TIMEOUT
    assert "no token within 0.1s" in raised.value.message
    assert loop.time() - started < 0.9  # the idle gap fired, not the first-token wait


async def test_paced_does_not_count_the_consumers_time() -> None:
    pacing = Pacing(first_token_s=0.1, idle_s=0.1, deadline_s=30)
    got = []
    async with aclosing(paced(ticking([0.0, 0.0, 0.0]), "p", pacing, deadline_in(30))) as events:
        async for i in events:
            got.append(i)
            if len(got) == 3:
                break
            await asyncio.sleep(0.25)  # longer than idle_s, spent by the consumer
    assert got == [0, 1, 2]


async def test_paced_lets_the_callers_cancel_through() -> None:
    pacing = Pacing(first_token_s=0.05, idle_s=0.05, deadline_s=30)

    waiting = asyncio.Event()

    async def silent() -> AsyncGenerator[int, None]:
        waiting.set()
        await asyncio.Event().wait()
        yield 0  # pragma: no cover - never reached

    async def consume() -> None:
        async for _ in paced(silent(), "p", pacing, deadline_in(30)):
            pass  # pragma: no cover - nothing comes

    task = asyncio.create_task(consume())
    await waiting.wait()  # paced is waiting on the stream, its timer armed
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_paced_ends_at_the_deadline_for_good() -> None:
    pacing = Pacing(first_token_s=5, idle_s=5, deadline_s=0.2)
    with pytest.raises(DeadlinePassed):
        async for _ in paced(ticking([0.05] * 100), "p", pacing, deadline_in(0.2)):
            pass
