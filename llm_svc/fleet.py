"""llm_svc among its replicas: provider rate limits and user quotas counted for the fleet,
over NATS (NATS_URL). Optional: without NATS_URL, or while NATS is unreachable, each replica
counts for itself (and shares what it counted once NATS is there).

- rpm/tpm: what this replica takes from each provider scope goes out every 100 ms on core
  NATS (svckit/spend_share.py), and what the others took is charged here (limits.py);
- daily quotas: one key per user and day in the KV bucket SB_QUOTAS (quota.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client

from llm_svc.limits import RateLimiter
from llm_svc.quota import DailyQuota, open_quota_bucket
from svckit.lifecycle import cancel_and_wait
from svckit.nats import close_nats, connect_nats
from svckit.spend_share import SpendShare

log = logging.getLogger(__name__)

SPEND_SUBJECT = "switchboard.llm.spent"
JOIN_RETRY_S = 2.0


class Fleet:
    def __init__(
        self, nats_url: str, replicas: int, limiter: RateLimiter, quota: DailyQuota
    ) -> None:
        self.nats_url = nats_url
        self.replicas = replicas
        self.limiter = limiter
        self.quota = quota
        self.nc: Client | None = None
        self.share: SpendShare | None = None
        self.joined = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Join in the background: serving never waits for NATS."""
        self._tasks.append(asyncio.create_task(self._join(), name="fleet join"))

    async def close(self) -> None:
        for task in reversed(self._tasks):
            await cancel_and_wait(task)
        if self.share is not None:
            await self.share.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):  # flushed by the last flush, or lost
                await self.quota.flush()
            await close_nats(self.nc)

    async def _join(self) -> None:
        while self.nc is None:
            try:
                self.nc = await connect_nats(self.nats_url, "llm_svc")
            except ConnectionError as error:
                log.warning(
                    "limits counted per replica until NATS is reachable", extra={"e": repr(error)}
                )
                await asyncio.sleep(JOIN_RETRY_S)
        self.share = SpendShare(self.nc, SPEND_SUBJECT, self.limiter.charge)
        await self.share.start()
        self.limiter.share = self.share.spend
        if self.quota.enabled:
            js = self.nc.jetstream()
            while self.quota.kv is None:
                try:
                    self.quota.attach(await open_quota_bucket(js, self.replicas))
                except Exception as error:  # NATS errors of every kind: try again
                    log.warning("quota bucket not open yet", extra={"e": repr(error)})
                    await asyncio.sleep(JOIN_RETRY_S)
            self._tasks.append(asyncio.create_task(self.quota.run(), name="quota flush"))
        log.info("limits shared with the other llm_svc replicas", extra={"url": self.nats_url})
        self.joined.set()
