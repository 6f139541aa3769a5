"""One generation end to end, through real processes, spoken in literal Phoenix V2 frames:
WebSocket → gateway_svc → task_svc → llm_svc, and history through NATS → persistence_svc."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from llm_svc.providers.local import compose_answer
from svckit.grpc_server import insecure_channel
from switchboard.v1 import common_pb2, events_pb2, history_pb2, history_pb2_grpc
from tests.conftest import timeout
from tests.e2e.history import terminal_history
from tools.stack import Stack, dev_token

pytestmark = pytest.mark.e2e

PROMPT = "Why do switchboards need operators?"


async def send(ws: ClientConnection, frame: list[Any]) -> None:
    await ws.send(json.dumps(frame))


async def receive(ws: ClientConnection) -> list[Any]:
    frame = json.loads(await asyncio.wait_for(ws.recv(), timeout(10)))
    assert isinstance(frame, list) and len(frame) == 5, frame
    return frame


async def test_generation_streams_and_lands_in_history(stack: Stack) -> None:
    task_id = str(uuid.uuid4())
    topic = f"task:{task_id}"
    url = f"{stack.config.socket_url}?token={dev_token('alice')}&vsn=2.0.0"
    async with connect(url) as ws:
        await send(ws, ["1", "1", topic, "phx_join", {}])
        assert await receive(ws) == [
            "1",
            "1",
            topic,
            "phx_reply",
            {"status": "ok", "response": {"status": "new"}},
        ]

        await send(ws, ["1", "2", topic, "llm_generate", {"prompt": PROMPT}])
        acked = False
        pushes: list[list[Any]] = []
        while not pushes or pushes[-1][3] not in ("llm_response", "error"):
            frame = await receive(ws)
            if frame[3] == "phx_reply":
                assert frame[:3] == ["1", "2", topic]
                assert frame[4]["status"] == "ok", frame
                assert frame[4]["response"]["task_id"] == task_id
                assert frame[4]["response"]["status"] == "queued"
                acked = True
            else:
                assert frame[:3] == ["1", None, topic], frame
                pushes.append(frame)
        assert acked, "llm_generate was never acknowledged"

    events = [p[3] for p in pushes]
    payloads = [p[4] for p in pushes]
    assert events[-1] == "llm_response", payloads[-1]
    assert "progress" in events and "chunk" in events
    seqs = [p["seq"] for p in payloads]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    expected = "".join(compose_answer(PROMPT, 0))
    final = payloads[-1]
    assert final["content"] == expected
    assert "".join(p["delta"] for p in payloads if "delta" in p) == expected
    assert final["model"] == "local"
    assert final["usage"]["completion_tokens"] > 0

    task, trail = await terminal_history(stack, task_id, "alice")
    assert task.status == common_pb2.TASK_STATUS_COMPLETED
    assert task.response == expected
    assert task.prompt == PROMPT
    assert task.user_id == "alice"
    assert [e.kind for e in trail] == [
        events_pb2.LIFECYCLE_KIND_QUEUED,
        events_pb2.LIFECYCLE_KIND_STARTED,
        events_pb2.LIFECYCLE_KIND_COMPLETED,
    ]
    async with insecure_channel(stack.config.address("persistence_svc")) as channel:
        history = history_pb2_grpc.HistoryServiceStub(channel)
        listed = await history.ListTasks(history_pb2.ListTasksRequest(user_id="alice"))
        assert [t.task_id for t in listed.tasks] == [task_id]
        strangers = await history.ListTasks(history_pb2.ListTasksRequest(user_id="bob"))
        assert list(strangers.tasks) == []


async def test_the_ack_does_not_wait_for_task_svc(sqlite_stack: Stack) -> None:
    """The gateway stores a new task's job itself (gateway_svc/direct_submit.py): with
    task_svc frozen (SIGSTOP), the push is still acknowledged; once it runs again, the job it
    finds in JetStream runs to its one terminal history row."""
    stack = sqlite_stack
    task_id = str(uuid.uuid4())
    topic = f"task:{task_id}"
    url = f"{stack.config.socket_url}?token={dev_token('alice')}&vsn=2.0.0"
    task_svc = stack.processes["task_svc"]
    async with connect(url) as ws:
        await send(ws, ["1", "1", topic, "phx_join", {}])
        assert (await receive(ws))[4]["response"] == {"status": "new"}
        task_svc.send_signal(signal.SIGSTOP)
        try:
            await send(ws, ["1", "2", topic, "llm_generate", {"prompt": PROMPT}])
            ack = await receive(ws)
        finally:
            task_svc.send_signal(signal.SIGCONT)
        assert ack[3] == "phx_reply" and ack[4]["status"] == "ok", ack
        assert ack[4]["response"]["status"] == "queued"
        pushes: list[list[Any]] = []
        while not pushes or pushes[-1][3] not in ("llm_response", "error"):
            pushes.append(await receive(ws))
    assert pushes[0][3] == "progress" and pushes[0][4]["status"] == "queued"
    assert pushes[-1][3] == "llm_response"
    assert pushes[-1][4]["content"] == "".join(compose_answer(PROMPT, 0))
    task, trail = await terminal_history(stack, task_id, "alice")
    assert task.status == common_pb2.TASK_STATUS_COMPLETED
    assert [e.kind for e in trail].count(events_pb2.LIFECYCLE_KIND_COMPLETED) == 1


async def test_connect_without_token_is_refused_and_others_are_unaffected(stack: Stack) -> None:
    good = f"{stack.config.socket_url}?token={dev_token('alice')}&vsn=2.0.0"
    async with connect(good) as ws:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with connect(f"{stack.config.socket_url}?vsn=2.0.0"):
                pass
        assert refused.value.response.status_code == 403
        await ws.send("this is not a phoenix frame")
        async with connect(good) as other:
            await send(other, [None, "7", "phoenix", "heartbeat", {}])
            assert await receive(other) == [
                None,
                "7",
                "phoenix",
                "phx_reply",
                {"status": "ok", "response": {}},
            ]
