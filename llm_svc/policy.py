"""What surrounds one provider call: retries with backoff, guards, a response cache.

Guards are async context managers entered around one attempt, that may refuse it (raise a
`ServiceError`: RATE_LIMITED, OVERLOADED) and see how it ended: the circuit breakers
(`breaker.Breakers`) and the rate limits (`limits.RateLimiter`). Per-user quotas
(`quota.UserQuota`) count whole generations, not attempts, so `Generator` calls them itself.
The response cache (`cache.MemoryResponseCache`) implements `ResponseCache`.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from llm_svc.catalogue import ModelEntry
from llm_svc.providers.base import ProviderRequest, TokenUsage
from svckit.backoff import full_jitter
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode

# Failures worth trying the next model of the chain for: the model, not the request, is the
# problem. (INVALID_REQUEST or CONTENT_FILTERED would fail the same way elsewhere.) Here
# QUOTA_EXCEEDED is the provider account's (a user's own quota is checked before any model)
# and MODEL_NOT_FOUND the provider's 404 for an upstream name it does not know.
FALLBACK_CODES = frozenset(
    {
        Code.ERROR_CODE_RATE_LIMITED,
        Code.ERROR_CODE_OVERLOADED,
        Code.ERROR_CODE_TIMEOUT,
        Code.ERROR_CODE_NETWORK,
        Code.ERROR_CODE_AUTH,
        Code.ERROR_CODE_INTERNAL,
        Code.ERROR_CODE_QUOTA_EXCEEDED,
        Code.ERROR_CODE_MODEL_NOT_FOUND,
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one model, only before it streamed anything (after that, the caller has
    text it cannot take back: the error goes to task_svc, which retries the whole job)."""

    max_attempts: int = 2
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0
    # Retries stop once a generation is this old (seconds): what is left of the chain
    # (each fallback gets its first attempt) or the cache answers instead.
    deadline_s: float = 30.0

    def delay(self, attempt: int, error: ServiceError, elapsed_s: float = 0.0) -> float | None:
        """Seconds to wait before attempt `attempt + 1` (attempt counts from 1), or None to
        give up on this model. A retry-after longer than `max_delay_s` gives up at once: the
        next model of the chain is better than waiting; so does a retry that would start
        after the deadline (`elapsed_s` is the generation's age)."""
        if not error.retryable or attempt >= self.max_attempts:
            return None
        retry_after = error.retry_after_ms / 1000
        if retry_after > self.max_delay_s:
            return None
        backoff = full_jitter(attempt, self.base_delay_s, self.max_delay_s)
        delay = max(retry_after, backoff)
        if elapsed_s + delay > self.deadline_s:
            return None
        return delay


@dataclass
class Attempt:
    """One call of one model, as guards see it; `usage` is set when it finished."""

    model: ModelEntry
    request: ProviderRequest
    usage: TokenUsage | None = None


class Guard(Protocol):
    def admit(self, attempt: Attempt) -> AbstractAsyncContextManager[None]:
        """Enter before the call (may wait, or raise a ServiceError to refuse it); the
        exit sees the call's exception, if any, and `attempt.usage` when it finished."""
        ...


@dataclass(frozen=True)
class CachedAnswer:
    content: str
    model: str
    finish_reason: str
    usage: TokenUsage


class ResponseCache(Protocol):
    """Answers kept for a fallback of last resort (and, later, for repeated prompts)."""

    async def get(self, model: ModelEntry, request: ProviderRequest) -> CachedAnswer | None: ...

    async def put(
        self, model: ModelEntry, request: ProviderRequest, answer: CachedAnswer
    ) -> None: ...
