"""task_svc test harness: a small fake LlmService on a real gRPC server, task_svc itself on a
real gRPC server and a real nats-server, and helpers to read streams."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from llm_svc.multiplex import serve_many
from svckit.grpc_server import insecure_channel
from svckit.nats import connect_nats
from switchboard.v1 import common_pb2, events_pb2, llm_pb2, llm_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from task_svc.app import TaskApp
from task_svc.config import Settings
from tests.conftest import timeout

Status = common_pb2.TaskStatus
Kind = events_pb2.LifecycleKind


class FakeLlm(llm_pb2_grpc.LlmServiceServicer):
    """Streams the prompt's words back as deltas. Prompts starting with `hold` wait after the
    first word until `release(request_id)`; `fail` ends with a typed error. Records the order
    of starts and sees cancellations."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.cancelled: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.releases: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.address = ""

    def release(self, request_id: str) -> None:
        self.releases[request_id].set()

    async def ListModels(self, request, context):
        return llm_pb2.ListModelsResponse(
            models=[
                llm_pb2.ModelInfo(
                    id="fake-small", provider="fake", queue="default", is_default=True
                ),
                llm_pb2.ModelInfo(id="fake-large", provider="fake", queue="default"),
            ]
        )

    async def GenerateMany(self, request_iterator, context):  # type: ignore[override]
        # llm_svc's own server half: the same multiplexing task_svc meets in production.
        await serve_many(request_iterator, context, self._generate)

    def _generate(self, request: llm_pb2.GenerateRequest) -> AsyncIterator[llm_pb2.GenerateEvent]:
        return self.Generate(request, None)  # type: ignore[no-any-return, no-untyped-call]

    async def Generate(self, request, context):
        self.order.append(request.request_id)
        self.started[request.request_id].set()
        try:
            words = request.prompt.split()
            tokens = [word if index == 0 else " " + word for index, word in enumerate(words)]
            # As llm_svc does: a cut run's text (`continue_from`) is continued, not repeated.
            done = 0
            while done < len(tokens) and request.continue_from.startswith(
                "".join(tokens[: done + 1])
            ):
                done += 1
            if request.prompt.startswith("flaky") and self.order.count(request.request_id) <= 2:
                # One more word, then rate limited.
                yield llm_pb2.GenerateEvent(delta=llm_pb2.TextDelta(text=tokens[done]))
                yield llm_pb2.GenerateEvent(
                    error=common_pb2.Error(
                        code=common_pb2.ERROR_CODE_RATE_LIMITED,
                        message="slow down",
                        retryable=True,
                        retry_after_ms=20,
                    )
                )
                return
            if request.prompt.startswith("fail"):
                yield llm_pb2.GenerateEvent(
                    error=common_pb2.Error(
                        code=common_pb2.ERROR_CODE_CONTENT_FILTERED, message="refused by fake"
                    )
                )
                return
            for index, text in enumerate(tokens):
                if index < done:
                    continue
                yield llm_pb2.GenerateEvent(delta=llm_pb2.TextDelta(text=text))
                yield llm_pb2.GenerateEvent(
                    progress=llm_pb2.GenerationProgress(
                        progress=(index + 1) / len(words), tokens=index + 1
                    )
                )
                if index == 0 and request.prompt.startswith("hold"):
                    await self.releases[request.request_id].wait()
            yield llm_pb2.GenerateEvent(
                final=llm_pb2.GenerationFinal(
                    content=" ".join(words),
                    model=request.model or "fake-small",
                    finish_reason="stop",
                    usage=common_pb2.Usage(
                        prompt_tokens=len(words),
                        completion_tokens=len(words),
                        total_tokens=2 * len(words),
                    ),
                )
            )
        except asyncio.CancelledError:
            self.cancelled[request.request_id].set()
            raise


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLlm]:
    fake = FakeLlm()
    server = grpc.aio.server()
    llm_pb2_grpc.add_LlmServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.address = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await server.stop(0)


AppFactory = Callable[..., Awaitable[TaskApp]]
NODE_ID = "test-node"


