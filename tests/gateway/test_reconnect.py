"""A client that disconnects in the middle of a generation and comes back with `last_seq`
gets every event it missed, in order, nothing twice, and the final answer; the task runs on
while no client is connected."""

from __future__ import annotations

from websockets.asyncio.client import connect

from switchboard.v1 import common_pb2, tasks_pb2
from tests.gateway.live import Stack, recv, send, topic

Status = common_pb2.TaskStatus


async def test_reconnect_mid_generation_gets_exactly_the_missed_events(stack: Stack) -> None:
    t = topic()
    task_id = t.removeprefix("task:")
    async with connect(stack.url()) as ws:
        await send(ws, ["1", "1", t, "phx_join", {}])
        assert (await recv(ws))[4] == {"status": "ok", "response": {"status": "new"}}
        await send(ws, ["1", "2", t, "llm_generate", {"prompt": "hi"}])
        assert (await recv(ws))[4]["status"] == "ok"
        task = stack.fake.tasks[task_id]
        await task.emit(progress=tasks_pb2.Progress(status=Status.TASK_STATUS_PROCESSING))
        for delta in ("Once", " upon"):
            await task.emit(chunk=tasks_pb2.Chunk(delta=delta))
        seen = [await recv(ws) for _ in range(4)]
        assert [(f[3], f[4]["seq"]) for f in seen] == [
            ("progress", 1),
            ("progress", 2),
            ("chunk", 3),
            ("chunk", 4),
        ]
    # Gone: the gateway ends the Watch, the task goes on without any client.
    await stack.wait_drained()
    for delta in (" a", " time"):
        await task.emit(chunk=tasks_pb2.Chunk(delta=delta))
    async with connect(stack.url()) as ws:
        await send(ws, ["5", "5", t, "phx_join", {"last_seq": 4}])
        joined = await recv(ws)
        assert joined[:4] == ["5", "5", t, "phx_reply"]
        assert joined[4]["response"] == {
            "status": "processing",
            "progress": 0.0,
            "seq": 6,
            "content": "Once upon a time",
            "model": "local-small",
        }
        await task.emit(
            completed=tasks_pb2.Completed(
                content="Once upon a time",
                model="local-small",
                usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=4, total_tokens=5),
                finish_reason="stop",
            )
        )
        missed = [await recv(ws) for _ in range(3)]
    assert [(f[0], f[1], f[3], f[4]["seq"]) for f in missed] == [
        ("5", None, "chunk", 5),
        ("5", None, "chunk", 6),
        ("5", None, "llm_response", 7),
    ]
    assert [f[4]["delta"] for f in missed[:2]] == [" a", " time"]
    assert missed[2][4]["content"] == "Once upon a time"
    assert stack.fake.watches[-1].after_seq == 4
    await stack.wait_drained()


async def test_reconnect_after_the_end_replays_the_tail_then_the_stream_ends(
    stack: Stack,
) -> None:
    t = topic()
    task_id = t.removeprefix("task:")
    async with connect(stack.url()) as ws:
        await send(ws, ["1", "1", t, "phx_join", {}])
        await recv(ws)
        await send(ws, ["1", "2", t, "llm_generate", {"prompt": "hi"}])
        await recv(ws)
        assert (await recv(ws))[4]["seq"] == 1
    await stack.fake.run(task_id)  # progress 2, chunks 3 and 4, completed 5, all unseen
    async with connect(stack.url()) as ws:
        await send(ws, ["2", "2", t, "phx_join", {"last_seq": 1}])
        assert (await recv(ws))[4]["response"]["status"] == "completed"
        tail = [await recv(ws) for _ in range(4)]
        assert [(f[3], f[4]["seq"]) for f in tail] == [
            ("progress", 2),
            ("chunk", 3),
            ("chunk", 4),
            ("llm_response", 5),
        ]
        # The Watch ended after the terminal event; the channel stays joined and quiet.
        await stack.fake.wait_watches(0)
        await send(ws, [None, "3", "phoenix", "heartbeat", {}])
        assert await recv(ws) == [
            None,
            "3",
            "phoenix",
            "phx_reply",
            {"status": "ok", "response": {}},
        ]
