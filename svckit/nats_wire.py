"""The part of the NATS client protocol a JetStream publisher needs, sans I/O: the commands
it sends (CONNECT, SUB, HPUB, PING, PONG) and a parser of what the server sends (INFO, MSG,
HMSG, PING, PONG, +OK, -ERR), fed bytes as they arrive, in any pieces.
https://docs.nats.io/reference/reference-protocols/nats-protocol
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

CRLF = b"\r\n"
PING = b"PING\r\n"
PONG = b"PONG\r\n"
# A header key as NATS takes it (no whitespace, colon or control characters), and a value
# without line breaks: anything else would let a value forge headers or commands.
_HEADER_KEY = re.compile(r"[!-9;-~]+")
_LINE_BREAKS = str.maketrans("", "", "\r\n")
MAX_CONTROL_LINE = 64 * 1024  # far above any real one; past it the peer is not NATS


class ProtocolError(Exception):
    """What the server sent is not the NATS protocol."""


@dataclass(frozen=True, slots=True)
class Info:
    options: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Message:
    subject: str
    sid: str
    reply: str
    headers: bytes  # the raw header block of an HMSG ("NATS/1.0 ...\r\n...\r\n\r\n"), or b""
    payload: bytes

    @property
    def status(self) -> str:
        """The status code of the header block's first line (e.g. "503"), or ""."""
        first = self.headers.split(CRLF, 1)[0].split()
        return first[1].decode() if len(first) > 1 else ""


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Ok:
    pass


@dataclass(frozen=True, slots=True)
class Err:
    text: str


ServerOp = Info | Message | Ping | Pong | Ok | Err


def connect(options: dict[str, Any]) -> bytes:
    return b"CONNECT " + orjson.dumps(options) + CRLF


def sub(subject: str, sid: str) -> bytes:
    return f"SUB {subject} {sid}\r\n".encode()


def hpub(subject: str, reply: str, headers: dict[str, str], payload: bytes) -> bytes:
    lines = ["NATS/1.0"]
    for key, value in headers.items():
        if not _HEADER_KEY.fullmatch(key):
            raise ValueError(f"not a NATS header key: {key!r}")
        lines.append(f"{key}: {value.translate(_LINE_BREAKS)}")
    block = ("\r\n".join(lines) + "\r\n\r\n").encode()
    size = len(block) + len(payload)
    return b"".join(
        (f"HPUB {subject} {reply} {len(block)} {size}\r\n".encode(), block, payload, CRLF)
    )


class Parser:
    """Bytes in, server operations out. `feed` keeps what is incomplete for the next call."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[ServerOp]:
        buffer = self._buffer
        buffer += data
        ops: list[ServerOp] = []
        start = 0
        while True:
            end = buffer.find(CRLF, start)
            if end < 0:
                if len(buffer) - start > MAX_CONTROL_LINE:
                    raise ProtocolError("control line too long")
                break
            line = bytes(buffer[start:end])
            verb = line.split(b" ", 1)[0].upper()
            if verb in (b"MSG", b"HMSG"):
                parsed = _message(verb, line, buffer, end + 2)
                if parsed is None:
                    break  # its payload has not all arrived
                message, start = parsed
                ops.append(message)
                continue
            ops.append(_control(verb, line))
            start = end + 2
        del buffer[:start]
        return ops


def _control(verb: bytes, line: bytes) -> ServerOp:
    if verb == b"PING":
        return Ping()
    if verb == b"PONG":
        return Pong()
    if verb == b"+OK":
        return Ok()
    if verb == b"-ERR":
        return Err(line[4:].strip().strip(b"'").decode(errors="replace"))
    if verb == b"INFO":
        try:
            return Info(orjson.loads(line[5:]))
        except orjson.JSONDecodeError as error:
            raise ProtocolError("unreadable INFO") from error
    raise ProtocolError(f"unknown operation {verb[:16]!r}")


def _message(verb: bytes, line: bytes, buffer: bytearray, body: int) -> tuple[Message, int] | None:
    """The message whose control line is `line` and whose body starts at `body`, and where
    the next operation starts; None while the body is incomplete."""
    parts = line.split()
    try:
        if verb == b"MSG":  # MSG <subject> <sid> [reply] <size>
            header_size, size = 0, int(parts[-1])
            reply = parts[3] if len(parts) == 5 else b""
        else:  # HMSG <subject> <sid> [reply] <header size> <total size>
            header_size, size = int(parts[-2]), int(parts[-1])
            reply = parts[3] if len(parts) == 6 else b""
        subject, sid = parts[1], parts[2]
    except (IndexError, ValueError) as error:
        raise ProtocolError(f"bad {verb.decode()} line") from error
    if not 0 <= header_size <= size:
        raise ProtocolError(f"bad {verb.decode()} sizes")
    end = body + size
    if len(buffer) < end + 2:
        return None
    if buffer[end : end + 2] != CRLF:
        raise ProtocolError(f"{verb.decode()} payload not followed by CRLF")
    message = Message(
        subject.decode(),
        sid.decode(),
        reply.decode(),
        bytes(buffer[body : body + header_size]),
        bytes(buffer[body + header_size : end]),
    )
    return message, end + 2
