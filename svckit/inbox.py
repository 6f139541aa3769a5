"""`Inbox`: the queue of one reader, on the hot paths (a multiplexed call's items, a
multiplexed stream's commands, a watcher's events, a coalesced stream's output).

asyncio.Queue serves any number of readers and writers, and pays for it on every item: task
accounting (an Event cleared on every put), a deque of waiting getters, and, on every wait, a
lookup of the running loop, which on Python 3.11 is a getpid() system call. Under the paced
load (300 streams) that lookup alone was 10 % of task_svc's and llm_svc's CPU and 6 % of the
gateway's (py-spy, most of it from these queues). An Inbox has one reader, so it needs one
waiter, and it is bound to the loop it was made on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    """Items in the order put; `get` waits for one. A second reader waiting at once is a bug
    (RuntimeError). `maxsize` is advisory: `put` never refuses, callers check `full()`."""

    __slots__ = ("_items", "_loop", "_waiter", "maxsize")

    def __init__(self, maxsize: int = 0) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.maxsize = maxsize

    def __len__(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def put(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> T:
        """The first item, once there is one."""
        while not self._items:
            await self._wait()
        return self._items.popleft()

    async def get_all(self) -> list[T]:
        """Every item there is, once there is one."""
        while not self._items:
            await self._wait()
        items = list(self._items)
        self._items.clear()
        return items

    async def _wait(self) -> None:
        if self._waiter is not None:
            raise RuntimeError("an Inbox has one reader")
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            if self._waiter is waiter:  # cancelled: nothing woke it
                self._waiter = None
