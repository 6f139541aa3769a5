"""The live view of task_svc's membership and shard leases, read from NATS KV (svckit/shards.py
says what the buckets hold). task_svc's nodes keep it to decide what to take and release
(task_svc/membership.py); gateways keep it to reach each task's owner directly.

Both buckets are followed with KV watchers, so a change is seen the moment it is stored. A
node's heartbeat expires from SB_NODES by the bucket's TTL without any notice to watchers, so
liveness is judged here by when a heartbeat was last *seen* (the local monotonic clock, so
no two machines' clocks are compared): a node not heard from for the lease TTL is dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import nats.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from svckit.lifecycle import cancel_and_wait
from svckit.nats import while_forming
from svckit.shards import NODES_BUCKET, SHARDS_BUCKET, Lease, Member, shard_of, shard_of_key

log = logging.getLogger(__name__)

WATCH_RETRY_S = 1.0
KV_ERRORS = (nats.errors.Error, OSError, TimeoutError)


@dataclass
class _Seen:
    member: Member
    at: float  # monotonic time the heartbeat was seen


@dataclass(frozen=True)
class Held:
    lease: Lease
    revision: int  # the KV revision, for compare-and-set


def bucket_configs(lease_s: float, replicas: int) -> list[KeyValueConfig]:
    storage = StorageType.FILE
    return [
        KeyValueConfig(
            bucket=NODES_BUCKET, ttl=lease_s, history=1, replicas=replicas, storage=storage
        ),
        KeyValueConfig(bucket=SHARDS_BUCKET, history=1, replicas=replicas, storage=storage),
    ]


async def ensure_buckets(js: JetStreamContext, lease_s: float, replicas: int) -> None:
    """Create both buckets if missing (an existing one is used as it is)."""
    for config in bucket_configs(lease_s, replicas):
        try:
            await js.key_value(config.bucket)
        except BucketNotFoundError:
            await while_forming(config.bucket, partial(js.create_key_value, config))
            log.info("kv bucket created", extra={"bucket": config.bucket})


class MembershipView:
    """Who is alive, and who holds which shard. `open` returns once both buckets' current
    contents are known."""

    def __init__(
        self,
        js: JetStreamContext,
        lease_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.js = js
        self.lease_s = lease_s
        self.clock = clock
        self.nodes: dict[str, _Seen] = {}
        self.leases: dict[int, Held] = {}
        # Set when a node comes, goes or changes, or a lease does (a heartbeat that only
        # says "still here" does not); readers clear it.
        self.changed = asyncio.Event()
        self.nodes_kv: KeyValue | None = None
        self.shards_kv: KeyValue | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self, timeout_s: float = 5.0) -> None:
        """Follow both buckets; return once their contents are in, or after `timeout_s`
        (a gateway may start before any task_svc has made the buckets: they are bound
        whenever they appear, and until then nothing is known)."""
        loaded = [asyncio.Event(), asyncio.Event()]
        for bucket, apply, event in zip(
            (NODES_BUCKET, SHARDS_BUCKET), (self._node, self._lease), loaded, strict=True
        ):
            task = asyncio.create_task(self._follow(bucket, apply, event), name=f"watch {bucket}")
            self._tasks.append(task)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*(event.wait() for event in loaded))

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    # -- reading ----------------------------------------------------------------------

    def live(self) -> dict[str, Member]:
        """Every node heard from within the lease TTL."""
        horizon = self.clock() - self.lease_s
        return {node: seen.member for node, seen in self.nodes.items() if seen.at > horizon}

    def is_live(self, node: str) -> bool:
        seen = self.nodes.get(node)
        return seen is not None and seen.at > self.clock() - self.lease_s

    def owner(self, shard: int) -> Lease | None:
        """The shard's holder, if it is alive (asked for every call a gateway routes)."""
        held = self.leases.get(shard)
        if held is None or not self.is_live(held.lease.node):
            return None
        return held.lease

    def owner_of(self, task_id: str) -> Lease | None:
        return self.owner(shard_of(task_id))

    # -- following ----------------------------------------------------------------------

    async def _follow(
        self, bucket: str, apply: Callable[[KeyValue.Entry], bool], loaded: asyncio.Event
    ) -> None:
        """Apply every update of a bucket; the watcher is made again if it breaks."""
        silence = self.lease_s if bucket == NODES_BUCKET else 10 * self.lease_s
        while True:
            watcher = None
            try:
                kv = await self.js.key_value(bucket)
                if bucket == NODES_BUCKET:
                    self.nodes_kv = kv
                else:
                    self.shards_kv = kv
                watcher = await kv.watchall()
                while True:
                    # Heartbeats come every fifth of the lease: silence means the watcher
                    # is gone (a NATS node lost); the leases are read afresh now and then.
                    # (Not `updates(timeout=)`: its wait_for can swallow a cancel on 3.11.)
                    async with asyncio.timeout(silence):
                        entry = await anext(watcher)
                    if entry is None:  # the initial values are all in
                        loaded.set()
                        continue
                    if apply(entry):
                        self.changed.set()
            except BucketNotFoundError:
                pass  # not made yet (no task_svc has started)
            except TimeoutError:
                log.info("kv watch silent; watching again", extra={"bucket": bucket})
            except StopAsyncIteration:
                pass  # stopped under us
            except KV_ERRORS as error:
                log.warning("kv watch broke; watching again", extra={"e": repr(error)})
            finally:
                if watcher is not None:
                    with contextlib.suppress(*KV_ERRORS):
                        await watcher.stop()  # type: ignore[no-untyped-call]
            await asyncio.sleep(WATCH_RETRY_S)

    def _node(self, entry: KeyValue.Entry) -> bool:
        """Apply a heartbeat; whether the membership changed (not just "still here")."""
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            return self.nodes.pop(entry.key, None) is not None
        try:
            member = Member.decode(entry.key, entry.value)
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable node record ignored", extra={"key": entry.key})
            return False
        now = self.clock()
        before = self.nodes.get(entry.key)
        if before is not None and before.member == member:
            return False  # read again (a new watcher), not a new heartbeat
        self.nodes[entry.key] = _Seen(member, now)
        if before is None or before.at <= now - self.lease_s:
            return True  # joined, or back
        return (before.member.address, before.member.leaving) != (member.address, member.leaving)

    def _lease(self, entry: KeyValue.Entry) -> bool:
        shard = shard_of_key(entry.key)
        if shard is None:
            return False
        if entry.operation in ("DEL", "PURGE") or not entry.value:
            return self.leases.pop(shard, None) is not None
        try:
            lease = Lease.decode(entry.value)
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable shard lease ignored", extra={"key": entry.key})
            return False
        self.leases[shard] = Held(lease, entry.revision or 0)
        return True


async def node_gone(kv: KeyValue, node: str) -> bool:
    """Whether NATS itself no longer holds a node's heartbeat (expired or deleted): what
    a node checks before it takes a shard over from another."""
    try:
        await kv.get(node)
    except (NotFoundError, nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return True
    return False
