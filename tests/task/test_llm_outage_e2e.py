"""kill -9 llm_svc with generations streaming, start it again: an outage of our own costs
no attempt, every task reaches `llm_response` (each cut one resumed: its client keeps the
text it had, the rest follows), and its history holds one COMPLETED."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway_svc.phoenix_client import Channel, PhoenixClient
from llm_svc.providers.local import compose_answer
from switchboard.v1 import events_pb2
from tests.conftest import timeout
from tests.e2e.conftest import running_stack
from tests.e2e.history import terminal_history
from tools.stack import dev_token

pytestmark = pytest.mark.e2e

TASKS = 12
Push = tuple[str, dict[str, Any]]


async def until(channel: Channel, pushes: list[Push], done: Any) -> None:
    async with asyncio.timeout(timeout(60)):
        async for message in channel.messages():
            pushes.append((message.event, message.payload))
            if done(message.event, message.payload):
                return


def answer(pushes: list[Push]) -> str:
    """The text a client keeps: the chunks after the last reset."""
    text = ""
    for event, payload in pushes:
        if event == "progress" and payload.get("reset"):
            text = ""
        elif event == "chunk":
            text += payload["delta"]
    return text


async def test_kill_9_llm_svc_mid_stream_costs_no_attempt(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    env = {
        "LOCAL_MODEL_TOKEN_DELAY_MS": "25",  # about a second per answer: killed mid-stream
        "TASK_MAX_ATTEMPTS": "1",  # an outage that spent attempts would fail every task
        "GATEWAY_GENERATE_RATE_PER_S": "0",
    }
    async with running_stack(request, tmp_path / "var", "sqlite", env) as stack:
        ids = [str(uuid.uuid4()) for _ in range(TASKS)]
        prompts = {task_id: f"Tell me about {task_id[:8]}" for task_id in ids}
        pushes: dict[str, list[Push]] = {task_id: [] for task_id in ids}
        url = stack.config.socket_url
        async with await PhoenixClient.connect(url, token=dev_token("alice")) as client:
            channels = {task_id: await client.join(f"task:{task_id}") for task_id in ids}
            for task_id, channel in channels.items():
                reply = await channel.push("llm_generate", {"prompt": prompts[task_id]})
                assert reply.ok, reply.response
            for task_id, channel in channels.items():  # every one of them is streaming
                await until(channel, pushes[task_id], lambda event, _: event == "chunk")
            await stack.stop_service("llm_svc", signal.SIGKILL)
            await stack.start_service("llm_svc")
            for task_id, channel in channels.items():
                await until(
                    channel,
                    pushes[task_id],
                    lambda event, _: event in ("llm_response", "error"),
                )

        for task_id in ids:
            got = pushes[task_id]
            assert got[-1][0] == "llm_response", got[-1]
            assert not [p for e, p in got if e == "progress" and p.get("reset")]
            resumed = [p for e, p in got if str(p.get("message", "")).startswith("resuming")]
            assert resumed, "a generation cut by the kill is resumed"
            expected = "".join(compose_answer(prompts[task_id], 0))
            assert answer(got) == expected == got[-1][1]["content"]
            seqs = [p["seq"] for _, p in got]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            _, trail = await terminal_history(stack, task_id, "alice")
            kinds = [e.kind for e in trail]
            assert kinds.count(events_pb2.LIFECYCLE_KIND_COMPLETED) == 1
            assert events_pb2.LIFECYCLE_KIND_FAILED not in kinds
