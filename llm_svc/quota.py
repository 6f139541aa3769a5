"""Per-user daily quotas: requests and tokens per UTC day; over either, a generation fails
fast with QUOTA_EXCEEDED (not retryable; retry-after is the time to the next UTC midnight).

`UserQuota` is the seam: `MemoryQuota` keeps the counts in this process (so with several
llm_svc replicas each enforces its own share); a shared store (Redis, a NATS KV bucket)
would implement the same two methods. A request counts when admitted; its tokens when it
finished. The token check is made at admission, so the last request of a day may overshoot
the quota by its own size: failing fast matters more than exactness.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode
DAY_S = 86_400


class UserQuota(Protocol):
    async def admit(self, user_id: str) -> None:
        """Count one request of `user_id`, or raise QUOTA_EXCEEDED."""
        ...

    async def record(self, user_id: str, tokens: int) -> None:
        """`user_id` spent `tokens` (prompt and completion)."""
        ...


@dataclass
class _Day:
    day: int
    requests: int = 0
    tokens: int = 0


class MemoryQuota:
    """In-process counts per user for the current UTC day; 0 disables a limit."""

    def __init__(
        self,
        daily_requests: int = 0,
        daily_tokens: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.daily_requests = daily_requests
        self.daily_tokens = daily_tokens
        self._clock = clock
        self._users: dict[str, _Day] = {}

    def _today(self, user_id: str) -> tuple[_Day, float]:
        now = self._clock()
        day = int(now // DAY_S)
        entry = self._users.get(user_id)
        if entry is None or entry.day != day:
            if entry is not None:
                # A new day: yesterday's counts of everyone are dead weight.
                self._users = {u: e for u, e in self._users.items() if e.day == day}
            entry = _Day(day)
            self._users[user_id] = entry
        return entry, now

    def usage(self, user_id: str) -> tuple[int, int]:
        """(requests, tokens) of `user_id` today."""
        entry, _ = self._today(user_id)
        return entry.requests, entry.tokens

    async def admit(self, user_id: str) -> None:
        entry, now = self._today(user_id)
        over = ""
        if self.daily_requests and entry.requests >= self.daily_requests:
            over = f"{self.daily_requests} requests"
        elif self.daily_tokens and entry.tokens >= self.daily_tokens:
            over = f"{self.daily_tokens} tokens"
        if over:
            until_midnight = (entry.day + 1) * DAY_S - now
            raise ServiceError(
                Code.ERROR_CODE_QUOTA_EXCEEDED,
                f"daily quota of {over} used; it resets at 00:00 UTC",
                retry_after_ms=int(until_midnight * 1000),
            )
        entry.requests += 1

    async def record(self, user_id: str, tokens: int) -> None:
        entry, _ = self._today(user_id)
        entry.tokens += max(tokens, 0)
