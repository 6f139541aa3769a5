"""svckit/multiplex.py without gRPC, both halves: a fake call records each message written."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from svckit.errors import ServiceError
from svckit.multiplex import MuxClient, StreamMux
from switchboard.v1 import common_pb2
from tests.conftest import timeout


class _Recorder:
    """A call of either half (the server's context, the client's stream-stream call): records
    each message written, sets `all_in` once `expected` items were written, never answers."""

    def __init__(self, expected: int) -> None:
        self.writes: list[list[str]] = []
        self.expected = expected
        self.all_in = asyncio.Event()

    async def write(self, message: list[str]) -> None:
        self.writes.append(message)
        if sum(len(write) for write in self.writes) >= self.expected:
            self.all_in.set()

    async def read(self) -> Any:
        await asyncio.Event().wait()

    def cancel(self) -> None:
        pass


async def _serve(calls: Callable[[StreamMux[str], int], Coroutine[Any, Any, None]]) -> _Recorder:
    """Serve two logical calls, 0 and 1, until both items are written; the writes."""
    mux: StreamMux[str] = StreamMux(list, lambda key, error: f"{key} failed: {error.message}")
    context = _Recorder(expected=2)

    async def commands() -> AsyncIterator[list[int]]:
        yield [0, 1]
        await context.all_in.wait()  # the caller's side stays open until both were sent

    def handle(key: int) -> None:
        mux.spawn(key, calls(mux, key))

    async with asyncio.timeout(timeout(5)):
        await mux.serve(commands(), lambda keys: keys, handle, context)
    return context


async def test_items_made_ready_one_loop_turn_apart_leave_in_one_message() -> None:
    async def call(mux: StreamMux[str], key: int) -> None:
        for _ in range(key):  # call 1 sends one turn of the loop after call 0
            await asyncio.sleep(0)
        mux.send(f"item of {key}")

    context = await _serve(call)
    assert context.writes == [["item of 0", "item of 1"]]


async def test_a_failed_call_sends_its_error_and_the_other_goes_on() -> None:
    async def call(mux: StreamMux[str], key: int) -> None:
        if key == 0:
            raise ServiceError(common_pb2.ERROR_CODE_NOT_FOUND, "no such task")
        mux.send(f"item of {key}")

    context = await _serve(call)
    items = sorted(item for write in context.writes for item in write)
    assert items == ["0 failed: no such task", "item of 1"]


async def test_commands_queued_one_loop_turn_apart_leave_in_one_message() -> None:
    call = _Recorder(expected=2)
    client: MuxClient[str] = MuxClient(lambda: call, lambda batch: [], list, "test")
    first, second = client.call(), client.call()
    first.send("start 1")
    await asyncio.sleep(0)  # the second command comes one turn of the loop later
    second.send("start 2")
    async with asyncio.timeout(timeout(5)):
        await call.all_in.wait()
    await client.close()
    assert call.writes == [["start 1", "start 2"]]


async def test_a_call_cancelled_before_it_ran_is_closed_not_left_unawaited() -> None:
    mux: StreamMux[str] = StreamMux(list, lambda key, error: f"{key} failed: {error.message}")
    ran = []

    async def call() -> None:
        ran.append(True)

    run = call()
    mux.spawn(1, run)
    mux.cancel(1)  # the same turn: before its first step (a stream ending as it came)
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "mux call 1"]
    await asyncio.gather(task, return_exceptions=True)  # its done callbacks ran before this
    assert not mux.running(1)
    assert ran == []
    # Closed: left as it was, it would warn "never awaited" when collected.
    assert inspect.getcoroutinestate(run) == inspect.CORO_CLOSED
