"""A local server that speaks the Gemini API's streaming wire format:
`POST /v1beta/models/{model}:streamGenerateContent?alt=sse`, key in `x-goog-api-key`;
each SSE `data:` is a whole GenerateContentResponse (cumulative `usageMetadata`, the last
with `finishReason`), and the body simply ends (no end marker). Errors are google.rpc.Status
JSON with the HTTP status Gemini uses (400 API_KEY_INVALID for a bad key, 429
RESOURCE_EXHAUSTED with a RetryInfo, 500 INTERNAL, 503 UNAVAILABLE)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.llm.http_fake import FakeSseServer, Recorded
from tests.llm.http_fake import Reply as _Reply

MODEL = "gemini-2.5-flash-lite"
_PATH = re.compile(r"^/v1beta/models/([^/:]+):streamGenerateContent\?alt=sse$")


def response(
    text: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"index": 0}
    if text is not None:
        candidate["content"] = {"parts": [{"text": text}], "role": "model"}
    if finish_reason is not None:
        candidate["finishReason"] = finish_reason
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": completion_tokens,
            "totalTokenCount": prompt_tokens + completion_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt_tokens}],
        },
        "modelVersion": MODEL,
        "responseId": "resp-test",
    }


def completion(tokens: list[str], finish_reason: str = "STOP", prompt_tokens: int = 8) -> list[Any]:
    """The payloads Gemini streams for an answer of `tokens` (one token a chunk; the last
    chunk carries the last text and the finishReason)."""
    return [
        response(
            token, prompt_tokens, index + 1, finish_reason if index == len(tokens) - 1 else None
        )
        for index, token in enumerate(tokens)
    ]


def status_error(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return {"error": error}


def api_error(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> bytes:
    return orjson.dumps(status_error(code, status, message, details), option=orjson.OPT_INDENT_2)


BAD_KEY = api_error(
    400,
    "INVALID_ARGUMENT",
    "API key not valid. Please pass a valid API key.",
    [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"},
        }
    ],
)


def rate_limited(retry_delay: str = "2s") -> bytes:
    return api_error(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
        [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": "generativelanguage.googleapis.com/"
                        "generate_content_free_tier_requests",
                        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    }
                ],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
        ],
    )


@dataclass
class Reply(_Reply):
    payloads: list[Any] = field(default_factory=lambda: completion(["Hello", " world"]))


class FakeGemini(FakeSseServer):
    """`start()` gives the base URL (the host, as GEMINI_BASE_URL). With `key`, a request
    with another `x-goog-api-key` gets Gemini's 400 API_KEY_INVALID."""

    def __init__(self, *replies: _Reply, key: str | None = None) -> None:
        super().__init__(*replies)
        self.key = key

    def default_reply(self) -> _Reply:
        return Reply()

    def check(self, request: Recorded) -> _Reply | None:
        if not _PATH.match(request.path):
            body = api_error(404, "NOT_FOUND", f"no such method {request.path}")
            return Reply(404, body=body)
        if self.key is not None and request.headers.get("x-goog-api-key") != self.key:
            return Reply(400, body=BAD_KEY)
        return None

    @staticmethod
    def model_of(request: Recorded) -> str:
        match = _PATH.match(request.path)
        return match.group(1) if match else ""
