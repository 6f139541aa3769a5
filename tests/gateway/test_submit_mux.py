"""SubmitMany through both real halves (task_svc/submit_mux.py and gateway_svc/submits.py) over
a real grpc.aio server: concurrent Submits share one stream, each gets its own answer or its
own typed error, and a stream that breaks fails what was in flight with a typed error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway_svc.submits import Submits
from svckit.errors import ServiceError
from svckit.grpc_server import GrpcServer, insecure_channel
from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
from task_svc.submit_mux import serve_submits
from tests.conftest import timeout


class Authority(tasks_pb2_grpc.TaskServiceServicer):
    """Accepts a prompt, refuses "no", holds "hold" until `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = asyncio.Event()

    async def SubmitMany(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        await serve_submits(request_iterator, context, self.submit)

    async def submit(self, request: tasks_pb2.SubmitRequest) -> tasks_pb2.SubmitResponse:
        if request.prompt == "no":
            raise ServiceError(common_pb2.ERROR_CODE_OVERLOADED, "full", retry_after_ms=500)
        if request.prompt == "hold":
            self.held.set()
            await self.release.wait()
        state = common_pb2.TaskState(task_id=request.task_id, status=common_pb2.TASK_STATUS_QUEUED)
        return tasks_pb2.SubmitResponse(state=state)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Submits, Authority, GrpcServer]]:
    authority = Authority()
    server = GrpcServer(
        "127.0.0.1:0", lambda s: tasks_pb2_grpc.add_TaskServiceServicer_to_server(authority, s), []
    )
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            submits = Submits(tasks_pb2_grpc.TaskServiceStub(channel))
            try:
                yield submits, authority, server
            finally:
                await submits.close()
    finally:
        await server.stop(0)


def request(task_id: str, prompt: str = "hi") -> tasks_pb2.SubmitRequest:
    return tasks_pb2.SubmitRequest(task_id=task_id, user_id="alice", prompt=prompt)


async def test_concurrent_submits_share_one_stream_and_each_gets_its_answer(served: Any) -> None:
    submits, _, _ = served
    ids = [f"task-{i}" for i in range(50)]
    answers = await asyncio.wait_for(
        asyncio.gather(*(submits.submit(request(i)) for i in ids)), timeout(10)
    )
    assert [a.state.task_id for a in answers] == ids
    assert submits.mux.streams_opened == 1


async def test_a_refusal_is_that_submits_typed_error(served: Any) -> None:
    submits, _, _ = served
    results: tuple[Any, ...] = await asyncio.gather(
        submits.submit(request("a", "no")), submits.submit(request("b")), return_exceptions=True
    )
    refused, accepted = results
    assert isinstance(refused, ServiceError) and refused.code == common_pb2.ERROR_CODE_OVERLOADED
    assert refused.retry_after_ms == 500
    assert isinstance(accepted, tasks_pb2.SubmitResponse)


async def test_a_broken_stream_fails_the_submit_in_flight(served: Any) -> None:
    submits, authority, server = served
    pending = asyncio.ensure_future(submits.submit(request("a", "hold")))
    await asyncio.wait_for(authority.held.wait(), timeout(5))
    await server.stop(0)  # task_svc goes away before it answers
    with pytest.raises(ServiceError) as broken:
        await asyncio.wait_for(pending, timeout(5))
    assert broken.value.retryable
