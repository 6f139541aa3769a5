"""`make cluster` (tools/cluster.py): three NATS nodes form one JetStream cluster that takes
a stream with three replicas, both gateways accept sockets on the one port, llm_svc's two
instances answer on one round-robin target, one more task_svc joins, and everything stops
cleanly."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nats.js.api import StreamConfig
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from svckit.grpc_server import insecure_channel
from switchboard.v1 import llm_pb2, llm_pb2_grpc
from tests.conftest import timeout
from tests.e2e.conftest import TEST_ENV
from tools.cluster import Cluster, ClusterConfig
from tools.stack import dev_token

pytestmark = pytest.mark.e2e

SOCKETS = 40  # both gateways get some: all on one has odds of 2 in 2^40
TASK_SERVICE = "switchboard.v1.TaskService"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    config = ClusterConfig.on_free_ports(tmp_path / "var", extra_env=dict(TEST_ENV))
    running = Cluster(config)
    try:
        await running.start(timeout=timeout(60))
        yield running
    finally:
        codes = await running.stop()
        for log in sorted((config.var_dir / "logs").glob("*.log")):
            print(f"----- {log.name} (last 20 lines)")
            print("\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    # Exit 0 on SIGTERM; nats-server too. A process killed with a signal would show it.
    assert codes and all(code == 0 for code in codes.values()), codes
    assert all(p.returncode is not None for p in running.processes.values())


async def monitor(url: str) -> dict[str, object]:
    async with httpx.AsyncClient(timeout=timeout(5), trust_env=False) as client:
        reply = await client.get(url)
        reply.raise_for_status()
        return reply.json()  # type: ignore[no-any-return]


async def connects(metrics_url: str) -> float:
    async with httpx.AsyncClient(timeout=timeout(5), trust_env=False) as client:
        text = (await client.get(metrics_url)).text
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_connects":
            return sum(s.value for s in family.samples if s.name == "gateway_connects_total")
    raise AssertionError(f"no gateway_connects_total at {metrics_url}")


async def serving(address: str, service: str = "") -> bool:
    async with insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout(5)
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def test_cluster_forms_and_spreads_over_its_instances(cluster: Cluster) -> None:
    # Each NATS node routes to the other two, and the JetStream meta group has all three.
    for node in cluster.nodes:
        routez = await monitor(f"{node.monitor_url}/routez")
        remotes = {r["remote_name"] for r in routez["routes"]}  # type: ignore[attr-defined]
        assert remotes == {n.name for n in cluster.nodes} - {node.name}
        meta = (await monitor(f"{node.monitor_url}/jsz"))["meta_cluster"]
        assert meta["cluster_size"] == 3 and meta["leader"]  # type: ignore[index]

    # A stream on all three nodes: refused by a cluster of fewer than three JetStream peers.
    nc = await nats.connect(cluster.nats_urls, connect_timeout=timeout(5))
    try:
        js = nc.jetstream()
        await js.account_info()
        info = await js.add_stream(
            StreamConfig(name="CLUSTER_CHECK", subjects=["cluster.check"], num_replicas=3)
        )
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        assert (await js.publish("cluster.check", b"x")).seq == 1
        await js.delete_stream("CLUSTER_CHECK")
    finally:
        await nc.close()

    # Every task_svc reached NATS through the comma-separated NATS_URL (readiness).
    for name in cluster.names("task_svc"):
        address = cluster.group.instances[name].health_address
        assert address is not None and await serving(address, TASK_SERVICE), name

    # Both gateways accept sockets on the one port: Linux spreads the connects between them.
    before = [await connects(url) for url in cluster.gateway_metrics_urls]
    sockets = []
    try:
        for i in range(SOCKETS):
            url = f"{cluster.socket_url}?token={dev_token(f'spread-{i}')}&vsn=2.0.0"
            sockets.append(await connect(url, open_timeout=timeout(5)))
        for ws in sockets:  # each answers as a Phoenix socket
            await ws.send('[null,"1","phoenix","heartbeat",{}]')
            assert '"status":"ok"' in str(await asyncio.wait_for(ws.recv(), timeout(5)))
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))
    urls = cluster.gateway_metrics_urls
    gained = [await connects(url) - b for url, b in zip(urls, before, strict=True)]
    assert sum(gained) == SOCKETS and all(n > 0 for n in gained), gained

    # One target, both llm_svc (round_robin): it still answers with one of them killed.
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in cluster.config.llm_ports)
    async with insecure_channel(target) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        for _ in range(4):
            assert (await stub.ListModels(llm_pb2.ListModelsRequest(), timeout=timeout(5))).models
        assert await cluster.kill("llm_svc-1", signal.SIGKILL) == -signal.SIGKILL
        for _ in range(4):
            reply = await stub.ListModels(
                llm_pb2.ListModelsRequest(), timeout=timeout(5), wait_for_ready=True
            )
            assert reply.models
    await cluster.start_instance("llm_svc-1", timeout=timeout(30))

    # One more task_svc joins on a port of its own.
    added = await cluster.add_task_svc(timeout=timeout(30))
    assert added == "task_svc-4"
    assert cluster.group.instances[added].env["TASK_NODE_ID"] == "task-4"
