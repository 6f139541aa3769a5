"""The Phoenix Channels JSON serializers (V1 and V2), sans I/O.

Text in, `Message` out; `Message` in, text out. Shapes follow docs/protocol.md (read from
Phoenix 1.8's `Phoenix.Socket.V1.JSONSerializer` / `V2.JSONSerializer`):

- V2: the array `[join_ref, ref, topic, event, payload]`; trailing elements are ignored.
- V1: the object `{"topic", "event", "payload", "ref"}` (+ optional `"join_ref"` from the
  client); server frames carry exactly those four keys.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import orjson

# Event names of the protocol itself (phoenix.js CHANNEL_EVENTS).
PHX_JOIN = "phx_join"
PHX_LEAVE = "phx_leave"
PHX_REPLY = "phx_reply"
PHX_CLOSE = "phx_close"
PHX_ERROR = "phx_error"
HEARTBEAT = "heartbeat"
PHOENIX_TOPIC = "phoenix"


class ProtocolError(ValueError):
    """A frame that is not a Phoenix message; the connection that sent it is closed."""


class Vsn(enum.Enum):
    V1 = "1.0.0"
    V2 = "2.0.0"


def parse_vsn(value: str | None) -> Vsn | None:
    """The serializer for a `vsn` query parameter: 2.0.x → V2; 1.0.x or missing → V1;
    anything else → None (the connect is refused with 403, as Phoenix does)."""
    if value is None:
        return Vsn.V1
    parts = value.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    if parts[:2] == ["2", "0"]:
        return Vsn.V2
    if parts[:2] == ["1", "0"]:
        return Vsn.V1
    return None


@dataclass(frozen=True, slots=True)
class Message:
    join_ref: str | None
    ref: str | None
    topic: str
    event: str
    payload: dict[str, Any] = field(default_factory=dict)


def reply(
    join_ref: str | None, ref: str | None, topic: str, status: str, response: dict[str, Any]
) -> Message:
    """`[join_ref, ref, topic, "phx_reply", {"status", "response"}]`."""
    return Message(join_ref, ref, topic, PHX_REPLY, {"status": status, "response": response})


def _ref(value: object, what: str) -> str | None:
    # Refs are opaque strings. A numeric ref is accepted and turned into its decimal string,
    # because we always echo refs as strings (SwiftPhoenixClient treats a number as no ref).
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ProtocolError(f"{what} must be a string or null")


def _build(join_ref: object, ref: object, topic: object, event: object, payload: object) -> Message:
    if not isinstance(topic, str) or not topic:
        raise ProtocolError("topic must be a non-empty string")
    if not isinstance(event, str) or not event:
        raise ProtocolError("event must be a non-empty string")
    if not isinstance(payload, dict):
        raise ProtocolError("payload must be an object")
    return Message(_ref(join_ref, "join_ref"), _ref(ref, "ref"), topic, event, payload)


def decode(data: str | bytes, vsn: Vsn) -> Message:
    """One client text frame → `Message`; `ProtocolError` for anything else."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise ProtocolError(f"invalid JSON: {error}") from None
    if vsn is Vsn.V2:
        if not isinstance(value, list) or len(value) < 5:
            raise ProtocolError("a V2 frame is an array of 5 elements")
        return _build(*value[:5])
    if not isinstance(value, dict):
        raise ProtocolError("a V1 frame is an object")
    try:
        topic, event, payload = value["topic"], value["event"], value["payload"]
    except KeyError as missing:
        raise ProtocolError(f"a V1 frame needs {missing}") from None
    return _build(value.get("join_ref"), value.get("ref"), topic, event, payload)


def encode(message: Message, vsn: Vsn) -> bytes:
    """`Message` → the UTF-8 JSON of one server text frame."""
    if vsn is Vsn.V2:
        return orjson.dumps(
            [message.join_ref, message.ref, message.topic, message.event, message.payload]
        )
    # V1 server frames have exactly these four keys (V1.JSONSerializer.encode!).
    return orjson.dumps(
        {
            "topic": message.topic,
            "event": message.event,
            "payload": message.payload,
            "ref": message.ref,
        }
    )
