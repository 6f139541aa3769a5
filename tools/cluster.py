"""Run Switchboard as a cluster on one machine (`make cluster`): a three-node NATS
JetStream cluster, three task_svc, two gateway_svc sharing the WebSocket port
(GATEWAY_REUSE_PORT), two llm_svc and one persistence_svc, supervised as `make run` does
(tools/stack.py: `Processes`, `Restarts`, prefixed logs). Clients use the same ports as
with `make run` (WebSocket 4000), so `make client` works unchanged.

What it is for: trying what several replicas of each service do (the kernel spreading
sockets over two gateways, jobs and watches spread over three task_svc, a NATS node or a
task_svc killed and brought back) without Kubernetes. `Cluster` is what the tests use, on
free ports in a scratch folder: `kill("task_svc-2", SIGKILL)`, `start_instance("nats-2")`,
`add_task_svc()`.

Every process gets NATS_URL with all three servers, comma-separated; each task_svc its node
id and the address it serves on (TASK_NODE_ID, TASK_ADVERTISE_ADDR); a gRPC client of
llm_svc one target with both addresses (`ipv4:a,b`, spread by round_robin: svckit's
CHANNEL_OPTIONS). Nothing is stopped by Ctrl-C before it is told to: the gateways first,
then task_svc, persistence_svc, llm_svc, and the NATS nodes last.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tools.natsserver import ClusterNode, free_port, guarded, node_ready
from tools.stack import (
    DEFAULT_NICE,
    METRICS_LISTEN,
    METRICS_PORTS,
    ROOT,
    Instance,
    Processes,
    Restarts,
    banner,
    launcher_env,
    parse_nice,
    stop_on_signals,
)

CLUSTER_NAME = "switchboard"
NATS_REPLICAS = 3  # every stream on all three nodes: any one may go down


@dataclass
class ClusterConfig:
    """Where everything listens. The defaults are `make run`'s client-facing ports (the
    WebSocket on 4000, task_svc-1 on 7051, llm_svc-1 on 7052, persistence_svc on 7053),
    each further instance ten above the one before; NATS clients on 4223-4225 (4222 may be
    the machine's own, older, server)."""

    var_dir: Path = ROOT / "var" / "cluster"
    gateway_port: int = 4000
    gateway_grpc_ports: list[int] = field(default_factory=lambda: [7050, 7060])
    task_ports: list[int] = field(default_factory=lambda: [7051, 7061, 7071])
    llm_ports: list[int] = field(default_factory=lambda: [7052, 7062])
    persistence_port: int = 7053
    nats_ports: list[int] = field(default_factory=lambda: [4223, 4224, 4225])
    nats_cluster_ports: list[int] = field(default_factory=lambda: [6223, 6224, 6225])
    nats_monitor_ports: list[int] = field(default_factory=lambda: [8223, 8224, 8225])
    database_url: str | None = None  # None: SQLite under var_dir
    extra_env: dict[str, str] = field(default_factory=dict)
    log_to_files: bool = False  # tests keep each instance's log in var_dir/logs/
    nice: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_NICE))
    free_ports: bool = False  # a task_svc added later gets a free port, not the next in line

    @classmethod
    def on_free_ports(cls, var_dir: Path, **kwargs: object) -> ClusterConfig:
        def free(n: int) -> list[int]:
            return [free_port() for _ in range(n)]

        return cls(
            var_dir=var_dir,
            gateway_port=free_port(),
            gateway_grpc_ports=free(2),
            task_ports=free(3),
            llm_ports=free(2),
            persistence_port=free_port(),
            nats_ports=free(3),
            nats_cluster_ports=free(3),
            nats_monitor_ports=free(3),
            log_to_files=True,
            free_ports=True,
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def socket_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}/socket/websocket"

    def nats_nodes(self) -> list[ClusterNode]:
        ports = zip(self.nats_ports, self.nats_cluster_ports, self.nats_monitor_ports, strict=True)
        return [
            ClusterNode(f"nats-{i}", port, route, monitor, self.var_dir / f"nats-{i}")
            for i, (port, route, monitor) in enumerate(ports, start=1)
        ]


def _address(port: int) -> str:
    return f"127.0.0.1:{port}"


