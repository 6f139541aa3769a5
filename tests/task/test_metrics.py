"""task_svc's Prometheus metrics (task_svc/metrics.py): the engine's gauges read at scrape
time, its counters fed by the engine's observers, against the in-memory store (no NATS); one
app's own registry; and `python -m task_svc` serving them on TASK_METRICS_LISTEN."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from svckit.grpc_server import insecure_channel
from svckit.metrics import sample
from svckit.shards import SHARD_COUNT
from switchboard.v1 import tasks_pb2, tasks_pb2_grpc
from task_svc.memory_store import MemoryJobStore
from task_svc.metrics import TaskMetrics
from task_svc.task_state import TaskCore
from tests.conftest import eventually, timeout
from tests.task.conftest import AppFactory, FakeLlm, events_of, kind, new_id, submit, watch_all
from tests.task.fakes import ScriptedLlm
from tests.task.test_engine import Engine
from tools.natsserver import free_port

Q = {"queue": "default"}
COMPLETED = {**Q, "status": "completed"}
OUTCOMES = "switchboard_task_outcomes_total"


class Metered(Engine):
    """A started engine (test_engine.Engine) with its metrics on a registry of their own."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(MemoryJobStore(), ScriptedLlm(), **settings)
        self.metrics = TaskMetrics(self.engine)

    def value(self, name: str, **labels: str) -> float:
        return sample(self.metrics.registry, name, **labels)

    def outcomes(self, status: str) -> float:
        return self.value(OUTCOMES, status=status, **Q)


MakeMetered = Callable[..., Awaitable[Metered]]


@pytest.fixture
async def make_metered() -> AsyncIterator[MakeMetered]:
    started: list[Metered] = []

    async def make(**settings: Any) -> Metered:
        metered = Metered(**settings)
        await metered.engine.start()
        started.append(metered)
        return metered

    yield make
    for metered in started:
        await metered.engine.shutdown(0)


async def test_a_completed_task_counts_one_completed_outcome(make_metered: MakeMetered) -> None:
    e = await make_metered()
    assert e.value("switchboard_shards_held") == SHARD_COUNT  # a lone engine holds them all
    state = await e.submit("one two")
    await e.reached("finished", state.task_id)
    assert e.outcomes("completed") == 1
    assert e.outcomes("failed") == e.outcomes("cancelled") == 0
    assert e.value("switchboard_task_retries_total", **Q) == 0
    assert e.value("switchboard_dead_letters_total", **Q) == 0


async def test_running_and_waiting_tasks_show_in_the_gauges_until_they_finish(
    make_metered: MakeMetered,
) -> None:
    e = await make_metered(task_concurrency=1)
    running = await e.submit("hold running")
    await e.llm.started[running.task_id].wait()
    waiting = await e.submit("hold waiting")
    assert e.value("switchboard_tasks_running", **Q) == 1
    assert e.value("switchboard_queue_depth", **Q) == 1
    await eventually(async_probe(lambda: e.value("switchboard_queue_oldest_seconds", **Q) > 0))
    assert e.value("switchboard_task_servers") == 2
    # The waiting one's loop ends once its queued event is out; the running one's stays.
    await eventually(async_probe(lambda: e.value("switchboard_task_servers_hibernated") == 1))
    e.llm.release(running.task_id)
    e.llm.release(waiting.task_id)
    await e.reached("finished", waiting.task_id)
    assert e.value("switchboard_tasks_running", **Q) == 0
    assert e.value("switchboard_queue_depth", **Q) == 0
    assert e.value("switchboard_queue_oldest_seconds", **Q) == 0
    assert e.outcomes("completed") == 2
    assert e.value("switchboard_task_servers") == 2  # finished, retained for retain_s
    await eventually(async_probe(lambda: e.value("switchboard_task_servers_hibernated") == 2))


async def test_a_task_that_succeeds_on_its_third_run_counts_two_retries(
    make_metered: MakeMetered,
) -> None:
    e = await make_metered(task_max_attempts=3, task_retry_base_s=0.01)
    state = await e.submit("flaky answer")
    await e.reached("finished", state.task_id)
    assert e.llm.order == [state.task_id] * 3
    assert e.value("switchboard_task_retries_total", **Q) == 2
    assert e.value("switchboard_dead_letters_total", **Q) == 0
    assert e.outcomes("completed") == 1 and e.outcomes("failed") == 0


