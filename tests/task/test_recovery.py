"""Crashes and restarts: a crashing TaskServer among many, a supervisor giving up, and a job
left unacked by a stopped engine that a new engine runs to the end."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from svckit.grpc_server import insecure_channel
from svckit.nats import ensure_stream, jobs_stream_config
from svckit.shards import job_subject, shard_of
from switchboard.v1 import common_pb2, events_pb2, tasks_pb2, tasks_pb2_grpc
from task_svc.consumer import JobConsumer
from task_svc.legacy_jobs import move_legacy_jobs
from task_svc.task_state import TaskCore, TaskSpec
from tests.conftest import eventually, timeout
from tests.task.conftest import (
    NODE_ID,
    AppFactory,
    FakeLlm,
    Kind,
    Status,
    events_of,
    kind,
    lifecycle_until_terminal,
    new_id,
    submit,
    watch_all,
)


def boom(core: TaskCore) -> None:
    raise RuntimeError(f"injected crash in {core.task_id}")


async def test_a_crashing_task_server_is_restarted_and_others_are_unaffected(
    make_app: AppFactory, fake_llm: FakeLlm
) -> None:
    app = await make_app()
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        ids = [new_id() for _ in range(6)]
        for task_id in ids:
            await submit(stub, task_id, prompt=f"hold task {task_id[:8]}")
        for task_id in ids:
            await fake_llm.started[task_id].wait()
        victim = app.engine.registry.get(ids[2])
        assert victim is not None
        with pytest.raises(RuntimeError, match="injected crash"):
            await victim.call(boom)
        # The restarted actor answers from the state it had.
        state = await victim.call(lambda core: core.snapshot())
        assert state.status == Status.TASK_STATUS_PROCESSING and state.content == "hold"
        assert app.engine.supervisor.restarts(ids[2]) == 1
        assert all(app.engine.supervisor.restarts(t) == 0 for t in ids if t != ids[2])
        for task_id in ids:
            fake_llm.release(task_id)
        for task_id in ids:
            events = events_of(await watch_all(stub, task_id))
            assert [e.seq for e in events] == list(range(1, len(events) + 1))
            assert events[-1].completed.content == f"hold task {task_id[:8]}"


async def test_a_task_server_crashing_too_often_fails_its_task_only(
    make_app: AppFactory, fake_llm: FakeLlm, nc: Client
) -> None:
    app = await make_app(task_max_restarts=1, task_restart_period_s=60)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        victim_id, other_id = new_id(), new_id()
        await submit(stub, victim_id, prompt="hold victim")
        await submit(stub, other_id, prompt="hold other")
        await fake_llm.started[victim_id].wait()
        victim = app.engine.registry.get(victim_id)
        assert victim is not None
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await victim.call(boom)
        async with asyncio.timeout(timeout(10)):
            await fake_llm.cancelled[victim_id].wait()  # its generation was stopped
        events = events_of(await watch_all(stub, victim_id))
        assert kind(events[-1]) == "error"
        assert events[-1].error.code == common_pb2.ERROR_CODE_INTERNAL
        assert "crashed" in events[-1].error.message
        lifecycle = await lifecycle_until_terminal(nc.jetstream(), victim_id)
        assert lifecycle[-1][0].kind == Kind.LIFECYCLE_KIND_FAILED
        reply = await stub.Get(tasks_pb2.GetTaskRequest(task_id=victim_id, user_id="alice"))
        assert reply.state.status == Status.TASK_STATUS_FAILED
        fake_llm.release(other_id)
        other = events_of(await watch_all(stub, other_id))
        assert other[-1].completed.content == "hold other"


async def test_a_job_left_by_a_stopped_engine_is_redelivered_and_completes(
    make_app: AppFactory, fake_llm: FakeLlm, nc: Client
) -> None:
    first = await make_app(task_shutdown_grace_s=0.0)
    task_id = new_id()
    async with insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        await submit(stub, task_id, prompt="hold across restarts")
        await fake_llm.started[task_id].wait()
    await first.shutdown()  # grace 0: the running task is cancelled, its job not acked
    async with asyncio.timeout(timeout(10)):
        await fake_llm.cancelled[task_id].wait()
    info = await nc.jetstream().stream_info("SB_JOBS")
    assert info.state.messages == 1  # still on the work queue

    fake_llm.release(task_id)
    second = await make_app()
    async with insecure_channel(f"127.0.0.1:{second.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        responses = await watch_all(stub, task_id)
    events = events_of(responses)
    assert events[-1].completed.content == "hold across restarts"
    assert fake_llm.order == [task_id, task_id]
    # The rerun starts above any seq the first incarnation emitted (queued, started, the
    # first chunk and its progress: 4), and its first event says the text restarts.
    assert events[0].seq > 4 and events[0].progress.message == "restarted"
    assert events[0].progress.progress == 0
    lifecycle = [e for e, _ in await lifecycle_until_terminal(nc.jetstream(), task_id)]
    kinds = [e.kind for e in lifecycle]
    assert kinds == [
        Kind.LIFECYCLE_KIND_QUEUED,
        Kind.LIFECYCLE_KIND_STARTED,
        Kind.LIFECYCLE_KIND_QUEUED,
        Kind.LIFECYCLE_KIND_STARTED,
        Kind.LIFECYCLE_KIND_COMPLETED,
    ]
    seqs = [e.seq for e in lifecycle]
    assert seqs == sorted(set(seqs))  # the rebuilt task continues the seq
    assert lifecycle[-1].attempt == 2
    assert (await nc.jetstream().stream_info("SB_JOBS")).state.messages == 0


async def test_a_redelivered_job_of_a_finished_task_is_only_acked(
    make_app: AppFactory, fake_llm: FakeLlm, nc: Client
) -> None:
    # A task finished and its terminal event was published, but the job ack was lost (the
    # process died in between): a new engine must not run it again.
    first = await make_app()
    task_id = new_id()
    async with insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        await submit(stub, task_id, prompt="done once")
        await watch_all(stub, task_id)
    await lifecycle_until_terminal(nc.jetstream(), task_id)
    await first.shutdown()
    # Put the job back as if it had never been acked (a fresh message id: not a duplicate).
    spec = TaskSpec(task_id, "alice", "done once", "fake-small", 0)
    subject = job_subject(shard_of(task_id), "default")
    await nc.jetstream().publish(subject, spec.to_job().SerializeToString())
    second = await make_app()
    async with insecure_channel(f"127.0.0.1:{second.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        responses = await watch_all(stub, task_id)
        reply = await stub.Get(tasks_pb2.GetTaskRequest(task_id=task_id, user_id="alice"))
    # Whether the watcher came before or after the job, it never sees the task run again.
    assert all(kind(e) not in ("queued", "processing") for e in events_of(responses))
    assert reply.state.status == Status.TASK_STATUS_COMPLETED
    assert reply.state.content == "done once"
    assert fake_llm.order == [task_id]


async def start_and_kill_task_svc(
    nats_url: str, fake_llm: FakeLlm, port: int, prompt: str
) -> tuple[str, int]:
    """A task_svc process runs a task, watched until its first chunk, and is killed with -9
    (no shutdown, no nak) while the generation holds: (the task id, the last seq seen)."""
    env = dict(
        os.environ,
        NATS_URL=nats_url,
        LLM_SVC_ADDR=fake_llm.address,
        TASK_SVC_LISTEN=f"127.0.0.1:{port}",
        TASK_JOB_ACK_WAIT_S="60",
        TASK_NODE_ID=NODE_ID,  # the app started after it is the same node, restarted
        LOG_LEVEL="WARNING",
    )
    process = subprocess.Popen([sys.executable, "-m", "task_svc"], env=env)
    task_id = new_id()
    try:
        async with insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            request = tasks_pb2.SubmitRequest(task_id=task_id, user_id="alice", prompt=prompt)
            await stub.Submit(request, timeout=timeout(20), wait_for_ready=True)
            watch = stub.Watch(tasks_pb2.WatchRequest(task_id=task_id, user_id="alice"))
            seen = 0
            async for response in watch:
                if response.WhichOneof("kind") == "event":
                    seen = response.event.seq
                    if response.event.WhichOneof("kind") == "chunk":
                        break
            watch.cancel()
        process.kill()
        process.wait(timeout=timeout(10))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return task_id, seen


async def test_a_job_of_a_killed_task_svc_is_redelivered_and_completes(
    nats_url: str, make_app: AppFactory, fake_llm: FakeLlm, nc: Client, port: int
) -> None:
    task_id, _seen = await start_and_kill_task_svc(nats_url, fake_llm, port, "hold on")
    # Recreates the durable consumer, so the unacked job comes back at once (not after the
    # 60 s ack_wait), and rebuilds the task before serving: the first Get already knows it.
    app = await make_app(task_job_ack_wait_s=60.0)
    info = await nc.jetstream().consumer_info("SB_JOBS", f"task_svc-shard-{shard_of(task_id)}")
    assert info.config.max_ack_pending == 100_000 and info.config.ack_wait == 60
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        got = await stub.Get(tasks_pb2.GetTaskRequest(task_id=task_id, user_id="alice"))
        assert got.state.status in (Status.TASK_STATUS_QUEUED, Status.TASK_STATUS_PROCESSING)
        fake_llm.release(task_id)  # the rerun holds until now, so Get saw it unfinished
        events = events_of(await watch_all(stub, task_id))
    assert events[-1].completed.content == "hold on"
    assert fake_llm.order == [task_id, task_id]


async def test_submit_after_a_restart_is_still_idempotent(
    make_app: AppFactory, fake_llm: FakeLlm
) -> None:
    first = await make_app()
    task_id = new_id()
    async with insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        await submit(stub, task_id, prompt="only once")
        done = events_of(await watch_all(stub, task_id))
    await first.shutdown()
    second = await make_app()  # knows nothing in memory; JetStream remembers the id
    async with insecure_channel(f"127.0.0.1:{second.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await submit(stub, task_id, user="bob", prompt="only once")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A finished task is answerable after the restart, from its last lifecycle event.
        watched = await watch_all(stub, task_id)
        assert [r.WhichOneof("kind") for r in watched] == ["state"]
        assert watched[0].state.status == Status.TASK_STATUS_COMPLETED
        assert watched[0].state.content == "only once"
        got = await stub.Get(tasks_pb2.GetTaskRequest(task_id=task_id, user_id="alice"))
        assert got.state.seq == done[-1].seq
        reply = await submit(stub, task_id, prompt="only once")
    assert reply.duplicate and reply.state.status == Status.TASK_STATUS_COMPLETED
    assert reply.state.content == "only once" and reply.state.seq == done[-1].seq
    assert fake_llm.order == [task_id]


async def test_jobs_stored_before_sharding_run_after_the_upgrade(
    make_app: AppFactory, fake_llm: FakeLlm, nc: Client
) -> None:
    """What a task_svc of the single-instance kind left: its jobs on
    `switchboard.jobs.<queue>` and its durable consumer over the whole stream (whose filter
    would overlap every shard's). The upgraded node moves the jobs to their shards and runs
    them; the one the old node had started is recovered as a rerun."""
    js = nc.jetstream()
    await ensure_stream(js, jobs_stream_config())
    old = ConsumerConfig(
        durable_name="task_svc", ack_policy=AckPolicy.EXPLICIT, filter_subject="switchboard.jobs.>"
    )
    await js.add_consumer("SB_JOBS", old)
    ran, waiting = new_id(), new_id()
    for task_id in (ran, waiting):
        job = TaskSpec(task_id, "alice", f"from before {task_id}", "fake-small", 0).to_job()
        await js.publish("switchboard.jobs.default", job.SerializeToString())
    started = await js.pull_subscribe_bind(durable="task_svc", stream="SB_JOBS")
    assert len(await started.fetch(1, timeout=timeout(5))) == 1  # the old node took one
    await started.unsubscribe()

    for task_id in (ran, waiting):
        fake_llm.release(task_id)
    app = await make_app()
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        for task_id in (ran, waiting):
            events = events_of(await watch_all(stub, task_id))
            assert events[-1].completed.content == f"from before {task_id}"
            # Both may have run before (a moved job is recovered): each restarts its text.
            assert events[0].progress.message == "restarted"
    assert sorted(fake_llm.order) == sorted([ran, waiting])

    async def emptied() -> bool:
        return (await js.stream_info("SB_JOBS")).state.messages == 0

    await eventually(emptied)
    names = [c.name for c in await js.consumers_info("SB_JOBS")]
    assert "task_svc" not in names


async def test_a_job_run_before_is_recovered_even_when_it_arrives_after_the_take_over(
    nats_url: str,
    make_app: AppFactory,
    fake_llm: FakeLlm,
    port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a cluster, the new consumer's first fetch may end before it has brought every job
    back (its leader just moved), and the rest come as new deliveries of a new consumer
    (delivered once). A job stored before the take-over is recovered all the same: its seq
    continues above what its watchers saw and its text restarts."""
    task_id, seen = await start_and_kill_task_svc(nats_url, fake_llm, port, "hold twice")

    async def nothing_pending(_consumer: JobConsumer) -> list[Msg]:
        return []

    monkeypatch.setattr(JobConsumer, "take_pending", nothing_pending)
    app = await make_app(task_job_ack_wait_s=60.0)
    fake_llm.release(task_id)
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        events = events_of(await watch_all(stub, task_id))
    assert fake_llm.order == [task_id, task_id]
    assert events[0].progress.message == "restarted"
    assert events[0].seq > seen
    assert events[-1].completed.content == "hold twice"


async def test_a_move_of_old_jobs_cut_short_does_not_block_the_next(nc: Client) -> None:
    """A NATS node killed while shard 0's taker moved the old jobs left its mover consumer
    behind; a work-queue stream takes one consumer per filter, so the next attempt must
    not be refused (it was, until the leftover's inactivity threshold ran out)."""
    js = nc.jetstream()
    await ensure_stream(js, jobs_stream_config())
    # On two shards: each is then the last job on its shard's subject (one in 16 pairs of
    # random ids shared a shard, and the test failed).
    task_ids = [new_id()]
    while len(task_ids) < 2:
        if shard_of(candidate := new_id()) != shard_of(task_ids[0]):
            task_ids.append(candidate)
    for task_id in task_ids:
        job = TaskSpec(task_id, "alice", "from before", "fake-small", 0).to_job()
        await js.publish("switchboard.jobs.default", job.SerializeToString())
    leftover = ConsumerConfig(
        durable_name="task_svc-legacy-move",
        ack_policy=AckPolicy.EXPLICIT,
        filter_subject="switchboard.jobs.*",
        inactive_threshold=60.0,
    )
    await js.add_consumer("SB_JOBS", leftover)

    assert await move_legacy_jobs(js, "task_svc") == 2
    for task_id in task_ids:
        moved = await js.get_last_msg("SB_JOBS", job_subject(shard_of(task_id), "default"))
        assert events_pb2.Job.FromString(moved.data or b"").task_id == task_id
    assert [c.name for c in await js.consumers_info("SB_JOBS")] == []
