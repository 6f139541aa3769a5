"""A small asyncio Phoenix Channels client (V2 JSON), speaking exactly as SwiftPhoenixClient
and phoenix.js do: `<url>/websocket?<params>&vsn=2.0.0`, a heartbeat every 30 s, string refs,
`[join_ref, ref, topic, event, payload]` frames.

    async with await PhoenixClient.connect("ws://127.0.0.1:4000/socket", token=t) as client:
        channel = await client.join(f"task:{uuid4()}")          # JoinRefused on an error reply
        reply = await channel.push("llm_generate", {"prompt": "hi"})
        async for push in channel.messages():                    # progress, chunk, llm_response…
            ...
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from gateway_svc.phoenix import (
    HEARTBEAT,
    PHOENIX_TOPIC,
    PHX_CLOSE,
    PHX_ERROR,
    PHX_JOIN,
    PHX_LEAVE,
    PHX_REPLY,
    Message,
    ProtocolError,
    Vsn,
    decode,
    encode,
)

DEFAULT_TIMEOUT_S = 10.0  # phoenix.js's default push timeout
HEARTBEAT_INTERVAL_S = 30.0


class PhoenixError(Exception):
    pass


class ConnectionLost(PhoenixError):
    """The socket closed; `.code` is the close code when one was received."""

    def __init__(self, code: int | None = None) -> None:
        super().__init__(f"connection closed (code {code})")
        self.code = code


class PushTimeout(PhoenixError):
    pass


@dataclass(frozen=True, slots=True)
class Reply:
    status: str
    response: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class JoinRefused(PhoenixError):
    def __init__(self, topic: str, response: dict[str, Any]) -> None:
        super().__init__(f"join {topic} refused: {response}")
        self.topic = topic
        self.response = response


_CLOSED = object()  # put on channel queues when the socket ends


class Channel:
    """One joined topic. `join_response` is the join reply's response."""

    def __init__(self, client: PhoenixClient, topic: str, join_ref: str) -> None:
        self.client = client
        self.topic = topic
        self.join_ref = join_ref
        self.join_response: dict[str, Any] = {}
        self._queue: asyncio.Queue[Message | object] = asyncio.Queue()

    async def push(
        self, event: str, payload: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> Reply:
        return await self.client.push(self.topic, event, payload, self.join_ref, timeout)

    async def messages(self) -> AsyncIterator[Message]:
        """Server pushes on this channel, in order. Ends after phx_close or phx_error (both
        are yielded); raises ConnectionLost if the socket ends first."""
        while True:
            item = await self._queue.get()
            if not isinstance(item, Message):
                raise ConnectionLost(self.client.close_code)
            yield item
            if item.event in (PHX_CLOSE, PHX_ERROR):
                return

    async def leave(self, timeout: float = DEFAULT_TIMEOUT_S) -> Reply:
        return await self.push(PHX_LEAVE, {}, timeout)


class PhoenixClient:
    """One socket. Create with `await PhoenixClient.connect(...)`; close with `close()` or
    `async with`. All methods must run on the loop that connected."""

    def __init__(self, ws: ClientConnection, heartbeat_interval: float | None) -> None:
        self.ws = ws
        self.close_code: int | None = None
        self._refs = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._channels: dict[str, Channel] = {}  # topic → its latest join
        self._by_join_ref: dict[str, Channel] = {}  # every join not yet closed
        self._reader = asyncio.create_task(self._read(), name="phoenix client reader")
        self._heartbeat: asyncio.Task[None] | None = None
        if heartbeat_interval:
            self._heartbeat = asyncio.create_task(
                self._beat(heartbeat_interval), name="phoenix client heartbeat"
            )

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        token: str | None = None,
        params: dict[str, str] | None = None,
        vsn: str = "2.0.0",
        heartbeat_interval: float | None = HEARTBEAT_INTERVAL_S,
        subprotocols: list[str] | None = None,
        open_timeout: float = DEFAULT_TIMEOUT_S,
    ) -> PhoenixClient:
        """Connect to `url` (`ws://host:port/socket`; `/websocket` is appended as the
        official clients do). `token` goes in the query string; pass `subprotocols` to
        authenticate as phoenix.js's `authToken` does instead. Raises websockets'
        InvalidStatus (e.g. 403) or OSError when the connect fails."""
        query = dict(params or {})
        if token is not None:
            query["token"] = token
        query["vsn"] = vsn
        endpoint = url if url.rstrip("/").endswith("/websocket") else url.rstrip("/") + "/websocket"
        full = f"{endpoint}?{urllib.parse.urlencode(query)}"
        ws = await connect(
            full,
            subprotocols=[Subprotocol(s) for s in subprotocols] if subprotocols else None,
            open_timeout=open_timeout,
            compression=None,
            ping_interval=None,  # the Phoenix heartbeat is the keepalive
        )
        return cls(ws, heartbeat_interval)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def next_ref(self) -> str:
        return str(next(self._refs))

    async def send(self, message: Message) -> None:
        await self.ws.send(encode(message, Vsn.V2), text=True)

    async def push(
        self,
        topic: str,
        event: str,
        payload: dict[str, Any] | None = None,
        join_ref: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        ref: str | None = None,
    ) -> Reply:
        """Send one event and wait for its phx_reply; PushTimeout after `timeout`."""
        ref = ref or self.next_ref()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[ref] = future
        try:
            try:
                await self.send(Message(join_ref, ref, topic, event, payload or {}))
            except ConnectionClosed:
                raise ConnectionLost(self.close_code) from None
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise PushTimeout(f"no reply to {event} on {topic}") from None
        finally:
            self._pending.pop(ref, None)

    async def join(
        self, topic: str, params: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> Channel:
        """Join `topic` (a new join_ref each time, as after a rejoin); JoinRefused when the
        server replies with an error."""
        join_ref = self.next_ref()
        channel = Channel(self, topic, join_ref)
        self._channels[topic] = channel
        self._by_join_ref[join_ref] = channel
        try:
            reply = await self.push(topic, PHX_JOIN, params, join_ref, timeout, ref=join_ref)
        except BaseException:
            self._forget(channel)
            raise
        if not reply.ok:
            self._forget(channel)
            raise JoinRefused(topic, reply.response)
        channel.join_response = reply.response
        return channel

    def _forget(self, channel: Channel) -> None:
        self._by_join_ref.pop(channel.join_ref, None)
        if self._channels.get(channel.topic) is channel:
            del self._channels[channel.topic]

    async def heartbeat(self, timeout: float = DEFAULT_TIMEOUT_S) -> Reply:
        return await self.push(PHOENIX_TOPIC, HEARTBEAT, {}, None, timeout)

    async def close(self, code: int = 1000) -> None:
        tasks = [t for t in (self._heartbeat, self._reader) if t is not None]
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await self.ws.close(code)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_closed(self) -> int | None:
        """Wait until the server closes the socket; returns the close code."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._reader)
        return self.close_code

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                if isinstance(data, bytes):
                    continue  # SwiftPhoenixClient ignores binary frames too
                try:
                    message = decode(data, Vsn.V2)
                except ProtocolError:
                    continue
                self._dispatch(message)
        except ConnectionClosed:
            pass
        finally:
            self.close_code = self.ws.close_code
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionLost(self.close_code))
            for channel in self._by_join_ref.values():
                channel._queue.put_nowait(_CLOSED)

    def _dispatch(self, message: Message) -> None:
        if message.event == PHX_REPLY and message.ref is not None:
            future = self._pending.get(message.ref)
            if future is not None and not future.done():
                payload = message.payload
                response = payload.get("response")
                future.set_result(
                    Reply(
                        str(payload.get("status")), response if isinstance(response, dict) else {}
                    )
                )
            return
        # A push carries the join_ref of the join it belongs to (phoenix.js's isMember);
        # a broadcast (null join_ref) goes to the topic's latest join.
        if message.join_ref is None:
            channel = self._channels.get(message.topic)
        else:
            channel = self._by_join_ref.get(message.join_ref)
        if channel is None or channel.topic != message.topic:
            return
        channel._queue.put_nowait(message)
        if message.event in (PHX_CLOSE, PHX_ERROR):
            self._forget(channel)

    async def _beat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.heartbeat()
            except PushTimeout:
                # phoenix.js closes a socket whose heartbeat went unanswered, then reconnects.
                await self.ws.close(1001, "heartbeat timeout")
                return
            except ConnectionLost:
                return


def auth_token_subprotocols(token: str) -> list[str]:
    """What phoenix.js offers for its `authToken` option: `phoenix` and the token as
    `base64url.bearer.phx.<btoa(token) without padding>`."""
    encoded = base64.b64encode(token.encode()).decode().rstrip("=")
    return ["phoenix", f"base64url.bearer.phx.{encoded}"]