async def test_a_task_out_of_attempts_counts_a_dead_letter_and_a_failure(
    make_metered: MakeMetered,
) -> None:
    e = await make_metered(task_max_attempts=2, task_retry_base_s=0.01)
    state = await e.submit("flaky answer")
    await e.reached("dead", state.task_id)
    await e.reached("finished", state.task_id)
    assert e.value("switchboard_task_retries_total", **Q) == 1
    assert e.value("switchboard_dead_letters_total", **Q) == 1
    assert e.outcomes("failed") == 1 and e.outcomes("completed") == 0


async def test_a_refused_task_fails_without_a_retry_or_a_dead_letter(
    make_metered: MakeMetered,
) -> None:
    e = await make_metered()
    state = await e.submit("fail please")
    await e.reached("finished", state.task_id)
    assert e.outcomes("failed") == 1
    assert e.value("switchboard_task_retries_total", **Q) == 0
    assert e.value("switchboard_dead_letters_total", **Q) == 0


async def test_a_cancelled_running_task_counts_cancelled(make_metered: MakeMetered) -> None:
    e = await make_metered()
    state = await e.submit("hold on")
    await e.llm.started[state.task_id].wait()
    await e.engine.cancel(state.task_id, "alice")
    await e.reached("finished", state.task_id)
    assert e.outcomes("cancelled") == 1 and e.outcomes("completed") == 0
    assert e.value("switchboard_tasks_running", **Q) == 0


def crash(core: TaskCore) -> None:
    raise RuntimeError(f"injected crash in {core.task_id}")


async def test_a_task_server_restarted_after_a_crash_is_counted(
    make_metered: MakeMetered,
) -> None:
    e = await make_metered(task_max_restarts=3, task_restart_period_s=60)
    state = await e.submit("hold on")
    await e.llm.started[state.task_id].wait()
    server = e.engine.registry.get(state.task_id)
    assert server is not None
    assert e.value("switchboard_task_server_restarts_total") == 0
    with pytest.raises(RuntimeError):
        await server.call(crash)
    await eventually(async_probe(lambda: e.value("switchboard_task_server_restarts_total") == 1))
    e.llm.release(state.task_id)
    await e.reached("finished", state.task_id)
    assert e.outcomes("completed") == 1  # restarted, it carried on


async def test_each_app_counts_on_its_own_registry(make_app: AppFactory, fake_llm: FakeLlm) -> None:
    app = await make_app()
    async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        reply = await submit(stub, prompt="one two three")
        events = events_of(await watch_all(stub, reply.state.task_id))
    assert kind(events[-1]) == "completed"
    registry = app.metrics.registry

    def completed() -> bool:
        return sample(registry, OUTCOMES, **COMPLETED) == 1

    await eventually(async_probe(completed))
    assert sample(registry, "switchboard_shards_held") == SHARD_COUNT
    # Not the process-wide registry: apps started side by side never share a series.
    assert registry.get_sample_value("process_resident_memory_bytes") is None


async def test_python_m_task_svc_serves_its_metrics_on_task_metrics_listen(
    nats_url: str, fake_llm: FakeLlm, port: int
) -> None:
    metrics_port = free_port()
    env = dict(
        os.environ,
        NATS_URL=nats_url,
        LLM_SVC_ADDR=fake_llm.address,
        TASK_SVC_LISTEN=f"127.0.0.1:{port}",
        TASK_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        TASK_NODE_ID="metrics-node",
        TASK_SHUTDOWN_GRACE_S="0",
        LOG_LEVEL="WARNING",
    )
    process = subprocess.Popen([sys.executable, "-m", "task_svc"], env=env)
    try:
        await run_one_task(port)
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        values = await eventually(lambda: completed_scrape(url))
        assert values["switchboard_shards_held"] == SHARD_COUNT
        assert "process_resident_memory_bytes" in values  # the process-wide registry
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, timeout(20)) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def run_one_task(port: int) -> None:
    """Submit a task to the task_svc on `port` (once it serves) and watch it complete."""
    async with insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        request = tasks_pb2.SubmitRequest(task_id=new_id(), user_id="alice", prompt="one two")
        reply = await stub.Submit(request, timeout=timeout(20), wait_for_ready=True)
        events = events_of(await watch_all(stub, reply.state.task_id))
    assert kind(events[-1]) == "completed"


async def completed_scrape(url: str) -> dict[str, float] | None:
    """Every sample of one scrape by name (labels dropped but for the completed outcome),
    once that outcome shows the task; None before."""
    async with httpx.AsyncClient(timeout=timeout(5)) as http:
        response = await http.get(url)
    response.raise_for_status()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            if s.name != OUTCOMES or s.labels == COMPLETED:
                values[s.name] = s.value
    return values if values.get(OUTCOMES) == 1 else None


def async_probe(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """`check` as the awaitable probe `eventually` polls."""

    async def probe() -> bool:
        return check()

    return probe
