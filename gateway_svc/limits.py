"""Per-user and per-socket limits, sans I/O (the clock is a parameter): connections per user,
a token bucket per user on `llm_generate`, and one per socket on its other events (joins,
leaves, cancels, heartbeats: `SocketBucket`). The per-user ones are per gateway process: with
N replicas a user gets N times the budget, which still bounds what one user can cost.

Why a refused connect is an HTTP 403 before the upgrade (and not an upgrade then a close):
docs/protocol.md ("Connecting") makes every refused connect a 403 with an empty body, and
the official clients treat it as a connect error and retry with backoff. A close after the
upgrade would need a close code: 1001/1012 make phoenix.js reconnect at once (a tight loop),
and 1000 stops npm phoenix 1.8.0 to 1.8.15 from ever reconnecting. A 403 also costs no upgrade,
no socket state and no task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class ConnectionCounter:
    """Open connections per user; `acquire` refuses beyond `limit` (0 = no limit). Users with
    no connection hold no memory."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}

    def acquire(self, user: str) -> bool:
        count = self.open.get(user, 0)
        if self.limit > 0 and count >= self.limit:
            return False
        self.open[user] = count + 1
        return True

    def release(self, user: str) -> None:
        count = self.open.get(user, 0) - 1
        if count > 0:
            self.open[user] = count
        else:
            self.open.pop(user, None)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


def _level(bucket: _Bucket, now: float, rate: float, burst: int) -> float:
    return min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)


def _take(bucket: _Bucket, now: float, rate: float, burst: int) -> int:
    level = _level(bucket, now, rate, burst)
    bucket.stamp = now
    if level >= 1.0:
        bucket.tokens = level - 1.0
        return 0
    bucket.tokens = level
    return max(1, math.ceil((1.0 - level) / rate * 1000))


class SocketBucket:
    """One socket's token bucket (two floats: it lives as long as the socket)."""

    __slots__ = ("_bucket",)

    def __init__(self, burst: int, now: float) -> None:
        self._bucket = _Bucket(float(max(1, burst)), now)

    def take(self, now: float, rate: float, burst: int) -> int:
        """0 if the event may go (a token is spent), else the ms until one may; rate <= 0:
        no limit."""
        return _take(self._bucket, now, rate, max(1, burst)) if rate > 0 else 0


class RateLimiter:
    """A token bucket per key: `burst` tokens, refilled at `rate` per second. `rate <= 0`
    disables the limiter. A bucket that has refilled completely is indistinguishable from a
    new one, so full buckets are dropped now and then: memory follows active users only."""

    PRUNE_EVERY = 4096  # takes between two sweeps for full buckets

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.buckets: dict[str, _Bucket] = {}
        self._takes = 0

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, now: float) -> int:
        """0 if `key` may go now (a token is spent), else the milliseconds until it may."""
        if not self.enabled:
            return 0
        self._takes += 1
        if self._takes % self.PRUNE_EVERY == 0:
            self.prune(now)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(float(self.burst), now)
        return _take(bucket, now, self.rate, self.burst)

    def prune(self, now: float) -> None:
        rate, burst = self.rate, self.burst
        full = [k for k, b in self.buckets.items() if _level(b, now, rate, burst) >= burst]
        for key in full:
            del self.buckets[key]
