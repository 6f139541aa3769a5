"""The app's own history on its socket (`user:<id>`, gateway_svc/user_channel.py), through
real processes: two sockets of one user (the npm `phoenix` client) see each other's task
appear and complete and delete it from history; another user's topic is refused; stored
preferences change the default model; a rejoin with last_seq gets what it missed; while the
database is down, history answers a retryable `unavailable` and generation goes on;
delete_all cancels the user's running task and leaves no history of it."""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway_svc.phoenix import Message
from gateway_svc.phoenix_client import Channel, JoinRefused, PhoenixClient
from tests.conftest import eventually, timeout
from tests.e2e.conftest import running_stack
from tests.llm.openai_server import MODEL, FakeOpenAI, Reply, completion
from tests.persistence.helpers import fresh_database_settings
from tests.postgres import own_cluster
from tools.stack import Stack, dev_token

pytestmark = pytest.mark.e2e

JS_DIR = Path(__file__).resolve().parent.parent / "js"


async def run_history_js(stack: Stack, user: str) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node, "node (20+) is needed for the phoenix client tests"
    process = await asyncio.create_subprocess_exec(
        node,
        "history.mjs",
        f"ws://127.0.0.1:{stack.config.gateway_port}/socket",
        dev_token(user),
        user,
        cwd=JS_DIR,
        env={"PATH": "/usr/bin:/bin", "PROMPT": "Remember me on both phones"},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout(60))
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert lines and lines[-1]["type"] == "done", lines[-3:]
    return lines


