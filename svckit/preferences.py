"""What a user's stored preferences may hold (history.proto `Preferences`), checked by one
function: persistence_svc's UserService, the authority, refuses anything else, and the
gateway's `set_preferences` runs the same check before it asks, so a socket's error says
exactly what the store would.

Name and email are bounded by their columns (users.name, users.email); `extra` is kept
small, as every join of the user channel reads it back.
"""

from __future__ import annotations

import re

from svckit.requests import InvalidRequest
from switchboard.v1 import history_pb2

MAX_MODEL = 255
MAX_NAME = 255
MAX_EMAIL = 320
MAX_EXTRA_KEYS = 32
MAX_EXTRA_KEY = 64
MAX_EXTRA_VALUE = 1024
# A shape check only (one @, a dot in the domain, no spaces): whether it is the user's
# address is for a confirmation mail to tell, not a pattern.
EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")


def check_preferences(prefs: history_pb2.Preferences) -> None:
    """Raise InvalidRequest, saying what is wrong, unless `prefs` may be stored."""
    for key, limit in (("default_model", MAX_MODEL), ("name", MAX_NAME), ("email", MAX_EMAIL)):
        check_text(getattr(prefs, key), key, limit)
    if prefs.email and not EMAIL_SHAPE.fullmatch(prefs.email):
        raise InvalidRequest("email must look like name@example.com, or be empty to clear it")
    if len(prefs.extra) > MAX_EXTRA_KEYS:
        raise InvalidRequest(f"extra holds at most {MAX_EXTRA_KEYS} keys")
    for key, value in prefs.extra.items():
        if not key:
            raise InvalidRequest("an extra key cannot be empty")
        check_text(key, "an extra key", MAX_EXTRA_KEY)
        check_text(value, f"extra[{key!r}]", MAX_EXTRA_VALUE)


def check_text(value: str, key: str, limit: int) -> None:
    if "\x00" in value:  # PostgreSQL cannot store it in text: refused here, clearly
        raise InvalidRequest(f"{key} cannot hold NUL")
    if len(value) > limit:
        raise InvalidRequest(f"{key} must be at most {limit} characters")
