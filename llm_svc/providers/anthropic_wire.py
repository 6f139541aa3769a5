"""The Anthropic Messages API streaming wire format, sans-I/O.

`POST {base}/v1/messages` with `"stream": true`, headers `x-api-key` and
`anthropic-version`. The SSE stream (Messages API, "Streaming Messages") is named events:
`message_start` (the message, with `usage.input_tokens`), per content block
`content_block_start` / `content_block_delta` (`text_delta` carries text) /
`content_block_stop`, then `message_delta` (`delta.stop_reason`, cumulative
`usage.output_tokens`) and `message_stop`; `ping` may come anywhere, and an `error` event
(`{"type": "error", "error": {"type": "overloaded_error", ...}}`) can end a stream after
its 200. Unknown event types are skipped, as Anthropic's versioning policy asks.
Errors before the stream are JSON `{"type": "error", "error": {"type", "message"}}` with
the HTTP status (429 with retry-after, 529 overloaded).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llm_svc.providers.base import (
    Finish,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    TokenUsage,
)
from llm_svc.providers.http_errors import MAX_MESSAGE, error_detail, error_from_status
from llm_svc.providers.sse import SseEvent
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode
API_VERSION = "2023-06-01"

# Error `type`s (Messages API, "Errors") → (code, retryable).
ERROR_TYPES: dict[str, tuple[common_pb2.ErrorCode.ValueType, bool]] = {
    "invalid_request_error": (Code.ERROR_CODE_INVALID_REQUEST, False),
    "request_too_large": (Code.ERROR_CODE_INVALID_REQUEST, False),
    "authentication_error": (Code.ERROR_CODE_AUTH, False),
    "permission_error": (Code.ERROR_CODE_AUTH, False),
    "not_found_error": (Code.ERROR_CODE_MODEL_NOT_FOUND, False),
    "billing_error": (Code.ERROR_CODE_QUOTA_EXCEEDED, False),
    "rate_limit_error": (Code.ERROR_CODE_RATE_LIMITED, True),
    "api_error": (Code.ERROR_CODE_INTERNAL, True),
    "overloaded_error": (Code.ERROR_CODE_OVERLOADED, True),
    "timeout_error": (Code.ERROR_CODE_TIMEOUT, True),
}
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
}
CHARS_PER_TOKEN = 4  # text deltas carry no count: an estimate for progress only


def request_body(request: ProviderRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": [{"role": "user", "content": request.prompt}],
        "stream": True,
    }
    if request.continue_from:
        # A prefill: the model goes on from the assistant's text (which may not end in
        # whitespace; the continuation brings its own).
        prefill = {"role": "assistant", "content": request.continue_from.rstrip()}
        body["messages"].append(prefill)
    if request.system:
        body["system"] = request.system
    if request.temperature is not None:
        # Anthropic's range is 0 to 1; GenerationOptions allows up to 2 (OpenAI's range).
        body["temperature"] = min(request.temperature, 1.0)
    return body


def error_from_response(
    provider: str, status: int, headers: Mapping[str, str], body: bytes
) -> ProviderError:
    error = error_from_status(provider, status, headers, body)
    _, kind = error_detail(body)
    if kind in ERROR_TYPES and status not in (429, 529):
        # The body's type is more precise than the status (a 400 billing_error is a quota).
        error.code, error.retryable = ERROR_TYPES[kind]
        if not error.retryable:
            error.retry_after_ms = 0
    return error


class MessagesStreamParser:
    """Feed each SSE event; `done` after `message_stop` (the last event returned then is
    the `Finish`)."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.done = False
        self.stop_reason = ""
        self.prompt_tokens = 0
        self.output_tokens: int | None = None

    def feed_event(self, event: SseEvent) -> list[ProviderEvent]:
        if self.done:
            return []
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError as error:
            raise self._error(Code.ERROR_CODE_NETWORK, f"bad stream event: {error}") from error
        if not isinstance(data, dict):
            raise self._error(Code.ERROR_CODE_NETWORK, "bad stream event: not an object")
        kind = event.event if event.event != "message" else str(data.get("type", ""))
        match kind:
            case "message_start":
                usage = (data.get("message") or {}).get("usage") or {}
                self._usage(usage)
            case "content_block_start":
                block = data.get("content_block") or {}
                if block.get("type") == "text" and block.get("text"):
                    return [_text(str(block["text"]))]
            case "content_block_delta":
                delta = data.get("delta") or {}
                # thinking_delta, signature_delta, input_json_delta are not answer text.
                if delta.get("type") == "text_delta" and delta.get("text"):
                    return [_text(str(delta["text"]))]
            case "message_delta":
                reason = (data.get("delta") or {}).get("stop_reason")
                if reason == "refusal":
                    raise self._error(
                        Code.ERROR_CODE_CONTENT_FILTERED, "the model refused (stop_reason refusal)"
                    )
                if reason:
                    self.stop_reason = STOP_REASONS.get(str(reason), str(reason))
                self._usage(data.get("usage") or {})
            case "message_stop":
                self.done = True
                usage = None
                if self.output_tokens is not None:
                    usage = TokenUsage(self.prompt_tokens, self.output_tokens)
                return [Finish(self.stop_reason or "stop", usage)]
            case "error":
                raise self._stream_error(data.get("error") or {})
            case _:
                pass  # ping, content_block_stop, and event types added later
        return []

    def end(self) -> list[ProviderEvent]:
        raise self._error(Code.ERROR_CODE_NETWORK, "stream ended before message_stop")

    def _usage(self, usage: Mapping[str, Any]) -> None:
        # input_tokens excludes cached prompt tokens; the prompt is what all of them add up to.
        prompt = sum(
            int(usage.get(key) or 0)
            for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        if prompt:
            self.prompt_tokens = prompt
        if usage.get("output_tokens") is not None:
            self.output_tokens = int(usage["output_tokens"])

    def _stream_error(self, error: Mapping[str, Any]) -> ProviderError:
        kind = str(error.get("type", ""))
        code, retryable = ERROR_TYPES.get(kind, (Code.ERROR_CODE_INTERNAL, True))
        message = str(error.get("message", ""))[:MAX_MESSAGE]
        return ProviderError(
            self.provider,
            code,
            f"{self.provider} stream error: {kind} {message}".rstrip(),
            retryable=retryable,
        )

    def _error(self, code: common_pb2.ErrorCode.ValueType, message: str) -> ProviderError:
        return ProviderError(self.provider, code, f"{self.provider}: {message}")


def _text(text: str) -> TextDelta:
    return TextDelta(text, max(1, round(len(text) / CHARS_PER_TOKEN)))
