"""The ListTasks cursor: the opaque, URL-safe encoding of the last row's (created_at, id),
the keyset that the next page continues after (newest first)."""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from persistence_svc.errors import InvalidCursor

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_VERSION = "1"


@dataclass(frozen=True)
class Cursor:
    created_at: datetime
    task_id: uuid.UUID

    def encode(self) -> str:
        micros = (self.created_at - _EPOCH) // timedelta(microseconds=1)
        raw = f"{_VERSION}:{micros}:{self.task_id.hex}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
            version, micros, hex_id = raw.split(":")
            if version != _VERSION:
                raise ValueError(version)
            created_at = _EPOCH + timedelta(microseconds=int(micros))
            return cls(created_at, uuid.UUID(hex=hex_id))
        except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError):
            raise InvalidCursor("not a cursor from this service") from None
