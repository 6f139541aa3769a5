"""The gateway's side of TaskService.WatchMany: one gRPC stream to task_svc carries the watch
of every joined channel (svckit/multiplex.py; task_svc/watch_mux.py is the other side).

A `Watch` reads like a Watch call of its own: the task's state first, then its events, then
None once the task has ended. It is paced by its reader: task_svc sends at most `window`
responses ahead of what the channel has read, and the channel reads only while its socket
can take more (connection.py, `writable`), so a slow client slows its own watch and no other.
A watch that fails (refused, or its TaskServer dropped it) raises the typed error; a broken
stream fails every watch on it the same way, and the channels rejoin on a new one.
"""

from __future__ import annotations

from collections.abc import Iterable

from svckit.errors import ServiceError
from svckit.multiplex import MuxCall, MuxClient
from switchboard.v1 import tasks_pb2, tasks_pb2_grpc

Item = tasks_pb2.WatchItem
WINDOW = 64  # responses a watch may be sent ahead of its reader


def _split(batch: tasks_pb2.WatchBatch) -> Iterable[tuple[int, Item]]:
    return ((item.id, item) for item in batch.items)


class Watch:
    def __init__(self, call: MuxCall[Item], request: tasks_pb2.WatchRequest, window: int) -> None:
        self._call = call
        self._window = window
        self._unacked = 0  # read since the last credit sent back
        self._ended = False
        call.send(tasks_pb2.WatchCommand(id=call.id, watch=request, credit=window))

    async def read(self) -> tasks_pb2.WatchResponse | None:
        """The next response; None once the watch has ended. Raises ServiceError."""
        if self._ended:
            return None
        try:
            item = await self._call.get()
        except ServiceError:
            self._end()
            raise
        kind = item.WhichOneof("kind")
        if kind == "response":
            self._unacked += 1
            if self._unacked * 2 >= self._window:
                self._call.send(tasks_pb2.WatchCommand(id=self._call.id, credit=self._unacked))
                self._unacked = 0
            return item.response
        self._end()
        if kind == "error":
            raise ServiceError.from_proto(item.error)
        return None

    def cancel(self) -> None:
        """Stop watching (idempotent)."""
        if not self._ended:
            self._call.send(tasks_pb2.WatchCommand(id=self._call.id, unwatch=True))
            self._end()

    def _end(self) -> None:
        self._ended = True
        self._call.close()


class TaskWatches:
    def __init__(self, stub: tasks_pb2_grpc.TaskServiceStub, window: int = WINDOW) -> None:
        self.mux: MuxClient[Item] = MuxClient(
            stub.WatchMany,
            _split,
            lambda commands: tasks_pb2.WatchCommands(commands=commands),
            "task_svc watches",
        )
        self.window = window

    def open(self, request: tasks_pb2.WatchRequest) -> Watch:
        return Watch(self.mux.call(), request, self.window)

    async def close(self) -> None:
        await self.mux.close()
