"""Sharding by task id and rendezvous assignment (svckit/shards.py): pure, no I/O."""

from __future__ import annotations

import uuid
from collections import Counter

from svckit.shards import (
    SHARD_COUNT,
    Lease,
    Member,
    assignment,
    job_subject,
    node_key,
    preferred,
    queue_of,
    shard_key,
    shard_of,
    shard_of_key,
    shard_subjects,
)


def test_task_ids_spread_over_every_shard() -> None:
    counts = Counter(shard_of(str(uuid.uuid4())) for _ in range(20_000))
    assert set(counts) == set(range(SHARD_COUNT))
    mean = 20_000 / SHARD_COUNT
    assert all(0.6 * mean < n < 1.4 * mean for n in counts.values()), counts


def test_a_tasks_job_is_stored_where_only_its_shards_consumer_reads() -> None:
    task_id = str(uuid.uuid4())
    subject = job_subject(shard_of(task_id), "default")  # where a gateway stores it
    readers = [s for s in range(SHARD_COUNT) if _matches(shard_subjects(s), subject)]
    assert readers == [shard_of(task_id)]


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching, for the patterns used here (`*` is one token)."""
    want, got = pattern.split("."), subject.split(".")
    return len(want) == len(got) and all(w in ("*", g) for w, g in zip(want, got, strict=True))


def test_every_node_computes_the_same_owner_whatever_the_order() -> None:
    nodes = ["task-1", "task-2", "task-3"]
    for shard in range(SHARD_COUNT):
        assert preferred(shard, nodes) == preferred(shard, list(reversed(nodes)))
    assert preferred(0, []) is None
    assert assignment([]) == {}


def test_a_joining_node_takes_only_its_share() -> None:
    before = assignment(["task-1", "task-2", "task-3"])
    after = assignment(["task-1", "task-2", "task-3", "task-4"])
    moved = [s for s in range(SHARD_COUNT) if before[s] != after[s]]
    assert all(after[s] == "task-4" for s in moved)  # nothing moves between the old nodes
    assert 0 < len(moved) <= SHARD_COUNT / 2  # its share (a quarter on average), not all
    assert set(after.values()) == {"task-1", "task-2", "task-3", "task-4"}


def test_a_leaving_node_gives_only_its_own_shards() -> None:
    before = assignment(["task-1", "task-2", "task-3"])
    after = assignment(["task-1", "task-3"])
    for shard in range(SHARD_COUNT):
        if before[shard] != "task-2":
            assert after[shard] == before[shard]
        else:
            assert after[shard] in ("task-1", "task-3")


def test_subjects_and_keys_read_back() -> None:
    assert queue_of(job_subject(7, "openai")) == "openai"
    assert shard_of_key(shard_key(SHARD_COUNT - 1)) == SHARD_COUNT - 1
    assert shard_of_key(f"shard.{SHARD_COUNT}") is None and shard_of_key("node.x") is None


def test_records_read_back() -> None:
    member = Member("task-1", "10.0.0.1:7051", leaving=True)
    assert Member.decode("task-1", member.encode()) == member
    lease = Lease("task-2", "10.0.0.2:7051")
    assert Lease.decode(lease.encode()) == lease
    assert node_key("pod.example.com-7051") == "pod_example_com-7051"
