"""The rules of a generation request, in one place: task_svc enforces them (it is the
authority: Submit refuses what breaks them), the gateway checks the same rules before any gRPC
call so a bad push is refused at once with the same message, and llm_svc checks the options.

The gateway first turns the socket's JSON into a SubmitRequest (types are its concern:
gateway_svc/task_payloads.py); every value rule is here.
"""

from __future__ import annotations

import uuid

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, tasks_pb2

MAX_PROMPT_CHARS = 32_000  # the default of TASK_MAX_PROMPT_CHARS and GATEWAY_MAX_PROMPT_CHARS
MAX_PRIORITY = 9  # priorities run from 0 (highest) to 9
MAX_TEMPERATURE = 2.0


class InvalidRequest(ServiceError):
    """A request that breaks a rule: `invalid_request` on the socket, INVALID_ARGUMENT on gRPC."""

    def __init__(self, message: str) -> None:
        super().__init__(common_pb2.ERROR_CODE_INVALID_REQUEST, message)


class TooLong(InvalidRequest):
    """A prompt or system text over the configured size (also counted as a limit)."""


def check_task_id(task_id: str) -> None:
    # The id becomes a NATS subject token: only the canonical 8-4-4-4-12 form is accepted.
    try:
        valid = len(task_id) == 36 and uuid.UUID(task_id) is not None
    except ValueError:
        valid = False
    if not valid:
        raise InvalidRequest("task_id must be a UUID")


def check_user(user_id: str) -> None:
    if not user_id:
        raise InvalidRequest("user_id is required")


def check_options(options: common_pb2.GenerationOptions, max_chars: int | None = None) -> None:
    """`max_chars`: the limit on the system text (None: the caller sets none)."""
    if options.max_tokens < 0:
        raise InvalidRequest("options.max_tokens must not be negative")
    if options.HasField("temperature") and not 0.0 <= options.temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(f"options.temperature must be between 0 and {MAX_TEMPERATURE:g}")
    if max_chars is not None and len(options.system) > max_chars:
        raise TooLong(f"options.system is longer than {max_chars} characters")


def check_submit(request: tasks_pb2.SubmitRequest, max_chars: int = MAX_PROMPT_CHARS) -> None:
    """Raise InvalidRequest naming the first rule `request` breaks."""
    check_task_id(request.task_id)
    check_user(request.user_id)
    if not request.prompt.strip():
        raise InvalidRequest("prompt must be a non-empty string")
    if len(request.prompt) > max_chars:
        raise TooLong(f"prompt is longer than {max_chars} characters")
    if not 0 <= request.priority <= MAX_PRIORITY:
        raise InvalidRequest(f"priority must be an integer from 0 to {MAX_PRIORITY}")
    check_options(request.options, max_chars)
