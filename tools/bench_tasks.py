"""task_svc benchmarks (part of `make bench`):

(a) memory: N live TaskServers in one process, created as the engine creates queued tasks
    (spec, state, a QUEUED event in the log, registered, hibernated: no loop, no mailbox),
    measured as RSS and tracemalloc deltas per server, and registry lookup time;
(b) throughput: tasks through the real engine (real nats-server, task_svc's TaskApp, an
    in-process llm_svc with the local model at zero delay), beside the floor of the bare
    JetStream publish+ack of the same Job payloads, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import uvloop
from nats.js.api import StreamConfig

from llm_svc.catalogue import DEFAULT_MODELS_FILE
from llm_svc.config import Settings as LlmSettings
from llm_svc.server import LlmServer
from svckit.grpc_server import insecure_channel
from svckit.nats import connect_nats, ensure_stream
from switchboard.v1 import tasks_pb2, tasks_pb2_grpc
from task_svc.app import TaskApp
from task_svc.config import Settings
from task_svc.registry import Registry
from task_svc.supervisor import Supervisor
from task_svc.task_server import Host, TaskServer
from task_svc.task_state import TaskCore, TaskSpec, now_ns
from tools.natsserver import start_nats

IN_FLIGHT = 64  # concurrent submits (and concurrent floor publishes)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * 4096


def _make_servers(count: int, host: Host, registry: Registry) -> None:
    for index in range(count):
        spec = TaskSpec(
            str(uuid.uuid4()), f"user-{index % 1000}", "Why is the sky blue?", "local", 5,
            queue="local", submitted_ns=now_ns(),
        )  # fmt: skip
        core = TaskCore(spec)
        core.queued(index + 1, 0)
        registry.add(TaskServer(core, host))


def memory_bench(servers: int) -> list[str]:
    host = Host(Supervisor("bench"))
    gc.collect()
    rss_before = _rss_bytes()
    registry = Registry()
    _make_servers(servers, host, registry)
    gc.collect()
    rss = (_rss_bytes() - rss_before) / servers
    ids = list(registry._servers)
    probes = [random.choice(ids) for _ in range(200_000)]
    get = registry.get
    started = time.perf_counter_ns()
    for task_id in probes:
        get(task_id)
    lookups = time.perf_counter_ns() - started
    started = time.perf_counter_ns()
    for _task_id in probes:  # the loop alone, subtracted
        pass
    loop_ns = time.perf_counter_ns() - started
    lookup_ns = (lookups - loop_ns) / len(probes)
    bare = dict.fromkeys(ids)
    bare_get = bare.get
    started = time.perf_counter_ns()
    for task_id in probes:
        bare_get(task_id)
    bare_ns = (time.perf_counter_ns() - started - loop_ns) / len(probes)
    del registry, ids, probes, bare
    gc.collect()

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    traced = Registry()
    _make_servers(servers, host, traced)
    gc.collect()
    per_server = (tracemalloc.get_traced_memory()[0] - before) / servers
    tracemalloc.stop()
    del traced
    gc.collect()
    return [
        f"task_svc: {servers:,} live hibernated TaskServers in one process",
        f"  bytes per TaskServer: {per_server:,.0f} (tracemalloc)  {rss:,.0f} (RSS)"
        "   goal <= 4,096; an Erlang process is ~2,600",
        f"  registry lookup: {lookup_ns:,.0f} ns per lookup"
        f"   floor: a bare dict lookup of the same ids {bare_ns:,.0f} ns",
    ]


def _llm_settings(local_model_token_delay_ms: int = 0) -> LlmSettings:
    return LlmSettings(
        llm_svc_listen="127.0.0.1:0",
        llm_models_file=DEFAULT_MODELS_FILE,
        local_model_token_delay_ms=local_model_token_delay_ms,
        openai_api_key=None,
        gemini_api_key=None,
        anthropic_api_key=None,
        llm_default_model="local",
        llm_user_daily_requests=0,
        llm_user_daily_tokens=0,
    )


async def throughput_bench(tasks: int, store: Path) -> list[str]:
    nats = await start_nats(store / "nats")
    llm = LlmServer(_llm_settings())
    await llm.start()
    app: TaskApp | None = None
    try:
        settings = Settings(
            nats_url=nats.url,
            llm_svc_addr=f"127.0.0.1:{llm.port}",
            task_svc_listen="127.0.0.1:0",
            task_concurrency=64,
            task_max_queue_depth=tasks + 1,
            task_shutdown_grace_s=0.0,
            log_level="WARNING",
        )
        app = await TaskApp.start(settings)
        finished = events = 0
        all_done = asyncio.Event()
        engine = app.engine

        def observe(what: str, task_id: str) -> None:
            nonlocal finished, events
            if what == "finished":
                finished += 1
                server = engine.registry.get(task_id)
                events += server.core.seq if server is not None else 0
                if finished >= tasks:
                    all_done.set()

        app.engine.observers.append(observe)
        requests = [
            tasks_pb2.SubmitRequest(
                task_id=str(uuid.uuid4()), user_id=f"bench-{i % 50}", prompt=f"Question {i}?"
            )
            for i in range(tasks)
        ]
        async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def one(request: tasks_pb2.SubmitRequest) -> None:
                async with gate:
                    await stub.Submit(request, timeout=30)

            started = time.perf_counter()
            await asyncio.gather(*(one(r) for r in requests))
            accepted = time.perf_counter() - started
            await asyncio.wait_for(all_done.wait(), 120)
            elapsed = time.perf_counter() - started

        # The floor: the same Job payloads, published and acked, on a stream of their own.
        nc = await connect_nats(nats.url, "bench-floor")
        js = nc.jetstream()
        await ensure_stream(js, StreamConfig(name="BENCH_FLOOR", subjects=["bench.floor.>"]))
        payloads = [
            TaskSpec(r.task_id, r.user_id, r.prompt, "local", 0).to_job().SerializeToString()
            for r in requests
        ]
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def publish(data: bytes) -> None:
            async with gate:
                await js.publish("bench.floor.local", data)

        floor_started = time.perf_counter()
        await asyncio.gather(*(publish(p) for p in payloads))
        floor = time.perf_counter() - floor_started
        await nc.close()
        return [
            f"task_svc: {tasks:,} tasks through the engine (local model, 0 ms/token, "
            f"{IN_FLIGHT} submits in flight)",
            f"  accepted (durable Submit): {tasks / accepted:9,.0f} tasks/s",
            f"  submitted to terminal:     {tasks / elapsed:9,.0f} jobs/s "
            f"({events / tasks:,.0f} task events each: {events / elapsed:,.0f} events/s)",
            f"  floor: JetStream publish+ack of the same Jobs: {tasks / floor:9,.0f} msgs/s",
        ]
    finally:
        if app is not None:
            await app.shutdown()
        await llm.shutdown()
        nats.stop()


async def intake_bench(tasks: int, store: Path) -> list[str]:
    """Durable Submit alone: one slot and a local model that takes a minute per token, so
    nothing else runs while the tasks are accepted (stored in JetStream, QUEUED, scheduled)."""
    nats = await start_nats(store / "nats-intake")
    llm = LlmServer(_llm_settings(local_model_token_delay_ms=60_000))
    await llm.start()
    app: TaskApp | None = None
    try:
        settings = Settings(
            nats_url=nats.url,
            llm_svc_addr=f"127.0.0.1:{llm.port}",
            task_svc_listen="127.0.0.1:0",
            task_concurrency=1,
            task_max_queue_depth=tasks + 1,
            task_shutdown_grace_s=0.0,
        )
        app = await TaskApp.start(settings)
        async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def one(i: int) -> None:
                request = tasks_pb2.SubmitRequest(
                    task_id=str(uuid.uuid4()), user_id=f"bench-{i % 50}", prompt=f"Q{i}?"
                )
                async with gate:
                    await stub.Submit(request, timeout=30)

            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(tasks)))
            elapsed = time.perf_counter() - started
        return [f"  durable Submit alone (nothing running): {tasks / elapsed:9,.0f} tasks/s"]
    finally:
        if app is not None:
            await app.shutdown()
        await llm.shutdown()
        nats.stop()


async def run_task_bench(servers: int = 100_000, tasks: int = 500) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="sb-bench-tasks-") as store:
        lines = await throughput_bench(tasks, Path(store))
        lines += await intake_bench(tasks * 4, Path(store))
    # Last: the servers it creates are freed, but the process keeps the memory.
    return memory_bench(servers) + lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--servers", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, default=500)
    args = parser.parse_args()
    for line in uvloop.run(run_task_bench(args.servers, args.tasks)):
        print(line)


if __name__ == "__main__":
    main()
