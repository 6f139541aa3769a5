"""Per-user and per-socket limits, sans I/O (the clock is a parameter): connections per user,
a token bucket per user on `llm_generate`, and one per socket on its other events (joins,
leaves, cancels, heartbeats: `SocketBucket`). The per-user ones hold across gateway replicas
when `shared_limits.SharedLimits` tells each replica what the others hold and spend (it
records what changes here in `changed` and `spent`); without NATS they are per process.

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
        self.changed: set[str] | None = None  # users whose count changed (when shared)

    def acquire(self, user: str, elsewhere: int = 0) -> bool:
        """One more connection of `user`, who holds `elsewhere` on other replicas."""
        count = self.open.get(user, 0)
        if self.limit > 0 and count + elsewhere >= self.limit:
            return False
        self.open[user] = count + 1
        if self.changed is not None:
            self.changed.add(user)
        return True

    def release(self, user: str) -> None:
        count = self.open.get(user, 0) - 1
        if count > 0:
            self.open[user] = count
        else:
            self.open.pop(user, None)
        if self.changed is not None:
            self.changed.add(user)


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
        self.spent: dict[str, int] | None = None  # tokens taken here per key (when shared)
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
        wait_ms = _take(bucket, now, self.rate, self.burst)
        if not wait_ms and self.spent is not None:
            self.spent[key] = self.spent.get(key, 0) + 1
        return wait_ms

    def charge(self, key: str, tokens: int, now: float) -> None:
        """Spend `tokens` another replica took for `key`: its bucket is the same budget. The
        debt is bounded by one burst, so a flood elsewhere cannot block a key for long."""
        if not self.enabled:
            return
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = max(-float(self.burst), _level(bucket, now, self.rate, self.burst) - tokens)
        bucket.stamp = now

    def prune(self, now: float) -> None:
        rate, burst = self.rate, self.burst
        full = [k for k, b in self.buckets.items() if _level(b, now, rate, burst) >= burst]
        for key in full:
            del self.buckets[key]
