"""How long a provider may keep a generation waiting (catalogue `Pacing`, per model):

- `first_token_s`: from the request to the first event of the stream;
- `idle_s`: between two events (keep-alive pings are not events: a stream that only pings
  stalls all the same);
- `deadline_s`: the whole generation, every retry and fallback included.

A stall (first token or idle gap) is a retryable TIMEOUT of the provider, so the generation
retries or falls back, in seconds rather than after a socket read timeout. The deadline is
final: `DeadlinePassed`, not retried, and closing the stream aborts the upstream request.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from llm_svc.providers.base import ProviderError
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode
T = TypeVar("T")


@dataclass(frozen=True)
class Pacing:
    first_token_s: float = 30.0  # reasoning models think before their first token
    idle_s: float = 10.0
    deadline_s: float = 600.0


class DeadlinePassed(ServiceError):
    def __init__(self, deadline_s: float) -> None:
        super().__init__(
            Code.ERROR_CODE_TIMEOUT,
            f"the generation took longer than its deadline of {deadline_s:g}s",
            retryable=False,
        )


class _Watch:
    """The timer of one paced stream. An `asyncio.timeout` per event made and cancelled a
    timer for every token (7.5 us, five times the rest of the wait: 11 % of a core at 300
    streams of 50 tokens a second); this one is armed once and, when it fires early (an
    event came meanwhile), armed again for the new due time. Per event it costs a clock read.

    While the stream is awaited, `due` is when the wait ends; while the consumer has the
    event, `due` is infinite: the consumer's time is not the provider's."""

    __slots__ = ("cancelling", "deadline_at", "due", "fired", "loop", "task", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline_at: float) -> None:
        self.loop = loop
        self.deadline_at = deadline_at
        self.due = math.inf
        self.fired = False
        self.task: asyncio.Task[Any] | None = None
        self.cancelling = 0
        self.timer: asyncio.TimerHandle | None = None

    def waiting(self, wait_s: float) -> None:
        self.due = min(self.loop.time() + wait_s, self.deadline_at)
        self.task = task = asyncio.current_task(self.loop)  # the loop given: no lookup
        assert task is not None
        self.cancelling = task.cancelling()
        if self.timer is None or self.timer.when() > self.due:
            self.arm()

    def arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(self.due, self._check)

    def _check(self) -> None:
        self.timer = None
        if self.due == math.inf:
            return  # the consumer has the event; the next wait arms the timer again
        if self.loop.time() < self.due:
            self.arm()  # an event came since this was armed
            return
        assert self.task is not None
        self.fired = True
        self.task.cancel()

    def timed_out(self) -> bool:
        """Whether the CancelledError being handled is this timer's (not the caller's)."""
        assert self.task is not None
        return self.fired and self.task.uncancel() <= self.cancelling

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def paced(
    events: AsyncIterator[T], provider: str, pacing: Pacing, deadline_at: float
) -> AsyncGenerator[T, None]:
    """`events`, failing when the next one is late (see the module docstring); `deadline_at`
    is in the event loop's clock."""
    watch = _Watch(asyncio.get_running_loop(), deadline_at)
    wait_s, what = pacing.first_token_s, "no first token"
    try:
        while True:
            watch.waiting(wait_s)
            try:
                event = await anext(events)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not watch.timed_out():
                    raise
                if watch.due >= deadline_at:
                    raise DeadlinePassed(pacing.deadline_s) from None
                raise ProviderError(
                    provider, Code.ERROR_CODE_TIMEOUT, f"{what} within {wait_s:g}s", retryable=True
                ) from None
            finally:
                watch.due = math.inf
            yield event
            wait_s, what = pacing.idle_s, "no token"
    finally:
        watch.close()
