"""Run the whole stack: an embedded nats-server (unless NATS_URL is set) and the four
services as separate processes with prefixed logs, supervised: a service that dies is started
again with backoff, within a restart intensity (`Restarts`), and the stack goes on. `make run`
uses `main()`; the end-to-end tests and the benchmark use `Stack` with free ports and a
scratch folder.

The supervision itself (`Processes`) knows named instances, not services: `make run` has
one instance of each service, named after it; `make cluster` (tools/cluster.py) has several
("task_svc-2") and its nats-server nodes ("nats-1") in the same supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from svckit.backoff import exponential
from svckit.grpc_server import insecure_channel
from tools.natsserver import NatsServer, free_port, start_nats

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("llm_svc", "persistence_svc", "task_svc", "gateway_svc")
COLOURS = {"nats": 90, "llm_svc": 35, "persistence_svc": 34, "task_svc": 33, "gateway_svc": 36}
# Each service's Prometheus /metrics endpoint: the setting, and `make run`'s port (the
# services' own defaults; tests use free ports).
METRICS_LISTEN = {
    "gateway_svc": "GATEWAY_METRICS_LISTEN",
    "task_svc": "TASK_METRICS_LISTEN",
    "llm_svc": "LLM_METRICS_LISTEN",
    "persistence_svc": "PERSISTENCE_METRICS_LISTEN",
}
METRICS_PORTS = {"gateway_svc": 9100, "task_svc": 9101, "llm_svc": 9102, "persistence_svc": 9103}
EMBEDDED_NATS_PORT = 4223  # not 4222: machines here may run their own (older) NATS there
# The CPU priority of each service (its nice value) when the whole stack shares a machine: the
# acks' path (gateway_svc, and nats-server at 0) first, the streams next, history last. With
# the CPUs busy (300 paced streams on 2 cores) the llm_generate ack went from p50/p99
# 34-53/87-145 to 15-29/62-68 ms, first events from 83-131 to 62-64 ms, with the same
# throughput; at zero delay too. Lower priorities still (10/10/15) cut the paced ack further
# but cost zero-delay throughput about 15 %: the gateway then preempts the others at every
# wake-up and they batch less. What Kubernetes does with each pod's CPU request, on one box.
# STACK_NICE overrides it ("task_svc=10,llm_svc=10"; "" for all at 0).
DEFAULT_NICE = {"gateway_svc": 0, "task_svc": 5, "llm_svc": 5, "persistence_svc": 10}


def parse_nice(text: str) -> dict[str, int]:
    """`name=value,...` (STACK_NICE) as a nice value per service."""
    nice = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in SERVICES:
            raise ValueError(f"STACK_NICE names an unknown service: {name!r}")
        nice[name] = int(value)
    return nice


@dataclass
class StackConfig:
    var_dir: Path = ROOT / "var"
    gateway_port: int = 4000
    grpc_ports: dict[str, int] = field(
        default_factory=lambda: {
            "gateway_svc": 7050,
            "task_svc": 7051,
            "llm_svc": 7052,
            "persistence_svc": 7053,
        }
    )
    metrics_ports: dict[str, int] = field(default_factory=lambda: dict(METRICS_PORTS))
    nats_url: str | None = None  # None: start an embedded nats-server
    nats_port: int = EMBEDDED_NATS_PORT
    database_url: str | None = None  # None: SQLite under var_dir
    extra_env: dict[str, str] = field(default_factory=dict)
    log_to_files: bool = False  # tests keep each service's log in var_dir/logs/
    nice: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_NICE))

    @classmethod
    def on_free_ports(cls, var_dir: Path, **kwargs: object) -> StackConfig:
        ports = {name: free_port() for name in SERVICES}
        return cls(
            var_dir=var_dir,
            gateway_port=free_port(),
            grpc_ports=ports,
            metrics_ports={name: free_port() for name in SERVICES},
            nats_port=free_port(),
            log_to_files=True,
            **kwargs,  # type: ignore[arg-type]
        )

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.grpc_ports[service]}"

    def metrics_url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[service]}/metrics"

    @property
    def socket_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway_port}/socket/websocket"


class Restarts:
    """How a dead service is started again, as task_svc's supervisor does for TaskServers:
    after a backoff that doubles with each recent crash, and not at all past `max_restarts`
    in `period_s` (then something is wrong that restarting does not fix: the stack stops)."""

    def __init__(
        self,
        max_restarts: int = 5,
        period_s: float = 60.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_restarts = max_restarts
        self.period_s = period_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self._crashes: dict[str, list[float]] = {}

    def delay_s(self, name: str) -> float | None:
        """Count a crash of `name`: the wait before starting it again, or None to give up."""
        now = self.clock()
        recent = [t for t in self._crashes.get(name, []) if t > now - self.period_s]
        recent.append(now)
        self._crashes[name] = recent
        if len(recent) > self.max_restarts:
            return None
        return exponential(len(recent), self.backoff_s, self.max_backoff_s)


Probe = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class Instance:
    """One supervised process. `name` keys it everywhere (its log prefix and file, the
    processes, the restart intensity): the service's own name in `make run`, `task_svc-2`
    or `nats-1` in a cluster. `service` picks its colour."""

    name: str
    service: str
    # The command line; empty: `python -m <service>`.
    argv: tuple[str, ...] = ()
    # Its own variables, over the group's shared environment.
    env: Mapping[str, str] = field(default_factory=dict)
    nice: int = 0  # SB_NICE: what a service lowers its own priority to
    # Up when this gRPC address reports "" SERVING (grpc.health.v1) ...
    health_address: str | None = None
    # ... or when this says so (a nats-server node: its JetStream cluster is formed).
    ready: Probe | None = None
    # A session of its own: a Ctrl-C in the terminal must not stop it before the services
    # have drained (nats-server; see tools/natsserver.guarded).
    own_session: bool = False


class Processes:
    """The running processes of named instances, their logs, and their supervision: what
    `Stack` and `Cluster` share. Logs go prefixed to stdout, or with `log_dir` to one file
    per instance (kept across its restarts). `shared_env()` is read at each start."""

    def __init__(
        self, shared_env: Callable[[], Mapping[str, str]], log_dir: Path | None = None
    ) -> None:
        self.shared_env = shared_env
        self.log_dir = log_dir
        self.instances: dict[str, Instance] = {}
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._pumps: set[asyncio.Task[None]] = set()
        self._sinks: dict[str, IO[bytes]] = {}
        self._starting = asyncio.Lock()  # the alive check and the spawn, as one step
        self._started = asyncio.Event()  # tells supervise() to watch the new process

    def add(self, instance: Instance) -> None:
        if instance.name in self.instances:
            raise ValueError(f"an instance named {instance.name!r} exists already")
        self.instances[instance.name] = instance

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.returncode is None

    async def start(self, name: str) -> None:
        """Start instance `name`; refused while the process it has is still running (a
        second one would fight it for its ports)."""
        async with self._starting:
            if self.alive(name):
                raise RuntimeError(f"{name} is running already")
            instance = self.instances[name]
            argv = instance.argv or (sys.executable, "-m", instance.service)
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=ROOT,
                env={**self.shared_env(), **instance.env, "SB_NICE": str(instance.nice)},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=instance.own_session,
            )
            self.processes[name] = process
            self._started.set()
        assert process.stdout is not None
        pump = asyncio.create_task(
            _pump(name, instance.service, process.stdout, self._sink(name)), name=f"log {name}"
        )
        self._pumps.add(pump)
        pump.add_done_callback(self._pumps.discard)

    def _sink(self, name: str) -> IO[bytes] | None:
        if self.log_dir is None:
            return None
        if name not in self._sinks:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._sinks[name] = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - close()
        return self._sinks[name]

    async def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Stop instance `name` with `sig` (SIGKILL to simulate a crash) and wait for it,
        killing it past `timeout`; returns its exit code."""
        process = self.processes[name]
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
        assert process.returncode is not None
        return process.returncode

    async def stop_in_tiers(self, tiers: Iterable[Sequence[str]]) -> dict[str, int]:
        """SIGTERM tier after tier, the instances of one tier at once (their shutdown
        graces overlap); returns every exit code."""
        codes: dict[str, int] = {}
        for tier in tiers:
            names = [name for name in tier if name in self.processes]
            exits = await asyncio.gather(*(self.stop(name) for name in names))
            codes.update(zip(names, exits, strict=True))
        return codes

    async def wait_healthy(self, names: Iterable[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            await self._wait_up(name, deadline)

    async def _wait_up(self, name: str, deadline: float) -> None:
        instance = self.instances[name]
        if instance.health_address is not None:
            await self._wait_serving(name, instance.health_address, deadline)
        elif instance.ready is not None:
            while not await instance.ready():
                self._check_running(name, deadline)
                await asyncio.sleep(0.1)

    def _check_running(self, name: str, deadline: float) -> float:
        process = self.processes[name]
        if process.returncode is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{name} did not become healthy")
        return remaining

    async def _wait_serving(self, name: str, address: str, deadline: float) -> None:
        request = health_pb2.HealthCheckRequest(service="")
        async with insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                remaining = self._check_running(name, deadline)
                try:
                    # wait_for_ready blocks until the server listens; the short timeout lets
                    # us notice a process that died meanwhile.
                    reply = await stub.Check(
                        request, timeout=min(remaining, 1.0), wait_for_ready=True
                    )
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        await asyncio.sleep(0.1)
                    continue
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                await asyncio.sleep(0.1)

    async def supervise(
        self, stop: asyncio.Event, restarts: Restarts | None = None, out: IO[str] = sys.stderr
    ) -> None:
        """Until `stop` is set: start every instance that dies again (`Restarts`). Returns
        early, with the rest still up, if one crashes past the restart intensity. An
        instance someone else started again meanwhile (`start`) is left as it is."""
        restarts = restarts or Restarts()
        while not stop.is_set():
            self._started.clear()
            died = {
                asyncio.create_task(process.wait()): (name, process)
                for name, process in self.processes.items()
            }
            waits = [asyncio.create_task(stop.wait()), asyncio.create_task(self._started.wait())]
            done, _ = await asyncio.wait([*waits, *died], return_when=asyncio.FIRST_COMPLETED)
            for task in [*waits, *died]:
                task.cancel()
            await asyncio.gather(*waits, *died, return_exceptions=True)
            if stop.is_set():
                return
            for name, process in [died[task] for task in done if task in died]:
                if self.processes[name] is not process:
                    continue  # started again already
                delay = restarts.delay_s(name)
                if delay is None:
                    print(
                        f"{name} exited with {process.returncode} too often; giving up",
                        file=out,
                        flush=True,
                    )
                    return
                print(
                    f"{name} exited with {process.returncode}; restarting in {delay:.1f}s",
                    file=out,
                    flush=True,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
                if self.processes[name] is process:
                    await self.start(name)

    async def close(self) -> None:
        """After every process is stopped: the rest of their logs, then the log files."""
        for pump in list(self._pumps):
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        for sink in self._sinks.values():
            sink.close()
        self._sinks.clear()


class Stack:
    """Owns the processes of one running stack: one instance of each service, named after
    it; `stop()` is idempotent."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.nats: NatsServer | None = None
        logs = config.var_dir / "logs" if config.log_to_files else None
        self.group = Processes(self.env, logs)
        for name in SERVICES:
            self.group.add(
                Instance(
                    name,
                    name,
                    nice=config.nice.get(name, 0),
                    health_address=config.address(name),
                )
            )

    @property
    def processes(self) -> dict[str, asyncio.subprocess.Process]:
        return self.group.processes

    @property
    def nats_url(self) -> str:
        if self.config.nats_url:
            return self.config.nats_url
        assert self.nats is not None, "start() first"
        return self.nats.url

    @property
    def database_url(self) -> str:
        sqlite_file = self.config.var_dir / "switchboard.db"
        return self.config.database_url or f"sqlite+aiosqlite:///{sqlite_file}"

    def env(self) -> dict[str, str]:
        c = self.config
        env = launcher_env()
        env.update(
            {
                "NATS_URL": self.nats_url,
                "DATABASE_URL": self.database_url,
                "GATEWAY_PORT": str(c.gateway_port),
                "GATEWAY_GRPC_LISTEN": c.address("gateway_svc"),
                "TASK_SVC_LISTEN": c.address("task_svc"),
                "TASK_SVC_ADDR": c.address("task_svc"),
                "LLM_SVC_LISTEN": c.address("llm_svc"),
                "LLM_SVC_ADDR": c.address("llm_svc"),
                "HISTORY_SVC_LISTEN": c.address("persistence_svc"),
                "HISTORY_SVC_ADDR": c.address("persistence_svc"),
            }
        )
        for service, setting in METRICS_LISTEN.items():
            env[setting] = f"127.0.0.1:{c.metrics_ports[service]}"
        env.update(c.extra_env)
        return env

    async def start(self, timeout: float = 60.0) -> None:
        self.config.var_dir.mkdir(parents=True, exist_ok=True)
        if not self.config.nats_url:
            self.nats = await start_nats(
                self.config.var_dir / "nats",
                self.config.nats_port,
                log_file=self.config.var_dir / "nats.log",
            )
        for name in SERVICES:
            await self.start_service(name)
        await self.wait_healthy(timeout)

    async def start_service(self, name: str) -> None:
        await self.group.start(name)

    async def wait_healthy(self, timeout: float = 60.0, names: tuple[str, ...] = SERVICES) -> None:
        await self.group.wait_healthy(names, timeout)

    async def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Stop one service with `sig` (SIGKILL to simulate a crash); returns its exit code."""
        return await self.group.stop(name, sig, timeout)

    async def restart_service(self, name: str, sig: int = signal.SIGTERM) -> None:
        await self.stop_service(name, sig)
        await self.start_service(name)
        await self.wait_healthy(names=(name,))

    async def supervise(
        self, stop: asyncio.Event, restarts: Restarts | None = None, out: IO[str] = sys.stderr
    ) -> None:
        """Until `stop` is set: start every service that dies again (`Restarts`). Returns
        early, with the stack still up, if a service crashes past the restart intensity."""
        await self.group.supervise(stop, restarts, out)

    async def stop(self) -> dict[str, int]:
        """SIGTERM the services, gateway first so clients are told to come back later."""
        codes = await self.group.stop_in_tiers([name] for name in reversed(SERVICES))
        if self.nats:
            self.nats.stop()
        await self.group.close()
        return codes


def launcher_env() -> dict[str, str]:
    """What every process the launcher starts inherits, besides its settings."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # Stop with the launcher, even if it is killed (svckit.lifecycle).
        "SB_PARENT_PID": str(os.getpid()),
    }


async def _pump(
    name: str, service: str, stream: asyncio.StreamReader, sink: IO[bytes] | None
) -> None:
    while line := await stream.readline():
        if sink is not None:
            sink.write(line)
            sink.flush()
        else:
            sys.stdout.write(format_line(name, line, service))
            sys.stdout.flush()


def format_line(name: str, line: bytes, service: str | None = None) -> str:
    """One log line for people: `name | hh:mm:ss level msg key=value ...`, coloured by
    `service` (default: `name`)."""
    prefix = f"\x1b[{COLOURS.get(service or name, 0)}m{name:>17} |\x1b[0m "
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return prefix + line.decode(errors="replace").rstrip() + "\n"
    if not isinstance(entry, Mapping):
        return prefix + line.decode(errors="replace").rstrip() + "\n"
    ts = str(entry.get("ts", ""))[11:19]
    level, msg = entry.get("level", ""), entry.get("msg", "")
    skip = {"ts", "level", "msg", "service", "logger", "exc"}
    fields = " ".join(f"{k}={v}" for k, v in entry.items() if k not in skip)
    text = f"{prefix}{ts} {level:<7} {msg} {fields}".rstrip() + "\n"
    if "exc" in entry:
        text += "".join(f"{prefix}{row}\n" for row in str(entry["exc"]).splitlines())
    return text


def dev_token(user: str) -> str:
    """A development token, minted the way `make token` does."""
    from gateway_svc.tokens import mint_dev_token

    return mint_dev_token(user)


def banner(socket_url: str, nats_url: str, database_url: str, heading: str) -> str:
    """What `make run` and `make cluster` print once everything is up."""
    user = os.environ.get("SB_USER", "dev")
    return (
        f"\n\x1b[1m{heading}\x1b[0m\n"
        f"  WebSocket: {socket_url.removesuffix('/websocket')} "
        f"(path /socket/websocket, vsn=2.0.0)\n"
        f"  NATS:      {nats_url}\n"
        f"  Database:  {database_url}\n"
        f"  Token (user {user}): {dev_token(user)}\n"
        f'  Try:       make client PROMPT="Tell me about switchboards"\n'
        "  Ctrl-C stops everything.\n"
    )


def stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C (SIGINT) or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def run_until_stopped() -> None:
    config = StackConfig(
        nats_url=os.environ.get("NATS_URL") or None,
        database_url=os.environ.get("DATABASE_URL") or None,
        gateway_port=int(os.environ.get("GATEWAY_PORT", "4000")),
    )
    if "STACK_NICE" in os.environ:
        config.nice = parse_nice(os.environ["STACK_NICE"])
    stack = Stack(config)
    stop = stop_on_signals()
    try:
        await stack.start()
        print(
            banner(config.socket_url, stack.nats_url, stack.database_url, "Switchboard is up."),
            flush=True,
        )
        await stack.supervise(stop)
    finally:
        print("stopping...", flush=True)
        await stack.stop()


def main() -> None:
    asyncio.run(run_until_stopped())


if __name__ == "__main__":
    main()
