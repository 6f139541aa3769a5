"""A local server that speaks OpenAI's Chat Completions streaming wire format:
`POST /v1/chat/completions`, a `text/event-stream` body, one `data: <chat.completion.chunk>`
event per token, a finish chunk, a usage chunk (`stream_options.include_usage`), then
`data: [DONE]`; errors as JSON `{"error": {...}}` with the status codes and `retry-after`
headers OpenAI sends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.llm.http_fake import FakeSseServer, Recorded
from tests.llm.http_fake import Reply as _Reply

MODEL = "gpt-4o-mini"


def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_test",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": None,
    }


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_test",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


def completion(tokens: list[str], finish_reason: str = "stop", prompt_tokens: int = 9) -> list[Any]:
    """The payloads OpenAI streams for an answer made of `tokens`."""
    return [
        chunk({"role": "assistant", "content": "", "refusal": None}),
        *(chunk({"content": token}) for token in tokens),
        chunk({}, finish_reason),
        usage_chunk(prompt_tokens, len(tokens)),
    ]


def api_error(message: str, type_: str, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


BAD_KEY = api_error(
    "Incorrect API key provided. You can find your API key at "
    "https://platform.openai.com/account/api-keys.",
    "invalid_request_error",
    "invalid_api_key",
)


@dataclass
class Reply(_Reply):
    payloads: list[Any] = field(default_factory=lambda: completion(["Hello", " world"]))


class FakeOpenAI(FakeSseServer):
    """`start()` gives the base URL (…/v1). With `key`, a request with another bearer token
    gets OpenAI's 401 invalid_api_key."""

    def __init__(self, *replies: _Reply, key: str | None = None) -> None:
        super().__init__(*replies)
        self.key = key

    def default_reply(self) -> _Reply:
        return Reply()

    def trailer(self, reply: _Reply) -> bytes:
        return b"data: [DONE]\n\n"

    def check(self, request: Recorded) -> _Reply | None:
        if self.key is not None and request.headers.get("authorization") != f"Bearer {self.key}":
            return Reply(401, body=BAD_KEY)
        return None

    async def start(self) -> str:
        return await super().start() + "/v1"
