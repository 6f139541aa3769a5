"""task_svc's side of LlmService.GenerateMany: one gRPC stream to llm_svc carries every
running generation (llm_svc/multiplex.py is the other side).

`generate(request)` reads like a call of its own: an async iterator of that generation's
events, ending with its `final` or `error`. Closing it early (the worker was cancelled: a
user's Cancel, shutdown) sends `cancel` for it, and llm_svc aborts the provider request.
When the stream breaks (llm_svc restarted, the network), every generation on it fails with
the typed error of the break, and the next `generate` opens a new stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from svckit.errors import ServiceError
from svckit.lifecycle import cancel_and_wait
from switchboard.v1 import common_pb2, llm_pb2, llm_pb2_grpc

log = logging.getLogger(__name__)

Item = llm_pb2.GenerateEvent | ServiceError


class _Link:
    """One GenerateMany call, with the queues of the generations it carries."""

    def __init__(self, stub: llm_pb2_grpc.LlmServiceStub) -> None:
        self.call: Any = stub.GenerateMany()
        self.commands: asyncio.Queue[llm_pb2.GenerateCommand] = asyncio.Queue()
        self.streams: dict[int, asyncio.Queue[Item]] = {}
        self.broken: ServiceError | None = None
        self._writer = asyncio.create_task(self._write(), name="llm commands")
        self._reader = asyncio.create_task(self._read(), name="llm events")

    async def _write(self) -> None:
        try:
            while True:
                await self.call.write(await self.commands.get())
        except grpc.aio.AioRpcError as error:
            self._break(ServiceError.from_rpc_error(error))
        except asyncio.InvalidStateError:  # the call ended; the reader reports why
            pass

    async def _read(self) -> None:
        try:
            while True:
                batch = await self.call.read()
                if batch is grpc.aio.EOF:
                    raise ServiceError(common_pb2.ERROR_CODE_NETWORK, "llm_svc ended the stream")
                for tagged in batch.events:
                    queue = self.streams.get(tagged.id)
                    if queue is not None:
                        queue.put_nowait(tagged.event)
        except grpc.aio.AioRpcError as error:
            self._break(ServiceError.from_rpc_error(error))
        except ServiceError as error:
            self._break(error)

    def _break(self, error: ServiceError, *, closing: bool = False) -> None:
        if self.broken is not None:
            return
        self.broken = error
        if not closing:
            log.warning(
                "llm_svc stream broke", extra={"code": error.reason, "error": error.message}
            )
        for queue in self.streams.values():
            queue.put_nowait(error)
        self.streams.clear()
        self.call.cancel()

    async def close(self) -> None:
        closed = ServiceError(common_pb2.ERROR_CODE_NETWORK, "the llm_svc stream was closed")
        self._break(closed, closing=True)
        await cancel_and_wait(self._writer, self._reader)


class LlmClient:
    def __init__(self, stub: llm_pb2_grpc.LlmServiceStub) -> None:
        self.stub = stub
        self._ids = itertools.count(1)
        self._link: _Link | None = None
        self._old: set[_Link] = set()

    def _open(self) -> _Link:
        link = self._link
        if link is None or link.broken is not None:
            if link is not None:
                self._old.add(link)  # closed at shutdown; its tasks have ended by now
            link = self._link = _Link(self.stub)
        return link

    async def generate(
        self, request: llm_pb2.GenerateRequest
    ) -> AsyncGenerator[llm_pb2.GenerateEvent, None]:
        """The events of one generation, up to and including its `final` or `error`; a broken
        stream raises its ServiceError."""
        link = self._open()
        generation_id = next(self._ids)
        queue: asyncio.Queue[Item] = asyncio.Queue()
        link.streams[generation_id] = queue
        link.commands.put_nowait(llm_pb2.GenerateCommand(id=generation_id, start=request))
        ended = False
        try:
            while not ended:
                item = await queue.get()
                if isinstance(item, ServiceError):
                    ended = True
                    raise item
                ended = item.WhichOneof("kind") in ("final", "error")
                yield item
        finally:
            link.streams.pop(generation_id, None)
            if not ended and link.broken is None:
                link.commands.put_nowait(llm_pb2.GenerateCommand(id=generation_id, cancel=True))

    async def close(self) -> None:
        links = [*self._old, *([self._link] if self._link else [])]
        self._link, self._old = None, set()
        for link in links:
            await link.close()
