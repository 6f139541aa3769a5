"""The bounded outbound queue of one socket, sans I/O.

Frames wait here while the socket's transport is over its write limit (a slow or stalled
client). A frame put with a coalescing key replaces the queued frame with the same key: the
older one is removed and the new one goes to the back, so frames still leave in the order
they were produced and a task's `seq` never goes backwards on the wire (a progress push that
is dropped this way just leaves a gap; `progress` carries absolute values, latest wins).
Frames without a key (`chunk`, `llm_response`, `error`, replies, phx_close/phx_error) are
never dropped: when the queue still exceeds its bounds, `put` raises `Overflow` and the socket
is closed with 1008; the client reconnects and catches up with `last_seq`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


class Overflow(Exception):
    """The queue is over its bounds even after coalescing."""


@dataclass(slots=True)
class _Frame:
    data: bytes
    key: str | None


class Outbox:
    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.frames: collections.deque[_Frame] = collections.deque()
        self.bytes = 0
        self._keyed: dict[str, _Frame] = {}

    def __len__(self) -> int:
        return len(self.frames)

    def half_full(self) -> bool:
        """At or over half of either bound: producers that can wait should (see
        Connection.writable), keeping the other half for what cannot wait (replies)."""
        return len(self.frames) * 2 >= self.max_frames or self.bytes * 2 >= self.max_bytes

    def put(self, data: bytes, key: str | None = None) -> bool:
        """Queue `data`; True when it replaced an older frame with the same `key`. Raises
        Overflow when over bounds (a single frame larger than `max_bytes` is let through
        when it is alone, so one large final answer never fails a healthy client)."""
        coalesced = False
        if key is not None:
            older = self._keyed.pop(key, None)
            if older is not None:
                # O(n), with n bounded by max_frames and only while a client is slow.
                self.frames.remove(older)
                self.bytes -= len(older.data)
                coalesced = True
        frame = _Frame(data, key)
        self.frames.append(frame)
        self.bytes += len(data)
        if key is not None:
            self._keyed[key] = frame
        if len(self.frames) > 1 and (
            len(self.frames) > self.max_frames or self.bytes > self.max_bytes
        ):
            raise Overflow(f"{len(self.frames)} frames, {self.bytes} bytes queued")
        return coalesced

    def pop(self) -> bytes | None:
        """The next frame to write, or None when empty."""
        if not self.frames:
            return None
        frame = self.frames.popleft()
        self.bytes -= len(frame.data)
        if frame.key is not None and self._keyed.get(frame.key) is frame:
            del self._keyed[frame.key]
        return frame.data

    def clear(self) -> None:
        self.frames.clear()
        self._keyed.clear()
        self.bytes = 0
