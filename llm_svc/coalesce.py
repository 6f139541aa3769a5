"""Coalescing a generation's stream at the source: fewer, larger events on every hop.

A provider streams a delta per token (tens per second). Every event then costs a gRPC message
to task_svc, a mailbox step, a gRPC message to the gateway and a socket frame, so llm_svc
merges what arrives close together before it leaves the process:

- the first delta goes out at once (time to first token is never held back), and so does any
  delta arriving a window (`Window`) or more after the previous event went out;
- deltas arriving sooner are held and leave together, as one `delta` whose text is theirs
  joined, when the window since the last event has passed (a timer, so a provider that
  stalls does not hold text back), or at once when the stream ends;
- progress rides in the delta (`TextDelta.progress`, the latest value); a progress with no
  text to ride on is held the same way;
- `final`, `error` and a handover to the next model (`fallback_model`) are never held: what
  is held goes out first, then them.

Text is never lost or reordered: the deltas out, joined, are the deltas in, joined.

Under load the window widens (`Window`): every event costs the same CPU downstream (a gRPC
message, a mailbox step, a socket frame) whatever its size, so the events of all the streams
open together are held to a budget, `events_per_s`, with each stream's window at least
`streams / events_per_s` (at most `max_s`). A few streams are not affected; many get larger
chunks less often rather than the whole pipeline falling behind them: with 300 streams of
50 tokens a second on two cores, a 100 ms window in place of 50 ms cut the CPU of a
generation by a fifth, end to end, and raised throughput by a quarter.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from svckit.inbox import Inbox
from switchboard.v1 import llm_pb2

Event = llm_pb2.GenerateEvent


@dataclass
class Window:
    """How long deltas are held after an event went out: `base_s`, widened while many
    streams are open (see the module docstring); `events_per_s` 0 keeps it at `base_s`, and
    `base_s` 0 sends every delta alone.
    One per process, shared by every stream `coalesce` runs with it."""

    base_s: float
    events_per_s: float = 0.0
    max_s: float = 0.25
    streams: int = 0  # open now

    def seconds(self) -> float:
        if self.events_per_s <= 0:
            return self.base_s
        return min(max(self.base_s, self.streams / self.events_per_s), max(self.max_s, self.base_s))

    @property
    def holds(self) -> bool:
        return self.base_s > 0  # 0: every delta alone, whatever the load


class _Held:
    """What waits for the window to close."""

    __slots__ = ("parts", "progress")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.progress: llm_pb2.GenerationProgress | None = None

    def __bool__(self) -> bool:
        return bool(self.parts) or self.progress is not None

    def add(self, event: Event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "delta":
            self.parts.append(event.delta.text)
            if event.delta.HasField("progress"):
                self.progress = event.delta.progress
        elif kind == "progress":
            self.progress = event.progress

    def take(self) -> Event:
        if self.parts:
            event = Event()
            event.delta.text = "".join(self.parts)  # in place: a constructor would copy it
            if self.progress is not None:
                event.delta.progress.CopyFrom(self.progress)
        else:
            assert self.progress is not None
            event = Event(progress=self.progress)
        self.parts, self.progress = [], None
        return event


def _handover(event: Event) -> bool:
    return event.WhichOneof("kind") == "progress" and bool(event.progress.fallback_model)


async def coalesce(
    events: AsyncIterator[Event],
    window: Window,
    clock: Callable[[], float] | None = None,
) -> AsyncGenerator[Event, None]:
    """`events` with deltas and progress merged per the module docstring. Closing the result
    (or cancelling its consumer) stops reading `events` and closes it."""
    if not window.holds:
        async for event in events:
            yield event
        return
    loop = asyncio.get_running_loop()
    now = clock or loop.time
    out: Inbox[Event | BaseException | None] = Inbox()
    held = _Held()
    last_sent = -math.inf
    timer: asyncio.TimerHandle | None = None

    def flush() -> None:
        nonlocal timer, last_sent
        timer = None
        if held:
            out.put(held.take())
            last_sent = now()

    async def pump() -> None:
        nonlocal timer
        try:
            async for event in events:
                kind = event.WhichOneof("kind")
                if kind not in ("delta", "progress") or _handover(event):
                    if timer is not None:
                        timer.cancel()
                    flush()
                    out.put(event)
                    continue
                held.add(event)
                if timer is None:
                    wait = last_sent + window.seconds() - now()
                    if wait <= 0:
                        flush()
                    else:
                        timer = loop.call_later(wait, flush)
            if timer is not None:
                timer.cancel()
            flush()
            out.put(None)
        except Exception as error:  # re-raised by the consumer, in its own task
            out.put(error)

    reader = asyncio.create_task(pump(), name="coalesce")
    window.streams += 1
    try:
        while True:
            item = await out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        window.streams -= 1
        if timer is not None:
            timer.cancel()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
