"""The rules of a generation request (svckit/requests.py), which task_svc enforces and the
gateway and llm_svc check with the same code and messages."""

from __future__ import annotations

import pytest

from gateway_svc import task_payloads as tp
from svckit.requests import InvalidRequest, TooLong, check_options, check_submit
from switchboard.v1 import common_pb2, tasks_pb2

TASK = "00000000-0000-0000-0000-000000000001"


def submit(**fields: object) -> tasks_pb2.SubmitRequest:
    values: dict[str, object] = {"task_id": TASK, "user_id": "alice", "prompt": "hi"}
    values.update(fields)
    return tasks_pb2.SubmitRequest(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"task_id": "nope"}, "task_id must be a UUID"),
        ({"user_id": ""}, "user_id is required"),
        ({"prompt": "  "}, "prompt must be a non-empty string"),
        ({"prompt": "x" * 11}, "prompt is longer than 10 characters"),
        ({"priority": 10}, "priority must be an integer from 0 to 9"),
        ({"options": common_pb2.GenerationOptions(temperature=2.5)}, "options.temperature"),
        ({"options": common_pb2.GenerationOptions(system="s" * 11)}, "options.system is longer"),
    ],
)
def test_each_rule_names_what_is_wrong(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_submit(submit(**fields), max_chars=10)
    assert refused.value.message.startswith(message)
    assert refused.value.reason == "invalid_request"


def test_a_request_within_the_rules_passes() -> None:
    options = common_pb2.GenerationOptions(max_tokens=5, temperature=0.0, system="be brief")
    check_submit(submit(priority=9, options=options), max_chars=10)


def test_size_refusals_are_too_long_and_options_alone_have_no_size_limit() -> None:
    with pytest.raises(TooLong):
        check_submit(submit(prompt="x" * 11), max_chars=10)
    check_options(common_pb2.GenerationOptions(system="s" * 100_000))
    with pytest.raises(InvalidRequest):
        check_options(common_pb2.GenerationOptions(max_tokens=-1))


def test_the_gateway_refuses_with_the_authoritys_message() -> None:
    payload = {"prompt": "x" * 11}
    with pytest.raises(InvalidRequest) as at_gateway:
        tp.submit_request(TASK, "alice", payload, max_prompt_chars=10)
    with pytest.raises(InvalidRequest) as at_task_svc:
        check_submit(submit(prompt="x" * 11), max_chars=10)
    assert at_gateway.value.message == at_task_svc.value.message
