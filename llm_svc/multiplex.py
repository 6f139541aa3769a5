"""GenerateMany's server half: many generations over one gRPC stream (llm.proto).

task_svc keeps one stream open and starts every generation on it (svckit/multiplex.py says
why and owns the plumbing). Each generation runs in its own task: cancelling it (a `cancel`
command, or the stream's end) closes its provider stream, which aborts the HTTP request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from svckit.errors import ServiceError
from svckit.multiplex import StreamMux
from switchboard.v1 import common_pb2, llm_pb2

log = logging.getLogger(__name__)

Generate = Callable[[llm_pb2.GenerateRequest], AsyncIterator[llm_pb2.GenerateEvent]]


def _tagged(generation_id: int, event: llm_pb2.GenerateEvent) -> llm_pb2.TaggedEvent:
    return llm_pb2.TaggedEvent(id=generation_id, event=event)


def _error(
    generation_id: int, code: common_pb2.ErrorCode.ValueType, message: str
) -> llm_pb2.TaggedEvent:
    event = llm_pb2.GenerateEvent(error=ServiceError(code, message).to_proto())
    return _tagged(generation_id, event)


async def _run(
    mux: StreamMux[llm_pb2.TaggedEvent],
    generation_id: int,
    request: llm_pb2.GenerateRequest,
    generate: Generate,
) -> None:
    try:
        async with aclosing(generate(request)) as events:  # type: ignore[type-var]
            async for event in events:
                mux.send(_tagged(generation_id, event))
    except Exception:  # a bug of ours: that generation ends with a typed error
        log.exception("generation failed", extra={"request_id": request.request_id})
        mux.send(_error(generation_id, common_pb2.ERROR_CODE_INTERNAL, "llm_svc failed"))


async def serve_many(
    messages: AsyncIterable[llm_pb2.GenerateCommands], context: Any, generate: Generate
) -> None:
    """Run one GenerateMany call to its end."""
    mux: StreamMux[llm_pb2.TaggedEvent] = StreamMux(
        lambda events: llm_pb2.GenerateBatch(events=events)
    )

    def handle(command: llm_pb2.GenerateCommand) -> None:
        if command.cancel:
            mux.cancel(command.id)
        elif not command.HasField("start"):
            return
        elif mux.running(command.id):
            message = f"generation {command.id} is already running"
            mux.send(_error(command.id, common_pb2.ERROR_CODE_INVALID_REQUEST, message))
        else:
            mux.spawn(command.id, _run(mux, command.id, command.start, generate))

    await mux.serve(messages, lambda m: m.commands, handle, context)