class Cluster:
    """Owns the processes of one running cluster, each an `Instance` named `<service>-<n>`
    (`nats-<n>` for the NATS nodes). `stop()` is idempotent."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.nodes = config.nats_nodes()
        logs = config.var_dir / "logs" if config.log_to_files else None
        self.group = Processes(self.env, logs)
        self.task_ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}  # by instance name
        for node in self.nodes:
            self.group.add(self._nats_instance(node))
        for i, port in enumerate(config.llm_ports, start=1):
            self._add_service("llm_svc", i, port, {"LLM_SVC_LISTEN": _address(port)})
        # Its HISTORY_SVC_LISTEN is in the shared environment: there is one.
        self._add_service("persistence_svc", 1, config.persistence_port, {})
        for i, port in enumerate(config.task_ports, start=1):
            self._add_task_svc(i, port)
        for i, grpc_port in enumerate(config.gateway_grpc_ports, start=1):
            env = {"GATEWAY_GRPC_LISTEN": _address(grpc_port)}
            self._add_service("gateway_svc", i, grpc_port, env)

    # -- the layout -------------------------------------------------------------------

    def _nats_instance(self, node: ClusterNode) -> Instance:
        async def ready() -> bool:
            return await node_ready(node, self.nodes)

        return Instance(
            node.name,
            "nats",
            argv=tuple(guarded(node.args(CLUSTER_NAME, self.nodes))),
            ready=ready,
            own_session=True,
        )

    def _add_service(self, service: str, n: int, port: int, env: dict[str, str]) -> str:
        name = f"{service}-{n}"
        metrics_port = self._metrics_port(service, n)
        self.metrics_ports[name] = metrics_port
        env = {**env, METRICS_LISTEN[service]: _address(metrics_port)}
        self.group.add(
            Instance(
                name,
                service,
                env=env,
                nice=self.config.nice.get(service, 0),
                health_address=_address(port),
            )
        )
        return name

    def _add_task_svc(self, n: int, port: int) -> str:
        address = _address(port)
        env = {
            "TASK_NODE_ID": f"task-{n}",
            "TASK_SVC_LISTEN": address,
            "TASK_ADVERTISE_ADDR": address,
        }
        name = self._add_service("task_svc", n, port, env)
        self.task_ports[name] = port
        return name

    def env(self) -> dict[str, str]:
        """What every process shares; each instance adds its own listen addresses."""
        c = self.config
        llm_target = "ipv4:" + ",".join(_address(port) for port in c.llm_ports)
        env = launcher_env()
        env.update(
            {
                "NATS_URL": self.nats_url,
                # Every stream on every node, whichever service creates it first.
                "NATS_STREAM_REPLICAS": str(NATS_REPLICAS),
                "DATABASE_URL": self.database_url,
                "GATEWAY_PORT": str(c.gateway_port),
                "GATEWAY_REUSE_PORT": "1",
                # The gateways' fallback; which task_svc owns a task is theirs to find.
                "TASK_SVC_ADDR": _address(c.task_ports[0]),
                "LLM_SVC_ADDR": llm_target,
                "TASK_LLM_STREAMS": str(len(c.llm_ports)),  # one stream per llm_svc
                "HISTORY_SVC_LISTEN": _address(c.persistence_port),
                "HISTORY_SVC_ADDR": _address(c.persistence_port),
            }
        )
        env.update(c.extra_env)
        return env

    # -- what a client needs ----------------------------------------------------------

    @property
    def socket_url(self) -> str:
        return self.config.socket_url

    @property
    def nats_urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def nats_url(self) -> str:
        """Every server, comma-separated (NATS_URL)."""
        return ",".join(self.nats_urls)

    @property
    def database_url(self) -> str:
        sqlite_file = self.config.var_dir / "switchboard.db"
        return self.config.database_url or f"sqlite+aiosqlite:///{sqlite_file}"

    @property
    def processes(self) -> dict[str, asyncio.subprocess.Process]:
        return self.group.processes

    @property
    def gateway_metrics_urls(self) -> list[str]:
        return [self.metrics_url(name) for name in self.names("gateway_svc")]

    def metrics_url(self, name: str) -> str:
        """The `/metrics` endpoint of instance `name` (e.g. `task_svc-2`)."""
        return f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"

    def _metrics_port(self, service: str, n: int) -> int:
        """`make run`'s metrics port for the first instance, ten above for each further one
        (like the gRPC ports); free ports for tests."""
        if self.config.free_ports:
            return free_port()
        return METRICS_PORTS[service] + 10 * (n - 1)

    def names(self, service: str) -> list[str]:
        """The instances of `service` ("task_svc", "nats"), in start order."""
        return [name for name, i in self.group.instances.items() if i.service == service]

    # -- running it -------------------------------------------------------------------

    def _start_waves(self) -> Iterator[list[str]]:
        # The NATS nodes until their JetStream cluster has formed (a service that connects
        # earlier gets 503s from JetStream). Then one process at a time creates or updates
        # the streams (persistence_svc SB_TASK_EVENTS, each task_svc all of them): while a
        # replicated stream is being created its raft group has no leader yet, and another
        # process's stream info, create or update on it goes unanswered until nats-py's
        # request timeout (seen here: three task_svc started at once, all three exited).
        yield self.names("nats")
        yield [*self.names("llm_svc"), *self.names("persistence_svc")]
        for name in self.names("task_svc"):
            yield [name]
        yield self.names("gateway_svc")

    async def start(self, timeout: float = 60.0) -> None:
        """Start everything, wave after wave (`_start_waves`), each healthy before the
        next; returns once every instance is (within `timeout` in all)."""
        self.config.var_dir.mkdir(parents=True, exist_ok=True)
        deadline = asyncio.get_running_loop().time() + timeout
        for wave in self._start_waves():
            for name in wave:
                await self.group.start(name)
            remaining = deadline - asyncio.get_running_loop().time()
            await self.group.wait_healthy(wave, max(remaining, 0.1))

    async def wait_healthy(self, timeout: float = 60.0, names: Sequence[str] = ()) -> None:
        """Wait until `names` (default: every instance) report healthy: a service's "" health
        entry SERVING, a NATS node in its formed JetStream cluster."""
        await self.group.wait_healthy(names or list(self.group.instances), timeout)

    async def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 20) -> int:
        """Send `sig` to one instance ("task_svc-2", "nats-3") and wait until it exits;
        returns its exit code (negative: the signal). Under `supervise()` it is then
        started again after the restart backoff."""
        return await self.group.stop(name, sig, timeout)

    async def start_instance(self, name: str, timeout: float = 60.0) -> None:
        """Start one instance that is down again, and wait until it is healthy."""
        await self.group.start(name)
        await self.group.wait_healthy([name], timeout)

    async def add_task_svc(self, timeout: float = 60.0) -> str:
        """Start one more task_svc (node id `task-<n>`) on a port of its own; its name."""
        n = len(self.names("task_svc")) + 1
        port = free_port() if self.config.free_ports else max(self.task_ports.values()) + 10
        name = self._add_task_svc(n, port)
        await self.start_instance(name, timeout)
        return name

    async def supervise(
        self, stop: asyncio.Event, restarts: Restarts | None = None, out: IO[str] = sys.stderr
    ) -> None:
        """Until `stop` is set: start every instance that dies again (`Restarts`)."""
        await self.group.supervise(stop, restarts, out)

    def _stop_order(self) -> Iterator[list[str]]:
        # The gateways first, so clients are told to come back later; NATS last, so every
        # service still has it while it drains.
        for service in ("gateway_svc", "task_svc", "persistence_svc", "llm_svc", "nats"):
            yield self.names(service)

    async def stop(self) -> dict[str, int]:
        """SIGTERM everything, tier by tier (`_stop_order`); every exit code."""
        codes = await self.group.stop_in_tiers(self._stop_order())
        await self.group.close()
        return codes


async def run_until_stopped() -> None:
    config = ClusterConfig(database_url=os.environ.get("DATABASE_URL") or None)
    if "GATEWAY_PORT" in os.environ:
        config.gateway_port = int(os.environ["GATEWAY_PORT"])
    if "STACK_NICE" in os.environ:
        config.nice = parse_nice(os.environ["STACK_NICE"])
    cluster = Cluster(config)
    stop = stop_on_signals()
    try:
        await cluster.start()
        heading = (
            "Switchboard cluster is up: "
            f"{len(cluster.names('nats'))} NATS nodes, "
            f"{len(cluster.names('gateway_svc'))} gateways on one port, "
            f"{len(cluster.names('task_svc'))} task_svc, {len(cluster.names('llm_svc'))} llm_svc."
        )
        print(
            banner(cluster.socket_url, cluster.nats_url, cluster.database_url, heading),
            flush=True,
        )
        await cluster.supervise(stop)
    finally:
        print("stopping...", flush=True)
        await cluster.stop()


def main() -> None:
    asyncio.run(run_until_stopped())


if __name__ == "__main__":
    main()
