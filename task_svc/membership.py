"""This node's part in the cluster: its heartbeat in SB_NODES, and the shards it holds in
SB_SHARDS (svckit/shards.py, svckit/membership.py).

Every tick (a fifth of the lease TTL) the node heartbeats, then compares what it holds with
what rendezvous hashing over the live, not-leaving nodes gives it:
- a shard it should hold and nobody holds (no key), or that it held in a previous
  incarnation (same node id: a restarted pod), or whose holder NATS no longer knows (its
  heartbeat expired) is taken with compare-and-set on the key's revision, so of two nodes
  racing for a shard one wins; then the engine takes its jobs over (`ShardOwner.acquire`);
- a shard it holds that another live node should hold now (a node joined) is handed over:
  the engine drains it (`release`: running tasks get a grace, then are cut and resumed by the
  next owner), then the key is deleted, and the preferred node takes it at its next tick.

Fencing: a node whose heartbeats have not been stored for most of the TTL (cut off from NATS)
stops everything it holds at once (`lose`), before NATS expires its heartbeat and another
node may take its shards over: two nodes never run one shard's tasks at the same time.

Leaving (SIGTERM): the heartbeat says `leaving`, so no shard is preferred here any more; each
held shard is drained and released; the heartbeat is deleted last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import nats.js.errors
from nats.js.client import JetStreamContext

from svckit.lifecycle import cancel_and_wait
from svckit.membership import KV_ERRORS, MembershipView, ensure_buckets, node_gone
from svckit.shards import SHARD_COUNT, Lease, Member, preferred, shard_key

log = logging.getLogger(__name__)

ACQUIRE_RETRY_S = 0.2
FENCE_FRACTION = 0.7  # of the TTL without a stored heartbeat: stop before others may take over


class ShardOwner(Protocol):
    """What a node does with a shard (the job engine, jobs.py)."""

    async def acquire(self, shard: int) -> None: ...

    async def release(self, shard: int, grace_s: float) -> None: ...

    async def lose(self, shard: int) -> None: ...


class NodeMembership:
    def __init__(
        self,
        js: JetStreamContext,
        owner: ShardOwner,
        *,
        node: str,
        address: str,
        lease_s: float,
        replicas: int,
        handoff_grace_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.js = js
        self.owner = owner
        self.node = node
        self.address = address
        self.lease_s = lease_s
        self.replicas = replicas
        self.handoff_grace_s = handoff_grace_s
        self.clock = clock
        self.view = MembershipView(js, lease_s, clock)
        self.held: dict[int, int] = {}  # shard -> lease revision
        self.leaving = False
        self._stored_at: float | None = None  # when the last stored heartbeat was sent
        self._beat = 0
        self._busy: dict[int, asyncio.Task[None]] = {}  # one take or hand-over per shard
        self._loop: asyncio.Task[None] | None = None
        self._deciding = asyncio.Lock()  # held while a rebalance decides

    @property
    def tick_s(self) -> float:
        return self.lease_s / 5

    async def start(self) -> None:
        """Join: heartbeat, learn the membership, take this node's shards (all of them
        recovered before this returns), then keep at it in the background."""
        await ensure_buckets(self.js, self.lease_s, self.replicas)
        await self.view.open()
        if self.view.nodes_kv is None or self.view.shards_kv is None:
            raise ConnectionError("the membership buckets could not be read")
        await self._heartbeat()
        await self._rebalance()
        await self._settle()
        self._loop = asyncio.create_task(self._run(), name="membership")

    async def leave(self) -> None:
        """Hand every held shard over (drained), then leave the membership."""
        if self.view.nodes_kv is None:  # never joined
            await self.close()
            return
        self.leaving = True
        async with self._deciding:  # no take starts from here on
            pass
        await self._heartbeat()
        await self._settle()
        for shard in list(self.held):
            self._start(shard, self._hand_over(shard))
        await self._settle()
        await cancel_and_wait(self._loop)
        assert self.view.nodes_kv is not None
        with contextlib.suppress(*KV_ERRORS):
            await self.view.nodes_kv.delete(self.node)
        await self.view.close()

    async def close(self) -> None:
        """Stop without handing over (the engine stops its work itself)."""
        await cancel_and_wait(self._loop, *self._busy.values())
        await self.view.close()

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        """Heartbeat every tick; decide every tick and whenever the membership changes."""
        next_beat = self.clock() + self.tick_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(next_beat - self.clock(), 0)):
                    await self.view.changed.wait()
            self.view.changed.clear()
            if self.clock() >= next_beat:
                next_beat = self.clock() + self.tick_s
                await self._heartbeat()
            if self._fenced():
                await self._fence()
            elif not self.leaving:
                await self._rebalance()

    async def _heartbeat(self) -> None:
        kv = self.view.nodes_kv
        assert kv is not None
        sent = self.clock()
        self._beat += 1
        member = Member(self.node, self.address, self.leaving, self._beat)
        try:
            async with asyncio.timeout(self.tick_s):
                await kv.put(self.node, member.encode())
        except KV_ERRORS as error:
            log.warning("heartbeat not stored", extra={"e": repr(error)})
            return
        self._stored_at = sent

    def _fenced(self) -> bool:
        stored = self._stored_at
        return stored is None or self.clock() - stored > self.lease_s * FENCE_FRACTION

    async def _fence(self) -> None:
        if not self.held:
            return
        log.error(
            "cut off from NATS: stopping every held shard",
            extra={"shards": sorted(self.held), "node": self.node},
        )
        for shard in list(self.held):
            busy = self._busy.pop(shard, None)
            if busy is not None:
                busy.cancel()
            del self.held[shard]
            await self.owner.lose(shard)

    async def _settle(self) -> None:
        """Wait for every take and hand-over in progress."""
        while self._busy:
            await asyncio.gather(*self._busy.values(), return_exceptions=True)

    # -- deciding ----------------------------------------------------------------------

    async def _rebalance(self) -> None:
        async with self._deciding:
            if not self.leaving:
                await self._decide()

    async def _decide(self) -> None:
        live = self.view.live()
        live[self.node] = Member(self.node, self.address, self.leaving)
        candidates = [node for node, member in live.items() if not member.leaving]
        for shard in range(SHARD_COUNT):
            if shard in self._busy:
                continue
            wanted = preferred(shard, candidates)
            if shard in self.held:
                if self._taken_by_another(shard):
                    self._start(shard, self._lose(shard))
                elif wanted not in (None, self.node):
                    self._start(shard, self._hand_over(shard))
            elif wanted == self.node and await self._may_take(shard, live):
                self._start(shard, self._take(shard))

    def _taken_by_another(self, shard: int) -> bool:
        """Whether another node has written the shard's lease since this one took it. Its
        compare-and-set made the shard its own (it judged this node gone: a view cut off
        while a NATS node was lost), so this node must not run it any more, nor keep
        recreating its consumer under the other's feet."""
        held, ours = self.view.leases.get(shard), self.held.get(shard)
        return (
            held is not None
            and ours is not None
            and held.lease.node != self.node
            and held.revision > ours
        )

    async def _lose(self, shard: int) -> None:
        """Stop a shard another node took over, leaving its lease (now the other's) alone."""
        log.warning("shard taken over by another node; stopped here", extra={"shard": shard})
        if self.held.pop(shard, None) is not None:
            await self.owner.lose(shard)

    async def _may_take(self, shard: int, live: dict[str, Member]) -> bool:
        held = self.view.leases.get(shard)
        if held is None or held.lease.node == self.node:
            return True
        if held.lease.node in live:
            return False  # alive: it hands the shard over itself
        assert self.view.nodes_kv is not None
        try:
            return await node_gone(self.view.nodes_kv, held.lease.node)
        except KV_ERRORS:
            return False

    def _start(self, shard: int, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"shard {shard}")
        self._busy[shard] = task
        task.add_done_callback(lambda _t: self._busy.pop(shard, None))

    async def _take(self, shard: int) -> None:
        kv = self.view.shards_kv
        assert kv is not None
        lease = Lease(self.node, self.address).encode()
        held = self.view.leases.get(shard)
        try:
            if held is None:
                revision = await kv.create(shard_key(shard), lease)
            else:
                revision = await kv.update(shard_key(shard), lease, last=held.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return  # another node was quicker; the view shows it soon
        except KV_ERRORS as error:
            log.warning("shard not taken", extra={"shard": shard, "e": repr(error)})
            return
        if self.leaving:  # SIGTERM came meanwhile: give it straight back
            with contextlib.suppress(*KV_ERRORS):
                await kv.delete(shard_key(shard), last=revision)
            return
        self.held[shard] = revision
        delay = ACQUIRE_RETRY_S
        while True:  # the shard is ours: its jobs are taken over, however long NATS needs
            try:
                await self.owner.acquire(shard)
                break
            except Exception as error:
                log.warning(
                    "shard take-over failed; again", extra={"shard": shard, "e": repr(error)}
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.tick_s * 5)
            if self.leaving or shard not in self.held:
                return  # leaving, or fenced meanwhile
            if self._taken_by_another(shard):
                log.warning("shard taken over by another node first", extra={"shard": shard})
                del self.held[shard]  # not acquired here: nothing to stop
                return
        log.info("shard taken", extra={"shard": shard, "node": self.node})

    async def _hand_over(self, shard: int) -> None:
        kv = self.view.shards_kv
        assert kv is not None
        await self.owner.release(shard, self.handoff_grace_s)
        revision = self.held.pop(shard, None)
        if revision is None:
            return  # fenced meanwhile
        try:
            await kv.delete(shard_key(shard), last=revision)
        except KV_ERRORS as error:
            log.warning("shard lease not deleted", extra={"shard": shard, "e": repr(error)})
        log.info("shard handed over", extra={"shard": shard, "node": self.node})
