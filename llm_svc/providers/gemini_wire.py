"""The Gemini API (generativelanguage.googleapis.com) streaming wire format, sans-I/O.

`POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse` with the key in the
`x-goog-api-key` header. With `alt=sse` every SSE `data:` payload is one whole
`GenerateContentResponse`: `candidates[0].content.parts[].text` carries text,
`candidates[0].finishReason` comes on the last one, and `usageMetadata` (cumulative counts)
rides on the chunks. There is no end marker: the body ending after a finishReason is the
end. Errors are google.rpc.Status JSON, `{"error": {"code", "message", "status",
"details"}}`, as the HTTP body, or as a payload when the stream fails after its 200.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from llm_svc.providers.base import (
    CONTINUE_INSTRUCTION,
    Finish,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    TokenUsage,
)
from llm_svc.providers.http_errors import MAX_MESSAGE, error_from_status
from llm_svc.providers.sse import SseEvent
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode
API_VERSION = "v1beta"

# google.rpc.Code names (the `status` of an error) → (code, retryable).
STATUS_NAMES: dict[str, tuple[common_pb2.ErrorCode.ValueType, bool]] = {
    "INVALID_ARGUMENT": (Code.ERROR_CODE_INVALID_REQUEST, False),
    "FAILED_PRECONDITION": (Code.ERROR_CODE_INVALID_REQUEST, False),
    "OUT_OF_RANGE": (Code.ERROR_CODE_INVALID_REQUEST, False),
    "UNAUTHENTICATED": (Code.ERROR_CODE_AUTH, False),
    "PERMISSION_DENIED": (Code.ERROR_CODE_AUTH, False),
    "NOT_FOUND": (Code.ERROR_CODE_MODEL_NOT_FOUND, False),
    "RESOURCE_EXHAUSTED": (Code.ERROR_CODE_RATE_LIMITED, True),
    "CANCELLED": (Code.ERROR_CODE_CANCELLED, False),
    "INTERNAL": (Code.ERROR_CODE_INTERNAL, True),
    "UNKNOWN": (Code.ERROR_CODE_INTERNAL, True),
    "UNAVAILABLE": (Code.ERROR_CODE_OVERLOADED, True),
    "DEADLINE_EXCEEDED": (Code.ERROR_CODE_TIMEOUT, True),
}
# Finish reasons that mean the answer was withheld or cut by a filter (FinishReason enum).
FILTERED = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")  # protobuf Duration in JSON: "37s", "1.5s"


def stream_url(base_url: str, model: str) -> str:
    """The streaming endpoint; `base_url` is the API host (as GEMINI_BASE_URL), optionally
    already ending with a version segment ("/v1beta", "/v1")."""
    base = base_url.rstrip("/")
    if not re.search(r"/v1[a-z0-9]*$", base):
        base = f"{base}/{API_VERSION}"
    return f"{base}/models/{model}:streamGenerateContent?alt=sse"


def request_body(request: ProviderRequest) -> dict[str, Any]:
    config: dict[str, Any] = {"maxOutputTokens": request.max_tokens}
    if request.temperature is not None:
        config["temperature"] = request.temperature
    contents = [{"role": "user", "parts": [{"text": request.prompt}]}]
    if request.continue_from:
        contents.append({"role": "model", "parts": [{"text": request.continue_from}]})
        contents.append({"role": "user", "parts": [{"text": CONTINUE_INSTRUCTION}]})
    body: dict[str, Any] = {"contents": contents, "generationConfig": config}
    if request.system:
        body["systemInstruction"] = {"parts": [{"text": request.system}]}
    return body


def retry_delay_ms(error: Mapping[str, Any]) -> int:
    """The `google.rpc.RetryInfo.retryDelay` of an error's details, in ms; 0 when absent."""
    for detail in error.get("details") or ():
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return int(float(match.group(1)) * 1000)
    return 0


def _reasons(error: Mapping[str, Any]) -> set[str]:
    """The `google.rpc.ErrorInfo.reason`s of an error's details (e.g. API_KEY_INVALID)."""
    return {
        str(detail.get("reason", ""))
        for detail in error.get("details") or ()
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("ErrorInfo")
    }


