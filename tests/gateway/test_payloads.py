"""TaskService messages ↔ socket payloads."""

from __future__ import annotations

import pytest

from gateway_svc import task_payloads as tp
from svckit.requests import InvalidRequest
from switchboard.v1 import common_pb2, tasks_pb2

Status = common_pb2.TaskStatus
ID = "0b7e2a4e-3c1f-4f57-9a7e-0e6f1f0c9a11"


@pytest.mark.parametrize(
    ("topic", "task_id"),
    [
        (f"task:{ID}", ID),
        (f"task:{ID.upper()}", ID),
        ("task:not-a-uuid", None),
        (f"task:{{{ID}}}", None),
        (f"task:{ID.replace('-', '')}", None),
        (f"tasks:{ID}", None),
        ("phoenix", None),
    ],
)
def test_task_topics(topic: str, task_id: str | None) -> None:
    assert tp.task_id_of(topic) == task_id


def test_state_of_a_new_task() -> None:
    assert tp.state_payload(common_pb2.TaskState(task_id=ID)) == {"status": "new"}


def test_state_of_a_failed_task_carries_the_error() -> None:
    state = common_pb2.TaskState(
        status=Status.TASK_STATUS_FAILED,
        seq=4,
        content="par",
        model="m",
        progress=0.5,
        error=common_pb2.Error(code=common_pb2.ErrorCode.ERROR_CODE_RATE_LIMITED, message="slow"),
    )
    assert tp.state_payload(state) == {
        "status": "failed",
        "progress": 0.5,
        "seq": 4,
        "content": "par",
        "model": "m",
        "error": {"code": "rate_limited", "message": "slow", "retryable": False},
    }


def test_event_pushes() -> None:
    queued = tasks_pb2.TaskEvent(
        seq=1,
        progress=tasks_pb2.Progress(status=Status.TASK_STATUS_QUEUED, queue_position=3, eta_ms=90),
    )
    assert tp.event_push(queued) == (
        "progress",
        {"progress": 0.0, "status": "queued", "seq": 1, "position": 3, "eta_ms": 90},
    )
    assert tp.event_push(tasks_pb2.TaskEvent(seq=2, chunk=tasks_pb2.Chunk(delta="hi"))) == (
        "chunk",
        {"delta": "hi", "seq": 2},
    )
    # Progress rides in the chunk that made it (no progress push of its own).
    with_progress = tasks_pb2.TaskEvent(seq=2, chunk=tasks_pb2.Chunk(delta="hi", progress=0.25))
    assert tp.event_push(with_progress) == ("chunk", {"delta": "hi", "progress": 0.25, "seq": 2})
    done = tasks_pb2.TaskEvent(
        seq=3,
        completed=tasks_pb2.Completed(
            content="hi",
            model="m",
            usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
            finish_reason="stop",
            from_fallback=True,
        ),
    )
    assert tp.event_push(done) == (
        "llm_response",
        {
            "content": "hi",
            "model": "m",
            "from_fallback": True,
            "from_cache": False,
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
            "finish_reason": "stop",
            "seq": 3,
        },
    )
    assert tp.is_terminal(done) and not tp.is_terminal(queued)
    failed = tasks_pb2.TaskEvent(
        seq=4,
        error=common_pb2.Error(
            code=common_pb2.ErrorCode.ERROR_CODE_TIMEOUT, message="late", retryable=True
        ),
    )
    assert tp.event_push(failed) == (
        "error",
        {"code": "timeout", "message": "late", "retryable": True, "seq": 4},
    )


def test_llm_generate_validation() -> None:
    request = tp.submit_request(
        ID,
        "alice",
        {
            "prompt": "hi",
            "model": "m",
            "priority": 3,
            "options": {"max_tokens": 10, "temperature": 0.5, "system": "be brief"},
        },
    )
    assert (request.prompt, request.model, request.priority, request.user_id) == (
        "hi",
        "m",
        3,
        "alice",
    )
    assert request.options.temperature == 0.5 and request.options.max_tokens == 10
    assert not tp.submit_request(ID, "a", {"prompt": "x"}).options.HasField("temperature")
    for bad in (
        {},
        {"prompt": ""},
        {"prompt": 5},
        {"prompt": "x", "model": 1},
        {"prompt": "x", "priority": 10},
        {"prompt": "x", "priority": True},
        {"prompt": "x", "priority": "1"},
        {"prompt": "x", "options": []},
        {"prompt": "x", "options": {"max_tokens": -1}},
        {"prompt": "x", "options": {"temperature": "hot"}},
        {"prompt": "x", "options": {"temperature": 9}},
        {"prompt": "x", "options": {"system": 1}},
    ):
        with pytest.raises(InvalidRequest):
            tp.submit_request(ID, "a", bad)


