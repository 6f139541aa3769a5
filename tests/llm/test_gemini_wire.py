"""Gemini's streaming format and errors, sans-I/O."""

from __future__ import annotations

import orjson
import pytest

from llm_svc.providers.base import (
    CONTINUE_INSTRUCTION,
    Finish,
    ProviderError,
    ProviderRequest,
    TextDelta,
    TokenUsage,
)
from llm_svc.providers.gemini_wire import (
    GeminiStreamParser,
    error_from_response,
    request_body,
    stream_url,
)
from llm_svc.providers.sse import SseDecoder
from switchboard.v1 import common_pb2
from tests.llm.gemini_server import BAD_KEY, api_error, completion, rate_limited, response

Code = common_pb2.ErrorCode
AUTH, INVALID, QUOTA = (
    Code.ERROR_CODE_AUTH,
    Code.ERROR_CODE_INVALID_REQUEST,
    Code.ERROR_CODE_QUOTA_EXCEEDED,
)
NO_MODEL, RATE = Code.ERROR_CODE_MODEL_NOT_FOUND, Code.ERROR_CODE_RATE_LIMITED
INTERNAL, OVERLOAD, SLOW = (
    Code.ERROR_CODE_INTERNAL,
    Code.ERROR_CODE_OVERLOADED,
    Code.ERROR_CODE_TIMEOUT,
)


def test_url_and_body() -> None:
    host = "https://generativelanguage.googleapis.com"
    expected = f"{host}/v1beta/models/gemini-2.5-flash-lite:streamGenerateContent?alt=sse"
    assert stream_url(host, "gemini-2.5-flash-lite") == expected
    assert stream_url(host + "/v1beta/", "gemini-2.5-flash-lite") == expected
    request = ProviderRequest(
        model="gemini-2.5-flash-lite",
        prompt="Hi",
        max_tokens=50,
        system="be brief",
        temperature=0.3,
    )
    assert request_body(request) == {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]}],
        "generationConfig": {"maxOutputTokens": 50, "temperature": 0.3},
        "systemInstruction": {"parts": [{"text": "be brief"}]},
    }
    plain = request_body(ProviderRequest(model="m", prompt="Hi", max_tokens=5))
    assert "systemInstruction" not in plain and "temperature" not in plain["generationConfig"]


def parse(stream: str) -> tuple[list[object], GeminiStreamParser]:
    parser = GeminiStreamParser("gemini")
    events: list[object] = []
    for event in SseDecoder().feed(stream):
        events += parser.feed_event(event)
    return events, parser


def sse(payloads: list[object]) -> str:
    return "".join(f"data: {orjson.dumps(p).decode()}\r\n\r\n" for p in payloads)


def test_a_literal_stream() -> None:
    # As the API sends it with alt=sse: CRLF line ends, one response per event.
    stream = (
        'data: {"candidates": [{"content": {"parts": [{"text": "Hel"}],"role": "model"},'
        '"index": 0}],"usageMetadata": {"promptTokenCount": 4,"candidatesTokenCount": 1,'
        '"totalTokenCount": 5},"modelVersion": "gemini-2.5-flash-lite"}\r\n\r\n'
        'data: {"candidates": [{"content": {"parts": [{"text": "lo there"}],"role": "model"},'
        '"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 4,'
        '"candidatesTokenCount": 3,"totalTokenCount": 7},"modelVersion": '
        '"gemini-2.5-flash-lite"}\r\n\r\n'
    )
    events, parser = parse(stream)
    # Usage counts are cumulative: each delta carries what its chunk added.
    assert events == [TextDelta("Hel", 1), TextDelta("lo there", 2)]
    assert parser.end() == [Finish("stop", TokenUsage(4, 3))]


def test_max_tokens_and_thinking_tokens() -> None:
    last = response("end", 4, 2, "MAX_TOKENS")
    last["usageMetadata"]["thoughtsTokenCount"] = 10
    thought = response("pondering", 4, 0)
    thought["candidates"][0]["content"]["parts"][0]["thought"] = True
    events, parser = parse(sse([thought, last]))
    assert events == [TextDelta("end", 12)]
    assert parser.end() == [Finish("length", TokenUsage(4, 12))]


def test_a_body_ending_without_finish_reason_is_a_network_error() -> None:
    events, parser = parse(sse(completion(["a", "b"])[:1]))
    assert events == [TextDelta("a", 1)]
    with pytest.raises(ProviderError) as caught:
        parser.end()
    assert caught.value.code == Code.ERROR_CODE_NETWORK and caught.value.retryable


@pytest.mark.parametrize("reason", ["SAFETY", "RECITATION", "PROHIBITED_CONTENT"])
def test_filtered_answers_are_content_filtered(reason: str) -> None:
    with pytest.raises(ProviderError) as caught:
        parse(sse([response(None, 4, 0, reason)]))
    assert caught.value.code == Code.ERROR_CODE_CONTENT_FILTERED
    assert not caught.value.retryable and reason in caught.value.message


def test_a_blocked_prompt_is_content_filtered() -> None:
    blocked = {"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {}}
    with pytest.raises(ProviderError) as caught:
        parse(sse([blocked]))
    assert caught.value.code == Code.ERROR_CODE_CONTENT_FILTERED


def test_an_error_in_the_stream() -> None:
    error = orjson.loads(api_error(503, "UNAVAILABLE", "The model is overloaded."))
    with pytest.raises(ProviderError) as caught:
        parse(sse([response("a", 1, 1), error]))
    assert caught.value.code == Code.ERROR_CODE_OVERLOADED and caught.value.retryable
    assert "overloaded" in caught.value.message


@pytest.mark.parametrize(
    ("status", "body", "headers", "code", "retryable", "after"),
    [
        (400, BAD_KEY, {}, AUTH, False, 0),
        (400, api_error(400, "INVALID_ARGUMENT", "bad"), {}, INVALID, False, 0),
        (403, api_error(403, "PERMISSION_DENIED", "no"), {}, AUTH, False, 0),
        (404, api_error(404, "NOT_FOUND", "no model"), {}, NO_MODEL, False, 0),
        (429, rate_limited("37s"), {}, RATE, True, 37_000),
        (429, rate_limited("0.5s"), {}, RATE, True, 500),
        (429, api_error(429, "RESOURCE_EXHAUSTED", "q"), {"retry-after": "3"}, RATE, True, 3000),
        (500, api_error(500, "INTERNAL", "oops"), {}, INTERNAL, True, 0),
        (503, api_error(503, "UNAVAILABLE", "overloaded"), {}, OVERLOAD, True, 0),
        (504, api_error(504, "DEADLINE_EXCEEDED", "slow"), {}, SLOW, True, 0),
        (502, b"<html>Bad Gateway</html>", {}, OVERLOAD, True, 0),
    ],
)
def test_error_replies_are_typed(
    status: int, body: bytes, headers: dict[str, str], code: int, retryable: bool, after: int
) -> None:
    error = error_from_response("gemini", status, headers, body)
    assert (error.code, error.retryable, error.retry_after_ms) == (code, retryable, after)
    assert f"HTTP {status}" in error.message and error.provider == "gemini"


def test_a_continuation_gives_the_text_so_far_as_the_models_turn() -> None:
    body = request_body(
        ProviderRequest(model="m", prompt="Hi", max_tokens=5, continue_from="Hello the")
    )
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "Hi"}]},
        {"role": "model", "parts": [{"text": "Hello the"}]},
        {"role": "user", "parts": [{"text": CONTINUE_INSTRUCTION}]},
    ]
