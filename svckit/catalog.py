"""The models llm_svc serves (ListModels), as task_svc and the gateway resolve them: a
request's model (or the default one) and the queue its jobs go to.

The list is cached for `ttl_s` and refreshed in the background once stale, so no Submit or ack
waits for llm_svc except the very first one; while llm_svc is away the last list is kept (with
none at all, the model is taken as named and the job goes to the default queue: the task is
stored and fails later with a typed error if its model is unknown).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass

import grpc

from svckit.errors import ServiceError
from svckit.lifecycle import cancel_and_wait
from switchboard.v1 import common_pb2, events_pb2, llm_pb2, llm_pb2_grpc, tasks_pb2

log = logging.getLogger(__name__)

_QUEUE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
LIST_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ResolvedModel:
    model: str
    queue: str


class ModelCatalog:
    def __init__(self, llm: llm_pb2_grpc.LlmServiceStub, ttl_s: float = 10.0) -> None:
        self.llm = llm
        self.ttl_s = ttl_s
        self._models: list[llm_pb2.ModelInfo] | None = None
        self._fetched_at = 0.0
        self._refresh: asyncio.Task[None] | None = None

    async def resolve(self, model: str) -> ResolvedModel:
        """The model to run and its queue; MODEL_NOT_FOUND for a model llm_svc does not list."""
        models = await self._list()
        if not models:
            return ResolvedModel(model, "default")
        if not model:
            chosen = next((m for m in models if m.is_default), models[0])
        else:
            found = next((m for m in models if m.id == model), None)
            if found is None:
                raise ServiceError(
                    common_pb2.ERROR_CODE_MODEL_NOT_FOUND, f"unknown model {model!r}"
                )
            chosen = found
        queue = _QUEUE_UNSAFE.sub("_", chosen.queue) or "default"
        return ResolvedModel(chosen.id, queue)

    async def close(self) -> None:
        await cancel_and_wait(self._refresh)
        self._refresh = None

    async def _list(self) -> list[llm_pb2.ModelInfo] | None:
        if self._fetched_at == 0.0:  # never asked: the first resolve waits for the list
            await asyncio.shield(self._start_refresh())
        elif time.monotonic() - self._fetched_at >= self.ttl_s:
            self._start_refresh()
        return self._models

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._fetch(), name="ListModels")
        return self._refresh

    async def _fetch(self) -> None:
        try:
            reply = await self.llm.ListModels(llm_pb2.ListModelsRequest(), timeout=LIST_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            log.warning("ListModels failed", extra={"code": error.code().name})
            self._fetched_at = time.monotonic()  # not again at once: after another ttl
            return
        self._models = list(reply.models)
        self._fetched_at = time.monotonic()


def job_of(request: tasks_pb2.SubmitRequest, model: ResolvedModel) -> events_pb2.Job:
    """What a Submit stores in SB_JOBS, stamped now: the one builder, for the gateway's own
    store (the acks' path) and task_svc's Submit alike."""
    job = events_pb2.Job(
        task_id=request.task_id,
        user_id=request.user_id,
        prompt=request.prompt,
        model=model.model,
        priority=request.priority,
        options=request.options,
        traceparent=request.traceparent,
    )
    # Set by hand: Timestamp.GetCurrentTime goes through datetime (6 us against 0.7).
    job.submitted_at.seconds, job.submitted_at.nanos = divmod(time.time_ns(), 1_000_000_000)
    return job
