"""WatchMany's server half: many Watches over one gRPC stream (tasks.proto).

The gateway opens one stream per process instead of a Watch call per joined channel
(svckit/multiplex.py says why and owns the plumbing). Each watch runs what a Watch call runs
(`follow`: the task's state, then its events) in a task of its own, under a credit window:
it sends only as many responses as the gateway has granted, and the gateway grants more as
its socket takes them. So a client that reads slowly paces its own watch, as gRPC flow
control paced a Watch call, without holding up the other watches on the stream; if it falls
too far behind, its TaskServer's bounded queue drops it (OVERLOADED) and the client catches
up from its last seq.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from svckit.errors import ServiceError
from svckit.multiplex import StreamMux
from switchboard.v1 import common_pb2, tasks_pb2

Follow = Callable[[tasks_pb2.WatchRequest], AsyncIterator[tasks_pb2.WatchResponse]]
Item = tasks_pb2.WatchItem


class _Credit:
    """What one watch may still send; `take` waits while it is out."""

    __slots__ = ("_left", "_more")

    def __init__(self, first: int) -> None:
        self._left = first
        self._more: asyncio.Event | None = None

    def grant(self, count: int) -> None:
        self._left += count
        if self._more is not None:
            self._more.set()

    async def take(self) -> None:
        while self._left <= 0:
            self._more = asyncio.Event()
            await self._more.wait()
            self._more = None
        self._left -= 1


async def _run(
    mux: StreamMux[Item],
    watch_id: int,
    request: tasks_pb2.WatchRequest,
    follow: Follow,
    credits: dict[int, _Credit],
) -> None:
    credit = credits[watch_id]
    try:  # an error ends this watch alone: StreamMux sends its item (`_failed`)
        async with aclosing(follow(request)) as responses:  # type: ignore[type-var]
            async for response in responses:
                await credit.take()
                mux.send(Item(id=watch_id, response=response))
        mux.send(Item(id=watch_id, end=True))
    finally:
        credits.pop(watch_id, None)


def _failed(watch_id: int, error: ServiceError) -> Item:
    return Item(id=watch_id, error=error.to_proto())


async def serve_watch_many(
    messages: AsyncIterable[tasks_pb2.WatchCommands], context: Any, follow: Follow
) -> None:
    """Run one WatchMany call to its end."""
    mux: StreamMux[Item] = StreamMux(lambda items: tasks_pb2.WatchBatch(items=items), _failed)
    credits: dict[int, _Credit] = {}

    def handle(command: tasks_pb2.WatchCommand) -> None:
        kind = command.WhichOneof("kind")
        if kind == "watch":
            if mux.running(command.id):
                duplicate = ServiceError(
                    common_pb2.ERROR_CODE_INVALID_REQUEST, f"watch {command.id} is open already"
                )
                mux.send(Item(id=command.id, error=duplicate.to_proto()))
                return
            credits[command.id] = _Credit(command.credit)
            mux.spawn(command.id, _run(mux, command.id, command.watch, follow, credits))
        elif kind == "unwatch":
            mux.cancel(command.id)
        elif command.credit > 0 and (held := credits.get(command.id)) is not None:
            held.grant(command.credit)

    await mux.serve(messages, lambda m: m.commands, handle, context)
