"""PullFeed against a real nats-server: batches without a task per message (svckit/pull.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import orjson
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from svckit.pull import PullFeed
from tests.conftest import timeout, until

STREAM, CONSUMER = "PULLS", "reader"
LONG_S = 30.0  # far beyond each test's bound: a take that waited it out fails the test


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    js = client.jetstream()
    await js.add_stream(StreamConfig(name=STREAM, subjects=["pull.>"]))
    config = ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=60)
    await js.add_consumer(STREAM, config)
    yield client
    await client.close()


async def feed_of(nc: Client, batch: int) -> PullFeed:
    feed = PullFeed(nc, STREAM, CONSUMER, batch=batch)
    await feed.start()
    return feed


async def store(nc: Client, *names: str) -> None:
    js = nc.jetstream()
    for name in names:
        await js.publish(f"pull.{name}", name.encode())


def names(msgs: list[Msg]) -> list[str]:
    return [msg.data.decode() for msg in msgs]


async def first_to_come(nc: Client, feed: PullFeed, name: str) -> list[str]:
    """What a take returns for `name`, stored only once the take, finding nothing, has
    asked the server to wait (not `no_wait`): seen on the API subject as the server gets it."""
    asked = asyncio.Event()

    async def heard(msg: Msg) -> None:
        if "expires" in orjson.loads(msg.data):
            asked.set()

    sub = await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{CONSUMER}", cb=heard)
    await nc.flush()
    take = asyncio.create_task(feed.take(LONG_S))
    await asyncio.wait_for(asked.wait(), timeout(5))
    await sub.unsubscribe()
    await store(nc, name)
    async with asyncio.timeout(timeout(5)):
        return names(await take)


async def test_what_is_stored_comes_in_batches_without_waiting(nc: Client) -> None:
    await store(nc, *(f"m{n}" for n in range(7)))
    feed = await feed_of(nc, batch=3)
    taken: list[str] = []
    async with asyncio.timeout(timeout(5)):
        while len(taken) < 7:  # a request left open after a full batch would stall a take
            batch = await feed.take(LONG_S)
            assert 1 <= len(batch) <= 3
            taken += names(batch)
    assert taken == [f"m{n}" for n in range(7)]
    assert await feed.close() == []


async def test_with_nothing_stored_a_take_returns_the_first_to_come(nc: Client) -> None:
    feed = await feed_of(nc, batch=10)
    assert await first_to_come(nc, feed, "late") == ["late"]
    await store(nc, "later")  # the request still open delivers it: the next take has it
    async with asyncio.timeout(timeout(5)):
        assert names(await feed.take(LONG_S)) == ["later"]
    await feed.close()


async def test_a_take_gives_up_after_its_timeout(nc: Client) -> None:
    feed = await feed_of(nc, batch=10)
    assert await feed.take(0.2) == []
    await store(nc, "after")  # the feed asks again, and still gets what comes
    async with asyncio.timeout(timeout(5)):
        assert names(await feed.take(LONG_S)) == ["after"]
    await feed.close()


async def test_close_gives_back_what_was_delivered_and_never_taken(nc: Client) -> None:
    feed = await feed_of(nc, batch=10)
    assert await first_to_come(nc, feed, "first") == ["first"]
    await store(nc, "second", "third")
    await until(lambda: feed.waiting == 2)
    left = await feed.close()
    assert names(left) == ["second", "third"]
    for msg in left:  # handed back: delivered again to whoever reads next
        await msg.nak()
    again = await feed_of(nc, batch=10)
    async with asyncio.timeout(timeout(5)):
        redelivered = names(await again.take(LONG_S))
        while len(redelivered) < 2:
            redelivered += names(await again.take(LONG_S))
    assert sorted(redelivered) == ["second", "third"]
    await again.close()
