"""The database-free parts: event validation, the ordered fold, the cursor."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from persistence_svc.cursor import Cursor
from persistence_svc.errors import InvalidCursor, InvalidEvent
from persistence_svc.events import apply_event, new_task_row, parse_event
from switchboard.v1 import common_pb2, events_pb2
from tests.persistence.factory import T0, Kind, completed_lifecycle, event, new_task_id


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"task_id": "not-a-uuid"}, "not a UUID"),
        ({"user_id": ""}, "user id"),
        ({"seq": 0}, "seq"),
        ({"kind": Kind.LIFECYCLE_KIND_UNSPECIFIED, "status": 0}, "no kind"),
    ],
)
def test_parse_event_refuses_what_can_never_apply(change: dict[str, object], why: str) -> None:
    message = event(new_task_id(), 1, Kind.LIFECYCLE_KIND_QUEUED)
    for key, value in change.items():
        setattr(message, key, value)
    with pytest.raises(InvalidEvent, match=why):
        parse_event(message)


def test_status_defaults_from_kind_and_time_from_now() -> None:
    message = events_pb2.LifecycleEvent(
        task_id=new_task_id(), user_id="alice", seq=3, kind=Kind.LIFECYCLE_KIND_STARTED
    )
    now = datetime(2026, 1, 1, tzinfo=UTC)
    parsed = parse_event(message, now)
    assert (parsed.status, parsed.kind, parsed.at) == ("processing", "started", now)


def fold(events: list[events_pb2.LifecycleEvent]) -> dict[str, object]:
    parsed = [parse_event(e) for e in events]
    row = new_task_row(parsed[0], uuid.uuid4(), T0)
    for one in parsed:
        apply_event(row, one)
    return row


def test_fold_in_order_gives_the_final_state() -> None:
    row = fold(completed_lifecycle(new_task_id()))
    assert row["status"] == "completed"
    assert row["version"] == 7
    assert row["response"] == "Rayleigh."
    assert row["total_tokens"] == 8
    assert row["started_at"] == T0 + timedelta(seconds=1)
    assert row["completed_at"] == T0 + timedelta(seconds=3)


def test_older_event_never_overwrites_newer_state() -> None:
    queued, started, completed = completed_lifecycle(new_task_id())
    row = fold([completed, queued, started])
    assert row["status"] == "completed"
    assert row["version"] == 7
    assert row["progress"] == 1.0
    # ... but the write-once times an older event knows still fill their gaps.
    assert row["created_at"] == T0
    assert row["started_at"] == T0 + timedelta(seconds=1)


def test_progress_never_goes_backwards() -> None:
    task_id = new_task_id()
    row = fold(
        [
            event(task_id, 3, Kind.LIFECYCLE_KIND_STARTED, progress=0.5),
            event(task_id, 4, Kind.LIFECYCLE_KIND_STARTED, progress=0.2),
        ]
    )
    assert row["progress"] == 0.5


def test_failure_keeps_the_error_message() -> None:
    task_id = new_task_id()
    error = common_pb2.Error(code=common_pb2.ERROR_CODE_TIMEOUT, message="provider timed out")
    row = fold([event(task_id, 5, Kind.LIFECYCLE_KIND_FAILED, error=error)])
    assert (row["status"], row["error_message"]) == ("failed", "provider timed out")
    assert row["completed_at"] == T0


def test_cursor_round_trips_and_refuses_garbage() -> None:
    cursor = Cursor(T0 + timedelta(microseconds=123), uuid.uuid4())
    assert Cursor.decode(cursor.encode()) == cursor
    for bad in ["", "???", "MTpub3Q6YQ", cursor.encode()[:-3]]:
        with pytest.raises(InvalidCursor):
            Cursor.decode(bad)


def test_unknown_kind_with_a_status_still_applies() -> None:
    message = event(new_task_id(), 2, Kind.LIFECYCLE_KIND_STARTED)
    message.kind = 42  # type: ignore[assignment]  # from a newer task_svc
    parsed = parse_event(message)
    assert (parsed.kind, parsed.status) == ("unknown", "processing")


def test_progress_stays_between_zero_and_one() -> None:
    task_id = new_task_id()
    row = fold(
        [
            event(task_id, 2, Kind.LIFECYCLE_KIND_STARTED, progress=float("nan")),
            event(task_id, 3, Kind.LIFECYCLE_KIND_STARTED, progress=7.0),
        ]
    )
    assert row["progress"] == 1.0