def error_from_body(provider: str, error: Mapping[str, Any], status: int = 0) -> ProviderError:
    """A google.rpc.Status (the value of "error") → a typed error."""
    name = str(error.get("status", ""))
    message = str(error.get("message", ""))[:MAX_MESSAGE]
    code, retryable = STATUS_NAMES.get(name, (Code.ERROR_CODE_INTERNAL, True))
    # Gemini answers a bad key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
    if _reasons(error) & {"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED"}:
        code, retryable = Code.ERROR_CODE_AUTH, False
    prefix = f"{provider} answered HTTP {status}" if status else f"{provider} stream error"
    return ProviderError(
        provider,
        code,
        f"{prefix}: {name} {message}".rstrip(),
        retryable=retryable,
        retry_after_ms=retry_delay_ms(error) if retryable else 0,
    )


def error_from_response(
    provider: str, status: int, headers: Mapping[str, str], body: bytes
) -> ProviderError:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict) or "status" not in error:
        return error_from_status(provider, status, headers, body)
    typed = error_from_body(provider, error, status)
    if typed.retryable and not typed.retry_after_ms:
        typed.retry_after_ms = error_from_status(provider, status, headers, b"").retry_after_ms
    return typed


class GeminiStreamParser:
    """Feed each SSE event; `end()` when the body ended gives the `Finish` (or raises when
    no finishReason came: the stream was cut)."""

    done = False  # Gemini has no end marker: the end of the body is the end

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.finish_reason = ""
        self.usage: TokenUsage | None = None
        self._completion_tokens = 0

    def feed_event(self, event: SseEvent) -> list[ProviderEvent]:
        return self.feed(event.data)

    def feed(self, data: str) -> list[ProviderEvent]:
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise self._error(Code.ERROR_CODE_NETWORK, f"bad stream chunk: {error}") from error
        if not isinstance(chunk, dict):
            raise self._error(Code.ERROR_CODE_NETWORK, "bad stream chunk: not an object")
        if isinstance(chunk.get("error"), dict):
            raise error_from_body(self.provider, chunk["error"])
        blocked = (chunk.get("promptFeedback") or {}).get("blockReason")
        if blocked:
            raise self._error(Code.ERROR_CODE_CONTENT_FILTERED, f"prompt blocked: {blocked}")
        tokens = self._count(chunk.get("usageMetadata"))
        candidates = chunk.get("candidates") or [{}]
        candidate = candidates[0] if isinstance(candidates[0], dict) else {}
        parts = (candidate.get("content") or {}).get("parts") or ()
        # Thought summaries ("thought": true) are not part of the answer.
        text = "".join(
            str(part["text"])
            for part in parts
            if isinstance(part, dict) and part.get("text") and not part.get("thought")
        )
        events: list[ProviderEvent] = []
        if text:
            events.append(TextDelta(text, tokens if tokens is not None else 1))
        reason = candidate.get("finishReason")
        if reason in FILTERED:
            raise self._error(Code.ERROR_CODE_CONTENT_FILTERED, f"answer blocked: {reason}")
        if reason and reason != "FINISH_REASON_UNSPECIFIED":
            self.finish_reason = FINISH_REASONS.get(str(reason), str(reason).lower())
        return events

    def end(self) -> list[ProviderEvent]:
        if not self.finish_reason:
            raise self._error(Code.ERROR_CODE_NETWORK, "stream ended before a finishReason")
        return [Finish(self.finish_reason, self.usage)]

    def _count(self, usage: object) -> int | None:
        """Completion tokens this chunk added (usage counts are cumulative), or None."""
        if not isinstance(usage, dict):
            return None
        # Thinking tokens are billed as output and count against maxOutputTokens.
        completion = int(usage.get("candidatesTokenCount") or 0) + int(
            usage.get("thoughtsTokenCount") or 0
        )
        self.usage = TokenUsage(int(usage.get("promptTokenCount") or 0), completion)
        added = max(completion - self._completion_tokens, 0)
        self._completion_tokens = max(completion, self._completion_tokens)
        return added

    def _error(self, code: common_pb2.ErrorCode.ValueType, message: str) -> ProviderError:
        return ProviderError(self.provider, code, f"{self.provider}: {message}")
