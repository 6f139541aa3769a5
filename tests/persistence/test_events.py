"""The database-free parts: event validation, the ordered fold, the stored payload, the
cursor."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from google.protobuf.json_format import MessageToDict, ParseDict

from persistence_svc.cursor import Cursor
from persistence_svc.errors import InvalidCursor, InvalidEvent
from persistence_svc.events import apply_event, new_task_row, parse_event
from persistence_svc.payload import timestamp_json, to_json
from switchboard.v1 import common_pb2, events_pb2, history_pb2
from tests.persistence.factory import (
    T0,
    Kind,
    completed_lifecycle,
    event,
    new_task_id,
    slim_lifecycle,
)


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


def test_slim_events_in_order_give_the_final_state() -> None:
    row = fold(slim_lifecycle(new_task_id()))
    assert (row["prompt"], row["priority"], row["model"]) == (
        "Why is the sky blue?",
        1,
        "local-small",
    )
    assert (row["status"], row["version"], row["response"]) == ("completed", 7, "Rayleigh.")


def test_an_older_event_fills_the_write_once_gaps() -> None:
    """A QUEUED applied after later events (a redelivery): it sets the prompt, priority and
    model they left empty, and nothing else."""
    queued, started, completed = slim_lifecycle(new_task_id())
    completed.model = ""
    row = fold([started, completed])
    row["model"] = ""
    assert (row["prompt"], row["priority"]) == ("", 0)
    assert apply_event(row, parse_event(queued)) is True
    assert (row["prompt"], row["priority"], row["model"]) == (
        "Why is the sky blue?",
        1,
        "local-small",
    )
    assert (row["status"], row["version"], row["response"]) == ("completed", 7, "Rayleigh.")
    # With no gap left, an older event changes nothing, even one that disagrees.
    other = event(queued.task_id, 1, Kind.LIFECYCLE_KIND_QUEUED, prompt="another", priority=5)
    before = dict(row)
    assert apply_event(row, parse_event(other)) is False
    assert row == before


def test_a_newer_model_replaces_the_requested_one() -> None:
    task_id = new_task_id()
    row = fold(
        [
            event(task_id, 1, Kind.LIFECYCLE_KIND_QUEUED, model="local-small"),
            event(task_id, 7, Kind.LIFECYCLE_KIND_COMPLETED, model="fallback-model"),
        ]
    )
    assert row["model"] == "fallback-model"
    apply_event(row, parse_event(event(task_id, 2, Kind.LIFECYCLE_KIND_STARTED)))
    assert row["model"] == "fallback-model"  # an older one does not take it back


def every_field_set() -> events_pb2.LifecycleEvent:
    message = event(
        new_task_id(),
        (1 << 62) + 3,  # an int64 beyond what a double holds exactly
        Kind.LIFECYCLE_KIND_FAILED,
        prompt="a\x00b ünïcödé",
        progress=0.25,
        content="partial",
        finish_reason="error",
        usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8),
        error=common_pb2.Error(
            code=common_pb2.ERROR_CODE_TIMEOUT,
            message="provider timed out",
            retryable=True,
            retry_after_ms=1 << 40,
        ),
    )
    message.at.nanos = 123_456_789
    return message


def test_payload_round_trips_every_field() -> None:
    message = every_field_set()
    set_fields = {field.name for field, _ in message.ListFields()}
    assert set_fields == {field.name for field in message.DESCRIPTOR.fields}
    stored = orjson.loads(orjson.dumps(to_json(message)))  # as the database gives it back
    assert ParseDict(stored, events_pb2.LifecycleEvent()) == message


@pytest.mark.parametrize("progress", [float("nan"), float("inf"), float("-inf")])
def test_payload_keeps_what_json_cannot_spell(progress: float) -> None:
    message = every_field_set()
    message.progress = progress
    message.kind = 42  # type: ignore[assignment]  # from a newer task_svc
    stored = orjson.loads(orjson.dumps(to_json(message)))
    back = ParseDict(stored, events_pb2.LifecycleEvent())
    assert back.kind == 42
    assert back.progress == progress or (math.isnan(back.progress) and math.isnan(progress))


def test_payload_is_read_like_the_mapping_it_replaced() -> None:
    """Rows written before (MessageToDict) and now read back to the same message, and the
    new form differs from the old one only in 64-bit integers being numbers."""
    message = every_field_set()
    old = MessageToDict(message, preserving_proto_field_name=True)
    new = to_json(message)
    assert ParseDict(old, events_pb2.LifecycleEvent()) == ParseDict(
        new, events_pb2.LifecycleEvent()
    )
    assert {k for k in old if old[k] != new[k]} == {"seq", "error"}
    assert (old["seq"], new["seq"]) == (str(message.seq), message.seq)


@pytest.mark.parametrize("nanos", [0, 5_000_000, 123_000, 7, 999_999_999])
def test_timestamps_are_spelled_as_protobuf_does(nanos: int) -> None:
    message = every_field_set()
    message.at.nanos = nanos
    assert timestamp_json(message.at) == message.at.ToJsonString()


def test_types_the_table_cannot_express_fall_back_to_message_to_dict() -> None:
    preferences = history_pb2.Preferences(default_model="m", extra={"a": "b"})  # a map
    assert to_json(preferences) == {"default_model": "m", "extra": {"a": "b"}}
