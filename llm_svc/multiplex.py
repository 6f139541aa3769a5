"""GenerateMany's server half: many generations over one gRPC stream (llm.proto).

A gRPC call costs more CPU than the few messages a coalesced generation sends, so task_svc
keeps one stream open and starts every generation on it. Each generation runs in its own
asyncio task (cancelling it closes its provider stream, which aborts the HTTP request); their
events wait in one outbox and leave as one `GenerateBatch` per write, so a busy stream sends
fewer, larger messages.

The stream's end (the caller closed its side and nothing runs, or the call is cancelled)
cancels whatever still runs: no generation outlives the stream that started it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2, llm_pb2

log = logging.getLogger(__name__)

Generate = Callable[[llm_pb2.GenerateRequest], AsyncIterator[llm_pb2.GenerateEvent]]


class _Stream:
    """One GenerateMany call: its running generations and its outbox."""

    def __init__(self, generate: Generate) -> None:
        self.generate = generate
        self.running: dict[int, asyncio.Task[None]] = {}
        self.outbox: collections.deque[llm_pb2.TaggedEvent] = collections.deque()
        self.ready = asyncio.Event()
        self.reading = True  # until the caller closes its side

    def start(self, command: llm_pb2.GenerateCommand) -> None:
        if command.id in self.running:
            self._send(command.id, _duplicate(command.id))
            return
        task = asyncio.create_task(self._run(command.id, command.start), name="generation")
        self.running[command.id] = task

    def cancel(self, generation_id: int) -> None:
        task = self.running.get(generation_id)
        if task is not None:
            task.cancel()

    async def _run(self, generation_id: int, request: llm_pb2.GenerateRequest) -> None:
        try:
            async with aclosing(self.generate(request)) as events:  # type: ignore[type-var]
                async for event in events:
                    self._send(generation_id, event)
        except Exception:  # a bug of ours: that generation ends with a typed error
            log.exception("generation failed", extra={"request_id": request.request_id})
            error = ServiceError(common_pb2.ERROR_CODE_INTERNAL, "llm_svc failed")
            self._send(generation_id, llm_pb2.GenerateEvent(error=error.to_proto()))
        finally:
            self.running.pop(generation_id, None)
            self.ready.set()  # the writer may be waiting for the last one to end

    def _send(self, generation_id: int, event: llm_pb2.GenerateEvent) -> None:
        self.outbox.append(llm_pb2.TaggedEvent(id=generation_id, event=event))
        self.ready.set()

    async def read(self, commands: AsyncIterable[llm_pb2.GenerateCommand]) -> None:
        try:
            async for command in commands:
                if command.cancel:
                    self.cancel(command.id)
                elif command.HasField("start"):
                    self.start(command)
        finally:
            self.reading = False
            self.ready.set()

    async def write(self, context: Any) -> None:
        while self.reading or self.running or self.outbox:
            await self.ready.wait()
            self.ready.clear()
            if self.outbox:
                batch = llm_pb2.GenerateBatch(events=list(self.outbox))
                self.outbox.clear()
                await context.write(batch)

    async def close(self) -> None:
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _duplicate(generation_id: int) -> llm_pb2.GenerateEvent:
    error = ServiceError(
        common_pb2.ERROR_CODE_INVALID_REQUEST, f"generation {generation_id} is already running"
    )
    return llm_pb2.GenerateEvent(error=error.to_proto())


async def serve_many(
    commands: AsyncIterable[llm_pb2.GenerateCommand], context: Any, generate: Generate
) -> None:
    """Run one GenerateMany call to its end (see the module docstring)."""
    stream = _Stream(generate)
    reader = asyncio.create_task(stream.read(commands), name="generate-many commands")
    try:
        await stream.write(context)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await stream.close()
