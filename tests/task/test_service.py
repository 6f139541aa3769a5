"""TaskService over real gRPC, with a real nats-server and a fake LlmService."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from nats.aio.client import Client

from svckit.errors import ServiceError
from svckit.grpc_server import insecure_channel
from svckit.nats import QUEUE_BOARD_SUBJECT
from svckit.shards import job_subject, shard_of
from switchboard.v1 import common_pb2, events_pb2, llm_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from task_svc.app import TaskApp
from tests.conftest import eventually, timeout
from tests.task.conftest import (
    AppFactory,
    FakeLlm,
    Kind,
    Observed,
    Status,
    events_of,
    kind,
    lifecycle_until_terminal,
    new_id,
    submit,
    watch_all,
)

Code = common_pb2.ErrorCode


async def error_of(awaitable) -> ServiceError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await awaitable
    return ServiceError.from_rpc_error(caught.value)


async def test_submit_replies_after_the_job_is_stored_in_jetstream(
    stub, fake_llm: FakeLlm, nc: Client
) -> None:
    task_id = new_id()
    reply = await submit(stub, task_id, prompt="hold the line")
    assert not reply.duplicate
    assert reply.state.status == Status.TASK_STATUS_QUEUED
    assert reply.state.seq == 1 and reply.state.queue_position == 1
    assert reply.state.model == "fake-small"  # the default model, resolved
    # The job is on the work queue (held unacked while the fake holds the generation).
    subject = job_subject(shard_of(task_id), "default")
    stored = await nc.jetstream().get_last_msg("SB_JOBS", subject)
    job = events_pb2.Job.FromString(stored.data or b"")
    assert job.task_id == task_id and job.user_id == "alice" and job.prompt == "hold the line"
    assert (stored.headers or {}).get("Nats-Msg-Id") == task_id
    fake_llm.release(task_id)
    events = events_of(await watch_all(stub, task_id))
    assert kind(events[-1]) == "completed"

    # Done: the job is gone from the work queue.
    async def removed() -> bool:
        return (await nc.jetstream().stream_info("SB_JOBS")).state.messages == 0

    await eventually(removed)


async def test_a_job_a_gateway_stored_itself_runs_for_its_watcher_and_leaves_the_stream(
    stub, nc: Client
) -> None:
    """What gateway_svc/direct_submit.py does: the job straight onto the work queue, message id
    = task id; the consumer hands it to the engine, which runs it once."""
    task_id = new_id()
    request = tasks_pb2.WatchRequest(task_id=task_id, user_id="alice")
    watch = stub.Watch(request)
    first = await watch.read()
    assert first.state.status == Status.TASK_STATUS_UNSPECIFIED  # claimed, not submitted
    job = events_pb2.Job(task_id=task_id, user_id="alice", prompt="from the gateway")
    js = nc.jetstream()
    ack = await js.publish(
        job_subject(shard_of(task_id), "default"),
        job.SerializeToString(),
        headers={"Nats-Msg-Id": task_id},
    )
    events: list[tasks_pb2.TaskEvent] = []
    async with asyncio.timeout(timeout(10)):
        while (response := await watch.read()) is not grpc.aio.EOF:
            events.append(response.event)
    assert kind(events[0]) == "queued" and kind(events[-1]) == "completed"
    assert events[-1].completed.content == "from the gateway"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    again = await submit(stub, task_id, prompt="from the gateway")  # idempotent, not rerun
    assert again.duplicate and again.state.status == Status.TASK_STATUS_COMPLETED

    async def removed() -> bool:
        return (await js.stream_info("SB_JOBS")).state.messages == 0

    await eventually(removed)
    assert ack.seq > 0


async def test_the_queue_board_says_what_waits_and_what_runs(
    make_app: AppFactory, fake_llm: FakeLlm, nc: Client
) -> None:
    app = await make_app(task_concurrency=1, task_max_queue_depth=7)
    boards = await nc.subscribe(QUEUE_BOARD_SUBJECT)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        running = new_id()
        await submit(stub, running, prompt="hold the slot")
        await fake_llm.started[running].wait()
        await submit(stub, priority=3)

        async def board_with_one_waiting() -> events_pb2.QueueStats | None:
            msg = await boards.next_msg(timeout=timeout(5))
            for stats in events_pb2.QueueBoard.FromString(msg.data).queues:
                if stats.queue == "default" and sum(stats.waiting_by_priority) == 1:
                    return stats
            return None

        stats = await eventually(board_with_one_waiting)
        assert stats.waiting_by_priority[3] == 1 and stats.free_slots == 0
        assert stats.concurrency == 1 and stats.max_depth == 7
        fake_llm.release(running)
    await boards.unsubscribe()


async def test_submit_fails_when_the_job_cannot_be_stored(stub, nc: Client, fake_llm) -> None:
    await nc.jetstream().delete_stream("SB_JOBS")
    error = await error_of(submit(stub))
    assert error.code == Code.ERROR_CODE_OVERLOADED and error.retryable
    assert fake_llm.order == []


async def test_watch_gets_state_then_every_event_in_order_through_completed(stub) -> None:
    task_id = new_id()
    await submit(stub, task_id, prompt="one two three")
    responses = await watch_all(stub, task_id)
    assert responses[0].WhichOneof("kind") == "state"
    assert responses[0].state.task_id == task_id
    events = events_of(responses)
    assert len(events) == len(responses) - 1
    seqs = [e.seq for e in events]
    # state.seq may already be past the first events: the replay starts after seq 0 anyway.
    assert seqs == list(range(1, len(events) + 1))
    kinds = [kind(e) for e in events]
    assert kinds[:2] == ["queued", "processing"]
    assert kinds[-1] == "completed"
    assert "".join(e.chunk.delta for e in events if kind(e) == "chunk") == "one two three"
    completed = events[-1].completed
    assert completed.content == "one two three" and completed.model == "fake-small"
    assert completed.finish_reason == "stop" and completed.usage.total_tokens == 6
    progress = [e.progress.progress for e in events if kind(e) == "processing"]
    assert progress == sorted(progress)


async def test_watch_before_submit_claims_the_id_and_waits_for_it(stub) -> None:
    task_id = new_id()
    request = tasks_pb2.WatchRequest(task_id=task_id, user_id="alice")
    stream = stub.Watch(request, timeout=timeout(10))
    first = await stream.read()
    assert first.state.status == Status.TASK_STATUS_UNSPECIFIED
    # The watcher owns the id now.
    error = await error_of(submit(stub, task_id, user="bob"))
    assert error.code == Code.ERROR_CODE_FORBIDDEN
    await submit(stub, task_id, prompt="late but here")
    events = []
    while (message := await stream.read()) != grpc.aio.EOF:
        events.append(message.event)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].completed.content == "late but here"


async def test_watch_after_seq_gets_exactly_the_missed_events(stub, fake_llm: FakeLlm) -> None:
    task_id = new_id()
    await submit(stub, task_id, prompt="hold a b c d")
    # A first watcher reads up to the first chunk, then goes away.
    stream = stub.Watch(tasks_pb2.WatchRequest(task_id=task_id, user_id="alice"))
    seen: list[tasks_pb2.TaskEvent] = []
    assert (await stream.read()).WhichOneof("kind") == "state"
    while not seen or kind(seen[-1]) != "chunk":
        seen.append((await stream.read()).event)
    stream.cancel()
    last_seq = seen[-1].seq
    fake_llm.release(task_id)
    resumed = events_of(await watch_all(stub, task_id, after_seq=last_seq))
    full = events_of(await watch_all(stub, task_id))
    assert [e.seq for e in resumed] == list(range(last_seq + 1, full[-1].seq + 1))
    assert [e.seq for e in seen] + [e.seq for e in resumed] == [e.seq for e in full]
    # Nothing after the terminal event: a watcher that saw everything gets only the state.
    tail = await watch_all(stub, task_id, after_seq=full[-1].seq)
    assert [r.WhichOneof("kind") for r in tail] == ["state"]
    assert tail[0].state.status == Status.TASK_STATUS_COMPLETED
    assert tail[0].state.content == "hold a b c d"


async def test_duplicate_submit_is_idempotent(stub, fake_llm: FakeLlm, nc: Client) -> None:
    task_id = new_id()
    first = await submit(stub, task_id, prompt="hold once")
    again = await submit(stub, task_id, prompt="hold once")
    assert again.duplicate and again.state.task_id == task_id
    assert again.state.status in (Status.TASK_STATUS_QUEUED, Status.TASK_STATUS_PROCESSING)
    assert again.state.created_at == first.state.created_at
    info = await nc.jetstream().stream_info("SB_JOBS")
    assert info.state.messages == 1
    fake_llm.release(task_id)
    await watch_all(stub, task_id)
    after = await submit(stub, task_id, prompt="hold once")
    assert after.duplicate and after.state.status == Status.TASK_STATUS_COMPLETED
    assert fake_llm.order == [task_id]


async def test_another_users_task_is_forbidden_everywhere(stub) -> None:
    task_id = new_id()
    await submit(stub, task_id)
    for call in (
        submit(stub, task_id, user="bob"),
        stub.Get(tasks_pb2.GetTaskRequest(task_id=task_id, user_id="bob")),
        stub.Cancel(tasks_pb2.CancelRequest(task_id=task_id, user_id="bob")),
        watch_all(stub, task_id, user="bob"),
    ):
        error = await error_of(call)
        assert error.code == Code.ERROR_CODE_FORBIDDEN
    reply = await stub.Get(tasks_pb2.GetTaskRequest(task_id=task_id, user_id="alice"))
    assert reply.state.task_id == task_id


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"task_id": "not-a-uuid"}, Code.ERROR_CODE_INVALID_REQUEST),
        ({"prompt": "   "}, Code.ERROR_CODE_INVALID_REQUEST),
        ({"prompt": "x" * 101}, Code.ERROR_CODE_INVALID_REQUEST),
        ({"priority": 10}, Code.ERROR_CODE_INVALID_REQUEST),
        ({"user_id": ""}, Code.ERROR_CODE_INVALID_REQUEST),
        ({"model": "no-such-model"}, Code.ERROR_CODE_MODEL_NOT_FOUND),
    ],
)
async def test_bad_submits_get_typed_errors(make_app: AppFactory, fields, code) -> None:
    app = await make_app(task_max_prompt_chars=100)
    request: dict[str, Any] = {"task_id": new_id(), "user_id": "alice", "prompt": "hi"}
    request.update(fields)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        error = await error_of(stub.Submit(tasks_pb2.SubmitRequest(**request)))
    assert error.code == code


async def test_unknown_task_is_not_found(stub) -> None:
    for call in (
        stub.Get(tasks_pb2.GetTaskRequest(task_id=new_id(), user_id="alice")),
        stub.Cancel(tasks_pb2.CancelRequest(task_id=new_id(), user_id="alice")),
    ):
        assert (await error_of(call)).code == Code.ERROR_CODE_NOT_FOUND


async def test_priorities_run_highest_first_and_fifo_within_one(
    make_app: AppFactory, fake_llm: FakeLlm
) -> None:
    app = await make_app(task_concurrency=1)
    observed = Observed(app)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        blocker = new_id()
        await submit(stub, blocker, prompt="hold the slot", priority=5)
        await fake_llm.started[blocker].wait()
        plan = [("low", 9), ("urgent-1", 0), ("mid", 5), ("urgent-2", 0), ("high", 1)]
        ids = {}
        positions = []
        for name, priority in plan:
            ids[name] = new_id()
            reply = await submit(stub, ids[name], prompt=f"{name} job", priority=priority)
            positions.append(reply.state.queue_position)
            await observed.wait("scheduled", ids[name])
        assert positions[0] == 1 and positions[1] == 1  # urgent goes before low
        fake_llm.release(blocker)
        await observed.wait("finished", ids["low"])
    expected = [blocker] + [ids[n] for n in ("urgent-1", "urgent-2", "high", "mid", "low")]
    assert fake_llm.order == expected


async def test_cancel_a_queued_task(make_app: AppFactory, fake_llm: FakeLlm, nc: Client) -> None:
    app = await make_app(task_concurrency=1)
    observed = Observed(app)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        blocker, queued = new_id(), new_id()
        await submit(stub, blocker, prompt="hold the slot")
        await fake_llm.started[blocker].wait()
        await submit(stub, queued, prompt="never runs")
        await observed.wait("scheduled", queued)
        reply = await stub.Cancel(tasks_pb2.CancelRequest(task_id=queued, user_id="alice"))
        assert reply.state.status == Status.TASK_STATUS_CANCELLED

        # Its job is acked (after its CANCELLED event, which the reply waited for): only
        # the blocker's job is left on the work queue.
        async def only_the_blockers_job() -> bool:
            return (await nc.jetstream().stream_info("SB_JOBS")).state.messages == 1

        await eventually(only_the_blockers_job)
        events = events_of(await watch_all(stub, queued))
        assert [kind(e) for e in events] == ["queued", "cancelled"]
        fake_llm.release(blocker)
        await watch_all(stub, blocker)
        again = await stub.Cancel(tasks_pb2.CancelRequest(task_id=queued, user_id="alice"))
        assert again.state.status == Status.TASK_STATUS_CANCELLED
    assert queued not in fake_llm.order
    lifecycle = await lifecycle_until_terminal(nc.jetstream(), queued)
    assert [e.kind for e, _ in lifecycle] == [
        Kind.LIFECYCLE_KIND_QUEUED,
        Kind.LIFECYCLE_KIND_CANCELLED,
    ]


async def test_cancel_a_running_task_cancels_the_generation(
    stub, fake_llm: FakeLlm, nc: Client
) -> None:
    task_id = new_id()
    await submit(stub, task_id, prompt="hold forever")
    stream = stub.Watch(tasks_pb2.WatchRequest(task_id=task_id, user_id="alice"))
    assert (await stream.read()).WhichOneof("kind") == "state"
    events = [(await stream.read()).event]
    while kind(events[-1]) != "chunk":  # the generation is under way
        events.append((await stream.read()).event)
    reply = await stub.Cancel(tasks_pb2.CancelRequest(task_id=task_id, user_id="alice"))
    assert reply.state.status == Status.TASK_STATUS_CANCELLED
    assert reply.state.content == "hold"  # what had been streamed stays
    async with asyncio.timeout(timeout(10)):
        await fake_llm.cancelled[task_id].wait()
        while (message := await stream.read()) != grpc.aio.EOF:
            events.append(message.event)
    assert kind(events[-1]) == "cancelled"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert (await nc.jetstream().stream_info("SB_JOBS")).state.messages == 0
    lifecycle = await lifecycle_until_terminal(nc.jetstream(), task_id)
    assert lifecycle[-1][0].kind == Kind.LIFECYCLE_KIND_CANCELLED
    assert lifecycle[-1][0].error.code == Code.ERROR_CODE_CANCELLED
    # A finished task's Cancel returns its state.
    again = await stub.Cancel(tasks_pb2.CancelRequest(task_id=task_id, user_id="alice"))
    assert again.state.status == Status.TASK_STATUS_CANCELLED


async def test_lifecycle_events_on_jetstream_carry_seq_kind_and_fields(stub, nc: Client) -> None:
    task_id = new_id()
    await submit(stub, task_id, prompt="alpha beta", priority=3)
    events = events_of(await watch_all(stub, task_id))
    lifecycle = await lifecycle_until_terminal(nc.jetstream(), task_id)
    kinds = [e.kind for e, _ in lifecycle]
    assert kinds == [
        Kind.LIFECYCLE_KIND_QUEUED,
        Kind.LIFECYCLE_KIND_STARTED,
        Kind.LIFECYCLE_KIND_COMPLETED,
    ]
    assert [e.seq for e, _ in lifecycle] == [1, 2, events[-1].seq]
    assert [msg_id for _, msg_id in lifecycle] == [f"{task_id}:{e.seq}" for e, _ in lifecycle]
    for event, _ in lifecycle:
        assert event.task_id == task_id and event.user_id == "alice"
        assert event.model == "fake-small"
    # What was submitted travels once (QUEUED), the answer once (COMPLETED).
    queued, started, completed = (e for e, _ in lifecycle)
    assert (queued.prompt, queued.priority, queued.content) == ("alpha beta", 3, "")
    assert (started.prompt, started.content) == ("", "")
    assert completed.prompt == ""
    assert completed.status == Status.TASK_STATUS_COMPLETED and completed.attempt == 1
    assert completed.content == "alpha beta" and completed.usage.total_tokens == 4
    assert completed.finish_reason == "stop" and completed.progress == 1.0


async def test_an_llm_error_fails_the_task_with_a_typed_error(stub, nc: Client) -> None:
    task_id = new_id()
    await submit(stub, task_id, prompt="fail please")
    events = events_of(await watch_all(stub, task_id))
    assert kind(events[-1]) == "error"
    assert events[-1].error.code == Code.ERROR_CODE_CONTENT_FILTERED
    lifecycle = await lifecycle_until_terminal(nc.jetstream(), task_id)
    assert lifecycle[-1][0].kind == Kind.LIFECYCLE_KIND_FAILED
    assert lifecycle[-1][0].error.message == "refused by fake"


async def test_a_task_waits_for_llm_svc_without_spending_its_attempts(
    make_app: AppFactory, port: int
) -> None:
    """llm_svc away (never started, killed, restarting) is our outage: the task reruns, each
    rerun a machine-readable reset that costs no attempt, and completes once llm_svc is back,
    even with a single attempt allowed."""
    app: TaskApp = await make_app(llm_svc_addr=f"127.0.0.1:{port}", task_max_attempts=1)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        task_id = new_id()
        reply = await submit(stub, task_id)  # accepted: intake does not need llm_svc
        assert reply.state.status == Status.TASK_STATUS_QUEUED
        watch = stub.Watch(tasks_pb2.WatchRequest(task_id=task_id, user_id="alice"))
        events: list[tasks_pb2.TaskEvent] = []
        async with asyncio.timeout(timeout(10)):
            while not any(e.progress.HasField("reset") for e in events):
                response = await watch.read()
                if response.HasField("event"):
                    events.append(response.event)
        llm = FakeLlm()
        server = grpc.aio.server()
        llm_pb2_grpc.add_LlmServiceServicer_to_server(llm, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            async with asyncio.timeout(timeout(15)):
                while (response := await watch.read()) is not grpc.aio.EOF:
                    events.append(response.event)
        finally:
            await server.stop(0)
    assert kind(events[-1]) == "completed", events[-1]
    resets = [e.progress.reset for e in events if e.progress.HasField("reset")]
    assert resets and all(r.reason == "outage" and r.error == "network" for r in resets)
    assert all(r.attempt == 1 and r.max_attempts == 0 for r in resets)
    state = await app.engine.state(task_id, "alice")
    assert state.attempts == 1


async def test_an_llm_svc_away_past_the_outage_deadline_fails_the_task(
    make_app: AppFactory, port: int
) -> None:
    app = await make_app(llm_svc_addr=f"127.0.0.1:{port}", task_outage_deadline_s=0.5)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        task_id = new_id()
        await submit(stub, task_id)
        events = events_of(await watch_all(stub, task_id))
    assert events[-1].error.code == Code.ERROR_CODE_NETWORK and events[-1].error.retryable


async def test_retryable_errors_are_retried_then_dead_lettered_and_requeued(
    make_app: AppFactory, fake_llm: FakeLlm
) -> None:
    # "flaky" fails twice with RATE_LIMITED (retry-after 20 ms), then succeeds.
    app = await make_app(task_max_attempts=2, task_retry_base_s=0.01)
    async with insecure_channel(f"127.0.0.1:{app.port}", caller="admin") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        task_id = new_id()
        await submit(stub, task_id, prompt="flaky answer")
        events = events_of(await watch_all(stub, task_id))
        assert fake_llm.order.count(task_id) == 2
        # The first run had streamed "flaky": the retry continues it (no reset).
        resumed = [e for e in events if e.progress.message.startswith("resuming")]
        assert [e.progress.message for e in resumed] == [
            "resuming: attempt 2 of 2 in 0.0s after rate_limited"
        ]
        assert not any(e.progress.HasField("reset") for e in events)
        assert "".join(e.chunk.delta for e in events) == "flaky answer"
        assert events[-1].error.code == common_pb2.ERROR_CODE_RATE_LIMITED
        listed = await stub.ListDeadLetters(tasks_pb2.ListDeadLettersRequest())
        assert [d.task_id for d in listed.dead_letters] == [task_id]
        assert listed.dead_letters[0].attempts == 2
        assert listed.dead_letters[0].error.code == common_pb2.ERROR_CODE_RATE_LIMITED
        last_seq = events[-1].seq
        requeued = await stub.RequeueDeadLetter(tasks_pb2.RequeueDeadLetterRequest(task_id=task_id))
        assert requeued.state.status != Status.TASK_STATUS_FAILED  # runs again (may start at once)
        assert requeued.state.seq > last_seq
        again = events_of(await watch_all(stub, task_id, after_seq=last_seq))
        assert again[-1].completed.content == "flaky answer"
        assert all(e.seq > last_seq for e in again)
        listed = await stub.ListDeadLetters(tasks_pb2.ListDeadLettersRequest())
        assert list(listed.dead_letters) == []


async def test_a_full_queue_refuses_submit_with_overloaded_and_retry_after(
    make_app: AppFactory, fake_llm: FakeLlm
) -> None:
    app = await make_app(task_concurrency=1, task_max_queue_depth=1)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        running, waiting = new_id(), new_id()
        await submit(stub, running, prompt="hold the slot")
        await fake_llm.started[running].wait()
        await submit(stub, waiting)  # the one waiting place
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await submit(stub, new_id())
        error = ServiceError.from_rpc_error(caught.value)
        assert error.code == common_pb2.ERROR_CODE_OVERLOADED and error.retry_after_ms >= 1000
        fake_llm.release(running)
        assert events_of(await watch_all(stub, waiting))[-1].WhichOneof("kind") == "completed"


async def test_a_watched_queued_task_gets_its_position_as_the_queue_moves(
    make_app: AppFactory, fake_llm: FakeLlm
) -> None:
    app = await make_app(task_concurrency=1, task_position_interval_s=0.05)
    observed = Observed(app)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        first, second, third = new_id(), new_id(), new_id()
        await submit(stub, first, prompt="hold one")
        await fake_llm.started[first].wait()
        await submit(stub, second, prompt="hold two")
        reply = await submit(stub, third, prompt="three")
        assert reply.state.queue_position == 2  # the ack carries the position
        await observed.wait("scheduled", third)
        request = tasks_pb2.WatchRequest(task_id=third, user_id="alice")
        stream = stub.Watch(request)
        async with asyncio.timeout(timeout(10)):
            messages = aiter(stream)
            state = (await anext(messages)).state
            assert state.status == Status.TASK_STATUS_QUEUED and state.queue_position == 2
            fake_llm.release(first)  # the queue moves: "third" is next
            while True:
                event = (await anext(messages)).event
                if event.WhichOneof("kind") == "progress" and event.progress.queue_position == 1:
                    break
            assert event.progress.status == Status.TASK_STATUS_QUEUED
            fake_llm.release(second)
            rest = [r.event async for r in messages]
        assert rest[-1].completed.content == "three"
        seqs = [event.seq] + [e.seq for e in rest]
        assert seqs == sorted(set(seqs))


async def test_a_finished_task_server_leaves_memory_and_stays_readable(
    make_app: AppFactory, fake_llm: FakeLlm
) -> None:
    app = await make_app(task_retain_finished_s=0.0)
    observed = Observed(app)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        task_id = new_id()
        await submit(stub, task_id, prompt="short lived")
        await observed.wait("finished", task_id)
        gone = asyncio.Event()
        asyncio.get_running_loop().call_soon(gone.set)  # after the 0 s retention timer
        await gone.wait()
        assert app.engine.registry.get(task_id) is None
        # Read back from its terminal lifecycle event on JetStream.
        reply = await stub.Get(tasks_pb2.GetTaskRequest(task_id=task_id, user_id="alice"))
        assert reply.state.status == Status.TASK_STATUS_COMPLETED
        assert reply.state.content == "short lived"
