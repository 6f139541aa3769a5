"""What one batch changes, decided without a database: given the task rows the batch touches
(as locked in the transaction), its lifecycle events and published snapshots, the rows to
insert and update and the snapshot to keep per task. The repository then only writes it."""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from persistence_svc.events import ParsedEvent, apply_event, new_task_row
from persistence_svc.snapshots import (
    ParsedSnapshot,
    derived_snapshot,
    is_terminal,
    snapshot_task_row,
)

log = logging.getLogger(__name__)


@dataclass
class BatchPlan:
    inserts: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    # The snapshot to keep for each task the batch touches; None: the task has ended.
    keep: dict[uuid.UUID, ParsedSnapshot | None] = field(default_factory=dict)


def plan_batch(
    existing: dict[uuid.UUID, dict[str, Any]],
    events: list[ParsedEvent],
    published: dict[uuid.UUID, ParsedSnapshot],
    user_pks: dict[str, uuid.UUID],
    now: datetime,
) -> BatchPlan:
    """`existing`: the current rows of the batch's tasks (updated in place). Events apply in
    seq order per task (events.apply_event); snapshots per snapshots.ParsedSnapshot.replaces."""
    plan = BatchPlan()
    by_task: dict[uuid.UUID, list[ParsedEvent]] = defaultdict(list)
    for one in events:
        by_task[one.task_id].append(one)
    for task_id, task_events in by_task.items():
        task_events.sort(key=lambda e: e.seq)
        owner = task_events[0].user_id
        row = existing.get(task_id)
        is_new = row is None
        if row is None:
            row = existing[task_id] = new_task_row(task_events[0], user_pks[owner], now)
        elif row["user_id"] != user_pks[owner]:
            # task_svc owns ownership; an event naming another user is a bug upstream.
            # The row keeps its owner; the event still joins the audit trail.
            log.warning("event names another owner", extra={"task_id": str(task_id)})
        changed = False
        for one in task_events:
            changed = apply_event(row, one) or changed
        if is_new:
            plan.inserts.append(row)
        elif changed:
            row["updated_at"] = now
            plan.updates.append(row)
        if changed or is_new:
            ended = is_terminal(row["status"])
            plan.keep[task_id] = None if ended else derived_snapshot(row, owner, now)

    for task_id, snap in published.items():
        if is_terminal(snap.status):
            continue  # recovery needs active tasks only; the lifecycle event ends the task
        row = existing.get(task_id)
        if row is None:
            # The snapshot came before any lifecycle event of its task (they travel on
            # different subjects): the row starts from it, and every event still applies.
            row = existing[task_id] = snapshot_task_row(snap, user_pks[snap.user_id], now)
            plan.inserts.append(row)
        if is_terminal(row["status"]):
            plan.keep[task_id] = None  # a late snapshot of a task that has ended
            continue
        held = plan.keep.get(task_id)
        if held is None or snap.replaces(held.seq):
            plan.keep[task_id] = snap
    return plan
