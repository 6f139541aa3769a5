"""`make run` supervises: a service killed with -9 is started again and the stack goes on;
past the restart intensity it gives up; the embedded nats-server never outlives its launcher."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from gateway_svc.phoenix_client import PhoenixClient
from switchboard.v1 import common_pb2
from tests.conftest import eventually, timeout
from tests.e2e.history import terminal_history
from tools.stack import DEFAULT_NICE, ROOT, Restarts, Stack, dev_token, parse_nice

pytestmark = pytest.mark.e2e


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_restarts_back_off_and_give_up_past_the_intensity() -> None:
    clock = Clock()
    restarts = Restarts(max_restarts=3, period_s=10, backoff_s=0.5, max_backoff_s=1.5, clock=clock)
    assert [restarts.delay_s("a") for _ in range(3)] == [0.5, 1.0, 1.5]
    assert restarts.delay_s("b") == 0.5  # per service
    assert restarts.delay_s("a") is None  # a fourth crash within the period
    clock.now += 11  # the old crashes have aged out
    assert restarts.delay_s("a") == 0.5


def test_stack_nice_names_services_and_values() -> None:
    assert parse_nice("task_svc=5, llm_svc=3") == {"task_svc": 5, "llm_svc": 3}
    assert parse_nice("") == {}
    with pytest.raises(ValueError, match="unknown service"):
        parse_nice("task=5")


def nice_of(pid: int) -> int:
    """The nice value of a process (field 19 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


async def test_each_service_runs_at_its_priority(sqlite_stack: Stack) -> None:
    base = nice_of(os.getpid())
    for name, process in sqlite_stack.processes.items():
        assert nice_of(process.pid) == min(19, base + DEFAULT_NICE[name]), name


async def generate(stack: Stack, prompt: str) -> str:
    task_id = str(uuid.uuid4())
    url = stack.config.socket_url
    async with await PhoenixClient.connect(url, token=dev_token("alice")) as client:
        channel = await client.join(f"task:{task_id}")
        assert (await channel.push("llm_generate", {"prompt": prompt})).ok
        async with asyncio.timeout(timeout(30)):
            async for message in channel.messages():
                if message.event in ("llm_response", "error"):
                    assert message.event == "llm_response", message.payload
                    break
    return task_id


async def test_a_killed_service_is_started_again_and_the_stack_goes_on(
    sqlite_stack: Stack,
) -> None:
    stack = sqlite_stack
    stop = asyncio.Event()
    out = io.StringIO()
    supervisor = asyncio.create_task(stack.supervise(stop, Restarts(backoff_s=0.1), out))
    try:
        old = stack.processes["persistence_svc"]
        await stack.stop_service("persistence_svc", signal.SIGKILL)

        async def restarted() -> bool:
            return stack.processes["persistence_svc"] is not old

        await eventually(restarted)
        await stack.wait_healthy(timeout=timeout(30), names=("persistence_svc",))
        task_id = await generate(stack, "still there?")
        task, _ = await terminal_history(stack, task_id, "alice")
        assert task.status == common_pb2.TASK_STATUS_COMPLETED
        assert "persistence_svc exited with -9; restarting in 0.1s" in out.getvalue()
        assert not supervisor.done()
    finally:
        stop.set()
        await supervisor


async def test_it_gives_up_on_a_service_that_keeps_dying(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    out = io.StringIO()
    restarts = Restarts(max_restarts=1, backoff_s=0.05)
    supervisor = asyncio.create_task(stack.supervise(asyncio.Event(), restarts, out))
    await stack.stop_service("llm_svc", signal.SIGKILL)

    async def came_back() -> bool:
        return stack.processes["llm_svc"].returncode is None

    await eventually(came_back)
    await stack.stop_service("llm_svc", signal.SIGKILL)
    async with asyncio.timeout(timeout(10)):
        await supervisor  # returns: the stack's owner stops it
    assert "llm_svc exited with -9 too often; giving up" in out.getvalue()
    await stack.start_service("llm_svc")  # so that the fixture stops a full stack cleanly
    await stack.wait_healthy(timeout=timeout(30), names=("llm_svc",))


LAUNCHER = """
import asyncio, sys, time
from pathlib import Path
from tools.natsserver import start_nats
server = asyncio.run(start_nats(Path(sys.argv[1])))
print(server.process.pid, flush=True)
time.sleep(600)
"""


async def test_the_embedded_nats_server_dies_with_its_launcher(tmp_path: Path) -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path / "js")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert launcher.stdout is not None
    nats_pid = int(launcher.stdout.readline())
    assert Path(f"/proc/{nats_pid}").exists()
    launcher.kill()  # no cleanup code runs
    launcher.wait()

    async def gone() -> bool:
        stat = Path(f"/proc/{nats_pid}/stat")
        return not stat.exists() or stat.read_text().split()[2] == "Z"

    await eventually(gone)
