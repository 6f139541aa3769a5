"""Per-user daily quotas: requests and tokens per UTC day; over either, a generation fails
fast with QUOTA_EXCEEDED (not retryable; retry-after is the time to the next UTC midnight).

`UserQuota` is the seam the generator calls. `DailyQuota` counts in this process, and, once
`attach`ed to the NATS KV bucket SB_QUOTAS (server.py does when NATS_URL is set), in one key
per user and day that every replica adds its counts to: so N replicas enforce one quota, not
N, and a restarted replica knows what its users spent today. Admission stays local (no round
trip per request): a user's totals are read once when this replica first sees them today,
and what it counted is added to the key every `flush_s` with compare-and-set (which also
brings back what the other replicas added). Between two flushes the replicas may together
pass a quota by what a user spends in that second; a request counts when admitted, its
tokens when it finished, and the token check is made at admission, so the last request of a
day may overshoot by its own size: failing fast matters more than exactness. Without NATS
(not configured, or unreachable) the counts are this process's own, and flushed later.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import nats.errors
import nats.js.errors
import orjson
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from svckit.errors import ServiceError
from svckit.nats import while_forming
from switchboard.v1 import common_pb2

log = logging.getLogger(__name__)

Code = common_pb2.ErrorCode
DAY_S = 86_400
QUOTA_BUCKET = "SB_QUOTAS"
KV_ERRORS = (nats.errors.Error, OSError, TimeoutError)
READ_TIMEOUT_S = 0.5  # a user's first request today waits this long at most for its totals
CAS_ATTEMPTS = 5


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
    requests: int = 0  # today's, as far as this replica knows (its own and the others')
    tokens: int = 0
    unflushed_requests: int = 0  # counted here since the last flush
    unflushed_tokens: int = 0
    read: bool = False  # the shared totals were read (or could not be) today


class DailyQuota:
    """Counts per user for the current UTC day; 0 disables a limit."""

    def __init__(
        self,
        daily_requests: int = 0,
        daily_tokens: int = 0,
        clock: Callable[[], float] = time.time,
        flush_s: float = 1.0,
    ) -> None:
        self.daily_requests = daily_requests
        self.daily_tokens = daily_tokens
        self.flush_s = flush_s
        self._clock = clock
        self._users: dict[str, _Day] = {}
        self.kv: KeyValue | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.daily_requests or self.daily_tokens)

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
        """(requests, tokens) of `user_id` today, as far as this replica knows."""
        entry, _ = self._today(user_id)
        return entry.requests, entry.tokens

    async def admit(self, user_id: str) -> None:
        entry, now = self._today(user_id)
        if self.kv is not None and not entry.read:
            entry.read = True
            await self._read(user_id, entry)
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
        entry.unflushed_requests += 1

    async def record(self, user_id: str, tokens: int) -> None:
        entry, _ = self._today(user_id)
        entry.tokens += max(tokens, 0)
        entry.unflushed_tokens += max(tokens, 0)

    # -- shared across replicas (NATS KV) ----------------------------------------------

    def attach(self, kv: KeyValue) -> None:
        """Count in the shared bucket from now on (what was counted so far is flushed)."""
        self.kv = kv

    async def run(self) -> None:
        """Flush every `flush_s` until cancelled (the server owns this loop)."""
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> None:
        """Add what was counted here to each user's shared totals, and learn theirs."""
        if self.kv is None:
            return
        for user_id, entry in list(self._users.items()):
            if entry.unflushed_requests or entry.unflushed_tokens:
                try:
                    await self._add(user_id, entry)
                except KV_ERRORS as error:
                    log.warning("quota counts not shared yet", extra={"e": repr(error)})
                    return  # NATS is away: the next flush tries again

    async def _read(self, user_id: str, entry: _Day) -> None:
        assert self.kv is not None
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                got = await self.kv.get(_key(entry.day, user_id))
        except nats.js.errors.KeyNotFoundError:
            return
        except KV_ERRORS as error:
            log.warning("quota totals not read; counting here", extra={"e": repr(error)})
            return
        requests, tokens = _decode(got.value)
        entry.requests = requests + entry.unflushed_requests
        entry.tokens = tokens + entry.unflushed_tokens

    async def _add(self, user_id: str, entry: _Day) -> None:
        assert self.kv is not None
        key = _key(entry.day, user_id)
        requests, tokens = entry.unflushed_requests, entry.unflushed_tokens
        for _ in range(CAS_ATTEMPTS):
            try:
                got = await self.kv.get(key)
                revision, (stored_requests, stored_tokens) = got.revision, _decode(got.value)
            except nats.js.errors.KeyNotFoundError:
                revision, stored_requests, stored_tokens = None, 0, 0
            totals = (stored_requests + requests, stored_tokens + tokens)
            value = orjson.dumps(totals)
            try:
                if revision is None:
                    await self.kv.create(key, value)
                else:
                    await self.kv.update(key, value, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another replica added meanwhile: read again
            # What was counted during the awaits stays unflushed, and on top of the totals.
            entry.unflushed_requests -= requests
            entry.unflushed_tokens -= tokens
            entry.requests = totals[0] + entry.unflushed_requests
            entry.tokens = totals[1] + entry.unflushed_tokens
            entry.read = True
            return
        log.warning("quota counts contended; flushed next time", extra={"user_id": user_id})


def quota_bucket_config(replicas: int) -> KeyValueConfig:
    """Keys live two days after their last write: yesterday's totals expire by themselves."""
    return KeyValueConfig(
        bucket=QUOTA_BUCKET,
        history=1,
        ttl=2 * DAY_S,
        replicas=replicas,
        storage=StorageType.FILE,
    )


async def open_quota_bucket(js: JetStreamContext, replicas: int) -> KeyValue:
    with contextlib.suppress(nats.js.errors.BucketNotFoundError):
        return await js.key_value(QUOTA_BUCKET)
    return await while_forming(
        QUOTA_BUCKET, partial(js.create_key_value, quota_bucket_config(replicas))
    )


def _key(day: int, user_id: str) -> str:
    """KV keys allow few characters: the user id travels base64url-encoded."""
    encoded = base64.urlsafe_b64encode(user_id.encode()).decode().rstrip("=")
    return f"{day}.{encoded}"


def _decode(value: bytes | None) -> tuple[int, int]:
    try:
        requests, tokens = orjson.loads(value or b"[0, 0]")
        return int(requests), int(tokens)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        log.warning("unreadable quota totals ignored")
        return 0, 0
