"""A NATS connection of its own for the acks' JetStream publishes, whose PubAck resolves the
waiting publish in the read callback itself.

Through nats-py a publish and its PubAck cost four turns of the event loop besides the round
trip (the flusher task writes it; the read task parses the answer, a subscription task hands
it over, the publisher resumes), and under load every turn waits behind a whole loop
iteration: on the gateway, every stream's pushes. Here the publish is written at once and the
answer wakes it from `data_received`. Side by side in one paced run (300 streams; the gateway
alternated the two for its acks), publish to PubAck p50/p90/p99 was 4.1/16.3/20.6 ms here
against 9.5/43.4/47.0 through nats-py (and 2.5/16.6/25.0 against 4.4/28.7/37.5, 2.8/12.9/37.3
against 5.9/30.5/51.2 in two more runs).

It speaks only what that needs (svckit/nats_wire.py): CONNECT with the user and password, or
the token, of the URL; one SUB for the replies; HPUB; PING and PONG. A server asking for TLS is
not used (`connected` stays False, and the caller publishes through nats-py). While
disconnected, `publish` refuses at once (NotConnected), and a lost connection fails the
publishes waiting on it: the caller stores the job another way, and JetStream's duplicate
window keeps one copy (the message id). It reconnects by itself, to each server of the URL in
turn, and drops a connection whose server stops answering its pings.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from typing import Any, cast
from urllib.parse import SplitResult, urlsplit

import nats.errors
from nats.js.api import PubAck

from svckit import nats_wire
from svckit.nats import NotConnected, servers_of
from svckit.pubacks import pub_ack_of, time_out

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
RECONNECT_WAIT_S = 0.5  # doubled after each failed attempt, up to RECONNECT_MAX_S
RECONNECT_MAX_S = 4.0
PING_INTERVAL_S = 20.0
MAX_BUFFERED = 1 << 20  # bytes waiting to be sent: past it the connection is not keeping up
REPLY_SID = "1"


class Unsupported(Exception):
    """The server asks for what this connection does not speak (TLS)."""


class DirectPublisher:
    def __init__(self, url: str, name: str, ping_interval_s: float = PING_INTERVAL_S) -> None:
        self._ping_interval_s = ping_interval_s
        self._servers = [urlsplit(server) for server in servers_of(url)]
        self._name = name
        self._prefix = f"_SB_ACK.{secrets.token_hex(8)}."  # the replies' subjects
        self._tokens = itertools.count()
        self._link: _Link | None = None
        self._runner: asyncio.Task[None] | None = None
        self._up: asyncio.Event | None = None

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.ready

    def start(self) -> None:
        self._up = asyncio.Event()
        self._runner = asyncio.create_task(self._run(), name="direct publisher")

    async def wait_connected(self) -> None:
        assert self._up is not None, "start() first"
        await self._up.wait()

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def publish(
        self, subject: str, payload: bytes, *, timeout: float, headers: dict[str, str]
    ) -> PubAck:
        """Publish to JetStream and wait for its PubAck: AckedPublisher.publish's contract."""
        link = self._link
        if link is None or not link.ready or link.buffered() > MAX_BUFFERED:
            raise NotConnected
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[nats_wire.Message] = loop.create_future()
        link.waiting[token] = answer
        timer = loop.call_later(timeout, time_out, answer)
        try:
            link.send(nats_wire.hpub(subject, self._prefix + token, headers, payload))
            message = await answer
        finally:
            timer.cancel()
            link.waiting.pop(token, None)
        return pub_ack_of(message.payload, message.status)

    async def _run(self) -> None:
        assert self._up is not None
        failures = 0
        for server in itertools.cycle(self._servers):
            try:
                link = await self._connect(server)
            except Unsupported as why:
                log.warning("acks publish through nats-py", extra={"why": str(why)})
                return
            except (OSError, TimeoutError) as error:
                # Once per outage, not on every attempt (nats-py logs the outage too).
                level = logging.INFO if failures == 0 else logging.DEBUG
                log.log(level, "acks' nats connection not up", extra={"e": repr(error)})
                await asyncio.sleep(min(RECONNECT_WAIT_S * 2**failures, RECONNECT_MAX_S))
                failures += 1
                continue
            failures = 0
            self._link = link
            self._up.set()
            try:
                await link.run()
            finally:
                self._up.clear()
                self._link = None
                link.close()
            log.warning("acks' nats connection lost; reconnecting")
            await asyncio.sleep(RECONNECT_WAIT_S)

    async def _connect(self, server: SplitResult) -> _Link:
        loop = asyncio.get_running_loop()
        host, port = server.hostname or "127.0.0.1", server.port or 4222
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, link = await loop.create_connection(
                lambda: _Link(self._prefix, self._ping_interval_s), host, port
            )
            try:
                info = await link.info
                if info.get("tls_required"):
                    raise Unsupported(f"{host}:{port} requires TLS")
                link.send(
                    nats_wire.connect(self._options(server))
                    + nats_wire.sub(self._prefix + "*", REPLY_SID)
                    + nats_wire.PING
                )
                await link.handshake  # the PONG: CONNECT and SUB were taken
            except BaseException:
                link.close()
                raise
        link.ready = True
        return link

    def _options(self, server: SplitResult) -> dict[str, Any]:
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "headers": True,
            "no_responders": True,
            "protocol": 1,
            "lang": "python",
            "version": "switchboard",
            "name": self._name,
        }
        # As nats-py reads them (not percent-decoded): both connections present the same.
        if server.username and server.password is not None:
            options["user"], options["pass"] = server.username, server.password
        elif server.username:
            options["auth_token"] = server.username
        return options


