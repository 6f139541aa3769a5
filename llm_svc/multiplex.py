"""GenerateMany's server half: many generations over one gRPC stream (llm.proto).

task_svc keeps one stream open and starts every generation on it (svckit/multiplex.py says
why and owns the plumbing). Each generation runs in its own task: cancelling it (a `cancel`
command, or the stream's end) closes its provider stream, which aborts the HTTP request.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from svckit.errors import ServiceError
from svckit.multiplex import StreamMux
from switchboard.v1 import common_pb2, llm_pb2

Generate = Callable[[llm_pb2.GenerateRequest], AsyncIterator[llm_pb2.GenerateEvent]]


def _tagged(generation_id: int, event: llm_pb2.GenerateEvent) -> llm_pb2.TaggedEvent:
    return llm_pb2.TaggedEvent(id=generation_id, event=event)


def _failed(generation_id: int, error: ServiceError) -> llm_pb2.TaggedEvent:
    return _tagged(generation_id, llm_pb2.GenerateEvent(error=error.to_proto()))


async def _run(
    mux: StreamMux[llm_pb2.TaggedEvent],
    generation_id: int,
    request: llm_pb2.GenerateRequest,
    generate: Generate,
) -> None:
    # Domain failures are `error` events of the generation itself; an exception here is a
    # bug of ours, and StreamMux ends that generation alone with a typed error (`_failed`).
    async with aclosing(generate(request)) as events:  # type: ignore[type-var]
        async for event in events:
            mux.send(_tagged(generation_id, event))


async def serve_many(
    messages: AsyncIterable[llm_pb2.GenerateCommands], context: Any, generate: Generate
) -> None:
    """Run one GenerateMany call to its end."""
    mux: StreamMux[llm_pb2.TaggedEvent] = StreamMux(
        lambda events: llm_pb2.GenerateBatch(events=events), _failed
    )

    def handle(command: llm_pb2.GenerateCommand) -> None:
        if command.cancel:
            mux.cancel(command.id)
        elif not command.HasField("start"):
            return
        elif mux.running(command.id):
            message = f"generation {command.id} is already running"
            duplicate = ServiceError(common_pb2.ERROR_CODE_INVALID_REQUEST, message)
            mux.send(_failed(command.id, duplicate))
        else:
            mux.spawn(command.id, _run(mux, command.id, command.start, generate))

    await mux.serve(messages, lambda m: m.commands, handle, context)
