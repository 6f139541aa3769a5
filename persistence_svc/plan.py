"""What one batch changes, decided without a database: given the task rows the batch touches
(as locked in the transaction) and its lifecycle events, the task rows to write. The
repository then only writes them."""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from persistence_svc.events import ParsedEvent, apply_event, new_task_row

log = logging.getLogger(__name__)

# The `read_version` of a task the database did not hold when the batch read it. No row has
# it (versions start at 0), so a row a concurrent writer created since never matches.
NEW_TASK = -1


@dataclass
class BatchPlan:
    # Task rows to upsert, each with `read_version`: the version the stored row had when it
    # was read (NEW_TASK if there was none). The write applies only where the stored row is
    # still at that version, so it can never replace a row this batch did not read.
    rows: list[dict[str, Any]] = field(default_factory=list)
    new_tasks: int = 0


def plan_batch(
    existing: dict[uuid.UUID, dict[str, Any]],
    events: Sequence[ParsedEvent],
    user_pks: dict[str, uuid.UUID],
    now: datetime,
) -> BatchPlan:
    """`existing`: the current rows of the batch's tasks (updated in place). Events apply in
    seq order per task (events.apply_event)."""
    plan = BatchPlan()
    by_task: dict[uuid.UUID, list[ParsedEvent]] = defaultdict(list)
    for one in events:
        by_task[one.task_id].append(one)
    for task_id, task_events in by_task.items():
        task_events.sort(key=lambda e: e.seq)
        owner = user_pks[task_events[0].user_id]
        row = existing.get(task_id)
        if row is None:
            read_version = NEW_TASK
            row = existing[task_id] = new_task_row(task_events[0], owner, now)
        else:
            read_version = row["version"]
            if row["user_id"] != owner:
                # task_svc owns ownership; an event naming another user is a bug upstream.
                # The row keeps its owner; the event still joins the audit trail.
                log.warning("event names another owner", extra={"task_id": str(task_id)})
        changed = False
        for one in task_events:
            changed = apply_event(row, one) or changed
        if read_version == NEW_TASK:
            plan.new_tasks += 1
        elif not changed:
            continue
        row["updated_at"] = now
        plan.rows.append({**row, "read_version": read_version})
    return plan
