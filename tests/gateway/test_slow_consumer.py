"""A client that stops reading while its task streams: the gateway never blocks on it, closes
it with 1008 once its outbound queue overflows, and the client catches up from last_seq."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from switchboard.v1 import common_pb2, tasks_pb2
from tests.gateway.live import Stack, recv, send, topic

# Small kernel buffers on both ends keep the flood short.
SMALL_QUEUE = {
    "gateway_outbound_max_frames": 8,
    "gateway_outbound_max_bytes": 64 * 1024,
    "gateway_socket_sndbuf": 4096,
    "gateway_slow_consumer_s": 2.0,  # a stalled client is found quickly
}
DELTA = "x" * 16 * 1024
MAX_CHUNKS = 5000  # far above what kernel buffers and the queue can hold together


def small_socket(port: int) -> socket.socket:
    # A small receive buffer keeps what the kernel absorbs (before the gateway's own queue
    # fills) small, so the flood below is short.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def read_until_closed(ws: ClientConnection) -> tuple[list[list[Any]], int | None]:
    frames = []
    try:
        while True:
            frames.append(await recv(ws))
    except ConnectionClosed as closed:
        return frames, closed.rcvd.code if closed.rcvd else None


@pytest.mark.parametrize("stack", [SMALL_QUEUE], indirect=True)
async def test_slow_consumer_is_closed_with_1008_and_catches_up(stack: Stack) -> None:
    t = topic()
    task_id = t.removeprefix("task:")
    # max_queue=1: the client's websockets stops reading from TCP after one frame.
    ws = await connect(
        stack.url(), sock=small_socket(stack.gateway.port), max_queue=1, max_size=None
    )
    await send(ws, ["1", "1", t, "phx_join", {}])
    assert (await recv(ws))[4]["status"] == "ok"
    await send(ws, ["1", "2", t, "llm_generate", {"prompt": "hi"}])
    assert (await recv(ws))[4]["status"] == "ok"
    task = stack.fake.tasks[task_id]
    bystander = await connect(stack.url("bob"))

    # The client reads nothing more while the task streams chunks. Each chunk is emitted
    # once the previous one has left the task service, until the gateway ends the Watch.
    for _ in range(MAX_CHUNKS):
        event = await task.emit(chunk=tasks_pb2.Chunk(delta=DELTA))
        if not await stack.fake.wait_sent(task_id, event.seq):
            break
    else:
        pytest.fail("the gateway kept streaming to a client that does not read")
    assert stack.metric("gateway_slow_consumer_closes_total") == 1
    assert stack.metric("gateway_limit_hits_total", limit="outbound_queue") == 1
    # Other sockets are served meanwhile.
    await send(bystander, [None, "9", "phoenix", "heartbeat", {}])
    assert (await recv(bystander))[4] == {"status": "ok", "response": {}}

    # The client reads again: what the transport held, then the close 1008.
    frames, code = await read_until_closed(ws)
    assert code == 1008
    seqs = [f[4]["seq"] for f in frames if f[3] in ("progress", "chunk")]
    assert seqs == list(range(1, len(seqs) + 1))  # in order, none missing, none twice
    last_seq = seqs[-1]
    assert last_seq < task.state.seq  # the close dropped what was queued behind

    # The task went on; the client reconnects and catches up from last_seq.
    await task.emit(
        completed=tasks_pb2.Completed(
            content="done", model="m", usage=common_pb2.Usage(), finish_reason="stop"
        )
    )
    # The backlog (over a hundred 16 KiB chunks) is far larger than the queue, and this
    # client, on a small socket, pauses before it reads: the gateway paces its replay by
    # what the client takes, so a pause shorter than the slow-consumer grace never closes it.
    again = await connect(
        stack.url(), sock=small_socket(stack.gateway.port), max_queue=1, max_size=None
    )
    async with again:
        await send(again, ["3", "3", t, "phx_join", {"last_seq": last_seq}])
        joined = await recv(again)
        assert joined[4]["response"]["status"] == "completed"
        await asyncio.sleep(0.2)  # the pause under test: a tenth of the grace
        rest: list[list[Any]] = []
        while not rest or rest[-1][3] != "llm_response":
            rest.append(await recv(again))
    assert [f[4]["seq"] for f in rest] == list(range(last_seq + 1, task.state.seq + 1))
    assert stack.metric("gateway_slow_consumer_closes_total") == 1  # only the stalled one
    assert all(f[3] == "chunk" and f[4]["delta"] == DELTA for f in rest[:-1])
    await bystander.close()
    await stack.wait_drained()


@pytest.mark.parametrize("stack", [SMALL_QUEUE], indirect=True)
async def test_progress_is_coalesced_for_a_slow_client_but_chunks_are_not(stack: Stack) -> None:
    t = topic()
    task_id = t.removeprefix("task:")
    ws = await connect(
        stack.url(), sock=small_socket(stack.gateway.port), max_queue=1, max_size=None
    )
    async with ws:
        await send(ws, ["1", "1", t, "phx_join", {}])
        await recv(ws)
        await send(ws, ["1", "2", t, "llm_generate", {"prompt": "hi"}])
        await recv(ws)
        task = stack.fake.tasks[task_id]
        # Fill the transport with chunks the client does not read, then stream progress:
        # the queue keeps only the latest progress, so it never overflows.
        for _ in range(MAX_CHUNKS):
            await task.emit(chunk=tasks_pb2.Chunk(delta=DELTA))
            if stack.metric("gateway_coalesced_pushes_total") > 0:
                break
            for step in range(1, 20):
                event = await task.emit(
                    progress=tasks_pb2.Progress(
                        status=common_pb2.TaskStatus.TASK_STATUS_PROCESSING, progress=step / 20
                    )
                )
                await stack.fake.wait_sent(task_id, event.seq)
            if stack.metric("gateway_coalesced_pushes_total") > 0:
                break
        else:
            pytest.fail("progress was never coalesced")
        final = await task.emit(
            completed=tasks_pb2.Completed(content="done", usage=common_pb2.Usage())
        )
        frames: list[list[Any]] = []
        while not frames or frames[-1][3] != "llm_response":
            frames.append(orjson.loads(await ws.recv()))
    seqs = [f[4]["seq"] for f in frames if f[3] != "phx_reply"]
    assert seqs == sorted(set(seqs))  # in order, nothing twice
    chunks = {e.seq for e in task.events if e.WhichOneof("kind") == "chunk"}
    assert chunks <= set(seqs)  # every chunk arrived
    assert len(seqs) < final.seq  # some progress was replaced by a later one
    assert stack.metric("gateway_slow_consumer_closes_total") == 0
