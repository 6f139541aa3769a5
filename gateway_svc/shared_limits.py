"""Per-user limits across gateway replicas: each replica tells the others, over core NATS,
what its users hold and spend, so that connections per user and the `llm_generate` bucket
are one budget for the whole fleet, not one per replica.

Every `interval_s` a replica with something new publishes one message on
`switchboard.limits`: the tokens its users took since the last one (the others charge their
buckets with them) and the socket counts that changed (the others add them when a user
connects: `elsewhere`). Every `full_every_s` it sends all its counts, which also says it is
alive; a replica not heard for `peer_ttl_s` counts for nothing (it died, its sockets with it).

The check stays local, so a connect or an ack waits for no round trip. The price is a window
of `interval_s` (100 ms) in which two replicas may both admit the last token or connection:
the budget may be passed by what one user can do in 100 ms on each replica, never by N times.
Core NATS may lose a message; the next full count repairs the counts, a lost charge is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from gateway_svc.limits import ConnectionCounter, RateLimiter
from svckit.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)

SUBJECT = "switchboard.limits"


@dataclass
class _Peer:
    sockets: dict[str, int] = field(default_factory=dict)
    heard_at: float = 0.0


class SharedLimits:
    def __init__(
        self,
        nc: Client,
        connections: ConnectionCounter,
        generate: RateLimiter,
        *,
        interval_s: float = 0.1,
        full_every_s: float = 2.0,
        peer_ttl_s: float = 6.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nc = nc
        self.id = uuid.uuid4().hex
        self.connections = connections
        self.generate = generate
        self.interval_s = interval_s
        self.full_every_s = full_every_s
        self.peer_ttl_s = peer_ttl_s
        self.clock = clock
        self.peers: dict[str, _Peer] = {}
        # Only what is limited is tracked and told.
        if connections.limit > 0:
            connections.changed = set()
        if generate.enabled:
            generate.spent = {}
        self._last_full = -full_every_s
        self._sub: Subscription | None = None
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(SUBJECT, cb=self._heard)
        self._loop = asyncio.create_task(self._publish_every_interval(), name="shared limits")

    async def close(self) -> None:
        await cancel_and_wait(self._loop)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    def elsewhere(self, user: str) -> int:
        """The connections `user` holds on the other replicas (those heard lately)."""
        now = self.clock()
        return sum(
            peer.sockets.get(user, 0)
            for peer in self.peers.values()
            if now - peer.heard_at < self.peer_ttl_s
        )

    # -- out ----------------------------------------------------------------------------

    def message(self) -> bytes | None:
        """What is new since the last message (None: nothing), and every count when due."""
        now = self.clock()
        spent: dict[str, int] = {}
        if self.generate.spent is not None:
            spent, self.generate.spent = self.generate.spent, {}
        changed: set[str] = set()
        if self.connections.changed is not None:
            changed, self.connections.changed = self.connections.changed, set()
        full = now - self._last_full >= self.full_every_s
        if full:
            self._last_full = now
            counted = self.connections.changed is not None
            sockets = dict(self.connections.open) if counted else {}
        else:
            sockets = {user: self.connections.open.get(user, 0) for user in changed}
        if not (spent or sockets or full):
            return None
        return orjson.dumps({"from": self.id, "full": full, "sockets": sockets, "spent": spent})

    async def _publish_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            data = self.message()
            if data is None or not self.nc.is_connected:
                continue
            try:
                await self.nc.publish(SUBJECT, data)
            except (nats.errors.Error, OSError) as error:
                log.warning("limits not shared this time", extra={"e": repr(error)})

    # -- in -----------------------------------------------------------------------------

    async def _heard(self, msg: Msg) -> None:
        try:
            news = orjson.loads(msg.data)
            sender = news["from"]
            sockets = {str(u): int(n) for u, n in news["sockets"].items()}
            spent = {str(u): int(n) for u, n in news["spent"].items()}
            full = bool(news["full"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.warning("unreadable limits message ignored")
            return
        if sender == self.id:
            return
        self.heard(sender, full, sockets, spent)

    def heard(
        self, sender: str, full: bool, sockets: dict[str, int], spent: dict[str, int]
    ) -> None:
        now = self.clock()
        peer = self.peers.get(sender)
        if peer is None:
            peer = self.peers[sender] = _Peer()
        if full:
            peer.sockets = {u: n for u, n in sockets.items() if n > 0}
        else:
            for user, count in sockets.items():
                if count > 0:
                    peer.sockets[user] = count
                else:
                    peer.sockets.pop(user, None)
        peer.heard_at = now
        for user, tokens in spent.items():
            self.generate.charge(user, tokens, now)
        stale = [p for p, known in self.peers.items() if now - known.heard_at >= self.peer_ttl_s]
        for gone in stale:
            del self.peers[gone]
