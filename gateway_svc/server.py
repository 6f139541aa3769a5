"""The WebSocket endpoint: a thin I/O shell around `phoenix` (codec), `channels` (socket state
machine) and `task_channel`.

Connect rules (PHOENIX_PROTOCOL.md, "Connecting"): path `/socket/websocket`; `vsn` 2.0.x → V2,
1.0.x or missing → V1, else 403; the token comes from the `token` query parameter or the
`base64url.bearer.phx.<token>` subprotocol (answered with `phoenix`); a refused connect is an
HTTP 403 with an empty body, before the upgrade.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import http
import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from gateway_svc import channels as ch
from gateway_svc import phoenix, tokens
from gateway_svc.config import Settings
from gateway_svc.task_channel import TaskChannel
from gateway_svc.task_payloads import task_id_of
from switchboard.v1 import tasks_pb2_grpc

log = logging.getLogger(__name__)

SOCKET_PATH = "/socket/websocket"
PHOENIX_SUBPROTOCOL = Subprotocol("phoenix")
AUTH_TOKEN_PREFIX = "base64url.bearer.phx."
CLOSE_GOING_AWAY = 1001  # every close after which clients should come back: never 1000
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID = 1007


@dataclass(frozen=True, slots=True)
class Auth:
    user: str
    vsn: phoenix.Vsn


class GatewayConnection(ServerConnection):
    """A websockets connection that carries what the handshake established."""

    auth: Auth | None = None


@dataclass
class Stats:
    connections: int = 0
    refused: int = 0
    bad_frames: int = 0


def token_from_subprotocols(headers: Headers) -> str | None:
    """The token of a `base64url.bearer.phx.<b64>` subprotocol. phoenix.js encodes it with
    btoa (standard alphabet, padding stripped); the URL-safe alphabet is accepted too."""
    for header in headers.get_all("Sec-WebSocket-Protocol"):
        for offered in header.split(","):
            value = offered.strip()
            if value.startswith(AUTH_TOKEN_PREFIX):
                encoded = value[len(AUTH_TOKEN_PREFIX) :]
                encoded = encoded.replace("-", "+").replace("_", "/")
                try:
                    raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
                    return raw.decode()
                except (binascii.Error, UnicodeDecodeError):
                    return None
    return None


def _select_subprotocol(connection: ServerConnection, offered: Any) -> Subprotocol | None:
    # phoenix.js aborts unless the server answers `phoenix` when it offered it.
    return PHOENIX_SUBPROTOCOL if PHOENIX_SUBPROTOCOL in offered else None


class Connection:
    """One socket: reads frames strictly in order and carries out the state machine's
    actions. Owns its channels, and closes them when the socket ends."""

    def __init__(
        self,
        ws: ServerConnection,
        auth: Auth,
        settings: Settings,
        stub: tasks_pb2_grpc.TaskServiceStub,
        stats: Stats,
    ) -> None:
        self.ws = ws
        self.user = auth.user
        self.vsn = auth.vsn
        self.settings = settings
        self.stub = stub
        self.stats = stats
        self.state = ch.SocketState(
            lambda topic: task_id_of(topic) is not None, settings.gateway_max_channels
        )
        self.channels: dict[str, TaskChannel] = {}

    async def run(self) -> None:
        try:
            await self._read_loop()
        finally:
            await self._close_channels()

    async def _read_loop(self) -> None:
        ws, idle = self.ws, self.settings.gateway_idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(idle):
                    data = await ws.recv()
            except TimeoutError:
                log.info("idle timeout", extra={"user": self.user})
                await ws.close(CLOSE_GOING_AWAY, "idle timeout")
                return
            except ConnectionClosed:
                return
            if isinstance(data, bytes):
                # Phoenix's binary frames carry raw payloads we do not accept.
                self._bad_frame("binary frame")
                await ws.close(CLOSE_UNSUPPORTED, "binary frames are not supported")
                return
            try:
                message = phoenix.decode(data, self.vsn)
            except phoenix.ProtocolError as error:
                self._bad_frame(str(error))
                await ws.close(CLOSE_INVALID, "invalid frame")
                return
            for action in self.state.receive(message):
                await self._act(action)

    def _bad_frame(self, why: str) -> None:
        self.stats.bad_frames += 1
        log.warning("undecodable frame, closing", extra={"user": self.user, "error": why})

    async def send(self, message: phoenix.Message) -> None:
        with contextlib.suppress(ConnectionClosed):
            # The connection's read loop notices the close and cleans up.
            await self.ws.send(phoenix.encode(message, self.vsn), text=True)

    async def _act(self, action: ch.Action) -> None:
        match action:
            case ch.Send(message):
                await self.send(message)
            case ch.Deliver(message):
                channel = self.channels.get(message.topic)
                if channel is not None:
                    channel.deliver(message)
            case ch.StopChannel(topic):
                old = self.channels.pop(topic, None)
                if old is not None:
                    await old.close()
            case ch.StartChannel():
                await self._start(action)

    async def _start(self, start: ch.StartChannel) -> None:
        task_id = task_id_of(start.topic)
        assert task_id is not None  # the state machine only starts topics we handle
        channel = TaskChannel(
            self.stub,
            self.user,
            start.topic,
            task_id,
            start.join_ref,
            self.send,
            self._crashed,
            self.settings.gateway_join_timeout_s,
        )
        try:
            ok, response = await channel.join(start.params)
        except BaseException:
            await channel.close()  # releases the Watch call
            raise
        if ok:
            self.channels[start.topic] = channel
        for action in self.state.join_finished(start, ok, response):
            await self._act(action)
        if ok:
            channel.start()
        else:
            await channel.close()

    async def _crashed(self, channel: TaskChannel) -> None:
        if self.channels.get(channel.topic) is channel:
            del self.channels[channel.topic]
            for action in self.state.channel_crashed(channel.topic, channel.join_ref):
                await self._act(action)
        await channel.close()

    async def _close_channels(self) -> None:
        live = list(self.channels.values())
        self.channels.clear()
        await asyncio.gather(*(c.close() for c in live))


class Gateway:
    """The WebSocket server. `await start()` binds (`.port`); `await stop()` closes every
    socket with 1001 and waits, bounded by the shutdown grace."""

    def __init__(
        self, settings: Settings, secret: bytes, stub: tasks_pb2_grpc.TaskServiceStub
    ) -> None:
        self.settings = settings
        self._secret = secret
        self.stub = stub
        self.stats = Stats()
        self._server: Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.settings.gateway_host,
            self.settings.gateway_port,
            process_request=self._authenticate,
            select_subprotocol=_select_subprotocol,
            create_connection=GatewayConnection,
            max_size=self.settings.gateway_max_frame_bytes,
            # The idle timeout (clients heartbeat every 30 s) finds dead peers; websockets'
            # own pings would add a timer and a task per connection.
            ping_interval=None,
            # Frames are small JSON; per-connection deflate state costs ~100 KiB.
            compression=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("gateway listening", extra={"host": self.settings.gateway_host, "port": self.port})

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close(close_connections=True, code=CLOSE_GOING_AWAY, reason="server shutdown")
        try:
            await asyncio.wait_for(server.wait_closed(), self.settings.gateway_shutdown_grace_s)
        except TimeoutError:
            log.warning("sockets still open after the shutdown grace")

    def _refuse(self, connection: ServerConnection, why: str) -> Response:
        self.stats.refused += 1
        # Never log the token itself.
        log.info("connect refused", extra={"reason": why, "remote": str(connection.remote_address)})
        return connection.respond(http.HTTPStatus.FORBIDDEN, "")

    def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urllib.parse.urlsplit(request.path)
        if url.path != SOCKET_PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "")
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        vsn = phoenix.parse_vsn(query["vsn"][0] if "vsn" in query else None)
        if vsn is None:
            return self._refuse(connection, "unsupported vsn")
        token = query["token"][0] if query.get("token") else None
        token = token or token_from_subprotocols(request.headers)
        if not token:
            return self._refuse(connection, "missing token")
        try:
            user = tokens.verify(token, self._secret)
        except tokens.TokenError as error:
            return self._refuse(connection, str(error))
        assert isinstance(connection, GatewayConnection)
        connection.auth = Auth(user, vsn)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, GatewayConnection) and ws.auth is not None
        self.stats.connections += 1
        try:
            await Connection(ws, ws.auth, self.settings, self.stub, self.stats).run()
        finally:
            self.stats.connections -= 1
