"""Every limit answers with a clear error and moves its metric (read from the registry)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway_svc import tokens
from gateway_svc.phoenix_client import JoinRefused, PhoenixClient
from switchboard.v1 import common_pb2
from tests.conftest import timeout
from tests.gateway.live import KEY, Stack, recv, running_stack, send, topic


@pytest.mark.parametrize("stack", [{"gateway_max_connections_per_user": 2}], indirect=True)
async def test_connections_per_user_are_refused_with_403_and_counted(stack: Stack) -> None:
    first = await connect(stack.url("alice"))
    second = await connect(stack.url("alice"))
    with pytest.raises(InvalidStatus) as refused:
        await connect(stack.url("alice"))
    assert refused.value.response.status_code == 403
    assert refused.value.response.body == b""
    assert stack.metric("gateway_connects_refused_total", reason="too_many_connections") == 1
    assert stack.metric("gateway_limit_hits_total", limit="connections_per_user") == 1
    # Other users are not affected, and the slots come back when the sockets close.
    async with connect(stack.url("bob")):
        pass
    await first.close()
    await second.close()
    await stack.wait_drained()
    async with connect(stack.url("alice")), connect(stack.url("alice")):
        pass
    assert stack.metric("gateway_connects_total") == 5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_generate_is_rate_limited_per_user_with_retry_after() -> None:
    clock = Clock()
    limits: dict[str, Any] = {"gateway_generate_rate_per_s": 0.5, "gateway_generate_burst": 2}
    async with running_stack(clock=clock, **limits) as stack:
        alice = await PhoenixClient.connect(stack.base, token=stack.token("alice"))
        bob = await PhoenixClient.connect(stack.base, token=stack.token("bob"))
        async with alice, bob:
            for _ in range(2):
                channel = await alice.join(topic())
                assert (await channel.push("llm_generate", {"prompt": "hi"})).ok
            # The bucket is per user, across all of the user's channels.
            channel = await alice.join(topic())
            limited = await channel.push("llm_generate", {"prompt": "hi"})
            assert limited.status == "error"
            assert limited.response == {
                "reason": "rate_limited",
                "message": "too many generations; retry in 2000 ms",
                "retry_after_ms": 2000,
            }
            assert len(stack.fake.submits) == 2  # never reached task_svc
            assert stack.metric("gateway_limit_hits_total", limit="generate_rate") == 1
            assert stack.metric("gateway_rate_limited_pushes_total", source="gateway") == 1
            other = await bob.join(topic())
            assert (await other.push("llm_generate", {"prompt": "hi"})).ok
            clock.now += 2.0  # one token back
            assert (await channel.push("llm_generate", {"prompt": "hi"})).ok
            assert stack.metric("gateway_generates_total", status="ok") == 4
            assert stack.metric("gateway_generates_total", status="error") == 1


@pytest.mark.parametrize("stack", [{"gateway_max_prompt_chars": 10}], indirect=True)
async def test_oversize_prompt_is_refused_before_grpc(stack: Stack) -> None:
    async with await PhoenixClient.connect(stack.base, token=stack.token()) as client:
        channel = await client.join(topic())
        too_long = await channel.push("llm_generate", {"prompt": "x" * 11})
        assert too_long.status == "error"
        assert too_long.response == {
            "reason": "invalid_request",
            "message": "prompt is longer than 10 characters",
        }
        system = await channel.push(
            "llm_generate", {"prompt": "hi", "options": {"system": "y" * 11}}
        )
        assert system.response["message"] == "options.system is longer than 10 characters"
        assert stack.fake.submits == []
        assert stack.metric("gateway_limit_hits_total", limit="prompt_size") == 2
        assert (await channel.push("llm_generate", {"prompt": "x" * 10})).ok


@pytest.mark.parametrize("stack", [{"gateway_max_channels": 1}], indirect=True)
async def test_channel_limit_is_replied_and_counted(stack: Stack) -> None:
    async with connect(stack.url()) as ws:
        first, second = topic(), topic()
        await send(ws, ["1", "1", first, "phx_join", {}])
        assert (await recv(ws))[4]["status"] == "ok"
        await send(ws, ["2", "2", second, "phx_join", {}])
        assert await recv(ws) == [
            "2",
            "2",
            second,
            "phx_reply",
            {"status": "error", "response": {"reason": "too many channels joined"}},
        ]
        assert stack.metric("gateway_limit_hits_total", limit="channels_per_socket") == 1
        assert stack.metric("switchboard_channels") == 1


@pytest.mark.parametrize("stack", [{"gateway_max_frame_bytes": 1024}], indirect=True)
async def test_oversized_frame_closes_with_1009_and_is_counted(stack: Stack) -> None:
    async with connect(stack.url()) as ws:
        await send(ws, [None, "1", "phoenix", "heartbeat", {"pad": "x" * 2000}])
        async with asyncio.timeout(timeout(5)):
            await ws.wait_closed()
        assert ws.close_code == 1009
    await stack.wait_drained()
    assert stack.metric("gateway_limit_hits_total", limit="frame_size") == 1


@pytest.mark.parametrize("stack", [{"gateway_idle_timeout_s": 0.2}], indirect=True)
async def test_idle_close_is_counted(stack: Stack) -> None:
    async with connect(stack.url()) as ws:
        async with asyncio.timeout(timeout(5)):
            await ws.wait_closed()
        assert ws.close_code == 1001
    await stack.wait_drained()
    assert stack.metric("gateway_idle_closes_total") == 1


async def test_one_user_never_reaches_another_users_task(stack: Stack) -> None:
    t = topic()
    alice = await PhoenixClient.connect(stack.base, token=stack.token("alice"))
    bob = await PhoenixClient.connect(stack.base, token=stack.token("bob"))
    async with alice, bob:
        channel = await alice.join(t)
        assert (await channel.push("llm_generate", {"prompt": "secret"})).ok
        # Join (watch and read): refused without any of the task's state.
        for params in ({}, {"last_seq": 0}):
            with pytest.raises(JoinRefused) as refused:
                await bob.join(t, params)
            assert refused.value.response == {"reason": "unauthorized"}
        # Without a join, events on the topic never reach the task service.
        for event in ("llm_generate", "cancel"):
            reply = await bob.push(t, event, {"prompt": "mine now"})
            assert reply.response == {"reason": "unmatched topic"}
        assert [s.user_id for s in stack.fake.submits] == ["alice"]
        cancelled = common_pb2.TaskStatus.TASK_STATUS_CANCELLED
        assert stack.fake.tasks[t.removeprefix("task:")].state.status != cancelled
        assert stack.metric("gateway_joins_total", status="error") == 2


@pytest.mark.parametrize("stack", [{"gateway_close_timeout_s": 0.2}], indirect=True)
async def test_a_peer_that_never_finishes_its_close_is_aborted(stack: Stack) -> None:
    # A raw client: the opening handshake, a close frame, then it keeps TCP open forever
    # instead of closing it after the server's close frame (RFC 6455 7.1.1).
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.gateway.port)
    path = stack.url().removeprefix(f"ws://127.0.0.1:{stack.gateway.port}")
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    async with asyncio.timeout(timeout(5)):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        # FIN + close opcode, masked with a zero key, payload: status 1000.
        writer.write(bytes([0x88, 0x82, 0, 0, 0, 0]) + (1000).to_bytes(2, "big"))
        assert (await reader.readexactly(4))[:2] == bytes([0x88, 0x02])  # the server's close
        await stack.wait_drained()  # aborted by the sweep after the close timeout
        assert await reader.read() == b""
    writer.close()


async def test_a_socket_flooding_joins_and_heartbeats_is_refused_per_socket() -> None:
    clock = Clock()
    limits: dict[str, Any] = {"gateway_socket_events_per_s": 1.0, "gateway_socket_events_burst": 3}
    async with running_stack(clock=clock, **limits) as stack:
        async with connect(stack.url()) as flood, connect(stack.url()) as calm:
            for ref in range(1, 4):
                await send(flood, [None, str(ref), "phoenix", "heartbeat", {}])
                assert (await recv(flood))[4]["status"] == "ok"
            await send(flood, [None, "4", "phoenix", "heartbeat", {}])
            refused = (await recv(flood))[4]
            assert refused["status"] == "error"
            assert refused["response"]["reason"] == "rate_limited"
            assert refused["response"]["retry_after_ms"] > 0
            await send(flood, ["5", "5", topic(), "phx_join", {}])
            assert (await recv(flood))[4]["response"]["reason"] == "rate_limited"
            # The budget is the socket's own: another socket of the same user goes on.
            await send(calm, ["1", "1", topic(), "phx_join", {}])
            assert (await recv(calm))[4]["status"] == "ok"
        assert stack.metric("gateway_limit_hits_total", limit="socket_events") == 2


async def test_a_socket_is_closed_when_its_token_expires() -> None:
    settings: dict[str, Any] = {"gateway_close_timeout_s": 0.1}  # the sweep's period
    async with running_stack(**settings) as stack:
        token = tokens.mint("alice", KEY, ttl=1)
        async with connect(f"{stack.base}/websocket?token={token}&vsn=2.0.0") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(timeout(10)):
                    await ws.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "token expired")
        assert stack.metric("gateway_expired_closes_total") == 1
