"""A sans-I/O decoder of server-sent events (HTML Living Standard, "9.2 Server-sent events",
section "Interpreting an event stream"): text in, events out, no sockets.

Only what LLM providers use is kept: `data` (multi-line, joined with "\\n"), `event`, `id`;
comments (lines starting with ":") are skipped; `retry` is ignored (we never reconnect a
generation). A line ends with CRLF, LF or CR, which may be split across chunks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SseEvent:
    data: str
    event: str = "message"
    id: str = ""


class SseDecoder:
    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._event = ""
        self._id = ""

    def feed(self, chunk: str) -> list[SseEvent]:
        """Decode one chunk of the stream; the events it completed, in order."""
        self._buffer += chunk
        events: list[SseEvent] = []
        while True:
            end = _line_end(self._buffer)
            if end is None:
                return events
            line, self._buffer = self._buffer[: end[0]], self._buffer[end[1] :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]  # "If value starts with a U+0020 SPACE character, remove it"
        match name:
            case "data":
                self._data.append(value)
            case "event":
                self._event = value
            case "id" if "\0" not in value:
                self._id = value
            case _:
                pass  # "retry" and unknown fields are ignored
        return None

    def _dispatch(self) -> SseEvent | None:
        # "If the data buffer is an empty string, set the data buffer and the event type
        # buffer to the empty string and return": no data field, no event.
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SseEvent("\n".join(data), event or "message", self._id)


def _line_end(buffer: str) -> tuple[int, int] | None:
    """(end of the first line, start of the next), or None while no full line is buffered.
    A trailing CR waits for the next chunk: it may be the first half of a CRLF."""
    cr, lf = buffer.find("\r"), buffer.find("\n")
    if lf != -1 and (cr == -1 or lf < cr):
        return lf, lf + 1
    if cr == -1:
        return None
    if cr + 1 == len(buffer):
        return None
    return cr, cr + (2 if buffer[cr + 1] == "\n" else 1)