class _Link(asyncio.Protocol):
    """One TCP connection to one server: parses what comes and answers what waits."""

    def __init__(self, prefix: str, ping_interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        self.prefix = prefix
        self.ping_interval_s = ping_interval_s
        self.parser = nats_wire.Parser()
        self.waiting: dict[str, asyncio.Future[nats_wire.Message]] = {}
        self.info: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.ready = False
        self.transport: asyncio.Transport | None = None
        self.unanswered_pings = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def data_received(self, data: bytes) -> None:
        try:
            ops = self.parser.feed(data)
        except nats_wire.ProtocolError as error:
            log.warning("acks' nats connection: not NATS", extra={"e": str(error)})
            self.close()
            return
        for op in ops:
            match op:
                case nats_wire.Message(subject=subject):
                    answer = self.waiting.get(subject[len(self.prefix) :])
                    if answer is not None and not answer.done():
                        answer.set_result(op)
                case nats_wire.Ping():
                    self.send(nats_wire.PONG)
                case nats_wire.Pong():
                    self.unanswered_pings = 0
                    _settle(self.handshake, None)
                case nats_wire.Info(options=options):
                    _settle(self.info, options)
                case nats_wire.Err(text=text):
                    log.warning("acks' nats connection: server error", extra={"e": text})
                    _fail(self.handshake, ConnectionError(f"nats: {text}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.ready = False
        lost = ConnectionError("nats: connection lost")
        _fail(self.info, lost)
        _fail(self.handshake, lost)
        _settle(self.lost, None)
        for answer in self.waiting.values():
            _fail(answer, nats.errors.ConnectionClosedError())

    async def run(self) -> None:
        """Until the connection is lost, or its server stops answering pings."""
        while True:
            try:
                async with asyncio.timeout(self.ping_interval_s):
                    await asyncio.shield(self.lost)
                return
            except TimeoutError:
                if self.unanswered_pings >= 2:
                    log.warning("acks' nats connection: no PONG, dropped")
                    self.close()
                    await self.lost
                    return
                self.unanswered_pings += 1
                self.send(nats_wire.PING)

    def close(self) -> None:
        self.ready = False
        if self.transport is not None:
            self.transport.close()


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: nobody may be waiting for it any more
