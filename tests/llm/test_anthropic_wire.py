"""Anthropic's Messages streaming format and errors, sans-I/O."""

from __future__ import annotations

import pytest

from llm_svc.providers.anthropic_wire import (
    MessagesStreamParser,
    error_from_response,
    request_body,
)
from llm_svc.providers.base import Finish, ProviderError, ProviderRequest, TextDelta, TokenUsage
from llm_svc.providers.sse import SseDecoder
from switchboard.v1 import common_pb2
from tests.llm.anthropic_server import (
    BAD_KEY,
    OVERLOADED,
    FakeAnthropic,
    api_error,
    completion,
    error_event,
    message_delta,
    opening,
    text_delta,
)

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

# The example stream of the Messages API reference ("Streaming Messages", basic request).
LITERAL = """event: message_start
data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-haiku-4-5", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence":null}, "usage": {"output_tokens": 15}}

event: message_stop
data: {"type": "message_stop"}

"""  # noqa: E501


def parse(stream: str) -> tuple[list[object], MessagesStreamParser]:
    parser = MessagesStreamParser("anthropic")
    events: list[object] = []
    for event in SseDecoder().feed(stream):
        events += parser.feed_event(event)
    return events, parser


def frames(events: list[tuple[str, dict[str, object]]]) -> str:
    server = FakeAnthropic()
    return b"".join(server.frame(event) for event in events).decode()


def test_request_body() -> None:
    request = ProviderRequest(
        model="claude-haiku-4-5", prompt="Hi", max_tokens=64, system="be brief", temperature=1.5
    )
    assert request_body(request) == {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "system": "be brief",
        "temperature": 1.0,  # Anthropic's range ends at 1
    }
    plain = request_body(ProviderRequest(model="m", prompt="Hi", max_tokens=5))
    assert "system" not in plain and "temperature" not in plain


def test_the_reference_stream() -> None:
    events, parser = parse(LITERAL)
    assert events == [
        TextDelta("Hello", 1),
        TextDelta("!", 1),
        Finish("stop", TokenUsage(25, 15)),
    ]
    assert parser.done
    assert parser.feed_event(SseDecoder().feed("event: ping\ndata: {}\n\n")[0]) == []


def test_max_tokens_and_unknown_events() -> None:
    stream = frames(
        [
            *opening(7),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "thinking_delta", "thinking": "hm"}}),
            ("future_event", {"type": "future_event"}),
            text_delta("abcdefgh"),
            message_delta("max_tokens", 2),
            ("message_stop", {"type": "message_stop"}),
        ]
    )  # fmt: skip
    events, _ = parse(stream)
    assert events == [TextDelta("abcdefgh", 2), Finish("length", TokenUsage(7, 2))]


def test_an_error_event_mid_stream() -> None:
    stream = frames([*opening(), text_delta("par"), error_event("overloaded_error", "Overloaded")])
    parser = MessagesStreamParser("anthropic")
    decoded = SseDecoder().feed(stream)
    for event in decoded[:-1]:
        parser.feed_event(event)
    with pytest.raises(ProviderError) as caught:
        parser.feed_event(decoded[-1])
    assert caught.value.code == Code.ERROR_CODE_OVERLOADED and caught.value.retryable
    assert "overloaded_error" in caught.value.message


def test_a_refusal_is_content_filtered() -> None:
    with pytest.raises(ProviderError) as caught:
        parse(frames([*opening(), message_delta("refusal", 0)]))
    assert caught.value.code == Code.ERROR_CODE_CONTENT_FILTERED


def test_a_stream_without_message_stop_is_a_network_error() -> None:
    events, parser = parse(frames(completion(["a"])[:-1]))
    assert events == [TextDelta("a", 1)]
    with pytest.raises(ProviderError) as caught:
        parser.end()
    assert caught.value.code == Code.ERROR_CODE_NETWORK


@pytest.mark.parametrize(
    ("status", "body", "headers", "code", "retryable", "after"),
    [
        (401, BAD_KEY, {}, AUTH, False, 0),
        (403, api_error("permission_error", "no"), {}, AUTH, False, 0),
        (400, api_error("invalid_request_error", "bad"), {}, INVALID, False, 0),
        (400, api_error("billing_error", "credit balance too low"), {}, QUOTA, False, 0),
        (404, api_error("not_found_error", "model"), {}, NO_MODEL, False, 0),
        (429, api_error("rate_limit_error", "slow"), {"retry-after": "7"}, RATE, True, 7000),
        (500, api_error("api_error", "oops"), {}, INTERNAL, True, 0),
        (529, OVERLOADED, {}, OVERLOAD, True, 0),
    ],
)
def test_error_replies_are_typed(
    status: int, body: bytes, headers: dict[str, str], code: int, retryable: bool, after: int
) -> None:
    error = error_from_response("anthropic", status, headers, body)
    assert (error.code, error.retryable, error.retry_after_ms) == (code, retryable, after)
    assert f"HTTP {status}" in error.message


def test_a_continuation_is_an_assistant_prefill_without_trailing_whitespace() -> None:
    body = request_body(
        ProviderRequest(model="m", prompt="Hi", max_tokens=5, continue_from="Hello the ")
    )
    assert body["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello the"},
    ]