def test_last_seq() -> None:
    assert tp.last_seq_of({}) == 0
    assert tp.last_seq_of({"last_seq": None}) == 0
    assert tp.last_seq_of({"last_seq": 7}) == 7
    for bad in (-1, "7", 1.5, True):
        with pytest.raises(InvalidRequest):
            tp.last_seq_of({"last_seq": bad})


def test_a_restart_is_pushed_with_its_message_and_never_coalesced() -> None:
    restarted = tasks_pb2.TaskEvent(
        seq=70,
        progress=tasks_pb2.Progress(
            status=common_pb2.TASK_STATUS_QUEUED, progress=0.0, message="restarted"
        ),
    )
    pushed = tp.event_push(restarted)
    assert pushed is not None
    event, payload = pushed
    assert event == "progress" and payload["message"] == "restarted" and payload["seq"] == 70
    assert not tp.coalescable(event, payload)


def test_a_reset_is_machine_readable_and_never_coalesced() -> None:
    reset = tasks_pb2.Reset(attempt=2, max_attempts=3, reason="retry", error="network")
    event = tasks_pb2.TaskEvent(
        seq=9,
        progress=tasks_pb2.Progress(status=common_pb2.TASK_STATUS_QUEUED, reset=reset),
    )
    pushed = tp.event_push(event)
    assert pushed is not None
    name, payload = pushed
    assert name == "progress" and payload["reset"] is True
    assert (payload["attempt"], payload["max_attempts"]) == (2, 3)
    assert (payload["reason"], payload["error"]) == ("retry", "network")
    assert not tp.coalescable(name, payload)
    outage = tasks_pb2.Reset(attempt=1, reason="outage")
    event.progress.reset.CopyFrom(outage)
    pushed = tp.event_push(event)
    assert pushed is not None and "error" not in pushed[1] and pushed[1]["max_attempts"] == 0


def test_an_unavailable_chain_is_pushed_with_when_to_come_back() -> None:
    error = common_pb2.Error(
        code=common_pb2.ERROR_CODE_UNAVAILABLE, message="down", retryable=True, retry_after_ms=900
    )
    pushed = tp.event_push(tasks_pb2.TaskEvent(seq=5, error=error))
    assert pushed == (
        "error",
        {
            "code": "unavailable",
            "message": "down",
            "retryable": True,
            "retry_after_ms": 900,
            "seq": 5,
        },
    )


def test_a_handover_says_which_model_and_at_which_seq() -> None:
    event = tasks_pb2.TaskEvent(
        seq=12,
        progress=tasks_pb2.Progress(
            status=common_pb2.TASK_STATUS_PROCESSING, progress=0.4, fallback_model="backup"
        ),
    )
    pushed = tp.event_push(event)
    assert pushed is not None
    name, payload = pushed
    assert name == "progress" and payload["fallback"] == {"model": "backup", "at_seq": 12}
    assert "reset" not in payload and not tp.coalescable(name, payload)


def test_every_status_has_its_socket_name_and_a_newer_one_is_unknown() -> None:
    names = {status: tp.status_name(status) for status in common_pb2.TaskStatus.values()}
    assert names == {
        common_pb2.TASK_STATUS_UNSPECIFIED: "new",
        common_pb2.TASK_STATUS_QUEUED: "queued",
        common_pb2.TASK_STATUS_PROCESSING: "processing",
        common_pb2.TASK_STATUS_COMPLETED: "completed",
        common_pb2.TASK_STATUS_FAILED: "failed",
        common_pb2.TASK_STATUS_CANCELLED: "cancelled",
    }
    assert tp.status_name(99) == "unknown"  # type: ignore[arg-type]
