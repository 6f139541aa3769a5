"""Tasks are sharded by task id; shards are owned by task_svc nodes. Pure: no I/O here.

A task's shard is a stable hash of its id modulo `SHARD_COUNT` (fixed: changing it moves
every task). Its jobs live on the JetStream subject `switchboard.jobs.<shard>.<queue>`, so a
node consumes exactly its shards' jobs (one durable consumer per shard, task_svc/consumer.py).

Who owns a shard is decided in NATS, not here (task_svc/membership.py): nodes heartbeat into
the KV bucket `SB_NODES` (one key per node, the bucket's TTL expiring the dead ones), and a
node holds a shard by the key `shard.<n>` of `SB_SHARDS`, taken with compare-and-set. Which
node *should* hold a shard is rendezvous hashing over the live nodes (`preferred`): every
reader computes the same answer from the same membership, and a node joining or leaving
moves only the shards it gains or loses (about 1/N of them).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

SHARD_COUNT = 16  # see docs/architecture.md: nats-server's cost per job grows with consumers
JOBS_SUBJECT_PREFIX = "switchboard.jobs"
NODES_BUCKET = "SB_NODES"  # node id -> Member, expiring after the lease TTL
SHARDS_BUCKET = "SB_SHARDS"  # shard.<n> -> Lease, no TTL: a lease lives while its node does


def shard_of(task_id: str) -> int:
    """The shard of a task (CRC-32 of its id: stable across processes and versions)."""
    return zlib.crc32(task_id.encode()) % SHARD_COUNT


def job_subject(shard: int, queue: str) -> str:
    return f"{JOBS_SUBJECT_PREFIX}.{shard}.{queue}"


def shard_subjects(shard: int) -> str:
    """The filter of one shard's jobs, every queue."""
    return f"{JOBS_SUBJECT_PREFIX}.{shard}.*"


def queue_of(subject: str) -> str:
    """The queue of a job's subject (`switchboard.jobs.<shard>.<queue>`)."""
    return subject.rsplit(".", 1)[-1]


def shard_key(shard: int) -> str:
    return f"shard.{shard}"


def shard_of_key(key: str) -> int | None:
    head, _, number = key.partition(".")
    if head != "shard" or not number.isdigit():
        return None
    shard = int(number)
    return shard if shard < SHARD_COUNT else None


def _weight(node: str, shard: int) -> bytes:
    return hashlib.blake2b(f"{node}/{shard}".encode(), digest_size=8).digest()


def preferred(shard: int, nodes: Iterable[str]) -> str | None:
    """The node that should own `shard` among `nodes` (highest rendezvous weight)."""
    return max(nodes, key=lambda node: _weight(node, shard), default=None)


def assignment(nodes: Iterable[str]) -> dict[int, str]:
    """Every shard's preferred node; empty when there is no node."""
    live = sorted(set(nodes))
    if not live:
        return {}
    return {shard: preferred(shard, live) or "" for shard in range(SHARD_COUNT)}


@dataclass(frozen=True)
class Member:
    """A task_svc node, as its heartbeat in SB_NODES says."""

    node: str
    address: str  # where its TaskService answers (host:port)
    leaving: bool = False  # draining after SIGTERM: owns what it holds, takes nothing more
    # Counts the node's heartbeats: a reader sees the node alive when this changes, not
    # when it reads the record again (a dead node's last record stays until it expires).
    beat: int = 0

    def encode(self) -> bytes:
        return orjson.dumps({"address": self.address, "leaving": self.leaving, "beat": self.beat})

    @classmethod
    def decode(cls, node: str, data: bytes) -> Member:
        fields = orjson.loads(data)
        leaving = bool(fields.get("leaving", False))
        return cls(node, str(fields["address"]), leaving, int(fields.get("beat", 0)))


@dataclass(frozen=True)
class Lease:
    """Who holds a shard (SB_SHARDS), with where to reach it."""

    node: str
    address: str

    def encode(self) -> bytes:
        return orjson.dumps({"node": self.node, "address": self.address})

    @classmethod
    def decode(cls, data: bytes) -> Lease:
        fields = orjson.loads(data)
        return cls(str(fields["node"]), str(fields["address"]))


def node_key(node: str) -> str:
    """A node id as a KV key: letters, digits, '-', '_' and '=' only (a hostname's dots
    would make key tokens)."""
    return "".join(c if c.isalnum() or c in "-_=" else "_" for c in node)
