"""svckit.inbox.Inbox: a single reader's queue."""

from __future__ import annotations

import asyncio

import pytest

from svckit.inbox import Inbox


async def test_items_come_out_in_order_and_a_get_waits_for_a_put() -> None:
    inbox: Inbox[int] = Inbox()
    inbox.put(1)
    assert await inbox.get() == 1
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    inbox.put(2)
    inbox.put(3)
    assert await waiting == 2
    assert await inbox.get() == 3
    assert len(inbox) == 0


async def test_get_all_takes_everything_there_is_once_there_is_one() -> None:
    inbox: Inbox[str] = Inbox()
    waiting = asyncio.create_task(inbox.get_all())
    await asyncio.sleep(0)
    inbox.put("a")
    inbox.put("b")  # before the reader runs: both in one batch
    assert await waiting == ["a", "b"]
    inbox.put("c")
    assert await inbox.get_all() == ["c"]


async def test_a_cancelled_get_loses_nothing_and_leaves_the_inbox_usable() -> None:
    inbox: Inbox[int] = Inbox()
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    inbox.put(7)
    assert await inbox.get() == 7

    # Woken and then cancelled before it ran: the item stays for the next get.
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put(8)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await inbox.get() == 8


async def test_a_second_reader_at_once_is_refused() -> None:
    inbox: Inbox[int] = Inbox()
    first = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="one reader"):
        await inbox.get()
    inbox.put(1)
    assert await first == 1


async def test_full_is_advisory_at_maxsize() -> None:
    bounded: Inbox[int] = Inbox(maxsize=2)
    bounded.put(1)
    assert not bounded.full()
    bounded.put(2)
    assert bounded.full()
    bounded.clear()
    assert not bounded.full() and len(bounded) == 0
    assert not Inbox[int]().full()  # 0: unbounded
