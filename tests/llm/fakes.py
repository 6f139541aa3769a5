"""Small provider doubles, and test settings, for llm_svc tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from llm_svc.catalogue import DEFAULT_MODELS_FILE
from llm_svc.config import Settings
from llm_svc.providers.base import (
    Finish,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    TokenUsage,
)
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode


@dataclass
class Script:
    """What one call does: stream `deltas`, then raise `error` or finish."""

    deltas: Sequence[str] = ("Hello", " world")
    error: ProviderError | None = None
    finish: Finish | None = field(
        default_factory=lambda: Finish("stop", TokenUsage(prompt_tokens=3, completion_tokens=2))
    )


class ScriptedProvider:
    """Plays one script per call, in order (the last one repeats); records the requests."""

    def __init__(self, name: str, *scripts: Script, estimate: int | None = None) -> None:
        self.name = name
        self.scripts = list(scripts) or [Script()]
        self.requests: list[ProviderRequest] = []
        self.estimate = estimate
        self.closed = 0

    def estimate_tokens(self, request: ProviderRequest) -> int | None:
        return self.estimate

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        script = self.scripts[min(len(self.requests), len(self.scripts) - 1)]
        self.requests.append(request)
        for text in script.deltas:
            await asyncio.sleep(0)
            yield TextDelta(text)
        if script.error is not None:
            raise script.error
        if script.finish is not None:
            yield Finish(script.finish.finish_reason, script.finish.usage)

    async def aclose(self) -> None:
        self.closed += 1


class HangingProvider:
    """Streams one delta, then waits forever; `stopped` is set when the stream is torn down
    (cancelled or closed), which is what a cancelled Generate must cause at once."""

    name = "local"

    def __init__(self) -> None:
        self.first_delta_sent = asyncio.Event()
        self.stopped = asyncio.Event()
        self.how: str | None = None

    def estimate_tokens(self, request: ProviderRequest) -> int | None:
        return None

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[ProviderEvent, None]:
        try:
            yield TextDelta("thinking")
            self.first_delta_sent.set()
            await asyncio.Event().wait()
            yield Finish("stop")  # pragma: no cover - never reached
        except asyncio.CancelledError:
            self.how = "cancelled"
            raise
        except GeneratorExit:
            self.how = "closed"
            raise
        finally:
            self.stopped.set()

    async def aclose(self) -> None:
        return None


def failure(code: common_pb2.ErrorCode.ValueType, retry_after_ms: int = 0) -> ProviderError:
    return ProviderError(
        "fake", code, f"fake {common_pb2.ErrorCode.Name(code)}", retry_after_ms=retry_after_ms
    )


def settings(**overrides: object) -> Settings:
    """An in-process llm_svc on port 0: no pacing, and nothing taken from the environment
    that would change the models offered."""
    values: dict[str, object] = {
        "llm_svc_listen": "127.0.0.1:0",
        "llm_models_file": DEFAULT_MODELS_FILE,
        "local_model_token_delay_ms": 0,
        "openai_api_key": None,
        "gemini_api_key": None,
        "anthropic_api_key": None,
        "llm_default_model": "",
        "llm_retry_base_delay_ms": 1,
        "llm_retry_max_delay_ms": 50,
        "llm_shutdown_grace_s": 0.2,
        # Every delta on its own, as the provider sent it (tests/llm/test_coalesce.py
        # covers coalescing, through gRPC too).
        "llm_coalesce_ms": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
