"""Snapshots of active tasks on the lifecycle stream: recognised, never stored.

task_svc publishes a TaskSnapshot of each active task as a checkpoint on
`switchboard.tasks.<task_id>.snapshot` (history.proto) and reads it back from JetStream itself
after a crash. It is not history: the consumer acks it without decoding it or touching the
database, so a snapshot costs no more than its delivery and never waits on a database outage.
"""

from __future__ import annotations

SNAPSHOT_SUBJECT_SUFFIX = ".snapshot"


def is_snapshot(subject: str) -> bool:
    """Whether a message on the lifecycle stream is a snapshot (by its subject alone)."""
    return subject.endswith(SNAPSHOT_SUBJECT_SUFFIX)
