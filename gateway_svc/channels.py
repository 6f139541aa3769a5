"""The per-socket channel state machine of Phoenix.Socket, sans I/O.

It decides, for each decoded client `Message`, which frames to send and which effects the I/O
layer must carry out (start a channel and await its join, stop a channel, deliver an event to
a channel). It never awaits anything: the I/O layer calls `receive()` for each frame in order,
performs the returned actions in order, and reports back with `join_finished()` and
`channel_crashed()`. Rules quoted from docs/protocol.md ("Events").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway_svc.phoenix import (
    HEARTBEAT,
    PHOENIX_TOPIC,
    PHX_CLOSE,
    PHX_ERROR,
    PHX_JOIN,
    PHX_LEAVE,
    Message,
    reply,
)

DEFAULT_MAX_CHANNELS = 100  # Phoenix's default per-socket channel limit
LIMIT_CHANNELS = "channels_per_socket"  # the LimitHit of a join over that limit


@dataclass(frozen=True, slots=True)
class Send:
    """Send this frame now, after the frames of earlier actions."""

    message: Message


@dataclass(frozen=True, slots=True)
class StartChannel:
    """Create the channel for `topic` and await its join with `params`, then call
    `join_finished(this, ok, response)` before handling the next frame of the connection."""

    topic: str
    join_ref: str | None
    ref: str | None
    params: dict[str, Any]
    replaced_join_ref: str | None = None  # a duplicate join: phx_close this one after the reply
    replaces: bool = False


@dataclass(frozen=True, slots=True)
class StopChannel:
    """End the channel of `topic` (it sends nothing more)."""

    topic: str
    join_ref: str | None


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand `message` to the channel of its topic (it replies through the I/O layer)."""

    message: Message
    join_ref: str | None  # the channel's own join_ref, for its replies and pushes


@dataclass(frozen=True, slots=True)
class LimitHit:
    """A configured limit refused something (the I/O layer counts it); a Send follows."""

    limit: str


Action = Send | StartChannel | StopChannel | Deliver | LimitHit


def unmatched_topic(message: Message) -> Send:
    # Phoenix's encode_ignore: the reply carries no join_ref.
    return Send(reply(None, message.ref, message.topic, "error", {"reason": "unmatched topic"}))


class SocketState:
    """The joined topics of one socket and their join_refs."""

    def __init__(
        self,
        handles: Callable[[str], bool],
        max_channels: int = DEFAULT_MAX_CHANNELS,
    ) -> None:
        self._handles = handles
        self._max_channels = max_channels
        self.joined: dict[str, str | None] = {}  # topic → join_ref of the live channel

    def receive(self, message: Message) -> list[Action]:
        topic, event = message.topic, message.event
        if topic == PHOENIX_TOPIC and event == HEARTBEAT:
            # Answered whether or not anything is joined.
            return [Send(reply(None, message.ref, PHOENIX_TOPIC, "ok", {}))]
        if event == PHX_JOIN:
            return self._join(message)
        if topic not in self.joined:
            if event == PHX_LEAVE:
                # Leaving a topic that is not joined: ok, and no phx_close.
                return [Send(reply(message.join_ref, message.ref, topic, "ok", {}))]
            return [unmatched_topic(message)]
        join_ref = self.joined[topic]
        if message.join_ref is not None and message.join_ref != join_ref:
            # A frame for an earlier incarnation of this channel: ignored, no reply.
            return []
        if event == PHX_LEAVE:
            del self.joined[topic]
            return [
                StopChannel(topic, join_ref),
                Send(reply(join_ref, message.ref, topic, "ok", {})),
                Send(Message(join_ref, join_ref, topic, PHX_CLOSE, {})),
            ]
        return [Deliver(message, join_ref)]

    def _join(self, message: Message) -> list[Action]:
        topic = message.topic
        if not self._handles(topic):
            return [unmatched_topic(message)]
        actions: list[Action] = []
        replaces = topic in self.joined
        replaced: str | None = None
        if replaces:
            # Duplicate join: the old channel ends first, the new join is replied to, then
            # phx_close goes out for the old join_ref (see join_finished).
            replaced = self.joined.pop(topic)
            actions.append(StopChannel(topic, replaced))
        elif len(self.joined) >= self._max_channels:
            return [
                LimitHit(LIMIT_CHANNELS),
                Send(
                    reply(
                        message.join_ref,
                        message.ref,
                        topic,
                        "error",
                        {"reason": "too many channels joined"},
                    )
                ),
            ]
        actions.append(
            StartChannel(
                topic, message.join_ref, message.ref, message.payload, replaced, replaces=replaces
            )
        )
        return actions

    def join_finished(
        self, start: StartChannel, ok: bool, response: dict[str, Any]
    ) -> list[Action]:
        """The outcome of a `StartChannel`: the join reply, and the phx_close of a replaced
        channel. On success the topic is joined from now on."""
        topic = start.topic
        if ok:
            self.joined[topic] = start.join_ref
        actions: list[Action] = [
            Send(reply(start.join_ref, start.ref, topic, "ok" if ok else "error", response))
        ]
        if start.replaces:
            old = start.replaced_join_ref
            actions.append(Send(Message(old, old, topic, PHX_CLOSE, {})))
        return actions

    def channel_crashed(self, topic: str, join_ref: str | None) -> list[Action]:
        """A live channel failed: forget it and send phx_error, so the client rejoins.
        A report about a channel that is no longer current sends nothing."""
        if topic not in self.joined or self.joined[topic] != join_ref:
            return []
        del self.joined[topic]
        return [Send(Message(join_ref, join_ref, topic, PHX_ERROR, {"reason": "channel_crash"}))]
