"""The real gateway over real WebSockets, against a fake TaskService on a real gRPC server."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import orjson
import pytest
from rich.console import Console
from websockets.asyncio.client import ClientConnection, connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway_svc import client as client_cmd
from gateway_svc import tokens
from gateway_svc.phoenix_client import (
    JoinRefused,
    PhoenixClient,
    auth_token_subprotocols,
)
from gateway_svc.server import token_from_subprotocols
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2
from tests.conftest import timeout
from tests.gateway.live import KEY, Stack, recv, send, topic, until


async def test_connect_refused_with_403_before_upgrade(stack: Stack) -> None:
    expired = tokens.mint("alice", KEY, ttl=-1)
    for url in (
        f"{stack.base}/websocket?vsn=2.0.0",
        f"{stack.base}/websocket?vsn=2.0.0&token=forged.token",
        f"{stack.base}/websocket?vsn=2.0.0&token={expired}",
        f"{stack.base}/websocket?vsn=3.0.0&token={stack.token()}",
    ):
        with pytest.raises(InvalidStatus) as refused:
            await connect(url)
        assert refused.value.response.status_code == 403
        assert refused.value.response.body == b""
    with pytest.raises(InvalidStatus) as missing:
        await connect(f"ws://127.0.0.1:{stack.gateway.port}/other?token={stack.token()}")
    assert missing.value.response.status_code == 404
    assert stack.metric("switchboard_sockets") == 0
    assert stack.metric("gateway_connects_refused_total", reason="missing_token") == 1
    assert stack.metric("gateway_connects_refused_total", reason="invalid_token") == 1
    assert stack.metric("gateway_connects_refused_total", reason="expired_token") == 1
    assert stack.metric("gateway_connects_refused_total", reason="unsupported_vsn") == 1


async def test_token_as_subprotocol_is_answered_with_phoenix(stack: Stack) -> None:
    client = await PhoenixClient.connect(
        stack.base, subprotocols=auth_token_subprotocols(stack.token())
    )
    async with client:
        assert client.ws.subprotocol == "phoenix"
        assert (await client.heartbeat()).ok


async def test_join_replies_with_state_then_generate_acks_before_pushes(stack: Stack) -> None:
    t = topic()
    async with connect(stack.url()) as ws:
        await send(ws, ["1", "1", t, "phx_join", {}])
        assert await recv(ws) == [
            "1",
            "1",
            t,
            "phx_reply",
            {"status": "ok", "response": {"status": "new"}},
        ]
        await send(ws, ["1", "2", t, "llm_generate", {"prompt": "hi", "priority": 2}])
        task_id = t.removeprefix("task:")
        assert await recv(ws) == [
            "1",
            "2",
            t,
            "phx_reply",
            {
                "status": "ok",
                "response": {"task_id": task_id, "status": "queued", "position": 1, "eta_ms": 250},
            },
        ]
        assert await recv(ws) == [
            "1",
            None,
            t,
            "progress",
            {"progress": 0.0, "status": "queued", "seq": 1, "position": 1, "eta_ms": 250},
        ]
        await stack.fake.run(task_id)
        pushes = [await recv(ws) for _ in range(4)]
        assert [(p[0], p[1], p[3], p[4]["seq"]) for p in pushes] == [
            ("1", None, "progress", 2),
            ("1", None, "chunk", 3),
            ("1", None, "chunk", 4),
            ("1", None, "llm_response", 5),
        ]
        assert pushes[1][4]["delta"] == "Hello"
        assert pushes[3][4] == {
            "content": "Hello, world",
            "model": "local-small",
            "from_fallback": False,
            "from_cache": False,
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            "finish_reason": "stop",
            "seq": 5,
        }
        assert stack.fake.submits[0].user_id == "alice"
        assert stack.fake.submits[0].priority == 2


async def test_rejoin_after_completion_reports_the_final_state(stack: Stack) -> None:
    t = topic()
    async with await PhoenixClient.connect(stack.base, token=stack.token()) as client:
        channel = await client.join(t)
        assert (await channel.push("llm_generate", {"prompt": "hi"})).ok
        await stack.fake.run(t.removeprefix("task:"))
        events = [m.event async for m in until(channel.messages(), "llm_response")]
        assert events == ["progress", "progress", "chunk", "chunk", "llm_response"]
        again = await client.join(t, {"last_seq": 5})
        assert again.join_response["status"] == "completed"
        assert again.join_response["content"] == "Hello, world"
        assert again.join_response["seq"] == 5
        assert again.join_response["usage"]["total_tokens"] == 5
        # The old join is closed after the new join's reply.
        assert [m.event async for m in until(channel.messages(), "phx_close")] == ["phx_close"]


async def test_cancel_replies_with_the_cancelled_state(stack: Stack) -> None:
    t = topic()
    async with await PhoenixClient.connect(stack.base, token=stack.token()) as client:
        channel = await client.join(t)
        assert (await channel.push("llm_generate", {"prompt": "hi"})).ok
        reply = await channel.push("cancel", {})
        assert reply.ok and reply.response["status"] == "cancelled"
        pushes = [m async for m in until(channel.messages(), "progress", "cancelled")]
        assert [p.payload["status"] for p in pushes] == ["queued", "cancelled"]


async def test_another_users_task_is_unauthorized(stack: Stack) -> None:
    t = topic()
    async with await PhoenixClient.connect(stack.base, token=stack.token("alice")) as alice:
        await alice.join(t)
        async with await PhoenixClient.connect(stack.base, token=stack.token("bob")) as bob:
            with pytest.raises(JoinRefused) as refused:
                await bob.join(t)
            assert refused.value.response == {"reason": "unauthorized"}


async def test_errors_are_replied_with_reasons(stack: Stack) -> None:
    t = topic()
    async with await PhoenixClient.connect(stack.base, token=stack.token()) as client:
        channel = await client.join(t)
        bad = await channel.push("llm_generate", {"prompt": 42})
        assert not bad.ok and bad.response["reason"] == "invalid_request"
        assert "prompt" in bad.response["message"]
        unknown = await channel.push("dance", {})
        assert unknown.response == {"reason": "unknown event"}
        stack.fake.refuse_submit = ServiceError(
            common_pb2.ErrorCode.ERROR_CODE_RATE_LIMITED, "slow down", retry_after_ms=1500
        )
        limited = await channel.push("llm_generate", {"prompt": "hi"})
        assert limited.status == "error"
        assert limited.response == {
            "reason": "rate_limited",
            "message": "slow down",
            "retry_after_ms": 1500,
        }
        with pytest.raises(JoinRefused) as refused:
            await client.join(topic(), {"last_seq": "x"})
        assert refused.value.response["reason"] == "invalid_request"


async def test_a_broken_watch_is_taken_up_again_from_the_last_seq(stack: Stack) -> None:
    """task_svc restarting (or the task's shard moving) breaks its watch with UNAVAILABLE:
    the gateway watches again from the last seq it pushed, and the client sees one gap-free
    sequence on the channel it has, without a phx_error or a rejoin."""
    t = topic()
    task_id = t.removeprefix("task:")
    async with await PhoenixClient.connect(stack.base, token=stack.token()) as client:
        channel = await client.join(t)
        assert (await channel.push("llm_generate", {"prompt": "hi"})).ok
        first = [m async for m in until(channel.messages(), "progress")]
        assert first[-1].payload["seq"] == 1
        watches = len(stack.fake.watches)
        await stack.fake.break_streams(task_id)
        await stack.fake.run(task_id)
        rest = [m async for m in until(channel.messages(), "llm_response")]
        assert "phx_error" not in [m.event for m in rest]
        assert [m.payload["seq"] for m in rest] == [2, 3, 4, 5]
        assert len(stack.fake.watches) == watches + 1
        assert stack.fake.watches[-1].after_seq == 1


async def test_malformed_frame_closes_only_its_connection(stack: Stack) -> None:
    async with await PhoenixClient.connect(stack.base, token=stack.token()) as good:
        async with connect(stack.url()) as bad:
            await bad.send("this is not a phoenix frame")
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(timeout(5)):
                    await bad.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1007
        assert (await good.heartbeat()).ok
        assert stack.metric("gateway_bad_frames_total", kind="invalid") == 1


async def test_v1_frames_when_vsn_is_missing(stack: Stack) -> None:
    t = topic()
    async with connect(stack.url(vsn=None)) as ws:
        await ws.send(
            orjson.dumps(
                {"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "1"}
            ).decode()
        )
        assert await recv_v1(ws) == {
            "topic": "phoenix",
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": "1",
        }
        await ws.send(
            orjson.dumps({"topic": t, "event": "phx_join", "payload": {}, "ref": "2"}).decode()
        )
        assert await recv_v1(ws) == {
            "topic": t,
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {"status": "new"}},
            "ref": "2",
        }


async def recv_v1(ws: ClientConnection) -> Any:
    async with asyncio.timeout(timeout(5)):
        return orjson.loads(await ws.recv())


@pytest.mark.parametrize("stack", [{"gateway_idle_timeout_s": 0.3}], indirect=True)
async def test_idle_connection_is_closed_with_1001(stack: Stack) -> None:
    async with connect(stack.url()) as ws:
        async with asyncio.timeout(timeout(5)):
            await ws.wait_closed()
        assert ws.close_code == 1001


@pytest.mark.parametrize("stack", [{"gateway_max_frame_bytes": 1024}], indirect=True)
async def test_oversized_frame_closes_with_1009(stack: Stack) -> None:
    async with connect(stack.url()) as ws:
        await send(ws, [None, "1", "phoenix", "heartbeat", {"pad": "x" * 2000}])
        async with asyncio.timeout(timeout(5)):
            await ws.wait_closed()
        assert ws.close_code == 1009


async def test_shutdown_closes_sockets_with_1001(stack: Stack) -> None:
    async with await PhoenixClient.connect(stack.base, token=stack.token()) as client:
        await client.join(topic())
        await stack.gateway.stop()
        async with asyncio.timeout(timeout(5)):
            assert await client.wait_closed() == 1001


async def test_client_command_streams_to_the_end(stack: Stack) -> None:
    stack.fake.auto_run = True
    out = io.StringIO()
    args = client_cmd.parse_args(["Say hi", "--url", stack.base, "--token", stack.token()])
    async with asyncio.timeout(timeout(10)):
        await client_cmd.run(args, Console(file=out, width=100))
    assert "Hello, world" in out.getvalue()
    assert "5 total" in out.getvalue() and "local-small" in out.getvalue()


async def test_client_command_fails_clearly(stack: Stack) -> None:
    bad_token = client_cmd.parse_args(["hi", "--url", stack.base, "--token", "x.y"])
    with pytest.raises(client_cmd.Failed) as refused:
        await client_cmd.run(bad_token, Console(file=io.StringIO()))
    assert refused.value.status == 2 and "403" in str(refused.value)
    stack.fake.refuse_submit = ServiceError(common_pb2.ErrorCode.ERROR_CODE_OVERLOADED, "busy")
    args = client_cmd.parse_args(["hi", "--url", stack.base, "--token", stack.token()])
    with pytest.raises(client_cmd.Failed) as failed:
        await client_cmd.run(args, Console(file=io.StringIO()))
    assert failed.value.status == 3 and "overloaded: busy" in str(failed.value)


def test_token_from_subprotocol_accepts_both_base64_alphabets() -> None:
    # phoenix.js's own test: authToken "1234" is offered as "base64url.bearer.phx.MTIzNA".
    headers = Headers([("Sec-WebSocket-Protocol", "phoenix, base64url.bearer.phx.MTIzNA")])
    assert token_from_subprotocols(headers) == "1234"
    token = "a?>b"  # btoa gives "YT8+Yg", the URL-safe alphabet "YT8-Yg"
    for encoded in ("YT8+Yg", "YT8-Yg"):
        offered = Headers([("Sec-WebSocket-Protocol", f"phoenix, base64url.bearer.phx.{encoded}")])
        assert token_from_subprotocols(offered) == token
    assert token_from_subprotocols(Headers([("Sec-WebSocket-Protocol", "phoenix")])) is None
    bad = Headers([("Sec-WebSocket-Protocol", "base64url.bearer.phx.%%%")])
    assert token_from_subprotocols(bad) is None


async def test_a_generation_is_timed_and_its_frames_and_close_counted(stack: Stack) -> None:
    t = topic()
    async with connect(stack.url()) as ws:
        await send(ws, ["1", "1", t, "phx_join", {}])
        await recv(ws)
        await send(ws, ["1", "2", t, "llm_generate", {"prompt": "hi"}])
        await recv(ws)  # the ack
        assert stack.metric("switchboard_ack_seconds_count") == 1
        assert stack.metric("switchboard_first_chunk_seconds_count", model="local-small") == 0
        await stack.fake.run(t.removeprefix("task:"))
        async with asyncio.timeout(timeout(5)):
            while (await recv(ws))[3] != "llm_response":
                pass
        assert stack.metric("switchboard_first_chunk_seconds_count", model="local-small") == 1
        assert stack.metric("switchboard_generation_seconds_count", model="local-small") == 1
        assert stack.metric("switchboard_generation_seconds_sum", model="local-small") > 0
        assert stack.metric("switchboard_frames_total", direction="in") == 2
        # The join and generate replies, the queued and started progress, two chunks, the end.
        assert stack.metric("switchboard_frames_total", direction="out") == 7
    await stack.wait_drained()
    assert stack.metric("switchboard_socket_closes_total", code="1000") == 1
