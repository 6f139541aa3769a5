"""The WebSocket endpoint: a thin I/O shell around `phoenix` (codec), `channels` (socket state
machine) and `task_channel`.

Connect rules (docs/protocol.md, "Connecting"): path `/socket/websocket`; `vsn` 2.0.x → V2,
1.0.x or missing → V1, else 403; the token comes from the `token` query parameter or the
`base64url.bearer.phx.<token>` subprotocol (answered with `phoenix`); a refused connect is an
HTTP 403 with an empty body, before the upgrade.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import http
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from gateway_svc import metrics as m
from gateway_svc import phoenix, tokens
from gateway_svc.admin import Dashboard, page
from gateway_svc.config import Settings
from gateway_svc.connection import CLOSE_GOING_AWAY, Auth, Connection
from gateway_svc.direct_submit import DirectSubmit
from gateway_svc.limits import ConnectionCounter, RateLimiter
from gateway_svc.routes import Owner, TaskRoutes
from gateway_svc.shared_limits import SharedLimits
from gateway_svc.submits import Submits
from gateway_svc.task_channel import ChannelDeps
from gateway_svc.user_channel import Preferences, UserDeps, UserFeed
from gateway_svc.watches import TaskWatches
from svckit.grpc_server import insecure_channel
from svckit.lifecycle import cancel_and_wait
from svckit.membership import MembershipView
from switchboard.v1 import history_pb2_grpc, tasks_pb2_grpc

log = logging.getLogger(__name__)

SOCKET_PATH = "/socket/websocket"
PHOENIX_SUBPROTOCOL = Subprotocol("phoenix")
AUTH_TOKEN_PREFIX = "base64url.bearer.phx."


class GatewayConnection(ServerConnection):
    """A websockets connection that carries what the handshake established, and releases
    the user's connection slot when the TCP connection is gone, whatever happened before
    (a failed handshake never runs the handler; connection_lost always runs once)."""

    auth: Auth | None = None
    on_lost: Callable[[GatewayConnection], None] | None = None
    sndbuf = 0  # set on the subclass the Gateway makes (GATEWAY_SOCKET_SNDBUF)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.sndbuf > 0:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost(self)


_HANDSHAKE_DONE = Request(SOCKET_PATH, Headers())


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


class Gateway:
    """The WebSocket server. `await start()` binds (`.port`); `await stop()` closes every
    socket with 1001 and waits, bounded by the shutdown grace."""

    def __init__(
        self,
        settings: Settings,
        secret: bytes,
        stub: tasks_pb2_grpc.TaskServiceStub,
        metrics: m.GatewayMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        control: tasks_pb2_grpc.TaskServiceStub | None = None,
        direct: DirectSubmit | None = None,
        membership: MembershipView | None = None,
    ) -> None:
        self.settings = settings
        self._secret = secret
        self.stub = stub
        self.metrics = metrics if metrics is not None else m.GatewayMetrics()
        self.user_connections = ConnectionCounter(settings.gateway_max_connections_per_user)
        # `stub` and `control` reach TASK_SVC_ADDR, asked while the membership (when there is
        # one) names no node for a task (routes.py).
        fallback = Owner(
            settings.task_svc_addr, TaskWatches(stub), Submits(control or stub), control or stub
        )
        self.routes = TaskRoutes(fallback, membership)
        self.dashboard = Dashboard(
            frozenset(u.strip() for u in settings.gateway_admin_users.split(",") if u.strip()),
            self.routes,
            self.metrics,
            settings.llm_svc_addr,
            direct.nc if direct is not None else None,
        )
        self.deps = ChannelDeps(
            self.routes,
            self.metrics,
            RateLimiter(settings.gateway_generate_rate_per_s, settings.gateway_generate_burst),
            settings.gateway_max_prompt_chars,
            settings.gateway_join_timeout_s,
            clock,
            direct,
            self.dashboard,
            self._user_deps(settings, direct),
        )
        # With NATS (the acks' own path has a connection) and a per-user limit to keep, the
        # limits are one budget across every gateway replica (shared_limits.py).
        limited = self.user_connections.limit > 0 or self.deps.generate_limiter.enabled
        self.shared = (
            SharedLimits(direct.nc, self.user_connections, self.deps.generate_limiter)
            if direct is not None and limited
            else None
        )
        self._server: Server | None = None
        self._handlers = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._live: set[Connection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.settings.gateway_host,
            self.settings.gateway_port,
            process_request=self._authenticate,
            select_subprotocol=_select_subprotocol,
            create_connection=type(
                "GatewayConnection",
                (GatewayConnection,),
                {"sndbuf": self.settings.gateway_socket_sndbuf},
            ),
            max_size=self.settings.gateway_max_frame_bytes,
            # The idle sweep (clients heartbeat every 30 s) finds dead peers; websockets'
            # own pings would add a timer and a task per connection.
            ping_interval=None,
            # Frames are small JSON; per-connection deflate state costs ~100 KiB.
            compression=None,
            close_timeout=self.settings.gateway_close_timeout_s,
            # Every client reconnects at once after a deploy: the kernel's default accept
            # queue (100 in asyncio) drops SYNs then, and clients wait seconds to retry.
            backlog=self.settings.gateway_listen_backlog,
            # GATEWAY_REUSE_PORT: other gateway processes may listen on this port too.
            reuse_port=self.settings.gateway_reuse_port,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep_idle(), name="idle sweeper")
        if self.shared is not None:
            await self.shared.start()
        await self.dashboard.start()
        log.info("gateway listening", extra={"host": self.settings.gateway_host, "port": self.port})

    async def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        await cancel_and_wait(self._sweeper)
        if self.shared is not None:
            await self.shared.close()
        server.close(close_connections=True, code=CLOSE_GOING_AWAY, reason="server shutdown")
        try:
            await asyncio.wait_for(server.wait_closed(), self.settings.gateway_shutdown_grace_s)
        except TimeoutError:
            log.warning("sockets still open after the shutdown grace")
        await self.dashboard.close()
        assert self.deps.users is not None
        await self.deps.users.feed.close()
        await self.deps.users.preferences.close()
        await self._history_channel.close()
        await self.routes.close()

    def _user_deps(self, settings: Settings, direct: DirectSubmit | None) -> UserDeps:
        """The user channels' history (persistence_svc), preferences and live feed (NATS,
        from the acks' own connection; without it no `task_updated` pushes)."""
        channel = insecure_channel(settings.history_svc_addr)
        self._history_channel = channel
        return UserDeps(
            history_pb2_grpc.HistoryServiceStub(channel),
            Preferences(history_pb2_grpc.UserServiceStub(channel)),
            UserFeed(direct.nc if direct is not None else None),
            self.routes,
            direct.catalog if direct is not None else None,
        )

    async def _sweep_idle(self) -> None:
        # An idle socket is closed between `idle` and `idle * 1.25` after its last frame; a
        # stuck close is aborted within two close timeouts.
        idle = self.settings.gateway_idle_timeout_s
        interval = min(idle / 4, self.settings.gateway_close_timeout_s)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now, wall = loop.time(), time.time()
            for connection in list(self._live):
                connection.sweep(now, idle, wall)

    async def wait_idle(self) -> None:
        """Wait until no socket is open and no user holds a connection slot (tests, bench)."""
        await self._idle.wait()

    def _check_idle(self) -> None:
        if self._handlers == 0 and not self.user_connections.open:
            self._idle.set()
        else:
            self._idle.clear()

    def _refuse(self, connection: ServerConnection, reason: str, why: str) -> Response:
        self.metrics.refused.labels(reason).inc()
        # Never log the token itself.
        log.info(
            "connect refused",
            extra={"reason": reason, "error": why, "remote": str(connection.remote_address)},
        )
        return connection.respond(http.HTTPStatus.FORBIDDEN, "")

    def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urllib.parse.urlsplit(request.path)
        if url.path != SOCKET_PATH:
            return _static(connection, url.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        vsn = phoenix.parse_vsn(query["vsn"][0] if "vsn" in query else None)
        if vsn is None:
            return self._refuse(connection, m.REFUSED_VSN, "unsupported vsn")
        token = query["token"][0] if query.get("token") else None
        token = token or token_from_subprotocols(request.headers)
        if not token:
            return self._refuse(connection, m.REFUSED_MISSING_TOKEN, "missing token")
        try:
            claims = tokens.verify_claims(token, self._secret)
        except tokens.TokenError as error:
            expired = isinstance(error, tokens.ExpiredToken)
            reason = m.REFUSED_EXPIRED_TOKEN if expired else m.REFUSED_INVALID_TOKEN
            return self._refuse(connection, reason, str(error))
        user = claims.user
        # A 403 before the upgrade, like every refused connect (see limits.py for why).
        elsewhere = self.shared.elsewhere(user) if self.shared is not None else 0
        if not self.user_connections.acquire(user, elsewhere):
            self.metrics.limit(m.LIMIT_CONNECTIONS)
            log.warning("too many connections", extra={"user": user})
            return self._refuse(connection, m.REFUSED_TOO_MANY, "too many connections")
        assert isinstance(connection, GatewayConnection)
        connection.auth = Auth(user, vsn, claims.expires_at)
        connection.on_lost = self._release
        self._idle.clear()
        return None

    def _release(self, connection: GatewayConnection) -> None:
        assert connection.auth is not None
        self.user_connections.release(connection.auth.user)
        self._check_idle()

    async def _handle(self, ws: ServerConnection) -> None:
        assert isinstance(ws, GatewayConnection) and ws.auth is not None
        # Memory per idle socket: the handshake's request and response (two Headers, ~30
        # containers, the token) are kept by websockets for the socket's life but not read
        # after the handshake; only `request is not None` is (it tells frames from the
        # handshake request). Replace both with nothing of this socket's own.
        ws.request, ws.response = _HANDSHAKE_DONE, None
        self._handlers += 1
        self._idle.clear()
        self.metrics.connections.inc()
        self.metrics.connects.inc()
        connection = Connection(ws, ws.auth, self.settings, self.deps)
        if self.deps.users is not None:  # its first llm_generate seldom waits for it then
            self.deps.users.preferences.prefetch(ws.auth.user)
        self._live.add(connection)
        try:
            await connection.run()
        finally:
            self._live.discard(connection)
            self.metrics.connections.dec()
            self.metrics.closes.labels(str(ws.close_code or 1006)).inc()
            self._handlers -= 1
            self._check_idle()


def _static(connection: ServerConnection, path: str) -> Response:
    """The operator dashboard's page and scripts (admin.py), or 404. The page holds no
    data: what it shows comes over the socket, to an admin's token only."""
    found = page(path)
    if found is None:
        return connection.respond(http.HTTPStatus.NOT_FOUND, "")
    body, content_type = found
    response = connection.respond(http.HTTPStatus.OK, "")
    response.body = body
    for name, value in (("Content-Length", str(len(body))), ("Content-Type", content_type)):
        del response.headers[name]  # respond() set them for its empty text body
        response.headers[name] = value
    response.headers["Cache-Control"] = "no-cache"
    return response
