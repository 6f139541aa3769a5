"""Health that means something: task_svc reports its TaskService NOT_SERVING while NATS (its
job store) is unreachable and SERVING again once it is back, while "" (the process is alive:
what a liveness probe asks) stays SERVING all along."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from svckit.grpc_server import insecure_channel
from switchboard.v1 import tasks_pb2
from tests.conftest import eventually
from tests.e2e.conftest import running_stack
from tools.natsserver import start_nats

pytestmark = pytest.mark.e2e

TASK_SERVICE = tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name
Status = health_pb2.HealthCheckResponse


async def test_task_svc_is_not_ready_while_nats_is_down(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    async with running_stack(request, tmp_path / "var") as stack:
        assert stack.nats is not None
        async with insecure_channel(stack.config.address("task_svc")) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                return int(reply.status)

            assert await status(TASK_SERVICE) == Status.SERVING
            stack.nats.stop()

            async def not_ready() -> bool:
                return bool(await status(TASK_SERVICE) == Status.NOT_SERVING)

            await eventually(not_ready, seconds=15)
            assert await status("") == Status.SERVING  # alive: no restart would help

            var = stack.config.var_dir
            stack.nats = await start_nats(var / "nats", stack.config.nats_port, var / "nats.log")

            async def ready() -> bool:
                return bool(await status(TASK_SERVICE) == Status.SERVING)

            await eventually(ready, seconds=15)
