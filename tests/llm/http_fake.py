"""A local HTTP/1.1 server that streams server-sent events the way LLM providers do:
one reply per request, played from a script; each provider's module (openai_server,
gemini_server, anthropic_server) gives the framing of its payloads and its error bodies.

A 200 reply is `text/event-stream` in chunked transfer encoding, one HTTP chunk per SSE
event (or per byte, to split lines and UTF-8 sequences). Failure modes a client must
survive: `hang` (stall after the payloads, holding the connection open: a read timeout),
`drop` (close the connection in the middle of the chunked body: a broken stream).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson


@dataclass
class Reply:
    status: int = 200
    payloads: list[Any] = field(default_factory=list)
    done: bool = True  # send the format's end marker, if it has one (OpenAI's [DONE])
    hang: bool = False  # after the payloads, keep the response open until the client leaves
    drop: bool = False  # after the payloads, close the connection mid-body
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # the body of an error reply
    byte_by_byte: bool = False  # one HTTP chunk per byte: splits lines and UTF-8 sequences
    every_s: float = 0.0  # a pause before each payload: a model that takes its time


@dataclass
class Recorded:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # lower-cased names
    body: dict[str, Any]


class FakeSseServer:
    """Plays one `Reply` per request, in order (the last one repeats). Subclasses frame the
    payloads (`frame`), add the end marker (`trailer`), and may refuse a request before
    the script runs (`check`, e.g. a wrong API key)."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies) or [self.default_reply()]
        self.requests: list[Recorded] = []
        self.client_left = asyncio.Event()  # a hanging response saw the client disconnect
        self.streaming = asyncio.Event()  # a hanging response sent its payloads
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    def default_reply(self) -> Reply:
        return Reply()

    def frame(self, payload: Any) -> bytes:
        data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
        return f"data: {data}\n\n".encode()

    def trailer(self, reply: Reply) -> bytes:
        return b""

    def check(self, request: Recorded) -> Reply | None:
        return None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        """Listen on a free port; the base URL clients should be given."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.origin

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Closing the connections ends every handler (its reads see the end of the stream);
        # cancelling them instead makes asyncio log the cancelled connection callbacks.
        for writer in list(self._writers):
            writer.close()
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> FakeSseServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            # Keep-alive: serve requests on this connection until a reply closes it.
            while await self._serve(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; whether the connection stays open for another."""
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        recorded = Recorded(method, path, headers, orjson.loads(body) if body else {})
        self.requests.append(recorded)
        reply = self.check(recorded) or self.replies[min(len(self.requests), len(self.replies)) - 1]
        status_line = f"HTTP/1.1 {reply.status} {_phrase(reply.status)}\r\n"
        extra = "".join(f"{k}: {v}\r\n" for k, v in reply.headers.items())
        if reply.status != 200:
            writer.write(
                f"{status_line}content-type: application/json\r\ncontent-length: "
                f"{len(reply.body)}\r\n{extra}\r\n".encode()
                + reply.body
            )
            await writer.drain()
            return True
        writer.write(
            f"{status_line}content-type: text/event-stream; charset=utf-8\r\n"
            f"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n{extra}\r\n".encode()
        )
        for payload in reply.payloads:
            if reply.every_s:
                await asyncio.sleep(reply.every_s)
            event = self.frame(payload)
            if reply.byte_by_byte:
                for index in range(len(event)):
                    await self._chunk(writer, event[index : index + 1])
            else:
                await self._chunk(writer, event)
        if reply.hang:
            self.streaming.set()
            await reader.read()  # b"" once the client closed the connection
            self.client_left.set()
            return False
        if reply.drop:
            # Half an SSE event, then the connection goes: no terminating 0-chunk.
            await self._chunk(writer, b'data: {"trunc')
            return False
        if reply.done and (trailer := self.trailer(reply)):
            await self._chunk(writer, trailer)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Overloaded" if status == 529 else "Unknown"  # 529: Anthropic's own status
