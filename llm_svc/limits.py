"""Requests-per-minute and tokens-per-minute limits per provider (and key, and model),
enforced before calling: a `Guard` around each attempt.

Each limit is a token bucket that refills continuously (capacity = the per-minute figure,
refill = a sixtieth of it per second), the model providers themselves describe. A call
reserves one request and its estimated tokens (prompt estimate + max_tokens, as OpenAI
counts a request against TPM); the estimate is settled against the real usage afterwards.
A reservation may take the bucket below zero when the wait it implies is short (at most
`max_wait_s`): the call then sleeps that long, which queues callers fairly in arrival order.
A longer wait is refused with RATE_LIMITED and its retry-after, so the retry policy can
choose between waiting and the next model of the chain. A provider's own 429 with a
retry-after pauses its buckets for that long, so we stop sending what it will refuse.

With several llm_svc replicas calling one provider with one key, each replica's buckets
would allow the whole budget: `share` (svckit/spend_share.py) tells the others what this one
took, and `charge` takes what they took from ours, so the fleet keeps to one budget (a
replica's 429 pause stays its own: the others hear their own 429s).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from llm_svc.catalogue import Limits, ModelEntry
from llm_svc.policy import Attempt
from llm_svc.providers.base import ProviderRequest
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode
CHARS_PER_TOKEN = 4
WINDOW_S = 60.0  # what a bucket refills in: older charges no longer count


def estimate_request_tokens(request: ProviderRequest) -> int:
    """What a call may spend: its prompt (about 4 characters a token) and max_tokens."""
    prompt = (len(request.prompt) + len(request.system)) // CHARS_PER_TOKEN + 1
    return prompt + request.max_tokens


class TokenBucket:
    """`per_minute` units a minute, refilled continuously; sans-I/O (the caller gives `now`)."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # units a second
        self.level = self.capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` more could be taken (0: now)."""
        self._refill(now)
        # One call larger than the whole bucket could never pass: it waits for a full one.
        short = min(amount, self.capacity) - self.level
        return max(short, 0.0) / self.rate

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= min(amount, self.capacity)

    def give(self, amount: float, now: float) -> None:
        """Return `amount` (negative: take more, e.g. when usage exceeded the estimate)."""
        self._refill(now)
        self.level = min(self.capacity, self.level + amount)

    def pause(self, seconds: float, now: float) -> None:
        """Make the next unit wait `seconds` at least (the provider said retry-after)."""
        self._refill(now)
        self.level = min(self.level, 1.0 - seconds * self.rate)


@dataclass
class _Scope:
    """The buckets of one scope (a provider's key, or one model on it)."""

    requests: TokenBucket | None
    tokens: TokenBucket | None


class RateLimiter:
    """A `Guard`. `limits_for(model)` names the scopes a model's calls count against, with
    their limits (0 = unlimited); `key_ids` is provider → key fingerprint, so two keys of
    one provider (two processes configured differently) never share buckets by mistake."""

    def __init__(
        self,
        limits_for: Callable[[ModelEntry], Mapping[str, Limits]],
        key_ids: Mapping[str, str] | None = None,
        *,
        max_wait_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_wait: Callable[[str], None] | None = None,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.limits_for = limits_for
        self.key_ids = dict(key_ids or {})
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._sleep = sleep
        self._scopes: dict[str, _Scope] = {}
        # Told the provider of each call that queues for the buckets, and of each refused
        # (metrics.py counts them).
        self.on_wait = on_wait
        self.on_refusal = on_refusal
        # Told what this replica takes from each scope ([requests, tokens]): the others'.
        self.share: Callable[[str, Sequence[float]], None] | None = None
        # Other replicas' charges to scopes this one has not used yet: (when, amounts).
        self._early: dict[str, list[tuple[float, Sequence[float]]]] = {}

    def _buckets(self, model: ModelEntry) -> list[tuple[str, _Scope]]:
        key = self.key_ids.get(model.provider, "")
        scopes = []
        for name, limits in self.limits_for(model).items():
            if not (limits.rpm or limits.tpm):
                continue
            scope_id = f"{key}/{name}"
            scope = self._scopes.get(scope_id)
            if scope is None:
                scope = self._scopes[scope_id] = self._new_scope(scope_id, limits)
            scopes.append((scope_id, scope))
        return scopes

    def _new_scope(self, scope_id: str, limits: Limits) -> _Scope:
        """Full buckets, less what other replicas took from this scope in the last window."""
        early = self._early.pop(scope_id, [])
        start = early[0][0] if early else self._clock()
        scope = _Scope(
            TokenBucket(limits.rpm, start) if limits.rpm else None,
            TokenBucket(limits.tpm, start) if limits.tpm else None,
        )
        for when, amounts in early:
            _charge(scope, amounts, when)
        return scope

    def charge(self, spent: Mapping[str, Sequence[float]]) -> None:
        """Other replicas took these ([requests, tokens] by scope) from the fleet's budget."""
        now = self._clock()
        for scope_id, amounts in spent.items():
            scope = self._scopes.get(scope_id)
            if scope is not None:
                _charge(scope, amounts, now)
                continue
            early = [e for e in self._early.get(scope_id, []) if now - e[0] < WINDOW_S]
            self._early[scope_id] = [*early, (now, amounts)]

    def _told(self, scope_id: str, requests: float, tokens: float) -> None:
        if self.share is not None:
            self.share(scope_id, (requests, tokens))

    def reserve(self, model: ModelEntry, tokens: int) -> float:
        """Reserve one request and `tokens` in every scope of `model`; the seconds to wait
        before calling. Raises RATE_LIMITED (reserving nothing) when that is too long."""
        scopes = self._buckets(model)
        now = self._clock()
        wait = 0.0
        for _, scope in scopes:
            if scope.requests is not None:
                wait = max(wait, scope.requests.wait_for(1, now))
            if scope.tokens is not None:
                wait = max(wait, scope.tokens.wait_for(tokens, now))
        if wait > self.max_wait_s:
            if self.on_refusal is not None:
                self.on_refusal(model.provider)
            raise ServiceError(
                Code.ERROR_CODE_RATE_LIMITED,
                f"rate limit of {model.provider} reached (our own limit, before calling)",
                retry_after_ms=int(wait * 1000) + 1,
            )
        for scope_id, scope in scopes:
            _charge(scope, (1, tokens), now)
            self._told(scope_id, 1, tokens)
        return wait

    def settle(self, model: ModelEntry, reserved: int, used: int) -> None:
        """The call spent `used` tokens of the `reserved` estimate."""
        now = self._clock()
        for scope_id, scope in self._buckets(model):
            if scope.tokens is not None and used != reserved:
                _charge(scope, (0, used - reserved), now)
                self._told(scope_id, 0, used - reserved)

    def pause(self, model: ModelEntry, seconds: float) -> None:
        now = self._clock()
        for _, scope in self._buckets(model):
            for bucket in (scope.requests, scope.tokens):
                if bucket is not None:
                    bucket.pause(seconds, now)

    @asynccontextmanager
    async def admit(self, attempt: Attempt) -> AsyncIterator[None]:
        reserved = estimate_request_tokens(attempt.request)
        wait = self.reserve(attempt.model, reserved)
        used = 0
        if wait > 0 and self.on_wait is not None:
            self.on_wait(attempt.model.provider)
        try:
            if wait > 0:
                await self._sleep(wait)
            yield
        except ServiceError as error:
            if error.code == Code.ERROR_CODE_RATE_LIMITED and error.retry_after_ms:
                self.pause(attempt.model, error.retry_after_ms / 1000)
            raise
        finally:
            # A failed call may have spent nothing: keep the request, return the tokens.
            if attempt.usage is not None:
                used = attempt.usage.total_tokens
            self.settle(attempt.model, reserved, used)


def _charge(scope: _Scope, amounts: Sequence[float], now: float) -> None:
    """Take [requests, tokens] from the scope's buckets (a negative amount gives back)."""
    for bucket, amount in zip((scope.requests, scope.tokens), amounts, strict=False):
        if bucket is None or not amount:
            continue
        if amount > 0:
            bucket.take(amount, now)
        else:
            bucket.give(-amount, now)
