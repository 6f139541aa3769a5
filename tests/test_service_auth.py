"""Internal calls need a service token (svckit/service_auth.py): over a real gRPC hop, a call
without one, with a forged one or an expired one is refused UNAUTHENTICATED before it reaches
the handler; the dead-letter RPCs want the admin; health checking stays open for probes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from svckit.grpc_server import GrpcServer, insecure_channel
from svckit.service_auth import (
    DEV_SECRET,
    METADATA_KEY,
    SecretMissing,
    internal_secret,
    mint,
    verify,
)
from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc


class _Answering(tasks_pb2_grpc.TaskServiceServicer):
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def Get(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append("Get")
        return tasks_pb2.GetTaskResponse(state=common_pb2.TaskState(task_id=request.task_id))

    async def ListDeadLetters(self, request, context):  # type: ignore[no-untyped-def]
        self.calls.append("ListDeadLetters")
        return tasks_pb2.ListDeadLettersResponse()


@pytest.fixture
async def served() -> AsyncIterator[tuple[GrpcServer, _Answering]]:
    servicer = _Answering()
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: tasks_pb2_grpc.add_TaskServiceServicer_to_server(servicer, s),
        ["switchboard.v1.TaskService"],
    )
    await server.start()
    try:
        yield server, servicer
    finally:
        await server.stop(0)


def test_tokens_name_their_caller_until_they_expire() -> None:
    token = mint("gateway_svc", DEV_SECRET, now=1000.0, ttl_s=60)
    assert verify(token, DEV_SECRET, now=1059.0) == "gateway_svc"
    assert verify(token, DEV_SECRET, now=1060.0) is None  # expired
    assert verify(token, b"another secret of thirty-two bytes!!", now=1000.0) is None
    forged = token.replace("gateway_svc", "admin")
    assert verify(forged, DEV_SECRET, now=1000.0) is None
    assert verify("v1.admin.9999999999", DEV_SECRET, now=1000.0) is None  # unsigned


def test_production_needs_a_real_secret() -> None:
    with pytest.raises(SecretMissing):
        internal_secret({"SWITCHBOARD_ENV": "production"})
    with pytest.raises(SecretMissing):
        internal_secret({"SWITCHBOARD_INTERNAL_SECRET": "short"})
    assert internal_secret({"SWITCHBOARD_INTERNAL_SECRET": "x" * 32}) == b"x" * 32
    assert internal_secret({}) == DEV_SECRET  # development


async def test_a_call_with_the_services_token_goes_through(
    served: tuple[GrpcServer, _Answering],
) -> None:
    server, servicer = served
    async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
        reply = await tasks_pb2_grpc.TaskServiceStub(channel).Get(
            tasks_pb2.GetTaskRequest(task_id="t")
        )
    assert reply.state.task_id == "t" and servicer.calls == ["Get"]


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        ((METADATA_KEY, "v1.gateway_svc.9999999999.00"),),  # forged
        ((METADATA_KEY, mint("gateway_svc", DEV_SECRET, now=0.0, ttl_s=1)),),  # expired
        ((METADATA_KEY, mint("gateway_svc", b"not our secret, thirty-two bytes", 2e9)),),
    ],
    ids=["none", "forged", "expired", "other secret"],
)
async def test_a_call_without_a_valid_token_never_reaches_the_handler(
    served: tuple[GrpcServer, _Answering], metadata: tuple[tuple[str, str], ...]
) -> None:
    server, servicer = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as raw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tasks_pb2_grpc.TaskServiceStub(raw).Get(
                tasks_pb2.GetTaskRequest(task_id="t"), metadata=metadata
            )
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Probes need no token.
        reply = await health_pb2_grpc.HealthStub(raw).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert servicer.calls == []


async def test_dead_letters_are_for_the_admin(served: tuple[GrpcServer, _Answering]) -> None:
    server, servicer = served
    address = f"127.0.0.1:{server.port}"
    async with insecure_channel(address, caller="gateway_svc") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tasks_pb2_grpc.TaskServiceStub(channel).ListDeadLetters(
                tasks_pb2.ListDeadLettersRequest()
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with insecure_channel(address, caller="admin") as channel:
        await tasks_pb2_grpc.TaskServiceStub(channel).ListDeadLetters(
            tasks_pb2.ListDeadLettersRequest()
        )
    assert servicer.calls == ["ListDeadLetters"]


async def test_a_stream_without_a_token_is_refused_too(
    served: tuple[GrpcServer, _Answering],
) -> None:
    server, _ = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as raw:
        call = tasks_pb2_grpc.TaskServiceStub(raw).WatchMany()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
