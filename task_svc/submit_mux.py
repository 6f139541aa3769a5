"""SubmitMany's server half: Submits over one gRPC stream (tasks.proto).

The gateway's acks take this path: a connection of their own, no gRPC call set-up per task,
and the answers of Submits that finish together leave in one message (svckit/multiplex.py).
Each Submit runs in its own task, exactly as the unary Submit would, and its typed error, if
any, comes back in its reply.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

from svckit.errors import ServiceError
from svckit.multiplex import StreamMux
from switchboard.v1 import tasks_pb2

Submit = Callable[[tasks_pb2.SubmitRequest], Awaitable[tasks_pb2.SubmitResponse]]
Reply = tasks_pb2.SubmitReply


async def _one(
    mux: StreamMux[Reply], call_id: int, request: tasks_pb2.SubmitRequest, submit: Submit
) -> None:
    mux.send(Reply(id=call_id, response=await submit(request)))  # a refusal: StreamMux


def _refused(call_id: int, error: ServiceError) -> Reply:
    return Reply(id=call_id, error=error.to_proto())


async def serve_submits(
    messages: AsyncIterable[tasks_pb2.SubmitCommands], context: Any, submit: Submit
) -> None:
    """Run one SubmitMany call to its end."""
    mux: StreamMux[Reply] = StreamMux(
        lambda replies: tasks_pb2.SubmitReplies(replies=replies), _refused
    )

    def handle(command: tasks_pb2.SubmitCommand) -> None:
        if not mux.running(command.id):
            mux.spawn(command.id, _one(mux, command.id, command.request, submit))

    await mux.serve(messages, lambda m: m.commands, handle, context)
