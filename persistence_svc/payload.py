"""Protobuf messages to the JSON the audit trail stores (task_events.payload), cheaply.

The stored form is the proto3 JSON mapping with the .proto field names, read back by
json_format.ParseDict (rows.to_lifecycle_event), so rows written earlier by MessageToDict read
the same. It differs from MessageToDict's output only where ParseDict accepts both forms:
64-bit integers stay JSON numbers instead of strings.

MessageToDict walks the descriptor again for every message; here each message type gets a
table of its fields once (name and converter per field descriptor) and a message costs one
`ListFields()` (which also gives exact field presence) and a dict lookup per set field: about
a fifth of the time, on the consumer's hot path. Message types this table cannot express
(repeated or map fields, well-known types other than Timestamp) fall back to MessageToDict.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

Converter = Callable[[Any], Any] | None  # None: the value is its own JSON
FieldTable = dict[FieldDescriptor, tuple[str, Converter]]
# What `Message.DESCRIPTOR` is typed as (the upb runtime's class, or the pure-Python one).
AnyDescriptor = Descriptor | Any

_EPOCH = datetime(1970, 1, 1)
_TIMESTAMP = "google.protobuf.Timestamp"
# A type's table, or None when it falls back to MessageToDict.
_tables: dict[str, FieldTable | None] = {}


def to_json(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping of `message` as a dict (field names as in the .proto)."""
    table = _table(message.DESCRIPTOR)
    if table is None:
        return MessageToDict(message, preserving_proto_field_name=True)
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        name, convert = table[field]
        out[name] = value if convert is None else convert(value)
    return out


def timestamp_json(value: Any) -> str:
    """Timestamp.ToJsonString(), exactly (0, 3, 6 or 9 fraction digits), without its checks:
    a Timestamp that reached us out of range was refused by events.parse_event already."""
    nanos = value.nanos
    text = (_EPOCH + timedelta(seconds=value.seconds)).isoformat()
    if nanos:
        digits = f"{nanos:09d}"
        if nanos % 1_000_000 == 0:
            digits = digits[:3]
        elif nanos % 1_000 == 0:
            digits = digits[:6]
        text += "." + digits
    return text + "Z"


def _float_json(value: float) -> float | str:
    # JSON has no NaN or infinities; the proto3 mapping spells them as strings.
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _bytes_json(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _enum_json(field: FieldDescriptor) -> Callable[[int], int | str]:
    assert field.enum_type is not None  # an enum field has its type
    names = {value.number: value.name for value in field.enum_type.values}
    # proto3 enums are open: a number this build does not know stays a number.
    return lambda number: names.get(number, number)


def _converter(field: FieldDescriptor) -> Converter:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None  # a message field has its type
        return timestamp_json if field.message_type.full_name == _TIMESTAMP else to_json
    if field.type == FieldDescriptor.TYPE_ENUM:
        return _enum_json(field)
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _float_json
    if field.type == FieldDescriptor.TYPE_BYTES:
        return _bytes_json
    return None


def _expressible(descriptor: AnyDescriptor) -> bool:
    if descriptor.full_name.startswith("google.protobuf."):
        return False  # well-known types have JSON forms of their own
    return not any(field.is_repeated for field in descriptor.fields)


def _table(descriptor: AnyDescriptor) -> FieldTable | None:
    name = descriptor.full_name
    if name not in _tables:
        table: FieldTable | None = None
        if _expressible(descriptor):
            table = {field: (field.name, _converter(field)) for field in descriptor.fields}
        _tables[name] = table
    return _tables[name]
