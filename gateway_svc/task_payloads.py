"""Translation between socket payloads (JSON objects) and TaskService messages, pure.

Socket shapes follow docs/protocol.md ("The task channel"): the join reply holds the task's
state; pushes are `progress`, `chunk`, `llm_response` and `error`, each with the task's `seq`.
"""

from __future__ import annotations

import uuid
from typing import Any

from svckit.errors import ServiceError
from svckit.requests import MAX_PRIORITY, MAX_PROMPT_CHARS, InvalidRequest, check_submit
from switchboard.v1 import common_pb2, tasks_pb2

Status = common_pb2.TaskStatus
TOPIC_PREFIX = "task:"
TERMINAL = frozenset(
    {Status.TASK_STATUS_COMPLETED, Status.TASK_STATUS_FAILED, Status.TASK_STATUS_CANCELLED}
)


def task_id_of(topic: str) -> str | None:
    """The task id of a `task:<uuid>` topic (canonical lowercase), or None if the topic is
    not one (the join is then refused with `unmatched topic`)."""
    if not topic.startswith(TOPIC_PREFIX):
        return None
    raw = topic[len(TOPIC_PREFIX) :]
    # Only the hyphenated 36-character form: uuid.UUID would also take braces and URNs.
    if len(raw) != 36:
        return None
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return None


# Looked up for every progress push: protobuf's enum Name() is a Python-level call each time.
_STATUS_NAMES = {
    value: name.removeprefix("TASK_STATUS_").lower()
    for name, value in common_pb2.TaskStatus.items()
} | {Status.TASK_STATUS_UNSPECIFIED: "new"}


def status_name(status: common_pb2.TaskStatus.ValueType) -> str:
    return _STATUS_NAMES.get(status, "unknown")  # unknown: a status newer than this gateway


