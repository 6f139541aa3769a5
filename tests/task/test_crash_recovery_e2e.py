"""kill -9 task_svc with tasks queued and running, start it again: every accepted task
reaches a terminal state, its history is written once, and a client rejoining its channel
through the gateway gets the outcome, with seq above anything it saw before the crash."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway_svc.phoenix_client import Channel, PhoenixClient
from switchboard.v1 import events_pb2
from tests.conftest import timeout
from tests.e2e.conftest import running_stack
from tests.e2e.history import terminal_history
from tools.stack import dev_token

pytestmark = pytest.mark.e2e

Kind = events_pb2.LifecycleKind
TERMINAL_KINDS = {
    Kind.LIFECYCLE_KIND_COMPLETED,
    Kind.LIFECYCLE_KIND_FAILED,
    Kind.LIFECYCLE_KIND_CANCELLED,
}
TASKS = 4


def terminal_push(event: str, payload: dict[str, Any]) -> bool:
    return event in ("llm_response", "error") or (
        event == "progress" and payload.get("status") == "cancelled"
    )


async def pushes_until(channel: Channel, done: Any) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    async with asyncio.timeout(timeout(30)):
        async for message in channel.messages():
            out.append((message.event, message.payload))
            if done(message.event, message.payload):
                return out
    return out


async def test_kill_9_task_svc_with_tasks_queued_and_running(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    env = {
        "LOCAL_MODEL_TOKEN_DELAY_MS": "20",  # long enough to be killed mid-generation
        "TASK_CONCURRENCY": "2",  # so that some tasks are still queued
        "TASK_JOB_ACK_WAIT_S": "60",  # recovery must not wait for it
    }
    async with running_stack(request, tmp_path / "var", "sqlite", env) as stack:
        url = stack.config.socket_url
        ids = [str(uuid.uuid4()) for _ in range(TASKS)]
        seen: dict[str, int] = {}
        async with await PhoenixClient.connect(url, token=dev_token("alice")) as client:
            channels = {task_id: await client.join(f"task:{task_id}") for task_id in ids}
            for task_id, channel in channels.items():
                reply = await channel.push("llm_generate", {"prompt": f"Tell me about {task_id}"})
                assert reply.ok, reply.response
            # The first task is generating (some chunks seen); others wait in the queue.
            first = await pushes_until(
                channels[ids[0]],
                lambda event, payload: event == "chunk" and payload["seq"] >= 6,
            )
            seen[ids[0]] = max(p["seq"] for _, p in first if "seq" in p)
            await stack.stop_service("task_svc", signal.SIGKILL)
        await stack.start_service("task_svc")
        await stack.wait_healthy(timeout=timeout(30), names=("task_svc",))

        async with await PhoenixClient.connect(url, token=dev_token("alice")) as client:
            for task_id in ids:
                last_seq = seen.get(task_id, 0)
                channel = await client.join(f"task:{task_id}", {"last_seq": last_seq})
                state = channel.join_response
                assert state["status"] != "new", state  # known at once after the restart
                if state["status"] in ("completed", "failed", "cancelled"):
                    continue
                pushes = await pushes_until(channel, terminal_push)
                seqs = [p["seq"] for _, p in pushes]
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
                assert all(seq > last_seq for seq in seqs), (last_seq, seqs)
                assert terminal_push(*pushes[-1])
                if task_id == ids[0]:
                    # The rerun starts with a progress that resets the client's text.
                    assert pushes[0][0] == "progress" and pushes[0][1]["progress"] == 0
                    assert pushes[0][1].get("message") == "restarted"
                    assert pushes[0][1]["reset"] is True
                    assert pushes[0][1]["reason"] == "recovered"

        for task_id in ids:
            _, events = await terminal_history(stack, task_id, "alice")
            terminal = [e for e in events if e.kind in TERMINAL_KINDS]
            assert len(terminal) == 1, [Kind.Name(e.kind) for e in events]  # written once
            assert terminal[0].kind == Kind.LIFECYCLE_KIND_COMPLETED
            seqs = [e.seq for e in events]
            assert seqs == sorted(set(seqs))
