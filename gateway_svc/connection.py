"""One socket's I/O: frames in strictly in order through the channel state machine, frames
out through a fast path or a bounded outbox, idle and stuck-close detection, slow consumers
closed with 1008. The Gateway (server.py) accepts sockets and runs one `Connection` each.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidState
from websockets.protocol import State

from gateway_svc import channels as ch
from gateway_svc import metrics as m
from gateway_svc import phoenix
from gateway_svc.admin import ADMIN_TOPIC, AdminChannel
from gateway_svc.config import Settings
from gateway_svc.limits import SocketBucket
from gateway_svc.outbox import Outbox, Overflow
from gateway_svc.task_channel import ChannelDeps, TaskChannel
from gateway_svc.task_payloads import coalescable, task_id_of
from gateway_svc.user_channel import UserChannel, user_of
from svckit.lifecycle import cancel_and_wait

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001  # every close after which clients should come back: never 1000
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID = 1007
CLOSE_POLICY = 1008  # slow consumer: the client reconnects and catches up with last_seq
CLOSE_TOO_BIG = 1009  # sent by websockets itself for a frame over max_size (RFC 6455 7.4.1)
# Frames up to this size skip the outbox when nothing waits: well under websockets' write
# limit (32 KiB), so writing one into an empty transport buffer never pauses the writer.
DIRECT_WRITE_MAX = 16 * 1024
# Events of a socket under its own budget (GATEWAY_SOCKET_EVENTS_*); `llm_generate` has the
# user's (GATEWAY_GENERATE_*).
LIMITED_EVENTS = frozenset({"phx_join", "phx_leave", "heartbeat", "cancel"})


@dataclass(frozen=True, slots=True)
class Auth:
    user: str
    vsn: phoenix.Vsn
    expires_at: float = math.inf  # the token's expiry (Unix time): the socket closes then


def _handles_tasks(topic: str) -> bool:
    return task_id_of(topic) is not None


def _handles_every_topic(topic: str) -> bool:
    return task_id_of(topic) is not None or topic == ADMIN_TOPIC or user_of(topic) is not None


class Connection:
    """One socket: reads frames strictly in order and carries out the state machine's
    actions. Owns its channels, and closes them when the socket ends.

    A frame is written at once when nothing is waiting (see `send`); otherwise it joins a
    bounded `Outbox` drained by a writer task that exists only while frames wait. So an idle
    socket costs no task besides websockets' handler and no timer (the Gateway's sweep
    finds idle sockets), and no producer (the read loop, a channel's Watch pump) ever waits
    for a slow client.
    """

    __slots__ = (
        "_closer",
        "_closing",
        "_drained",
        "_events",
        "_flush_soon",
        "_loop",
        "_outbox",
        "_writer",
        "channels",
        "deps",
        "expires_at",
        "last_seen",
        "metrics",
        "settings",
        "state",
        "user",
        "vsn",
        "ws",
    )

    def __init__(
        self, ws: ServerConnection, auth: Auth, settings: Settings, deps: ChannelDeps
    ) -> None:
        self.ws = ws
        self.user = auth.user
        self.vsn = auth.vsn
        self.expires_at = auth.expires_at
        self.settings = settings
        self.deps = deps
        self.metrics = deps.metrics
        handles = _handles_tasks if deps.users is None else _handles_every_topic
        self.state = ch.SocketState(handles, settings.gateway_max_channels)
        self.channels: dict[str, TaskChannel | AdminChannel | UserChannel] = {}
        self._outbox: Outbox | None = None  # allocated while frames wait
        self._drained: asyncio.Event | None = None  # allocated while a channel waits
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closing = False  # no frame is queued any more
        self._flush_soon = False  # frames written directly wait for the end of this iteration
        # Looked up once: on Python 3.11 every lookup of the running loop is a getpid().
        self._loop = asyncio.get_running_loop()
        self.last_seen = self._loop.time()
        self._events = SocketBucket(settings.gateway_socket_events_burst, self.last_seen)

    async def run(self) -> None:
        try:
            await self._read_loop()
        finally:
            self._closing = True
            await self._close_channels()
            if self._closer is not None:
                await asyncio.shield(self._closer)
            await cancel_and_wait(self._writer)

    def sweep(self, now: float, idle: float, wall: float) -> None:
        """Called by the Gateway's sweeper for every socket (one sweep for all sockets costs
        less than a timer re-armed on every frame, and allocates nothing per frame that the
        garbage collector would have to walk).

        - Its token expired (`wall`, Unix time, past it): close with 1008; the client must
          connect again with a fresh token.
        - Nothing received for `idle` seconds: close with 1001.
        - A close handshake the peer started but never finished (it does not close TCP
          after the close frames, RFC 6455 7.1.1): websockets only waits for the peer's
          EOF then, and the read loop with it. `close()` bounds that by the close timeout,
          then aborts the TCP connection.
        """
        if self._closing:
            return
        if self.ws.state is State.CLOSING:
            self._closing = True
            self._closer = asyncio.create_task(self.ws.close(), name="stuck close")
            return
        if wall >= self.expires_at:
            self._closing = True
            log.info("token expired", extra={"user": self.user})
            self.metrics.expired_closes.inc()
            self._closer = asyncio.create_task(
                self.ws.close(CLOSE_POLICY, "token expired"), name="expired close"
            )
            return
        if now - self.last_seen < idle:
            return
        self._closing = True
        log.info("idle timeout", extra={"user": self.user})
        self.metrics.idle_closes.inc()
        self._closer = asyncio.create_task(
            self.ws.close(CLOSE_GOING_AWAY, "idle timeout"), name="idle close"
        )

    async def _read_loop(self) -> None:
        ws, loop = self.ws, self._loop
        while not self._closing:
            try:
                data = await ws.recv()
                self.metrics.frames_in += 1
            except ConnectionClosed as closed:
                if closed.sent is not None and closed.sent.code == CLOSE_TOO_BIG:
                    # websockets refused a frame over max_size (GATEWAY_MAX_FRAME_BYTES).
                    self.metrics.limit(m.LIMIT_FRAME_SIZE)
                    log.info("frame too big, closed with 1009", extra={"user": self.user})
                return
            self.last_seen = loop.time()
            if self._closing:
                return  # closing (slow consumer, idle): later frames are not handled
            if isinstance(data, bytes):
                # Phoenix's binary frames carry raw payloads we do not accept.
                self._bad_frame("binary", "binary frame")
                await ws.close(CLOSE_UNSUPPORTED, "binary frames are not supported")
                return
            try:
                message = phoenix.decode(data, self.vsn)
            except phoenix.ProtocolError as error:
                self._bad_frame("invalid", str(error))
                await ws.close(CLOSE_INVALID, "invalid frame")
                return
            if message.event in LIMITED_EVENTS and await self._refused(message):
                continue
            for action in self.state.receive(message):
                await self._act(action)

    async def _refused(self, message: phoenix.Message) -> bool:
        """Whether the socket's event budget refused `message` (it got its error reply)."""
        settings = self.settings
        wait_ms = self._events.take(
            self.last_seen,
            settings.gateway_socket_events_per_s,
            settings.gateway_socket_events_burst,
        )
        if not wait_ms:
            return False
        self.metrics.limit(m.LIMIT_SOCKET_EVENTS)
        limited = {
            "reason": "rate_limited",
            "message": f"too many events on this socket; retry in {wait_ms} ms",
            "retry_after_ms": wait_ms,
        }
        reply = phoenix.reply(message.join_ref, message.ref, message.topic, "error", limited)
        await self.send(reply)
        return True

    def _bad_frame(self, kind: str, why: str) -> None:
        self.metrics.bad_frames.labels(kind).inc()
        log.warning("undecodable frame, closing", extra={"user": self.user, "error": why})

    # -- output -----------------------------------------------------------------------------

    async def send(self, message: phoenix.Message) -> None:
        """Send or queue one frame; never waits for the client (the channels' SendFn).

        Fast path, the common case: nothing is queued, the transport's buffer is empty and the
        frame is small, so it is framed at once (websockets' sans-I/O protocol) and written
        with the others of this loop iteration (`_flush`), a reply at once; nothing can wait
        on drain (the buffer stays under the write limit). No task, no queue. Otherwise the
        frame joins the outbox behind the others."""
        if self._closing:
            return
        self.metrics.frames_out += 1
        data = phoenix.encode(message, self.vsn)
        if (
            self._writer is None
            and self._outbox is None
            and len(data) <= DIRECT_WRITE_MAX
            and self.ws.transport.get_write_buffer_size() == 0
        ):
            try:
                self.ws.protocol.send_text(data)
            except InvalidState:
                self._closing = True  # the read loop notices the close and cleans up
                return
            if message.ref is not None:
                # A reply (an llm_generate's ack among them) leaves now, with whatever was
                # framed before it: it does not wait for the rest of this loop iteration.
                self._write_framed()
            elif not self._flush_soon:
                self._flush_soon = True
                self._loop.call_soon(self._flush)
            return
        self._enqueue(message, data)

    def _flush(self) -> None:
        """Write every frame framed directly during this loop iteration at once: a task's
        events often arrive together (one batch from task_svc), and one write is one system
        call, where websockets' own send makes one per frame."""
        self._flush_soon = False
        self._write_framed()

    def _write_framed(self) -> None:
        chunks = self.ws.protocol.data_to_send()
        if all(chunks):
            if chunks and not self.ws.transport.is_closing():
                self.ws.transport.write(b"".join(chunks))
            return
        for chunk in chunks:  # an end of stream (a close) framed meanwhile: keep its order
            if chunk:
                self.ws.transport.write(chunk)
            elif self.ws.transport.can_write_eof():
                self.ws.transport.write_eof()

    def _enqueue(self, message: phoenix.Message, data: bytes) -> None:
        # Only pushes (ref null) of non-terminal progress are coalesced, per channel.
        key = (
            message.topic
            if message.ref is None and coalescable(message.event, message.payload)
            else None
        )
        box = self._outbox
        if box is None:
            box = self._outbox = Outbox(
                self.settings.gateway_outbound_max_frames, self.settings.gateway_outbound_max_bytes
            )
        try:
            if box.put(data, key):
                self.metrics.coalesced.inc()
        except Overflow as overflow:
            self._slow_consumer(str(overflow))
            return
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(box), name="socket writer")

    async def writable(self) -> None:
        """Wait while the outbox is half full: a channel calls this before reading its next
        event, so a client catching up on a backlog paces the Watch stream (and, through
        gRPC flow control, task_svc) instead of overflowing the queue. A client that does
        not drain within GATEWAY_SLOW_CONSUMER_S is a slow consumer: closed with 1008."""
        if not self._must_wait():
            return  # the common case, once per pushed event: no timer, no event
        try:
            async with asyncio.timeout(self.settings.gateway_slow_consumer_s):
                while self._must_wait():
                    if self._drained is None:
                        self._drained = asyncio.Event()
                    self._drained.clear()
                    await self._drained.wait()
        except TimeoutError:
            if not self._closing:
                self._slow_consumer("outbound queue not drained in time")

    def _must_wait(self) -> bool:
        box = self._outbox
        return box is not None and box.half_full() and not self._closing

    async def _write(self, box: Outbox) -> None:
        try:
            while (data := box.pop()) is not None:
                if self._drained is not None:
                    self._drained.set()  # waiting channels re-check the queue
                # Waits while the transport is over its write limit (a slow client).
                await self.ws.send(data, text=True)
        except ConnectionClosed:
            # The read loop notices the close and cleans up.
            self._closing = True
            box.clear()
        finally:
            self._writer = None
            if self._outbox is box and not box:
                self._outbox = None
            if self._drained is not None:
                self._drained.set()
                self._drained = None

    def _slow_consumer(self, why: str) -> None:
        self._closing = True
        if self._outbox is not None:
            self._outbox.clear()
        self.metrics.limit(m.LIMIT_OUTBOUND_QUEUE)
        self.metrics.slow_consumer_closes.inc()
        log.warning("slow consumer, closing with 1008", extra={"user": self.user, "queue": why})
        self._closer = asyncio.create_task(self._close_slow(), name="slow consumer close")

    async def _close_slow(self) -> None:
        # Stop the channels first (their Watch streams and pumps), then close: the close
        # frame goes out after what the transport already holds.
        await cancel_and_wait(self._writer)
        await self._close_channels()
        await self.ws.close(CLOSE_POLICY, "slow consumer")

    # -- actions ----------------------------------------------------------------------------

    async def _act(self, action: ch.Action) -> None:
        match action:
            case ch.Send(message):
                await self.send(message)
            case ch.Deliver(message):
                channel = self.channels.get(message.topic)
                if channel is not None:
                    channel.deliver(message)
            case ch.StopChannel(topic):
                old = self._pop_channel(topic)
                if old is not None:
                    await old.close()
            case ch.StartChannel():
                await self._start(action)
            case ch.LimitHit(limit):
                self.metrics.limit(limit)

    def _pop_channel(self, topic: str) -> TaskChannel | AdminChannel | UserChannel | None:
        channel = self.channels.pop(topic, None)
        if channel is not None:
            self.metrics.channels.dec()
        return channel

    def _channel(self, start: ch.StartChannel) -> TaskChannel | AdminChannel | UserChannel:
        if start.topic == ADMIN_TOPIC and self.deps.dashboard is not None:
            dashboard = self.deps.dashboard
            return AdminChannel(dashboard, self.user, start.topic, start.join_ref, self.send)
        if user_of(start.topic) is not None and self.deps.users is not None:
            return UserChannel(self.deps.users, self.user, start.topic, start.join_ref, self.send)
        task_id = task_id_of(start.topic)
        assert task_id is not None  # the state machine only starts topics we handle
        return TaskChannel(
            self.deps,
            self.user,
            start.topic,
            task_id,
            start.join_ref,
            self.send,
            self._crashed,
            self.writable,
        )

    async def _start(self, start: ch.StartChannel) -> None:
        channel = self._channel(start)
        try:
            ok, response = await channel.join(start.params)
        except BaseException:
            await channel.close()  # releases the Watch call
            raise
        if ok and self._closing:
            ok = False  # the socket is going away: nothing may outlive it
        if ok:
            self.channels[start.topic] = channel
            self.metrics.channels.inc()
        for action in self.state.join_finished(start, ok, response):
            await self._act(action)
        if ok:
            channel.start()
        else:
            await channel.close()

    async def _crashed(self, channel: TaskChannel) -> None:
        if self.channels.get(channel.topic) is channel:
            self._pop_channel(channel.topic)
            self.metrics.channel_crashes.inc()
            for action in self.state.channel_crashed(channel.topic, channel.join_ref):
                await self._act(action)
        await channel.close()

    async def _close_channels(self) -> None:
        live = list(self.channels.values())
        for channel in live:
            self._pop_channel(channel.topic)
        await asyncio.gather(*(c.close() for c in live))
