"""A local server that speaks Anthropic's Messages streaming wire format: `POST
/v1/messages` with `x-api-key` and `anthropic-version`; named SSE events message_start,
content_block_start, ping, content_block_delta (text_delta), content_block_stop,
message_delta (stop_reason, cumulative output_tokens), message_stop; `event: error` in the
stream; error bodies `{"type": "error", "error": {"type", "message"}, "request_id"}` with
401, 429 (retry-after), 500, 529 (overloaded)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.llm.http_fake import FakeSseServer, Recorded
from tests.llm.http_fake import Reply as _Reply

MODEL = "claude-haiku-4-5"
Event = tuple[str, dict[str, Any]]


def message_start(input_tokens: int) -> Event:
    message: dict[str, Any] = {
        "id": "msg_test",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": MODEL,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
    }
    return "message_start", {"type": "message_start", "message": message}


def text_delta(text: str) -> Event:
    delta = {"type": "text_delta", "text": text}
    return "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}


def message_delta(stop_reason: str, output_tokens: int) -> Event:
    return "message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }


PING: Event = ("ping", {"type": "ping"})
MESSAGE_STOP: Event = ("message_stop", {"type": "message_stop"})


def opening(input_tokens: int = 12) -> list[Event]:
    block = {"type": "text", "text": ""}
    return [
        message_start(input_tokens),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
        PING,
    ]


def completion(
    tokens: list[str], stop_reason: str = "end_turn", input_tokens: int = 12
) -> list[Event]:
    """The events Anthropic streams for an answer made of `tokens`."""
    return [
        *opening(input_tokens),
        *(text_delta(token) for token in tokens),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        message_delta(stop_reason, len(tokens)),
        MESSAGE_STOP,
    ]


def error_event(type_: str, message: str) -> Event:
    return "error", {"type": "error", "error": {"type": type_, "message": message}}


def api_error(type_: str, message: str) -> bytes:
    return orjson.dumps(
        {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_test"}
    )


BAD_KEY = api_error("authentication_error", "invalid x-api-key")
OVERLOADED = api_error("overloaded_error", "Overloaded")


@dataclass
class Reply(_Reply):
    payloads: list[Any] = field(default_factory=lambda: completion(["Hello", " world"]))


class FakeAnthropic(FakeSseServer):
    """`start()` gives the base URL (the host, as ANTHROPIC_BASE_URL). With `key`, a
    request with another `x-api-key` gets Anthropic's 401 authentication_error."""

    def __init__(self, *replies: _Reply, key: str | None = None) -> None:
        super().__init__(*replies)
        self.key = key

    def default_reply(self) -> _Reply:
        return Reply()

    def frame(self, payload: Any) -> bytes:
        name, data = payload
        return f"event: {name}\ndata: {orjson.dumps(data).decode()}\n\n".encode()

    def check(self, request: Recorded) -> _Reply | None:
        if request.path != "/v1/messages":
            return Reply(404, body=api_error("not_found_error", "Not found"))
        if "anthropic-version" not in request.headers:
            body = api_error("invalid_request_error", "anthropic-version: header is required")
            return Reply(400, body=body)
        if self.key is not None and request.headers.get("x-api-key") != self.key:
            return Reply(401, body=BAD_KEY)
        return None
