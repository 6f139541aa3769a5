"""The gateway's side of TaskService.SubmitMany: every `llm_generate` is submitted over one
gRPC stream (svckit/multiplex.py; task_svc/submit_mux.py is the other side), on a connection
of its own (see __main__), so an ack pays no call set-up and never waits behind the watches'
traffic. `submit` reads like the unary Submit: the response, or the typed error it failed
with (a broken stream fails the Submits on it; Submit is idempotent, so the client may push
again).
"""

from __future__ import annotations

from collections.abc import Iterable

from svckit.errors import ServiceError
from svckit.multiplex import MuxClient
from switchboard.v1 import tasks_pb2, tasks_pb2_grpc

Reply = tasks_pb2.SubmitReply


def _split(batch: tasks_pb2.SubmitReplies) -> Iterable[tuple[int, Reply]]:
    return ((reply.id, reply) for reply in batch.replies)


class Submits:
    def __init__(self, stub: tasks_pb2_grpc.TaskServiceStub) -> None:
        self.mux: MuxClient[Reply] = MuxClient(
            stub.SubmitMany,
            _split,
            lambda commands: tasks_pb2.SubmitCommands(commands=commands),
            "task_svc submits",
        )

    async def submit(self, request: tasks_pb2.SubmitRequest) -> tasks_pb2.SubmitResponse:
        call = self.mux.call()
        try:
            call.send(tasks_pb2.SubmitCommand(id=call.id, request=request))
            reply = await call.get()
        finally:
            call.close()
        if reply.HasField("error"):
            raise ServiceError.from_proto(reply.error)
        return reply.response

    async def close(self) -> None:
        await self.mux.close()
