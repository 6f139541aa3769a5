"""task_svc's side of LlmService.GenerateMany: a gRPC stream to llm_svc carries many running
generations (svckit/multiplex.py; llm_svc/multiplex.py is the other side). With several
llm_svc replicas behind one target, `streams` streams (TASK_LLM_STREAMS) are opened on the
channel, which spreads them over the replicas (round_robin, svckit/grpc_server.py); each
generation goes on the stream carrying the fewest.

`generate(request)` reads like a call of its own: an async iterator of that generation's
events, ending with its `final` or `error`. Closing it early (the worker was cancelled: a
user's Cancel, shutdown) sends `cancel` for it, and llm_svc aborts the provider request.
When the stream breaks (llm_svc restarted, the network), every generation on it fails with
`LlmUnreachable` (our own outage, not the provider's: it costs the task no attempt, runner.py),
and the next `generate` opens a new stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable

from svckit import tracing
from svckit.errors import ServiceError
from svckit.multiplex import MuxClient
from switchboard.v1 import llm_pb2, llm_pb2_grpc

Event = llm_pb2.GenerateEvent


class LlmUnreachable(ServiceError):
    """llm_svc could not be reached, or its stream broke under a running generation."""

    @classmethod
    def of(cls, error: ServiceError) -> LlmUnreachable:
        return cls(error.code, f"llm_svc unreachable: {error.message}", retryable=True)


def _split(batch: llm_pb2.GenerateBatch) -> Iterable[tuple[int, Event]]:
    return ((tagged.id, tagged.event) for tagged in batch.events)


class LlmClient:
    def __init__(self, stub: llm_pb2_grpc.LlmServiceStub, streams: int = 1) -> None:
        self.muxes: list[MuxClient[Event]] = [
            MuxClient(
                stub.GenerateMany,
                _split,
                lambda commands: llm_pb2.GenerateCommands(commands=commands),
                "llm_svc",
            )
            for _ in range(max(streams, 1))
        ]

    async def generate(self, request: llm_pb2.GenerateRequest) -> AsyncGenerator[Event, None]:
        """The events of one generation, up to and including its `final` or `error`; a broken
        stream raises its ServiceError."""
        # A stream opened here (the first, or after a break) serves every generation after
        # this one: its tasks must not take this generation's trace (svckit/tracing.py).
        with tracing.untraced():
            call = min(self.muxes, key=lambda mux: mux.calls).call()
        call.send(llm_pb2.GenerateCommand(id=call.id, start=request))
        ended = False
        try:
            while not ended:
                try:
                    event = await call.get()
                except ServiceError as broken:  # the stream's own failure, not an `error` event
                    ended = True
                    raise LlmUnreachable.of(broken) from broken
                ended = event.WhichOneof("kind") in ("final", "error")
                yield event
        finally:
            if not ended:
                call.send(llm_pb2.GenerateCommand(id=call.id, cancel=True))
            call.close()

    async def close(self) -> None:
        for mux in self.muxes:
            await mux.close()
