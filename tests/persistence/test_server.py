"""The assembled service: in process (PersistenceServer) and as `python -m persistence_svc`
with a clean SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from persistence_svc.config import Settings
from persistence_svc.server import SERVICE_NAME, USER_SERVICE_NAME, PersistenceServer
from svckit.grpc_server import insecure_channel
from svckit.nats import connect_nats
from switchboard.v1 import common_pb2, history_pb2, history_pb2_grpc
from tests.conftest import eventually, timeout
from tests.persistence.factory import completed_lifecycle, new_task_id
from tests.persistence.helpers import publish


async def completed_over_grpc(target: str, task_id: str) -> history_pb2.HistoryTask:
    async with insecure_channel(target) as channel:
        stub = history_pb2_grpc.HistoryServiceStub(channel)

        async def probe() -> history_pb2.HistoryTask | None:
            try:
                task = await stub.GetTask(
                    history_pb2.GetHistoryTaskRequest(task_id=task_id, user_id="alice"),
                    timeout=timeout(5),
                )
            except grpc.aio.AioRpcError as error:
                if error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    return None
                raise
            return task if task.status == common_pb2.TASK_STATUS_COMPLETED else None

        return await eventually(probe, seconds=20)


async def publish_lifecycle(nats_url: str, task_id: str) -> None:
    nc = await connect_nats(nats_url, "test-publisher")
    try:
        js = nc.jetstream()
        for event in completed_lifecycle(task_id):
            await publish(js, event)
    finally:
        await nc.close()


async def test_server_in_process(nats_url: str, database_url: str) -> None:
    settings = Settings(
        nats_url=nats_url, database_url=database_url, history_svc_listen="127.0.0.1:0"
    )
    server = PersistenceServer(settings)
    try:
        await server.start()  # creates SB_TASK_EVENTS itself: task_svc may start later
        task_id = new_task_id()
        await publish_lifecycle(nats_url, task_id)
        target = f"127.0.0.1:{server.port}"
        task = await completed_over_grpc(target, task_id)
        assert (task.version, task.response) == (7, "Rayleigh.")
        async with insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in (SERVICE_NAME, USER_SERVICE_NAME):
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=name), timeout=timeout(5)
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # SnapshotService is gone: neither served nor known to health checking.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health.Check(
                    health_pb2.HealthCheckRequest(service="switchboard.v1.SnapshotService"),
                    timeout=timeout(5),
                )
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/switchboard.v1.SnapshotService/ListSnapshots")(
                    b"", timeout=timeout(5)
                )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            users = history_pb2_grpc.UserServiceStub(channel)
            wanted = history_pb2.Preferences(default_model="local-small", extra={"a": "b"})
            await users.SetPreferences(
                history_pb2.SetPreferencesRequest(user_id="alice", preferences=wanted),
                timeout=timeout(5),
            )
            got = await users.GetPreferences(
                history_pb2.GetPreferencesRequest(user_id="alice"), timeout=timeout(5)
            )
            assert got == wanted
    finally:
        await server.shutdown()
        await server.shutdown()  # idempotent
    assert server.nc is not None and server.nc.is_closed


# SQLite only: the process's life is what is tested here (PostgreSQL is covered in process),
# on an empty database that it migrates itself, started from a folder that is not the repo.
@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
async def test_process_serves_and_stops_cleanly_on_sigterm(
    nats_url: str, empty_database_url: str, port: int, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "DATABASE_URL": empty_database_url,
        "HISTORY_SVC_LISTEN": f"127.0.0.1:{port}",
        "LOG_LEVEL": "INFO",
    }
    log_path = tmp_path / "persistence.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            # From another folder: the migrations are found inside the package, not the cwd.
            [sys.executable, "-m", "persistence_svc"],
            cwd=tmp_path,
            env=env,
            stderr=log,
            stdout=log,
        )
    try:
        target = f"127.0.0.1:{port}"
        async with insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                try:
                    reply = await health.Check(
                        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout(1)
                    )
                except grpc.aio.AioRpcError:
                    return False
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            await eventually(serving, seconds=30)
        task_id = new_task_id()
        await publish_lifecycle(nats_url, task_id)
        task = await completed_over_grpc(target, task_id)
        assert task.response == "Rayleigh."

        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, timeout(20))
        assert code == 0, log_path.read_text()
        assert "persistence_svc stopped" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        print(log_path.read_text())  # shown by pytest when the test fails
