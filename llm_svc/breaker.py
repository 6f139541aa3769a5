"""A circuit breaker per provider: stop calling one that keeps failing, probe it later.

States (Nygard, "Release It!", the Circuit Breaker pattern): CLOSED counts consecutive
failures; at `failure_threshold` it OPENs and refuses every call at once (OVERLOADED, with
the time left as retry-after, so the generator falls back instead of waiting); after
`reset_after_s` it is HALF_OPEN and lets one probe through: success closes it, failure
opens it again. Only failures that say the provider is unwell count (overloaded, timeouts,
network, internal errors); a bad request or a filtered answer is the provider working.

Written here rather than taken from purgatory or aiobreaker: both read the wall clock, and
neither has a single half-open probe or a neutral outcome (a cancel, a 429) that leaves the
circuit as it was (docs/architecture.md, "Libraries").
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from llm_svc.policy import Attempt
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode

UNHEALTHY = frozenset(
    {
        Code.ERROR_CODE_OVERLOADED,
        Code.ERROR_CODE_TIMEOUT,
        Code.ERROR_CODE_NETWORK,
        Code.ERROR_CODE_INTERNAL,
    }
)


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """One provider's breaker; sans-I/O (the caller gives `now`)."""

    def __init__(self, failure_threshold: int = 5, reset_after_s: float = 30.0) -> None:
        self.failure_threshold = max(failure_threshold, 1)
        self.reset_after_s = reset_after_s
        self.state = State.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False

    def allow(self, now: float) -> float:
        """0.0 when a call may go (in HALF_OPEN it is then the probe), else the seconds
        until the breaker will let one through."""
        if self.state is State.OPEN:
            left = self.opened_at + self.reset_after_s - now
            if left > 0:
                return left
            self.state = State.HALF_OPEN
        if self.state is State.HALF_OPEN:
            if self.probing:
                return self.reset_after_s  # a probe is out; its outcome decides
            self.probing = True
        return 0.0

    def success(self) -> None:
        self.state = State.CLOSED
        self.failures = 0
        self.probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is State.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state = State.OPEN
            self.opened_at = now
        self.probing = False

    def release(self) -> None:
        """The call ended without a verdict (cancelled): a probe slot is free again."""
        self.probing = False

    def state_at(self, now: float) -> State:
        """The state a call would find at `now` (`allow` moves OPEN on only when called)."""
        if self.state is State.OPEN and now >= self.opened_at + self.reset_after_s:
            return State.HALF_OPEN
        return self.state


class Breakers:
    """A `Guard`: one `CircuitBreaker` per provider, created on first use."""

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._clock = clock
        self.breakers: dict[str, CircuitBreaker] = {}

    def breaker(self, provider: str) -> CircuitBreaker:
        breaker = self.breakers.get(provider)
        if breaker is None:
            breaker = CircuitBreaker(self.failure_threshold, self.reset_after_s)
            self.breakers[provider] = breaker
        return breaker

    def states(self) -> dict[str, State]:
        """Each provider's state now, for metrics scraped from another thread: the table is
        copied in one step (a provider's first call may add to it meanwhile)."""
        now = self._clock()
        return {name: breaker.state_at(now) for name, breaker in list(self.breakers.items())}

    @asynccontextmanager
    async def admit(self, attempt: Attempt) -> AsyncIterator[None]:
        provider = attempt.model.provider
        breaker = self.breaker(provider)
        left = breaker.allow(self._clock())
        if left > 0:
            raise ServiceError(
                Code.ERROR_CODE_OVERLOADED,
                f"{provider} is failing: circuit open, not calling it",
                retry_after_ms=int(left * 1000) + 1,
            )
        try:
            yield
        except ServiceError as error:
            if error.code in UNHEALTHY:
                breaker.failure(self._clock())
            elif error.code == Code.ERROR_CODE_RATE_LIMITED:
                breaker.release()  # busy, not broken (and maybe refused before calling)
            else:
                breaker.success()  # it answered properly, with a refusal
            raise
        except (asyncio.CancelledError, GeneratorExit):
            breaker.release()
            raise
        except Exception:
            breaker.failure(self._clock())
            raise
        else:
            breaker.success()
