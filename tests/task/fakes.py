"""Stand-ins for the job engine's unit tests: no NATS, no gRPC, no llm_svc.

`ScriptedLlm` answers like conftest.FakeLlm (same prompts), in process; `Recorder` is the
lifecycle publisher, writing into a MemoryJobStore what SB_TASK_EVENTS would answer and
logging each event in the store's log, so one list shows the order things were stored in.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncGenerator

from switchboard.v1 import common_pb2, events_pb2, history_pb2, llm_pb2
from task_svc.events import Stored
from task_svc.llm_client import LlmClient
from task_svc.memory_store import MemoryJobStore

Kind = events_pb2.LifecycleKind


def kind_name(event: events_pb2.LifecycleEvent) -> str:
    return Kind.Name(event.kind).removeprefix("LIFECYCLE_KIND_").lower()


class Recorder:
    def __init__(self, store: MemoryJobStore) -> None:
        self.store = store
        self.events: list[events_pb2.LifecycleEvent] = []

    def _stored(self) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def publish(self, event: events_pb2.LifecycleEvent) -> asyncio.Future[None]:
        self.events.append(event)
        self.store.log.append(("lifecycle", kind_name(event)))
        self.store.stored[event.task_id] = Stored(event.seq, event.user_id, event.attempt, event)
        return self._stored()

    def publish_snapshot(self, snapshot: history_pb2.TaskSnapshot) -> asyncio.Future[None]:
        state = snapshot.state
        self.store.stored[state.task_id] = Stored(
            state.seq, state.user_id, state.attempts, content=state.content, progress=state.progress
        )
        self.store.log.append(("snapshot", state.content))
        return self._stored()

    def kinds(self, task_id: str) -> list[str]:
        return [kind_name(e) for e in self.events if e.task_id == task_id]


class ScriptedLlm(LlmClient):
    """Echoes the prompt's words. `hold ...` waits after the first word until `release`;
    `fail ...` is refused (not retryable); `flaky ...` is rate limited on its first two
    runs. A run asked to continue a text (`continue_from`) streams only the words after it.
    Records the order of starts, what each was asked to continue, and cancellations."""

    def __init__(self) -> None:  # no stub: nothing to connect to
        self.order: list[str] = []
        self.releases: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.cancelled: set[str] = set()
        self.continued: defaultdict[str, list[str]] = defaultdict(list)  # continue_from

    def release(self, task_id: str) -> None:
        self.releases[task_id].set()

    async def generate(
        self, request: llm_pb2.GenerateRequest
    ) -> AsyncGenerator[llm_pb2.GenerateEvent, None]:
        task_id = request.request_id
        self.order.append(task_id)
        self.started[task_id].set()
        self.continued[task_id].append(request.continue_from)
        try:
            if request.prompt.startswith("flaky") and self.order.count(task_id) <= 2:
                error = common_pb2.Error(
                    code=common_pb2.ERROR_CODE_RATE_LIMITED,
                    message="slow down",
                    retryable=True,
                    retry_after_ms=10,
                )
                yield llm_pb2.GenerateEvent(delta=llm_pb2.TextDelta(text="partial"))
                yield llm_pb2.GenerateEvent(error=error)
                return
            if request.prompt.startswith("fail"):
                error = common_pb2.Error(code=common_pb2.ERROR_CODE_CONTENT_FILTERED, message="no")
                yield llm_pb2.GenerateEvent(error=error)
                return
            words = request.prompt.split()
            for index, word in enumerate(words):
                text = word if index == 0 else " " + word
                so_far = " ".join(words[: index + 1])
                if request.continue_from.startswith(so_far):
                    continue  # the text so far has it
                yield llm_pb2.GenerateEvent(delta=llm_pb2.TextDelta(text=text))
                if index == 0 and request.prompt.startswith("hold"):
                    await self.releases[task_id].wait()
            final = llm_pb2.GenerationFinal(content=" ".join(words), model=request.model)
            yield llm_pb2.GenerateEvent(final=final)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.add(task_id)
            raise

    async def close(self) -> None:
        pass
