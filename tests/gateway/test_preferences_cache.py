"""The gateway's cache of each user's default model (gateway_svc/user_channel.py,
`Preferences`): one read per user however many generations ask at once, a stale entry used
at once while one read refreshes it, and a change made here never overwritten by a read
that was under way."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from gateway_svc.user_channel import PREFERENCES_TTL_S, Preferences
from switchboard.v1 import history_pb2
from tests.conftest import timeout


class FakeUsers:
    """UserService's GetPreferences, answering with `model` once `answer` is set."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.asked = 0
        self.reading = asyncio.Event()  # a read has come in
        self.answer = asyncio.Event()
        self.answer.set()

    async def GetPreferences(
        self, request: history_pb2.GetPreferencesRequest, timeout: float
    ) -> history_pb2.Preferences:
        self.asked += 1
        self.reading.set()
        await self.answer.wait()
        return history_pb2.Preferences(default_model=self.model)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def refreshed(cache: Preferences) -> None:
    """Wait for the reads under way to end."""
    async with asyncio.timeout(timeout(5)):
        await asyncio.gather(*cache._reading.values())


def preferences(users: FakeUsers, clock: Clock, max_users: int = 1000) -> Preferences:
    fake: Any = users  # the stub's one method the cache calls
    return Preferences(fake, clock=clock, max_users=max_users)


async def test_generations_asking_at_once_for_a_new_user_make_one_read() -> None:
    users = FakeUsers("local")
    users.answer.clear()
    cache = preferences(users, Clock())
    waiting = [asyncio.create_task(cache.default_model("alice")) for _ in range(20)]
    async with asyncio.timeout(timeout(5)):
        await users.reading.wait()  # the read is held while all twenty wait on it
    users.answer.set()
    async with asyncio.timeout(timeout(5)):
        assert await asyncio.gather(*waiting) == ["local"] * 20
    assert users.asked == 1
    assert await cache.default_model("alice") == "local" and users.asked == 1


async def test_a_stale_model_is_used_at_once_while_one_read_refreshes_it() -> None:
    users, clock = FakeUsers("local"), Clock()
    cache = preferences(users, clock)
    assert await cache.default_model("alice") == "local"
    users.model = "fast"
    users.answer.clear()  # UserService is slow now
    clock.now += PREFERENCES_TTL_S
    # Neither waits for the read: both get what is cached, and only one read is made.
    async with asyncio.timeout(timeout(5)):
        assert await cache.default_model("alice") == "local"
        assert await cache.default_model("alice") == "local"
    users.answer.set()
    await refreshed(cache)
    assert await cache.default_model("alice") == "fast"
    assert users.asked == 2


async def test_a_change_made_here_during_a_read_is_not_overwritten_by_it() -> None:
    users, clock = FakeUsers("local"), Clock()
    cache = preferences(users, clock)
    await cache.default_model("alice")
    users.answer.clear()
    clock.now += PREFERENCES_TTL_S
    async with asyncio.timeout(timeout(5)):
        await cache.default_model("alice")  # a refresh starts, and waits on UserService
    clock.now += 1
    cache.stored("alice", history_pb2.Preferences(default_model="fast"))
    users.answer.set()
    await refreshed(cache)
    assert await cache.default_model("alice") == "fast"


async def test_an_unreadable_service_gives_the_cached_model_or_none() -> None:
    class Failing(FakeUsers):
        async def GetPreferences(
            self, request: history_pb2.GetPreferencesRequest, timeout: float
        ) -> history_pb2.Preferences:
            self.asked += 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata()
            )

    cache = preferences(Failing("local"), Clock())
    assert await cache.default_model("alice") == ""
    assert await cache.default_model("alice") == ""  # nothing cached: asked again
    assert cache._cache == {}


async def test_a_prefetch_is_the_read_the_first_generation_then_waits_for() -> None:
    users = FakeUsers("fast")
    users.answer.clear()
    cache = preferences(users, Clock())
    cache.prefetch("alice")  # the socket connected
    async with asyncio.timeout(timeout(5)):
        await users.reading.wait()
    cache.prefetch("alice")  # a second socket of the same user: no second read
    first = asyncio.create_task(cache.default_model("alice"))
    users.answer.set()
    async with asyncio.timeout(timeout(5)):
        assert await first == "fast"
    cache.prefetch("alice")  # known: nothing to read
    assert users.asked == 1
    await cache.close()


async def test_the_users_least_recently_asked_for_are_forgotten_past_the_bound() -> None:
    users = FakeUsers("fast")
    cache = preferences(users, Clock(), max_users=2)
    for user in ("a", "b"):
        assert await cache.default_model(user) == "fast"
    assert await cache.default_model("a") == "fast"  # a is now the most recent
    cache.stored("c", history_pb2.Preferences(default_model="slow"))  # b is forgotten
    assert users.asked == 2
    assert await cache.default_model("c") == "slow"
    assert await cache.default_model("a") == "fast"
    assert users.asked == 2
    assert await cache.default_model("b") == "fast"  # read again
    assert users.asked == 3
    await cache.close()
