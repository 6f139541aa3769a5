"""The user channel's `set_preferences` with a profile: default_model, name, email and extra,
each optional (one not given keeps what is stored), between a socket and a real UserService
on SQLite. What is set shows in the reply and in the next join, and lands in users.name and
users.email; a bad value is refused with `invalid_request` and changes nothing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from gateway_svc.phoenix_client import PhoenixClient
from persistence_svc import models
from persistence_svc.repository import Repository
from tests.gateway.live import running_stack
from tests.persistence.helpers import served


@contextlib.asynccontextmanager
async def alices_socket(repository: Repository) -> AsyncIterator[PhoenixClient]:
    """alice's socket on a gateway whose history is a real UserService on `repository`."""
    async with (
        served(repository) as history,
        running_stack(history_svc_addr=history.address) as stack,
        await PhoenixClient.connect(stack.base, token=stack.token("alice")) as alice,
    ):
        yield alice


async def columns(repo: Repository, user_id: str) -> tuple[str, str | None]:
    users = models.users
    query = select(users.c.name, users.c.email).where(users.c.external_id == user_id)
    async with repo.engine.connect() as conn:
        name, email = (await conn.execute(query)).one()
        return name, email


PROFILE: dict[str, Any] = {
    "default_model": "local",
    "name": "Alice Liddell",
    "email": "alice@example.com",
    "extra": {"theme": "dark", "lang": "en"},
}


async def test_set_then_rejoin_shows_the_profile_and_unset_fields_are_kept(
    repository: Repository,
) -> None:
    async with alices_socket(repository) as alice:
        channel = await alice.join("user:alice")
        assert channel.join_response["preferences"] == {
            "default_model": "",
            "name": "",
            "email": "",
            "extra": {},
        }
        stored = await channel.push("set_preferences", PROFILE)
        assert (stored.status, stored.response) == ("ok", PROFILE)
        assert await columns(repository, "alice") == ("Alice Liddell", "alice@example.com")

        # Only the name given: the model, email and extra stay as stored.
        renamed = await channel.push("set_preferences", {"name": "Alice L."})
        assert renamed.response == {**PROFILE, "name": "Alice L."}
        # An empty email clears it (NULL in the row); extra given is the new map as a whole.
        cleared = await channel.push("set_preferences", {"email": "", "extra": {"lang": "fr"}})
        want = {**PROFILE, "name": "Alice L.", "email": "", "extra": {"lang": "fr"}}
        assert cleared.response == want

        rejoined = await alice.join("user:alice")  # replaces the channel, as an app rejoins
        assert rejoined.join_response["preferences"] == want
    assert await columns(repository, "alice") == ("Alice L.", None)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"email": "not-an-address"}, "email must look like"),
        ({"email": "a@b"}, "email must look like"),
        ({"email": "a b@example.com"}, "email must look like"),
        ({"email": "a@example.com" + "m" * 320}, "email must be at most 320"),
        ({"name": "n" * 256}, "name must be at most 255"),
        ({"name": 7}, "name must be a string"),
        ({"name": "a\x00b"}, "name cannot hold NUL"),
        ({"default_model": ["local"]}, "default_model must be a string"),
        ({"extra": {f"k{i}": "v" for i in range(33)}}, "extra holds at most 32 keys"),
        ({"extra": {"k" * 65: "v"}}, "an extra key must be at most 64 characters"),
        ({"extra": {"": "v"}}, "an extra key cannot be empty"),
        ({"extra": {"theme": "v" * 1025}}, "extra['theme'] must be at most 1024"),
        ({"extra": {"theme": 1}}, "extra must be an object of strings"),
        ({"extra": ["theme"]}, "extra must be an object"),
    ],
)
async def test_bad_values_are_refused_with_invalid_request_and_change_nothing(
    repository: Repository, payload: dict[str, Any], message: str
) -> None:
    async with alices_socket(repository) as alice:
        channel = await alice.join("user:alice")
        assert (await channel.push("set_preferences", PROFILE)).ok
        # A good field beside the bad one is not applied either.
        refused = await channel.push("set_preferences", {"default_model": "", **payload})
        assert refused.status == "error"
        assert refused.response["reason"] == "invalid_request"
        assert refused.response["message"].startswith(message), refused.response
        rejoined = await alice.join("user:alice")
        assert rejoined.join_response["preferences"] == PROFILE
