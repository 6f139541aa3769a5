"""Running one task: LlmService.Generate, its events turned into the task's events.

The worker only talks to the TaskServer (through its mailbox) and to llm_svc; the job engine
owns the job message, publishing and acking. Cancelling the worker's asyncio task cancels the
Generate call, which cancels the gRPC stream, so llm_svc aborts the provider request.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, events_pb2, llm_pb2, llm_pb2_grpc
from task_svc.task_server import TaskServer
from task_svc.task_state import TaskCore

log = logging.getLogger(__name__)

Publish = Callable[[events_pb2.LifecycleEvent], "asyncio.Future[None]"]


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed generation is tried again: exponential backoff with full jitter, at
    least the provider's retry-after. The default (one attempt) never retries; the full
    engine raises `max_attempts` (and moves to nak-with-delay for long waits)."""

    max_attempts: int = 1
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def delay_s(self, attempt: int, error: ServiceError) -> float | None:
        if not error.retryable or attempt >= self.max_attempts:
            return None
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return max(random.uniform(0, backoff), error.retry_after_ms / 1000)


class _Streamed:
    """Whether any text reached the watchers (a retry would then repeat it)."""

    def __init__(self) -> None:
        self.any_text = False


async def run_task(
    server: TaskServer,
    llm: llm_pb2_grpc.LlmServiceStub,
    publish: Publish,
    policy: RetryPolicy | None = None,
) -> events_pb2.LifecycleEvent | None:
    """Run the task to a terminal state; return its terminal lifecycle event (None if the
    task had already ended, e.g. cancelled through the mailbox first)."""
    policy = policy or RetryPolicy()
    started = await server.apply(lambda core: core.started())
    if started is None:
        return None  # already finished (cancelled before it could start)
    publish(started)
    attempt = 0
    while True:
        attempt += 1
        streamed = _Streamed()
        try:
            final = await _generate(server, llm, streamed)
        except ServiceError as error:
            delay = None if streamed.any_text else policy.delay_s(attempt, error)
            if delay is None:
                log.info(
                    "task failed",
                    extra={"task_id": server.task_id, "code": error.reason, "error": error.message},
                )
                return await server.apply(partial(TaskCore.failed, error=error.to_proto()))
            await asyncio.sleep(delay)
            continue
        return await server.apply(partial(TaskCore.completed, final=final))


async def _generate(
    server: TaskServer, llm: llm_pb2_grpc.LlmServiceStub, streamed: _Streamed
) -> llm_pb2.GenerationFinal:
    spec = server.core.spec
    request = llm_pb2.GenerateRequest(
        request_id=spec.task_id,
        user_id=spec.user_id,
        model=spec.model,
        prompt=spec.prompt,
        options=spec.options,
    )
    call: Any = llm.Generate(request)
    try:
        async for event in call:
            kind = event.WhichOneof("kind")
            if kind == "delta":
                text = event.delta.text
                streamed.any_text = streamed.any_text or bool(text)
                await server.apply(partial(TaskCore.chunk, delta=text))
            elif kind == "progress":
                value = event.progress.progress
                await server.apply(partial(TaskCore.progressed, progress=value))
            elif kind == "final":
                final: llm_pb2.GenerationFinal = event.final
                return final
            elif kind == "error":
                raise ServiceError.from_proto(event.error)
        raise ServiceError(
            common_pb2.ERROR_CODE_INTERNAL, "llm_svc ended the stream without a final event"
        )
    except grpc.aio.AioRpcError as error:
        raise ServiceError.from_rpc_error(error) from error
    finally:
        # Explicit, so that a cancelled worker always cancels the stream on the wire.
        if not call.done():
            call.cancel()