async def test_two_sockets_of_a_user_see_a_task_appear_complete_and_go(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    async with running_stack(request, tmp_path / "var") as stack:
        lines = await run_history_js(stack, user)
    by_type: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_type.setdefault(line["type"], []).append(line)
    joined = by_type["joined"][0]["replies"]
    assert all(reply["counts"]["total"] == 0 for reply in joined), joined
    seen = {phone["phone"]: phone["statuses"] for phone in by_type["seen"][0]["phones"]}
    for phone in ("phone-1", "phone-2"):  # the second phone saw the first one's task
        assert {"queued", "processing", "completed"} <= set(seen[phone]), seen
    updates = [u for u in by_type["update"] if u["phone"] == "phone-2"]
    assert [u["seq"] for u in updates] == sorted(u["seq"] for u in updates)
    assert updates[-1]["status"] == "completed" and updates[-1]["preview"]
    listed = by_type["listed"][0]
    assert listed["status"] == "ok", listed
    (task,) = listed["reply"]["tasks"]
    assert task["status"] == "completed" and task["prompt"] == "Remember me on both phones"
    assert task["preview"] and len(task["preview"]) <= 200
    got = by_type["got"][0]["reply"]
    assert got["task"]["content"].startswith(task["preview"])
    assert [step["kind"] for step in got["trail"]][:2] == ["queued", "started"]
    assert got["trail"][-1]["kind"] == "completed"
    assert by_type["deleted"][0]["reply"] == {"deleted": True}
    assert by_type["listed_after"][0]["reply"]["tasks"] == []


async def test_another_users_topic_is_refused_with_the_reason(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with (
        running_stack(request, tmp_path / "var") as stack,
        await PhoenixClient.connect(stack.config.socket_url, token=dev_token("alice")) as client,
    ):
        with pytest.raises(JoinRefused) as refused:
            await client.join("user:bob")
    assert refused.value.response["reason"] == "unauthorized"


async def test_preferences_choose_the_model_when_a_push_names_none(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    provider = FakeOpenAI(Reply(payloads=completion(["Hi", " from", " the", " fake"])))
    async with provider:
        env = {"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": f"{provider.origin}/v1"}
        async with (
            running_stack(request, tmp_path / "var", env=env) as stack,
            await PhoenixClient.connect(
                stack.config.socket_url, token=dev_token("carol")
            ) as client,
        ):
            history = await client.join("user:carol")
            refused = await history.push("set_preferences", {"default_model": "nope-9"})
            assert not refused.ok and refused.response["reason"] == "model_not_found"
            stored = await history.push("set_preferences", {"default_model": MODEL})
            assert stored.ok, stored.response
            # The reply is the whole stored profile; the fields not given are as they were.
            assert stored.response == {
                "default_model": MODEL,
                "name": "",
                "email": "",
                "extra": {},
            }

            task = await client.join(f"task:{uuid.uuid4()}")
            ack = await task.push("llm_generate", {"prompt": "Which model am I?"})
            assert ack.ok, ack.response
            async for message in task.messages():
                if message.event in ("llm_response", "error"):
                    break
            assert message.event == "llm_response", message.payload
            assert message.payload["model"] == MODEL
            assert provider.requests, "the provider of the stored model was asked"


async def test_a_rejoin_with_last_seq_gets_the_updates_it_missed(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with running_stack(request, tmp_path / "var") as stack:
        url, token = stack.config.socket_url, dev_token("dave")
        async with await PhoenixClient.connect(url, token=token) as phone:
            history = await phone.join("user:dave")
            first = await phone.join(f"task:{uuid.uuid4()}")
            assert (await first.push("llm_generate", {"prompt": "one"})).ok
            async for message in history.messages():
                if message.event == "task_updated" and message.payload["status"] == "completed":
                    break
            last_seq = message.payload["seq"]
        # Away: another task runs meanwhile, from another socket.
        async with await PhoenixClient.connect(url, token=token) as other:
            second_id = str(uuid.uuid4())
            second = await other.join(f"task:{second_id}")
            assert (await second.push("llm_generate", {"prompt": "two"})).ok
            async for message in second.messages():
                if message.event == "llm_response":
                    break

            async def back() -> dict[str, Any] | None:
                async with await PhoenixClient.connect(url, token=token) as again:
                    channel = await again.join("user:dave", {"last_seq": last_seq})
                    missed = channel.join_response.get("missed", [])
                    done = [m for m in missed if m["task_id"] == second_id]
                    if done and done[-1]["status"] == "completed":
                        return channel.join_response
                return None

            response = await eventually(back)
    statuses = [m["status"] for m in response["missed"] if m["task_id"] == second_id]
    assert statuses[0] == "queued" and statuses[-1] == "completed", statuses
    assert all(m["seq"] > last_seq for m in response["missed"])


async def test_history_answers_unavailable_while_the_database_is_down_and_generation_goes_on(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """PostgreSQL stopped under a running stack: the user channel answers list_tasks and
    get_task with a retryable `unavailable` and its retry_after_ms, a new join is refused the
    same way, and a generation on a task channel streams to its end meanwhile. Once the
    database is back, history lists that task too."""
    user = f"u{uuid.uuid4().hex[:8]}"
    with own_cluster() as cluster:
        # Only the database URL of these settings is used: the stack has its own NATS.
        database_url = (await fresh_database_settings(cluster, "", "sb_e2e")).database_url
        async with (
            running_stack(request, tmp_path / "var", env={"DATABASE_URL": database_url}) as stack,
            await PhoenixClient.connect(stack.config.socket_url, token=dev_token(user)) as phone,
        ):
            history = await phone.join(f"user:{user}")
            before_id = await generate(phone, "before the outage")
            await eventually(lambda: listed(history, before_id))

            cluster.stop()
            try:
                during_id = str(uuid.uuid4())
                task = await phone.join(f"task:{during_id}")
                assert (await task.push("llm_generate", {"prompt": "during the outage"})).ok
                for event, payload in (
                    ("list_tasks", {"limit": 5}),
                    ("get_task", {"task_id": before_id}),
                ):
                    reply = await history.push(event, payload)
                    assert reply.status == "error", (event, reply)
                    assert reply.response["reason"] == "unavailable", (event, reply)
                    assert reply.response["retry_after_ms"] > 0, (event, reply)
                async with await PhoenixClient.connect(
                    stack.config.socket_url, token=dev_token(user)
                ) as other:
                    with pytest.raises(JoinRefused) as refused:
                        await other.join(f"user:{user}")
                assert refused.value.response["reason"] == "unavailable"
                assert refused.value.response["retry_after_ms"] > 0
                final = await last_push(task)
                assert final.event == "llm_response", final.payload
                assert final.payload["content"]
            finally:
                cluster.start()

            # Back: the task generated meanwhile is written from the events JetStream kept.
            listing = await eventually(lambda: listed(history, during_id), seconds=60)
            assert {t["task_id"] for t in listing} >= {before_id, during_id}


async def test_delete_all_cancels_the_users_running_task_and_leaves_no_history(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Account removal with a task still generating (the local model paced to run for
    seconds): delete_all cancels it, its task channel gets the cancelled end, and history
    holds nothing of it, even once its events have all been through persistence_svc.
    Another user's task generating meanwhile runs to its end and stays in their history."""
    env = {"LOCAL_MODEL_TOKEN_DELAY_MS": "100"}
    async with (
        running_stack(request, tmp_path / "var", env=env) as stack,
        await PhoenixClient.connect(stack.config.socket_url, token=dev_token("erin")) as erin,
        await PhoenixClient.connect(stack.config.socket_url, token=dev_token("frank")) as frank,
    ):
        erins_id, franks_id = str(uuid.uuid4()), str(uuid.uuid4())
        erins, franks = await running(erin, erins_id), await running(frank, franks_id)
        history = await erin.join("user:erin")
        wrong = await history.push("delete_all", {"confirm": "yes"})
        assert wrong.response["reason"] == "invalid_request"

        deleted = await history.push("delete_all", {"confirm": "delete all my tasks"})
        assert (deleted.status, deleted.response) == ("ok", {"deleted": 1})
        final = await last_push(erins, ("progress",), status="cancelled")
        assert final.payload["status"] == "cancelled"

        answer = await last_push(franks)
        assert answer.event == "llm_response", answer.payload
        # A task of frank's begun after the delete: its events follow all of erin's in the
        # stream, which history writes in order, so once it is listed, erin's last events
        # have been through persistence_svc too (and were dropped).
        franks_history = await frank.join("user:frank")
        later_id = await generate(frank, "after erin left")
        tasks = await eventually(lambda: listed(franks_history, later_id))
        assert any(t["task_id"] == franks_id and t["status"] == "completed" for t in tasks)
        after = await history.push("list_tasks", {"limit": 20})
        assert (after.status, after.response["tasks"]) == ("ok", [])
        gone = await history.push("get_task", {"task_id": erins_id})
        assert gone.response["reason"] == "not_found", gone


async def running(phone: PhoenixClient, task_id: str) -> Channel:
    """The task channel of a generation that has streamed its first text (so it runs)."""
    channel = await phone.join(f"task:{task_id}")
    assert (await channel.push("llm_generate", {"prompt": "Take your time answering"})).ok
    await last_push(channel, ("chunk",))
    return channel


async def generate(phone: PhoenixClient, prompt: str) -> str:
    """A task generated to its end on its own channel; its id."""
    task_id = str(uuid.uuid4())
    channel = await phone.join(f"task:{task_id}")
    assert (await channel.push("llm_generate", {"prompt": prompt})).ok
    final = await last_push(channel)
    assert final.event == "llm_response", final.payload
    return task_id


async def last_push(
    channel: Channel, events: tuple[str, ...] = ("llm_response", "error"), status: str = ""
) -> Message:
    """The task channel's first push of one of `events` (by default its final push:
    `llm_response` or `error`), with `status` if one is given."""
    async with asyncio.timeout(timeout(30)):
        async for message in channel.messages():
            if message.event in events and status in ("", message.payload.get("status")):
                return message
    raise AssertionError(f"the channel closed before a push of {events}")


async def listed(history: Channel, task_id: str) -> list[dict[str, Any]] | None:
    """The user's tasks once `task_id` is among them, completed; None before (not written
    yet, or history unavailable)."""
    reply = await history.push("list_tasks", {"limit": 20})
    if not reply.ok:
        assert reply.response["reason"] == "unavailable", reply
        return None
    tasks: list[dict[str, Any]] = reply.response["tasks"]
    done = [t for t in tasks if t["task_id"] == task_id and t["status"] == "completed"]
    return tasks if done else None