@pytest.fixture
async def make_app(nats_url: str, fake_llm: FakeLlm) -> AsyncIterator[AppFactory]:
    apps: list[TaskApp] = []

    async def make(**overrides: Any) -> TaskApp:
        values: dict[str, Any] = {
            "nats_url": nats_url,
            "llm_svc_addr": fake_llm.address,
            "task_svc_listen": "127.0.0.1:0",
            "task_shutdown_grace_s": 0.0,
            "task_handoff_grace_s": 0.0,
            # One node restarted (not a second node): it takes its shards back at once.
            "task_node_id": NODE_ID,
        }
        values.update(overrides)
        app = await TaskApp.start(Settings(**values))
        apps.append(app)
        return app

    yield make
    for app in apps:
        await app.shutdown()


@pytest.fixture
async def app(make_app: AppFactory) -> TaskApp:
    return await make_app()


@pytest.fixture
async def stub(app: TaskApp) -> AsyncIterator[tasks_pb2_grpc.TaskServiceStub]:
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield tasks_pb2_grpc.TaskServiceStub(channel)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await connect_nats(nats_url, "test")
    try:
        yield client
    finally:
        await client.close()


def new_id() -> str:
    return str(uuid.uuid4())


async def submit(
    stub: tasks_pb2_grpc.TaskServiceStub,
    task_id: str | None = None,
    *,
    user: str = "alice",
    prompt: str = "one two three",
    priority: int = 0,
    model: str = "",
) -> tasks_pb2.SubmitResponse:
    request = tasks_pb2.SubmitRequest(
        task_id=task_id or new_id(), user_id=user, prompt=prompt, priority=priority, model=model
    )
    reply: tasks_pb2.SubmitResponse = await stub.Submit(request, timeout=timeout(10))
    return reply


async def watch_all(
    stub: tasks_pb2_grpc.TaskServiceStub, task_id: str, *, user: str = "alice", after_seq: int = 0
) -> list[tasks_pb2.WatchResponse]:
    """Every message of one Watch stream, until the server ends it."""
    request = tasks_pb2.WatchRequest(task_id=task_id, user_id=user, after_seq=after_seq)
    async with asyncio.timeout(timeout(10)):
        return [r async for r in stub.Watch(request)]


def events_of(responses: list[tasks_pb2.WatchResponse]) -> list[tasks_pb2.TaskEvent]:
    return [r.event for r in responses if r.WhichOneof("kind") == "event"]


def kind(event: tasks_pb2.TaskEvent) -> str:
    name = event.WhichOneof("kind")
    assert name is not None
    if name == "progress":
        return Status.Name(event.progress.status).removeprefix("TASK_STATUS_").lower()
    return name


async def lifecycle_until_terminal(
    js: JetStreamContext, task_id: str
) -> list[tuple[events_pb2.LifecycleEvent, str]]:
    """Lifecycle events of a task from SB_TASK_EVENTS with their Nats-Msg-Id, up to the first
    terminal one after a STARTED (waits for them to be published)."""
    sub = await js.subscribe(f"switchboard.tasks.{task_id}.>", ordered_consumer=True)
    out: list[tuple[events_pb2.LifecycleEvent, str]] = []
    terminal = {
        Kind.LIFECYCLE_KIND_COMPLETED,
        Kind.LIFECYCLE_KIND_FAILED,
        Kind.LIFECYCLE_KIND_CANCELLED,
    }
    try:
        while True:
            msg = await sub.next_msg(timeout=timeout(10))
            if msg.subject.endswith(".snapshot"):
                continue  # a seq checkpoint (history.proto TaskSnapshot), not a lifecycle event
            event = events_pb2.LifecycleEvent.FromString(msg.data)
            out.append((event, (msg.headers or {}).get("Nats-Msg-Id", "")))
            if event.kind in terminal:
                return out
    finally:
        await sub.unsubscribe()


class Observed:
    """Awaitable engine steps ("scheduled", "started", "finished") per task id."""

    def __init__(self, app: TaskApp) -> None:
        self.events: defaultdict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        app.engine.observers.append(lambda what, task_id: self.events[(what, task_id)].set())

    async def wait(self, what: str, task_id: str) -> None:
        async with asyncio.timeout(timeout(10)):
            await self.events[(what, task_id)].wait()