def usage_payload(usage: common_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def error_payload(error: common_pb2.Error) -> dict[str, Any]:
    typed = ServiceError.from_proto(error)
    payload: dict[str, Any] = {
        "code": typed.reason,
        "message": typed.message,
        "retryable": typed.retryable,
    }
    if typed.retry_after_ms > 0:
        payload["retry_after_ms"] = typed.retry_after_ms
    return payload


def state_payload(state: common_pb2.TaskState) -> dict[str, Any]:
    """The join reply's response: `{"status": "new"}` for a task not submitted yet, else the
    task's state with the text so far (or the final text)."""
    if state.status == Status.TASK_STATUS_UNSPECIFIED:
        return {"status": "new"}
    payload: dict[str, Any] = {
        "status": status_name(state.status),
        "progress": state.progress,
        "seq": state.seq,
        "content": state.content,
        "model": state.model,
    }
    if state.status == Status.TASK_STATUS_QUEUED:
        payload["position"] = state.queue_position
        payload["eta_ms"] = state.eta_ms
    elif state.status == Status.TASK_STATUS_COMPLETED:
        payload["usage"] = usage_payload(state.usage)
        payload["finish_reason"] = state.finish_reason
    elif state.status == Status.TASK_STATUS_FAILED:
        payload["error"] = error_payload(state.error)
    return payload


def event_push(event: tasks_pb2.TaskEvent) -> tuple[str, dict[str, Any]] | None:
    """A TaskEvent → (socket event, payload); None for an event of an unknown kind."""
    kind = event.WhichOneof("kind")
    if kind == "progress":
        p = event.progress
        payload: dict[str, Any] = {
            "progress": p.progress,
            "status": status_name(p.status),
            "seq": event.seq,
        }
        if p.status == Status.TASK_STATUS_QUEUED:
            payload["position"] = p.queue_position
            payload["eta_ms"] = p.eta_ms
        if p.message:
            payload["message"] = p.message  # for people
        if p.HasField("reset"):
            # The task runs again from the start: clients drop the text they have.
            r = p.reset
            payload["reset"] = True
            payload["attempt"] = r.attempt
            payload["max_attempts"] = r.max_attempts
            payload["reason"] = r.reason
            if r.error:
                payload["error"] = r.error
        if p.fallback_model:
            # Another model took over mid-stream: the client keeps its text.
            payload["fallback"] = {"model": p.fallback_model, "at_seq": event.seq}
        return "progress", payload
    if kind == "chunk":
        chunk = event.chunk
        if chunk.progress > 0:
            return "chunk", {"delta": chunk.delta, "progress": chunk.progress, "seq": event.seq}
        return "chunk", {"delta": chunk.delta, "seq": event.seq}
    if kind == "completed":
        c = event.completed
        return "llm_response", {
            "content": c.content,
            "model": c.model,
            "from_fallback": c.from_fallback,
            "from_cache": c.from_cache,
            "usage": usage_payload(c.usage),
            "finish_reason": c.finish_reason,
            "seq": event.seq,
        }
    if kind == "error":
        return "error", {**error_payload(event.error), "seq": event.seq}
    return None


def coalescable(event: str, payload: dict[str, Any]) -> bool:
    """Whether a push may be replaced by a later one of its channel while the socket is slow:
    only non-terminal `progress` without a message or a reset (its fields are absolute, the
    latest wins; a reset tells the client something a later one does not)."""
    return (
        event == "progress"
        and payload.get("status") not in TERMINAL_NAMES
        and "message" not in payload
        and "reset" not in payload
        and "fallback" not in payload
    )


TERMINAL_NAMES = frozenset({"completed", "failed", "cancelled"})


def is_terminal(event: tasks_pb2.TaskEvent) -> bool:
    kind = event.WhichOneof("kind")
    return kind in ("completed", "error") or (
        kind == "progress" and event.progress.status in TERMINAL
    )


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def last_seq_of(params: dict[str, Any]) -> int:
    """`last_seq` from join params: absent or null → 0."""
    value = params.get("last_seq")
    if value is None:
        return 0
    if not _int(value) or not 0 <= value < 2**63:
        raise InvalidRequest("last_seq must be a non-negative integer")
    return int(value)


def submit_request(
    task_id: str,
    user: str,
    payload: dict[str, Any],
    max_prompt_chars: int = MAX_PROMPT_CHARS,
) -> tasks_pb2.SubmitRequest:
    """`llm_generate` {prompt, model?, priority?, options?{max_tokens, temperature, system}}
    → SubmitRequest. The JSON types are checked here, every value rule by task_svc's own
    `check_submit` (svckit/requests.py); InvalidRequest names the first wrong field."""
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a non-empty string")
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model must be a string")
    priority = payload.get("priority")
    if priority is not None and (not _int(priority) or not 0 <= priority <= MAX_PRIORITY):
        raise InvalidRequest(f"priority must be an integer from 0 to {MAX_PRIORITY}")
    request = tasks_pb2.SubmitRequest(
        task_id=task_id, user_id=user, prompt=prompt, model=model or "", priority=priority or 0
    )
    options = payload.get("options")
    if options is not None:
        _set_options(request.options, options)
    check_submit(request, max_prompt_chars)
    return request


def _set_options(options: common_pb2.GenerationOptions, given: object) -> None:
    if not isinstance(given, dict):
        raise InvalidRequest("options must be an object")
    max_tokens = given.get("max_tokens")
    if max_tokens is not None:
        if not _int(max_tokens) or not 0 <= max_tokens < 2**31:
            raise InvalidRequest("options.max_tokens must be a non-negative integer")
        options.max_tokens = max_tokens
    temperature = given.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float) or isinstance(temperature, bool):
            raise InvalidRequest("options.temperature must be a number")
        options.temperature = float(temperature)
    system = given.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise InvalidRequest("options.system must be a string")
        options.system = system


def error_reply(error: ServiceError) -> dict[str, Any]:
    """The response of an error reply: `{"reason", "message", "retry_after_ms"?}`."""
    response: dict[str, Any] = {"reason": error.reason, "message": error.message}
    if error.retry_after_ms > 0:
        response["retry_after_ms"] = error.retry_after_ms
    return response


def submit_reply(task_id: str, response: tasks_pb2.SubmitResponse) -> dict[str, Any]:
    state = response.state
    status = state.status if state.status != Status.TASK_STATUS_UNSPECIFIED else None
    return {
        "task_id": task_id,
        "status": status_name(status) if status is not None else "queued",
        "position": state.queue_position,
        "eta_ms": state.eta_ms,
    }
