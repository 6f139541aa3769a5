"""The provider interface: what every adapter (local, OpenAI, Gemini, Anthropic) implements.

A provider knows nothing about gRPC, progress, retries or fallbacks: it streams text deltas and
ends with one `Finish`, or raises a `ProviderError`. Everything around that (routing, retries,
rate limits, quotas, circuit breakers, caching) lives above it, in `generation.py` and
`policy.py`, so a new provider is one small module.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2


@dataclass(frozen=True)
class ProviderRequest:
    model: str  # the provider's own (upstream) model name
    prompt: str
    max_tokens: int
    system: str = ""
    temperature: float | None = None
    user_id: str = ""
    request_id: str = ""
    # Text the user already has from a model that failed mid-stream: continue it, never
    # repeat it (each wire format says so its own way: an assistant prefill for Anthropic,
    # the text as the assistant's turn plus CONTINUE_INSTRUCTION for the others).
    continue_from: str = ""


CONTINUE_INSTRUCTION = (
    "Your answer above was cut off. Continue it exactly where it stops: do not repeat any of "
    "it, do not comment on it, write only what comes next."
)


@dataclass(frozen=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_proto(self) -> common_pb2.Usage:
        return common_pb2.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.total_tokens,
        )


@dataclass(frozen=True)
class TextDelta:
    text: str
    tokens: int = 1  # completion tokens this delta carries, as far as the provider knows


@dataclass(frozen=True)
class Finish:
    finish_reason: str  # "stop", "length", "content_filter", ...
    usage: TokenUsage | None = None  # None: the provider did not report it


ProviderEvent = TextDelta | Finish


class ProviderError(ServiceError):
    """A provider's failure, typed with an `ErrorCode` (retryable, retry_after_ms)."""

    def __init__(
        self,
        provider: str,
        code: common_pb2.ErrorCode.ValueType,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after_ms: int = 0,
    ) -> None:
        super().__init__(code, message, retryable=retryable, retry_after_ms=retry_after_ms)
        self.provider = provider


class Provider(Protocol):
    """One backend. `stream` is an async generator: the caller closes it (or cancels the task
    iterating it) to abort the request at once; HTTP adapters must then close the response."""

    name: str

    def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]: ...

    def estimate_tokens(self, request: ProviderRequest) -> int | None:
        """The completion length to expect, for progress; None when unknown."""
        ...

    async def aclose(self) -> None: ...
