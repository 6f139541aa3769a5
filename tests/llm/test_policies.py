"""Rate limits, circuit breakers, user quotas, the response cache, the retry deadline:
each on a fake clock, then as the Generator uses them."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import aclosing
from typing import Any

import pytest

from llm_svc.breaker import Breakers, CircuitBreaker, State
from llm_svc.cache import MemoryResponseCache
from llm_svc.catalogue import Catalogue, Limits, ModelEntry
from llm_svc.generation import Generator
from llm_svc.limits import RateLimiter, TokenBucket, estimate_request_tokens
from llm_svc.policy import Attempt, CachedAnswer, RetryPolicy
from llm_svc.providers.base import Provider, ProviderRequest, TokenUsage
from llm_svc.providers.local import LocalProvider
from llm_svc.quota import DAY_S, DailyQuota
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, llm_pb2
from tests.llm.fakes import Script, ScriptedProvider, failure
from tests.llm.streams import check_stream

Code = common_pb2.ErrorCode


class Clock:
    def __init__(self, now: float = 1000.0, advance: bool = True) -> None:
        self.now = now
        self.advance = advance  # sleeping moves the clock
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.advance:
            self.now += seconds


MODEL = ModelEntry("m", "alpha", "alpha-1", "standard", 100, limits=Limits(rpm=0, tpm=0))


def attempt(prompt: str = "hi", max_tokens: int = 10) -> Attempt:
    return Attempt(MODEL, ProviderRequest(model="alpha-1", prompt=prompt, max_tokens=max_tokens))


# Token bucket and rate limiter


def test_token_bucket_refills_continuously() -> None:
    bucket = TokenBucket(60, now=0.0)  # one a second
    assert bucket.wait_for(60, 0.0) == 0.0
    bucket.take(60, 0.0)
    assert bucket.wait_for(1, 0.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, 0.5) == pytest.approx(0.5)
    assert bucket.wait_for(1, 1.0) == 0.0
    bucket.give(100, 1.0)
    assert bucket.level == 60  # never above capacity
    assert bucket.wait_for(1000, 1.0) == 0.0  # larger than the bucket: a full bucket will do
    bucket.pause(5.0, 1.0)
    assert bucket.wait_for(1, 1.0) == pytest.approx(5.0)


UNLIMITED = Limits()


def limiter(clock: Clock, provider: Limits, model: Limits = UNLIMITED, **kw: Any) -> RateLimiter:
    def limits_for(entry: ModelEntry) -> Mapping[str, Limits]:
        return {"alpha": provider, "alpha:alpha-1": model}

    return RateLimiter(limits_for, {"alpha": "key1"}, clock=clock, sleep=clock.sleep, **kw)


async def test_requests_per_minute_wait_briefly_then_refuse() -> None:
    clock = Clock(advance=False)  # callers queue at the same instant
    rl = limiter(clock, Limits(rpm=120), max_wait_s=1.0)  # one every 0.5 s
    for _ in range(120):
        async with rl.admit(attempt()):
            pass
    assert clock.slept == []
    for _ in range(2):  # the bucket is empty: each next caller queues behind the last
        async with rl.admit(attempt()):
            pass
    assert clock.slept == [pytest.approx(0.5), pytest.approx(1.0)]
    with pytest.raises(ServiceError) as caught:  # 1.5 s to wait: more than max_wait_s
        async with rl.admit(attempt()):
            pass
    assert caught.value.code == Code.ERROR_CODE_RATE_LIMITED and caught.value.retryable
    assert 1400 < caught.value.retry_after_ms <= 1501


async def test_tokens_per_minute_count_the_estimate_then_the_usage() -> None:
    clock = Clock()
    rl = limiter(clock, Limits(), Limits(tpm=1000), max_wait_s=0.0)
    big = attempt("x" * 400, max_tokens=500)  # ~101 prompt tokens + 500
    assert estimate_request_tokens(big.request) == 601
    async with rl.admit(big):
        big.usage = TokenUsage(101, 9)  # it used far less than it could have
    bucket = rl._scopes["key1/alpha:alpha-1"].tokens
    assert bucket is not None and bucket.level == pytest.approx(1000 - 110)
    async with rl.admit(attempt("x" * 400, max_tokens=500)):
        pass  # ended without usage (cancelled): the estimate is given back
    assert bucket.level == pytest.approx(1000 - 110)
    with pytest.raises(ServiceError):
        async with rl.admit(attempt("x" * 400, max_tokens=500)):
            raise ServiceError(Code.ERROR_CODE_NETWORK, "gone")
    assert bucket.level == pytest.approx(1000 - 110)


async def test_a_provider_429_pauses_its_buckets() -> None:
    clock = Clock()
    rl = limiter(clock, Limits(rpm=6000), max_wait_s=0.0)
    with pytest.raises(ServiceError):
        async with rl.admit(attempt()):
            raise ServiceError(Code.ERROR_CODE_RATE_LIMITED, "429", retry_after_ms=3000)
    with pytest.raises(ServiceError) as caught:
        async with rl.admit(attempt()):
            pass
    assert caught.value.code == Code.ERROR_CODE_RATE_LIMITED
    clock.now += 3.0
    async with rl.admit(attempt()):
        pass


async def test_unlimited_scopes_cost_nothing() -> None:
    clock = Clock()
    rl = limiter(clock, Limits(), max_wait_s=0.0)
    for _ in range(10_000):
        assert rl.reserve(MODEL, 10**6) == 0.0
    assert rl._scopes == {}


# Circuit breaker


def state(breaker: CircuitBreaker) -> State:
    return breaker.state  # (a call, so that mypy does not narrow the state across calls)


def test_breaker_opens_after_consecutive_failures_and_probes_half_open() -> None:
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=10)
    for _ in range(2):
        assert breaker.allow(0.0) == 0.0
        breaker.failure(0.0)
    breaker.success()  # a success in between: the count starts again
    for _ in range(3):
        assert breaker.allow(1.0) == 0.0
        breaker.failure(1.0)
    assert state(breaker) is State.OPEN
    assert breaker.allow(5.0) == pytest.approx(6.0)
    assert breaker.allow(11.0) == 0.0  # the probe
    assert state(breaker) is State.HALF_OPEN
    assert breaker.allow(11.0) == 10  # only one probe at a time
    breaker.failure(11.0)
    assert state(breaker) is State.OPEN and breaker.allow(12.0) == pytest.approx(9.0)
    assert breaker.allow(21.0) == 0.0
    breaker.release()  # a cancelled probe frees the slot
    assert breaker.allow(21.0) == 0.0
    breaker.success()
    assert state(breaker) is State.CLOSED and breaker.failures == 0


@pytest.mark.parametrize(
    ("code", "counts"),
    [
        (Code.ERROR_CODE_OVERLOADED, True),
        (Code.ERROR_CODE_TIMEOUT, True),
        (Code.ERROR_CODE_NETWORK, True),
        (Code.ERROR_CODE_INTERNAL, True),
        (Code.ERROR_CODE_INVALID_REQUEST, False),
        (Code.ERROR_CODE_CONTENT_FILTERED, False),
        (Code.ERROR_CODE_RATE_LIMITED, False),
    ],
)
async def test_only_unhealthy_failures_trip_the_breaker(code: int, counts: bool) -> None:
    breakers = Breakers(failure_threshold=1, reset_after_s=10, clock=Clock())
    with pytest.raises(ServiceError):
        async with breakers.admit(attempt()):
            raise ServiceError(code, "x")  # type: ignore[arg-type]
    assert (breakers.breaker("alpha").state is State.OPEN) is counts


CATALOGUE: dict[str, Any] = {
    "providers": {"alpha": {"rpm": 60}},
    "models": [
        {"id": "local", "provider": "local", "max_tokens": 256},
        {
            "id": "primary",
            "provider": "alpha",
            "max_tokens": 100,
            "tpm": 5000,
            "fallback": ["local"],
        },
    ],
}


def make(
    providers: Mapping[str, Provider], clock: Clock, **kwargs: Any
) -> tuple[Generator, Catalogue]:
    catalogue = Catalogue.from_dict(CATALOGUE, providers.keys())
    kwargs.setdefault("retry", RetryPolicy(max_attempts=1))
    generator = Generator(catalogue, providers, sleep=clock.sleep, clock=clock, **kwargs)
    return generator, catalogue


def request(prompt: str = "Hello there", user: str = "alice") -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(user_id=user, model="primary", prompt=prompt)


async def run(generator: Generator, req: llm_pb2.GenerateRequest) -> llm_pb2.GenerateEvent:
    async with aclosing(generator.generate(req)) as events:
        return check_stream([event async for event in events])


def test_catalogue_limits() -> None:
    catalogue = Catalogue.from_dict(CATALOGUE, {"local", "alpha"})
    primary = catalogue.models["primary"]
    assert catalogue.limits_for(primary) == {
        "alpha": Limits(rpm=60),
        "alpha:primary": Limits(tpm=5000),
    }
    assert catalogue.limits_for(catalogue.models["local"]) == {
        "local": Limits(),
        "local:local": Limits(),
    }


def test_provider_limits_can_be_overridden() -> None:
    catalogue = Catalogue.from_dict(CATALOGUE, {"local", "alpha"})
    changed = catalogue.with_provider_limits({"alpha": {"rpm": 0, "tpm": 99}, "beta": {}})
    assert changed.provider_limits == {"alpha": Limits(tpm=99), "beta": Limits()}
    assert catalogue.provider_limits == {"alpha": Limits(rpm=60)}  # a new catalogue
    with pytest.raises(ValueError, match="negative"):
        catalogue.with_provider_limits({"alpha": {"rpm": -1}})


async def test_an_open_breaker_skips_the_provider_without_calling_it() -> None:
    clock = Clock()
    alpha = ScriptedProvider("alpha", Script(deltas=[], error=failure(Code.ERROR_CODE_OVERLOADED)))
    breakers = Breakers(failure_threshold=2, reset_after_s=30, clock=clock)
    generator, _ = make({"local": LocalProvider(0), "alpha": alpha}, clock, guards=[breakers])
    for _ in range(3):
        final = (await run(generator, request())).final
        assert final.model == "local" and final.from_fallback
    assert len(alpha.requests) == 2  # the third went straight to the fallback
    clock.now += 31
    alpha.scripts = [Script(deltas=["back"])]
    final = (await run(generator, request())).final  # the half-open probe succeeds
    assert final.model == "primary" and final.content == "back"
    assert breakers.breaker("alpha").state is State.CLOSED


async def test_rate_limits_guard_the_generator() -> None:
    clock = Clock()
    alpha = ScriptedProvider("alpha")
    catalogue = Catalogue.from_dict(CATALOGUE, {"local", "alpha"})
    rl = RateLimiter(catalogue.limits_for, clock=clock, sleep=clock.sleep, max_wait_s=0.0)
    generator, _ = make({"local": LocalProvider(0), "alpha": alpha}, clock, guards=[rl])
    for _ in range(60):
        assert (await run(generator, request())).final.model == "primary"
    final = (await run(generator, request())).final
    assert final.model == "local" and final.from_fallback  # refused before calling
    assert len(alpha.requests) == 60


# Quotas


async def test_quota_counts_requests_and_tokens_per_utc_day() -> None:
    clock = Clock(now=10 * DAY_S + 3600.0)
    quota = DailyQuota(daily_requests=3, daily_tokens=100, clock=clock)
    await quota.admit("alice")
    await quota.record("alice", 60)
    await quota.admit("alice")
    await quota.record("alice", 60)
    assert quota.usage("alice") == (2, 120)
    with pytest.raises(ServiceError) as caught:
        await quota.admit("alice")
    error = caught.value
    assert error.code == Code.ERROR_CODE_QUOTA_EXCEEDED and not error.retryable
    assert error.retry_after_ms == (DAY_S - 3600) * 1000  # until 00:00 UTC
    await quota.admit("bob")  # per user
    clock.now += DAY_S  # a new day
    await quota.admit("alice")
    assert quota.usage("alice") == (1, 0)


async def test_a_spent_quota_fails_fast_without_calling_a_provider() -> None:
    clock = Clock(now=5 * DAY_S)
    alpha = ScriptedProvider("alpha")
    quota = DailyQuota(daily_requests=0, daily_tokens=6, clock=clock)
    generator, _ = make({"local": LocalProvider(0), "alpha": alpha}, clock, quota=quota)
    final = (await run(generator, request())).final
    assert final.usage.total_tokens == 5
    assert quota.usage("alice") == (1, 5)
    assert (await run(generator, request())).HasField("final")  # 5 < 6: still admitted
    error = (await run(generator, request())).error
    assert error.code == Code.ERROR_CODE_QUOTA_EXCEEDED and not error.retryable
    assert len(alpha.requests) == 2
    assert (await run(generator, request(user="bob"))).HasField("final")


async def test_bad_requests_do_not_count_against_the_quota() -> None:
    clock = Clock()
    quota = DailyQuota(daily_requests=1, clock=clock)
    generator, _ = make({"local": LocalProvider(0)}, clock, quota=quota)
    assert (await run(generator, request(prompt=" "))).error.code == (
        Code.ERROR_CODE_INVALID_REQUEST
    )
    assert quota.usage("alice") == (0, 0)


# Response cache


def answer(text: str) -> CachedAnswer:
    return CachedAnswer(text, "m", "stop", TokenUsage(1, 1))


async def test_cache_is_keyed_by_model_and_parameters() -> None:
    cache = MemoryResponseCache(max_entries=10, ttl_s=60, clock=Clock())
    req = ProviderRequest(model="alpha-1", prompt="p", max_tokens=10)
    await cache.put(MODEL, req, answer("a"))
    assert await cache.get(MODEL, req) == answer("a")
    for other in (
        ProviderRequest(model="alpha-1", prompt="p", max_tokens=11),
        ProviderRequest(model="alpha-1", prompt="p", max_tokens=10, temperature=0.5),
        ProviderRequest(model="alpha-1", prompt="p", max_tokens=10, system="s"),
        ProviderRequest(model="alpha-1", prompt="q", max_tokens=10),
    ):
        assert await cache.get(MODEL, other) is None
    other_model = ModelEntry("n", "alpha", "alpha-1", "standard", 100)
    assert await cache.get(other_model, req) is None


async def test_cache_entries_expire_and_the_oldest_go_first() -> None:
    clock = Clock()
    cache = MemoryResponseCache(max_entries=2, ttl_s=60, clock=clock)

    def req(prompt: str) -> ProviderRequest:
        return ProviderRequest(model="alpha-1", prompt=prompt, max_tokens=10)

    await cache.put(MODEL, req("a"), answer("a"))
    await cache.put(MODEL, req("b"), answer("b"))
    assert await cache.get(MODEL, req("a")) is not None  # "a" is now the most recent
    await cache.put(MODEL, req("c"), answer("c"))
    assert len(cache) == 2 and await cache.get(MODEL, req("b")) is None
    clock.now += 60
    assert await cache.get(MODEL, req("a")) is None and len(cache) == 0  # both expired


async def test_the_cache_answers_along_the_chain_when_all_fail() -> None:
    clock = Clock()
    cache = MemoryResponseCache(clock=clock)
    alpha = ScriptedProvider("alpha", Script(deltas=[], error=failure(Code.ERROR_CODE_NETWORK)))
    broken = ScriptedProvider("local", Script(deltas=["from", " local"]))
    generator, _ = make({"local": broken, "alpha": alpha}, clock, cache=cache)
    first = (await run(generator, request())).final
    assert (first.model, first.from_fallback, first.from_cache) == ("local", True, False)
    broken.scripts = [Script(deltas=[], error=failure(Code.ERROR_CODE_OVERLOADED))]
    again = (await run(generator, request())).final
    assert (again.content, again.model, again.from_cache) == ("from local", "local", True)


# Retry deadline


async def test_retries_stop_at_the_deadline() -> None:
    clock = Clock()
    alpha = ScriptedProvider(
        "alpha", Script(deltas=[], error=failure(Code.ERROR_CODE_RATE_LIMITED, 2000))
    )
    retry = RetryPolicy(max_attempts=10, base_delay_s=0.1, max_delay_s=5.0, deadline_s=5.0)
    generator, _ = make({"local": LocalProvider(0), "alpha": alpha}, clock, retry=retry)
    final = (await run(generator, request())).final
    assert final.model == "local" and final.from_fallback
    assert clock.slept == [2.0, 2.0]  # a third wait would end past 5 s
    assert len(alpha.requests) == 3


def test_retry_policy_deadline() -> None:
    policy = RetryPolicy(max_attempts=5, base_delay_s=1.0, max_delay_s=4.0, deadline_s=10.0)
    error = ServiceError(Code.ERROR_CODE_OVERLOADED, "busy", retry_after_ms=3000)
    assert policy.delay(1, error, elapsed_s=0.0) == 3.0
    assert policy.delay(1, error, elapsed_s=7.5) is None
    assert policy.delay(5, error) is None
