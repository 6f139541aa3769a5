"""The OpenAI Chat Completions streaming wire format, sans-I/O: the request body, and the
`data:` payloads of the SSE stream turned into `ProviderEvent`s.

Stream shape (API reference, "The chat completion chunk object"): each payload is a
`chat.completion.chunk` whose `choices[0].delta.content` carries text; `finish_reason` comes
on a chunk of its own; with `stream_options.include_usage` a last chunk has `choices: []`
and the `usage`; the stream ends with the literal payload `[DONE]`. OpenAI-compatible
servers (vLLM, llama.cpp, Ollama, LM Studio) follow the same shape.
"""

from __future__ import annotations

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
from llm_svc.providers.sse import SseEvent
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode
DONE = "[DONE]"


def request_body(request: ProviderRequest) -> dict[str, Any]:
    messages = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": request.prompt})
    if request.continue_from:
        messages.append({"role": "assistant", "content": request.continue_from})
        messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        # `max_tokens`, not the newer `max_completion_tokens`: every compatible server
        # knows it, and OpenAI still accepts it for chat models.
        "max_tokens": request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.temperature is not None:
        body["temperature"] = request.temperature
    return body


class ChatStreamParser:
    """Feed each SSE `data` payload; `done` once `[DONE]` arrived (then the last event
    returned was the `Finish`, carrying the finish reason and the usage chunk's counts)."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.finish_reason = ""
        self.usage: TokenUsage | None = None
        self.done = False

    def feed_event(self, event: SseEvent) -> list[ProviderEvent]:
        return self.feed(event.data)

    def end(self) -> list[ProviderEvent]:
        raise self._error(Code.ERROR_CODE_NETWORK, f"{self.provider}: stream ended before [DONE]")

    def feed(self, data: str) -> list[ProviderEvent]:
        if self.done:
            return []
        if data.strip() == DONE:
            self.done = True
            return [Finish(self.finish_reason or "stop", self.usage)]
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise self._error(Code.ERROR_CODE_NETWORK, f"bad stream chunk: {error}") from error
        if not isinstance(chunk, dict):
            raise self._error(Code.ERROR_CODE_NETWORK, "bad stream chunk: not an object")
        if "error" in chunk:
            # A failure after the 200 status line arrives in the stream itself.
            detail = chunk["error"] if isinstance(chunk["error"], dict) else {}
            message = str(detail.get("message", "error in stream"))
            raise self._error(Code.ERROR_CODE_OVERLOADED, message, retryable=True)
        events: list[ProviderEvent] = []
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            text = (choice.get("delta") or {}).get("content")
            if text:
                events.append(TextDelta(str(text)))
            if choice.get("finish_reason") == "content_filter":
                # The answer was cut by the provider's (or Azure's) content filter.
                raise self._error(Code.ERROR_CODE_CONTENT_FILTERED, "answer cut by a filter")
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = TokenUsage(
                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            )
        return events

    def _error(
        self, code: common_pb2.ErrorCode.ValueType, message: str, retryable: bool | None = None
    ) -> ProviderError:
        return ProviderError(self.provider, code, message, retryable=retryable)
