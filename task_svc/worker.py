"""Running one task: LlmService.Generate, its events turned into the task's events.

The worker only talks to the TaskServer (through its mailbox) and to llm_svc; the job engine
owns the job message, publishing and acking. Cancelling the worker's asyncio task closes its
generation (llm_client.py), so llm_svc aborts the provider request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import aclosing
from functools import partial

from svckit import tracing
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, events_pb2, llm_pb2
from task_svc.llm_client import LlmClient
from task_svc.task_server import TaskServer
from task_svc.task_state import TaskCore

log = logging.getLogger(__name__)

Publish = Callable[[events_pb2.LifecycleEvent], "asyncio.Future[None]"]


Outcome = ServiceError | events_pb2.LifecycleEvent | None


async def run_task(
    server: TaskServer, llm: LlmClient, publish: Publish, trace: str = ""
) -> Outcome:
    """Run the task once: its terminal lifecycle event when it completed, the typed error
    when the generation failed (the engine decides between a retry and failing the task),
    None if the task had already ended (e.g. cancelled through the mailbox first)."""
    started = await server.apply(lambda core: core.started())
    if started is None:
        return None
    publish(started)
    try:
        # Current (a coroutine's block, not a generator's), so the log lines written while
        # the stream runs, here and in llm_client.py, carry the task's trace id.
        generating = tracing.around("generate", trace, {"model": server.core.spec.model})
        with generating as span, tracing.current(span):
            final = await _generate(server, llm, tracing.traceparent(span))
    except ServiceError as error:
        log.info(
            "generation failed",
            extra={"task_id": server.task_id, "code": error.reason, "error": error.message},
        )
        return error
    return await server.apply(partial(TaskCore.completed, final=final))


async def _generate(server: TaskServer, llm: LlmClient, trace: str) -> llm_pb2.GenerationFinal:
    spec = server.core.spec
    request = llm_pb2.GenerateRequest(
        request_id=spec.task_id,
        user_id=spec.user_id,
        model=spec.model,
        prompt=spec.prompt,
        options=spec.options,
        # Resumed after a cut (runner.py): the text the watchers have is continued.
        continue_from=server.core.content,
        traceparent=trace,
    )
    # Closing the stream early (this task cancelled) cancels the generation in llm_svc.
    async with aclosing(llm.generate(request)) as events:
        async for event in events:
            kind = event.WhichOneof("kind")
            # Casts: nobody reads their result, and the mailbox keeps them in order.
            if kind == "delta":
                delta = event.delta
                progress = delta.progress.progress
                server.cast(partial(TaskCore.chunk, delta=delta.text, progress=progress))
            elif kind == "progress" and event.progress.fallback_model:
                model = event.progress.fallback_model
                server.cast(partial(TaskCore.handed_over, model=model))
            elif kind == "progress":
                value = event.progress.progress
                server.cast(partial(TaskCore.progressed, progress=value))
            elif kind == "final":
                final: llm_pb2.GenerationFinal = event.final
                return final
            elif kind == "error":
                raise ServiceError.from_proto(event.error)
    raise ServiceError(
        common_pb2.ERROR_CODE_INTERNAL, "llm_svc ended the stream without a final event"
    )
