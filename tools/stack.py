"""Run the whole stack: an embedded nats-server (unless NATS_URL is set) and the four
services as separate processes with prefixed logs, supervised: a service that dies is started
again with backoff, within a restart intensity (`Restarts`), and the stack goes on. `make run`
uses `main()`; the end-to-end tests and the benchmark use `Stack` with free ports and a
scratch folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
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
            "gateway_svc": 50050,
            "task_svc": 50051,
            "llm_svc": 50052,
            "persistence_svc": 50053,
        }
    )
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
            nats_port=free_port(),
            log_to_files=True,
            **kwargs,  # type: ignore[arg-type]
        )

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.grpc_ports[service]}"

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


class Stack:
    """Owns the processes of one running stack; `stop()` is idempotent."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.nats: NatsServer | None = None
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self._pumps: list[asyncio.Task[None]] = []
        self._log_files: list[IO[bytes]] = []

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
        env = dict(os.environ)
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
                "PYTHONUNBUFFERED": "1",
                # Stop with the launcher, even if it is killed (svckit.lifecycle).
                "SB_PARENT_PID": str(os.getpid()),
            }
        )
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
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            name,
            cwd=ROOT,
            env={**self.env(), "SB_NICE": str(self.config.nice.get(name, 0))},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self.processes[name] = process
        assert process.stdout is not None
        sink = self._sink(name)
        self._pumps.append(asyncio.create_task(_pump(name, process.stdout, sink)))

    def _sink(self, name: str) -> IO[bytes] | None:
        if not self.config.log_to_files:
            return None
        logs = self.config.var_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        sink = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._log_files.append(sink)
        return sink

    async def wait_healthy(self, timeout: float = 60.0, names: tuple[str, ...] = SERVICES) -> None:
        deadline = time.monotonic() + timeout
        for name in names:
            await self._wait_serving(name, deadline)

    async def _wait_serving(self, name: str, deadline: float) -> None:
        request = health_pb2.HealthCheckRequest(service="")
        async with insecure_channel(self.config.address(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                process = self.processes[name]
                if process.returncode is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{name} did not become healthy")
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

    async def stop_service(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        """Stop one service with `sig` (SIGKILL to simulate a crash); returns its exit code."""
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

    async def restart_service(self, name: str, sig: int = signal.SIGTERM) -> None:
        await self.stop_service(name, sig)
        await self.start_service(name)
        await self.wait_healthy(names=(name,))

    async def supervise(
        self, stop: asyncio.Event, restarts: Restarts | None = None, out: IO[str] = sys.stderr
    ) -> None:
        """Until `stop` is set: start every service that dies again (`Restarts`). Returns
        early, with the stack still up, if a service crashes past the restart intensity."""
        restarts = restarts or Restarts()
        while not stop.is_set():
            died = {
                asyncio.create_task(process.wait()): name
                for name, process in self.processes.items()
            }
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopper, *died], return_when=asyncio.FIRST_COMPLETED)
            for task in [stopper, *died]:
                task.cancel()
            if stop.is_set():
                return
            for name in [died[task] for task in done if task in died]:
                code = self.processes[name].returncode
                delay = restarts.delay_s(name)
                if delay is None:
                    print(f"{name} exited with {code} too often; giving up", file=out, flush=True)
                    return
                print(
                    f"{name} exited with {code}; restarting in {delay:.1f}s", file=out, flush=True
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
                await self.start_service(name)

    async def stop(self) -> dict[str, int]:
        """SIGTERM the services, gateway first so clients are told to come back later."""
        codes = {}
        for name in reversed(SERVICES):
            if name in self.processes:
                codes[name] = await self.stop_service(name)
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        self._pumps.clear()
        if self.nats:
            self.nats.stop()
        for sink in self._log_files:
            sink.close()
        self._log_files.clear()
        return codes


async def _pump(name: str, stream: asyncio.StreamReader, sink: IO[bytes] | None) -> None:
    while line := await stream.readline():
        if sink is not None:
            sink.write(line)
            sink.flush()
        else:
            sys.stdout.write(format_line(name, line))
            sys.stdout.flush()


def format_line(name: str, line: bytes) -> str:
    """One service log line for people: `name | hh:mm:ss level msg key=value ...`."""
    prefix = f"\x1b[{COLOURS.get(name, 0)}m{name:>15} |\x1b[0m "
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


async def run_until_stopped() -> None:
    config = StackConfig(
        nats_url=os.environ.get("NATS_URL") or None,
        database_url=os.environ.get("DATABASE_URL") or None,
        gateway_port=int(os.environ.get("GATEWAY_PORT", "4000")),
    )
    if "STACK_NICE" in os.environ:
        config.nice = parse_nice(os.environ["STACK_NICE"])
    stack = Stack(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stack.start()
        token = dev_token(os.environ.get("SB_USER", "dev"))
        print(
            "\n\x1b[1mSwitchboard is up.\x1b[0m\n"
            f"  WebSocket: {config.socket_url.removesuffix('/websocket')} "
            f"(path /socket/websocket, vsn=2.0.0)\n"
            f"  NATS:      {stack.nats_url}\n"
            f"  Database:  {stack.database_url}\n"
            f"  Token (user {os.environ.get('SB_USER', 'dev')}): {token}\n"
            f'  Try:       make client PROMPT="Tell me about switchboards"\n'
            "  Ctrl-C stops everything.\n",
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
