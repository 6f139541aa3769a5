"""A task_svc cut off from NATS longer than most of its lease stops its shards (fencing), and
when NATS is back it takes them back and runs what was running: the generation that was cut
reruns and completes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from svckit.grpc_server import insecure_channel
from switchboard.v1 import tasks_pb2_grpc
from tests.conftest import timeout
from tests.task.conftest import AppFactory, FakeLlm, events_of, new_id, submit, watch_all
from tools.natsserver import free_port, start_nats


async def test_a_fenced_node_takes_its_shards_back_and_reruns_what_it_cut(
    tmp_path: Path, make_app: AppFactory, fake_llm: FakeLlm
) -> None:
    port = free_port()
    server = await start_nats(tmp_path / "js", port)
    try:
        app = await make_app(nats_url=server.url, task_lease_s=1.0)
        task_id = new_id()
        async with insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = tasks_pb2_grpc.TaskServiceStub(channel)
            await submit(stub, task_id, prompt="hold through the fence")
            await asyncio.wait_for(fake_llm.started[task_id].wait(), timeout(10))
            fake_llm.started[task_id].clear()
            server.stop()  # cut off: the node fences itself after 0.7 s
            await asyncio.wait_for(fake_llm.cancelled[task_id].wait(), timeout(10))
            server = await start_nats(tmp_path / "js", port)
            await asyncio.wait_for(fake_llm.started[task_id].wait(), timeout(30))  # rerun
            fake_llm.release(task_id)
            events = events_of(await watch_all(stub, task_id))
        assert events[-1].completed.content == "hold through the fence"
        assert fake_llm.order == [task_id, task_id]
        await app.shutdown()  # while its NATS is up (the fixture's own is another server)
    finally:
        server.stop()
