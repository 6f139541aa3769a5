"""OpenAI's streaming format and HTTP errors, sans-I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import orjson
import pytest

from llm_svc.providers.base import Finish, ProviderError, ProviderRequest, TextDelta, TokenUsage
from llm_svc.providers.http_errors import error_from_status, retry_after_ms
from llm_svc.providers.openai_wire import ChatStreamParser, request_body
from switchboard.v1 import common_pb2
from tests.llm.openai_server import api_error, chunk, completion

Code = common_pb2.ErrorCode


def test_request_body() -> None:
    request = ProviderRequest(
        model="gpt-4o-mini", prompt="Hi", max_tokens=50, system="be brief", temperature=0.2
    )
    assert request_body(request) == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Hi"},
        ],
        "max_tokens": 50,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.2,
    }
    plain = request_body(ProviderRequest(model="m", prompt="Hi", max_tokens=5))
    assert plain["messages"] == [{"role": "user", "content": "Hi"}]
    assert "temperature" not in plain


def test_a_full_stream_gives_deltas_then_one_finish_with_usage() -> None:
    parser = ChatStreamParser("openai")
    events = []
    for payload in completion(["Hel", "lo"], finish_reason="length", prompt_tokens=4):
        events += parser.feed(orjson.dumps(payload).decode())
        assert not parser.done
    events += parser.feed("[DONE]")
    assert parser.done
    assert events == [TextDelta("Hel"), TextDelta("lo"), Finish("length", TokenUsage(4, 2))]
    assert parser.feed("[DONE]") == []


def test_a_content_filter_finish_is_content_filtered() -> None:
    parser = ChatStreamParser("openai")
    assert parser.feed(orjson.dumps(chunk({"content": "x"})).decode()) == [TextDelta("x")]
    with pytest.raises(ProviderError) as caught:
        parser.feed(orjson.dumps(chunk({}, "content_filter")).decode())
    assert caught.value.code == Code.ERROR_CODE_CONTENT_FILTERED and not caught.value.retryable


def test_without_usage_or_finish_reason() -> None:
    parser = ChatStreamParser("openai")
    assert parser.feed(orjson.dumps(chunk({"content": "x"})).decode()) == [TextDelta("x")]
    assert parser.feed("[DONE]") == [Finish("stop", None)]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("{not json", Code.ERROR_CODE_NETWORK),
        ("[1, 2]", Code.ERROR_CODE_NETWORK),
        ('{"error": {"message": "The server had an error"}}', Code.ERROR_CODE_OVERLOADED),
    ],
)
def test_bad_or_error_payloads_raise_typed_errors(payload: str, code: int) -> None:
    with pytest.raises(ProviderError) as caught:
        ChatStreamParser("openai").feed(payload)
    assert caught.value.code == code and caught.value.provider == "openai"


def test_retry_after_forms() -> None:
    assert retry_after_ms({"retry-after": "2"}) == 2000
    assert retry_after_ms({"retry-after": "0.5"}) == 500
    assert retry_after_ms({"retry-after-ms": "1234", "retry-after": "9"}) == 1234
    when = format_datetime(datetime.fromtimestamp(1_000_030, UTC), usegmt=True)
    assert retry_after_ms({"retry-after": when}, now=1_000_000) == 30_000
    assert retry_after_ms({"retry-after": "soon"}) == 0
    assert retry_after_ms({}) == 0


INVALID = api_error("bad max_tokens", "invalid_request_error")
BAD_KEY = api_error("Incorrect API key", "invalid_request_error", "invalid_api_key")
NO_MODEL = api_error("no such model", "invalid_request_error", "model_not_found")
RATE = api_error("Rate limit reached", "requests", "rate_limit_exceeded")
QUOTA = api_error("You exceeded your quota", "insufficient_quota", "insufficient_quota")
SERVER = api_error("The server had an error", "server_error")
AFTER_1, AFTER_3 = {"retry-after": "1"}, {"retry-after": "3"}


@pytest.mark.parametrize(
    ("status", "body", "headers", "code", "retryable", "after"),
    [
        (400, INVALID, {}, Code.ERROR_CODE_INVALID_REQUEST, False, 0),
        (401, BAD_KEY, {}, Code.ERROR_CODE_AUTH, False, 0),
        (404, NO_MODEL, {}, Code.ERROR_CODE_MODEL_NOT_FOUND, False, 0),
        (429, RATE, AFTER_3, Code.ERROR_CODE_RATE_LIMITED, True, 3000),
        (429, QUOTA, AFTER_3, Code.ERROR_CODE_QUOTA_EXCEEDED, False, 0),
        (500, SERVER, {}, Code.ERROR_CODE_INTERNAL, True, 0),
        (503, b"<html>Service Unavailable</html>", AFTER_1, Code.ERROR_CODE_OVERLOADED, True, 1000),
        (599, b"", {}, Code.ERROR_CODE_OVERLOADED, True, 0),
    ],
)
def test_status_codes_map_to_typed_errors(
    status: int, body: bytes, headers: dict[str, str], code: int, retryable: bool, after: int
) -> None:
    error = error_from_status("openai", status, headers, body)
    assert (error.code, error.retryable, error.retry_after_ms) == (code, retryable, after)
    assert f"HTTP {status}" in error.message
