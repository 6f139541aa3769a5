"""WatchMany through both real halves (task_svc/watch_mux.py and gateway_svc/watches.py) over a
real grpc.aio server: watches share one stream, each is paced by its own reader, one that
fails or is closed leaves the others alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway_svc.watches import TaskWatches
from svckit.errors import ServiceError
from svckit.grpc_server import GrpcServer, insecure_channel
from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
from task_svc.watch_mux import serve_watch_many
from tests.conftest import timeout

WINDOW = 8


class Follows(tasks_pb2_grpc.TaskServiceServicer):
    """Each task id names what its watch does: "endless", "fails", "three"."""

    def __init__(self) -> None:
        self.pulled: dict[str, int] = {}
        self.closed: dict[str, asyncio.Event] = {}

    async def WatchMany(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        await serve_watch_many(request_iterator, context, self.follow)

    async def follow(
        self, request: tasks_pb2.WatchRequest
    ) -> AsyncIterator[tasks_pb2.WatchResponse]:
        name = request.task_id
        self.pulled[name] = 0
        closed = self.closed[name] = asyncio.Event()
        try:
            yield tasks_pb2.WatchResponse(state=common_pb2.TaskState(task_id=name))
            if name == "fails":
                raise ServiceError(common_pb2.ERROR_CODE_FORBIDDEN, "another user's task")
            if name == "crashes":
                raise RuntimeError("a bug")
            for seq in range(1, 4 if name == "three" else 10_000):
                self.pulled[name] = seq
                yield tasks_pb2.WatchResponse(event=tasks_pb2.TaskEvent(seq=seq))
                await asyncio.sleep(0)
        finally:
            closed.set()


@pytest.fixture
async def watches() -> AsyncIterator[tuple[TaskWatches, Follows]]:
    follows = Follows()
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: tasks_pb2_grpc.add_TaskServiceServicer_to_server(follows, s),
        [],
    )
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            client = TaskWatches(tasks_pb2_grpc.TaskServiceStub(channel), window=WINDOW)
            try:
                yield client, follows
            finally:
                await client.close()
    finally:
        await server.stop(0)


def request(name: str) -> tasks_pb2.WatchRequest:
    return tasks_pb2.WatchRequest(task_id=name, user_id="alice")


async def read(watch: Any) -> Any:
    return await asyncio.wait_for(watch.read(), timeout(5))


async def test_a_watch_reads_state_then_events_then_its_end(watches: Any) -> None:
    client, _ = watches
    watch = client.open(request("three"))
    assert (await read(watch)).HasField("state")
    assert [(await read(watch)).event.seq for _ in range(3)] == [1, 2, 3]
    assert await read(watch) is None
    assert await read(watch) is None  # ended stays ended


async def test_a_slow_reader_paces_only_its_own_watch(watches: Any) -> None:
    client, follows = watches
    slow = client.open(request("endless"))
    await read(slow)  # the state
    quick = client.open(request("three"))
    assert (await read(quick)).HasField("state")
    assert [(await read(quick)).event.seq for _ in range(3)] == [1, 2, 3]
    # The slow watch's follower has produced no more than its window allows, however long
    # the quick one took.
    assert follows.pulled["endless"] <= WINDOW + 1
    for expected in range(1, 3 * WINDOW):  # reading grants more credit
        assert (await read(slow)).event.seq == expected
    assert follows.pulled["endless"] <= 3 * WINDOW + WINDOW + 1
    assert client.mux.streams_opened == 1


async def test_a_failing_watch_raises_its_error_and_the_stream_goes_on(watches: Any) -> None:
    client, _ = watches
    other = client.open(request("endless"))
    await read(other)
    failing = client.open(request("fails"))
    await read(failing)
    with pytest.raises(ServiceError) as refused:
        await read(failing)
    assert refused.value.code == common_pb2.ERROR_CODE_FORBIDDEN
    crashing = client.open(request("crashes"))
    await read(crashing)
    with pytest.raises(ServiceError) as crashed:  # a bug ends that watch, typed, not the stream
        await read(crashing)
    assert crashed.value.code == common_pb2.ERROR_CODE_INTERNAL
    assert (await read(other)).event.seq == 1
    assert client.mux.streams_opened == 1


async def test_cancel_closes_the_follower_on_the_server(watches: Any) -> None:
    client, follows = watches
    watch = client.open(request("endless"))
    await read(watch)
    watch.cancel()
    await asyncio.wait_for(follows.closed["endless"].wait(), timeout(5))
    assert await read(watch) is None


async def test_closing_the_client_ends_every_watch_on_the_server(watches: Any) -> None:
    client, follows = watches
    watch = client.open(request("endless"))
    await read(watch)
    await client.close()
    await asyncio.wait_for(follows.closed["endless"].wait(), timeout(5))
    with pytest.raises(ServiceError):  # after what had arrived before the close
        for _ in range(WINDOW + 2):
            await read(watch)
