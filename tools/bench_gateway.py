"""The gateway alone, measured: how many idle sockets one gateway process holds and what each
costs in resident memory, the heartbeat reply time while holding them, and join /
`llm_generate` ack latency under many concurrent clients, printed beside a bare websocket
echo round trip measured in the same run.

Every party is its own process, so the gateway's RSS (/proc/<pid>/status VmRSS) is its own:
the gateway (uvloop, as in production), an in-memory TaskService on a real gRPC server
(Submit answers queued at once; Watch sends the state and then holds the stream), a bare
websockets echo server (same library, same options, no Phoenix), and several holder processes
that open and heartbeat the idle sockets. Each connection uses its own user, as real clients
do, so no per-user limit applies.

With `--gateways N` (N > 1) there are N gateway processes on one port (GATEWAY_REUSE_PORT,
as `make cluster` runs two): Linux spreads the connects between them, and the figures are
for all of them together (RSS and CPU summed, the sockets each one holds).

    python -m tools.bench_gateway [--connections 20000] [--clients 500] [--gateways 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import os
import resource
import signal
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from tools.natsserver import free_port

HOLDERS = 4  # processes opening the idle sockets
OPEN_CONCURRENCY = 100  # handshakes in flight per holder
BEAT_WINDOW_S = 30.0  # every held socket heartbeats once in this window, as clients do
SECRET = "bench-secret-" + "x" * 32
FD_MARGIN = 128  # descriptors the gateway needs besides client sockets
HEARTBEAT = orjson.dumps([None, "1", "phoenix", "heartbeat", {}]).decode()


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process `pid`."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else math.nan


def row(name: str, values: list[float]) -> str:
    return (
        f"{name:<44} n={len(values):<6} p50={pct(values, 0.5):8.3f} ms "
        f"p99={pct(values, 0.99):8.3f} ms  max={pct(values, 1.0):8.3f} ms"
    )


# -- child processes -----------------------------------------------------------------------


async def serve_tasks() -> None:
    """A TaskService that answers at once: what the gateway costs, not what task_svc does."""
    from svckit.grpc_server import GrpcServer
    from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
    from task_svc.submit_mux import serve_submits
    from task_svc.watch_mux import serve_watch_many

    queued = common_pb2.TaskStatus.TASK_STATUS_QUEUED

    class Tasks(tasks_pb2_grpc.TaskServiceServicer):
        async def Submit(self, request: Any, context: Any) -> Any:
            state = common_pb2.TaskState(
                task_id=request.task_id, user_id=request.user_id, status=queued, seq=1
            )
            state.queue_position = 1
            return tasks_pb2.SubmitResponse(state=state)

        async def SubmitMany(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
            await serve_submits(request_iterator, context, lambda r: self.Submit(r, None))

        async def WatchMany(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
            await serve_watch_many(request_iterator, context, lambda r: self.Watch(r, None))

        async def Watch(self, request: Any, context: Any) -> Any:
            yield tasks_pb2.WatchResponse(
                state=common_pb2.TaskState(task_id=request.task_id, user_id=request.user_id)
            )
            await asyncio.Event().wait()  # held until the gateway cancels it

    server = GrpcServer(
        "127.0.0.1:0",
        # The other methods are never called here; the base class answers UNIMPLEMENTED.
        lambda s: tasks_pb2_grpc.add_TaskServiceServicer_to_server(Tasks(), s),  # type: ignore[abstract]
        ["switchboard.v1.TaskService"],
    )
    await server.start()
    await _ready_then_wait(server.port, lambda: server.stop(0))


async def serve_gateway(tasks_addr: str, port: int = 0, reuse_port: bool = False) -> None:
    from gateway_svc.config import Settings
    from gateway_svc.server import Gateway
    from svckit.grpc_server import insecure_channel
    from svckit.lifecycle import freeze_startup_objects, tune_gc
    from switchboard.v1 import tasks_pb2_grpc

    raise_nofile()
    # As `python -m gateway_svc` (svckit.lifecycle.run_service): with the interpreter's
    # default thresholds, 20,000 sockets' objects made the collector stop the loop for up to
    # a second (13 full collections), heartbeat p99 269 ms; with these, 4.4 ms.
    tune_gc()
    settings = Settings(
        gateway_port=port,
        gateway_reuse_port=reuse_port,
        task_svc_addr=tasks_addr,
        gateway_idle_timeout_s=300,
    )
    channel = insecure_channel(tasks_addr)
    gateway = Gateway(settings, SECRET.encode(), tasks_pb2_grpc.TaskServiceStub(channel))
    await gateway.start()
    freeze_startup_objects()  # as `python -m gateway_svc` does, too

    async def stop() -> None:
        await gateway.stop()
        await channel.close()

    await _ready_then_wait(gateway.port, stop)


async def serve_echo() -> None:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    raise_nofile()
    async with serve(echo, "127.0.0.1", 0, ping_interval=None, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        await _ready_then_wait(port, lambda: asyncio.sleep(0))


async def _ready_then_wait(port: int, stop: Callable[[], Awaitable[Any]]) -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, done.set)
    print(f"READY {port}", flush=True)
    await done.wait()
    await stop()


async def hold(url: str, count: int, first_user: int) -> None:
    """Open `count` sockets, report, then obey stdin: `BEAT` heartbeats each socket once over
    BEAT_WINDOW_S and reports the reply times; `CLOSE` closes them all and exits."""
    from gateway_svc.tokens import mint

    raise_nofile()
    sockets: list[ClientConnection] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def open_one(i: int) -> None:
        token = mint(f"holder-{first_user + i}", SECRET.encode(), ttl=3600)
        async with gate:
            try:
                ws = await connect(
                    f"{url}?token={token}&vsn=2.0.0",
                    ping_interval=None,
                    compression=None,
                    open_timeout=60,
                    max_queue=4,
                )
            except Exception as error:  # the machine's limit: report it, go on
                failures.append(f"{type(error).__name__}: {error}")
                return
            sockets.append(ws)

    started = time.perf_counter()
    await asyncio.gather(*(open_one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    # The held sockets live until CLOSE: keep this process's collector from walking them,
    # so its pauses do not count as the gateway's heartbeat latency.
    gc.collect()
    gc.freeze()
    _report({"opened": len(sockets), "seconds": elapsed, "failures": failures[:3]})
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while command := (await reader.readline()).decode().strip():
        if command == "BEAT":
            _report({"beats": await _beat(sockets)})
        elif command == "CLOSE":
            break
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    _report({"closed": len(sockets)})


async def _beat(sockets: list[ClientConnection]) -> list[float]:
    latencies: list[float] = []

    async def one(ws: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            started = time.perf_counter()
            await ws.send(HEARTBEAT)
            await ws.recv()
            latencies.append(time.perf_counter() - started)

    tick = 0.01
    per_tick = max(1, math.ceil(len(sockets) * tick / BEAT_WINDOW_S))
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    for n in range(0, len(sockets), per_tick):
        tasks.extend(asyncio.create_task(one(ws)) for ws in sockets[n : n + per_tick])
        # Paced against the clock so the rate holds even when a tick runs late.
        delay = start + (n // per_tick + 1) * tick - time.perf_counter()
        await asyncio.sleep(max(0.0, delay))
    await asyncio.gather(*tasks)
    return latencies


def _report(value: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(value).decode() + "\n")
    sys.stdout.flush()


# -- the parent --------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process

    async def line(self, timeout: float = 120) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            raw = await self.process.stdout.readline()
        if not raw:
            raise RuntimeError(f"{self.name} exited (status {await self.process.wait()})")
        return raw.decode().strip()

    async def json(self, timeout: float = 120) -> dict[str, Any]:
        return orjson.loads(await self.line(timeout))  # type: ignore[no-any-return]

    async def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{command}\n".encode())
        await self.process.stdin.drain()

    async def stop(self, grace: float = 10) -> None:
        if self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await self.process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


@contextlib.asynccontextmanager
async def children() -> AsyncIterator[Callable[..., Awaitable[Child]]]:
    """Start child processes of this module; every one is stopped on the way out."""
    started: list[Child] = []

    async def start(name: str, *args: str) -> Child:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tools.bench_gateway",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # a holder reports every heartbeat time on one line
            env={**os.environ, "LOG_LEVEL": "ERROR", "GRPC_VERBOSITY": "ERROR"},
        )
        child = Child(name, process)
        started.append(child)
        return child

    try:
        yield start
    finally:
        await asyncio.gather(*(c.stop() for c in reversed(started)), return_exceptions=True)


async def ready_port(child: Child) -> int:
    line = await child.line(60)
    if not line.startswith("READY "):
        raise RuntimeError(f"{child.name}: {line}")
    return int(line.split()[1])


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def connection_bench(
    start: Callable[..., Awaitable[Child]],
    gateways: list[Child],
    port: int,
    connections: int,
    fd_limit: int,
) -> list[str]:
    """Hold `connections` idle sockets on the gateway(s) listening on `port`, heartbeat
    each once, and report memory, CPU and heartbeat times, summed over the gateways."""
    lines: list[str] = []
    target = connections
    # Several gateways share the sockets, not evenly: a quarter more than a fair share.
    per_gateway = connections if len(gateways) == 1 else math.ceil(connections / len(gateways))
    if len(gateways) > 1:
        per_gateway += per_gateway // 4
    if fd_limit - FD_MARGIN < per_gateway:
        target = (fd_limit - FD_MARGIN) * connections // per_gateway
        lines.append(
            f"RLIMIT_NOFILE allows {fd_limit} descriptors per process: holding {target} "
            f"sockets instead of {connections}"
        )
    url = f"ws://127.0.0.1:{port}/socket/websocket"
    pids = [g.process.pid for g in gateways]
    # Warm up (imports, caches, the first allocations of every kind), then the baseline.
    await _warm_up(url, 20 * len(gateways))
    before = sum(rss_kib(pid) for pid in pids)
    cpu_before = sum(cpu_s(pid) for pid in pids)
    fds_before = [fds(pid) for pid in pids]
    per = [target // HOLDERS + (1 if i < target % HOLDERS else 0) for i in range(HOLDERS)]
    holders = [
        await start(
            f"holder {i}", "--hold", url, "--count", str(n), "--first-user", str(i * per[0])
        )
        for i, n in enumerate(per)
        if n
    ]
    opened = [await h.json(180) for h in holders]
    held = sum(r["opened"] for r in opened)
    open_s = max(r["seconds"] for r in opened)
    # What each gateway holds: its descriptors beyond its baseline, one per socket.
    spread = [fds(pid) - fds0 for pid, fds0 in zip(pids, fds_before, strict=True)]
    after_open = sum(rss_kib(pid) for pid in pids)
    cpu_open = sum(cpu_s(pid) for pid in pids) - cpu_before
    cpu_before_beat = sum(cpu_s(pid) for pid in pids)
    holders_cpu = sum(cpu_s(h.process.pid) for h in holders)
    for h in holders:
        await h.tell("BEAT")
    beats = [x for h in holders for x in (await h.json(120))["beats"]]
    cpu_beat = sum(cpu_s(pid) for pid in pids) - cpu_before_beat
    holders_cpu = sum(cpu_s(h.process.pid) for h in holders) - holders_cpu
    after_beat = sum(rss_kib(pid) for pid in pids)
    for h in holders:
        await h.tell("CLOSE")
    for h in holders:
        await h.json(120)
    failures = [f for r in opened for f in r["failures"]]
    per_conn = (max(after_open, after_beat) - before) * 1024 / max(1, held)
    holding = (
        "one gateway process"
        if len(gateways) == 1
        else f"{len(gateways)} gateway processes on one port (SO_REUSEPORT), "
        f"{' / '.join(map(str, spread))} each"
    )
    lines.append(
        f"idle sockets held by {holding}: {held} of {target} "
        f"(opened in {open_s:.1f} s, {held / open_s:.0f}/s; gateway CPU "
        f"{cpu_open * 1e6 / max(1, held):.0f} us per connect)"
    )
    if failures:
        lines.append(f"  first connect failures: {failures}")
    rss = "gateway RSS" if len(gateways) == 1 else f"gateway RSS (sum of {len(gateways)})"
    lines.append(
        f"{rss}: {before / 1024:.1f} MiB before, {after_open / 1024:.1f} MiB holding, "
        f"{after_beat / 1024:.1f} MiB after heartbeats -> {per_conn / 1024:.1f} KiB per "
        f"connection (goal < 20 KiB; Phoenix ~40 KiB)"
    )
    lines.append(
        row(f"heartbeat reply while holding {held} (1 per socket/{BEAT_WINDOW_S:.0f}s)", beats)
    )
    lines.append(
        f"  CPU over the heartbeat window: gateway {cpu_beat:.1f} s "
        f"({cpu_beat * 1e6 / max(1, len(beats)):.0f} us per heartbeat), "
        f"holders {holders_cpu:.1f} s"
    )
    for pid, fds0 in zip(pids, fds_before, strict=True):
        await _wait_released(pid, fds0)
    return lines


async def _wait_released(pid: int, baseline: int, seconds: float = 60) -> None:
    """Wait until the gateway has closed the held sockets, so the next measurement does not
    share the CPU with their clean-up (polled: the gateway is another process)."""
    deadline = time.monotonic() + seconds
    while fds(pid) > baseline + 8 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)


async def _warm_up(url: str, count: int = 20) -> None:
    """Sockets enough to reach every gateway on the port (the kernel picks one for each)."""
    from gateway_svc.tokens import mint

    for i in range(count):
        token = mint(f"warm-{i}", SECRET.encode(), ttl=600)
        async with connect(f"{url}?token={token}&vsn=2.0.0", compression=None) as ws:
            await ws.send(HEARTBEAT)
            await ws.recv()


async def latency_bench(gateway_port: int, echo_port: int, clients: int, rounds: int) -> list[str]:
    from gateway_svc.tokens import mint

    url = f"ws://127.0.0.1:{gateway_port}/socket/websocket"
    echo: list[float] = []
    heartbeat: list[float] = []
    joins: list[float] = []
    acks: list[float] = []
    errors: list[str] = []

    async def echo_client(_: int) -> None:
        async with connect(f"ws://127.0.0.1:{echo_port}", compression=None) as ws:
            for _ in range(rounds):
                started = time.perf_counter()
                await ws.send(HEARTBEAT)
                await ws.recv()
                echo.append(time.perf_counter() - started)

    async def gateway_client(i: int) -> None:
        token = mint(f"client-{i}", SECRET.encode(), ttl=600)
        async with connect(f"{url}?token={token}&vsn=2.0.0", compression=None) as ws:
            for r in range(rounds):
                started = time.perf_counter()
                await ws.send(orjson.dumps([None, f"h{r}", "phoenix", "heartbeat", {}]).decode())
                await _reply(ws, f"h{r}")
                heartbeat.append(time.perf_counter() - started)
                topic = f"task:{uuid.uuid4()}"
                ref = str(r + 1)
                started = time.perf_counter()
                await ws.send(orjson.dumps([ref, ref, topic, "phx_join", {}]).decode())
                await _reply(ws, ref)
                joins.append(time.perf_counter() - started)
                started = time.perf_counter()
                push = [ref, f"g{ref}", topic, "llm_generate", {"prompt": f"bench {i} {r}"}]
                await ws.send(orjson.dumps(push).decode())
                reply = await _reply(ws, f"g{ref}")
                acks.append(time.perf_counter() - started)
                if reply["status"] != "ok":
                    errors.append(str(reply["response"]))
                await ws.send(orjson.dumps([ref, f"l{ref}", topic, "phx_leave", {}]).decode())
                await _reply(ws, f"l{ref}")

    await asyncio.gather(*(echo_client(i) for i in range(clients)))
    echo.clear()  # the first pass warmed both sides up
    await asyncio.gather(*(echo_client(i) for i in range(clients)))
    await asyncio.gather(*(gateway_client(i) for i in range(clients)))
    lines = [
        row(f"floor: bare websocket echo x{clients}", echo),
        row(f"gateway heartbeat round trip x{clients}", heartbeat),
        row(f"phx_join reply (gRPC Watch) x{clients}", joins),
        row(f"llm_generate ack (gRPC Submit) x{clients}", acks),
        f"ratios (p50): heartbeat / echo = {pct(heartbeat, 0.5) / pct(echo, 0.5):.1f}x, "
        f"llm_generate ack / echo = {pct(acks, 0.5) / pct(echo, 0.5):.1f}x; "
        f"mean ack {statistics.mean(acks) * 1000:.2f} ms",
    ]
    if errors:
        lines.append(f"  {len(errors)} llm_generate refused, e.g. {errors[0]}")
    return lines


async def _reply(ws: ClientConnection, ref: str) -> dict[str, Any]:
    while True:
        frame = orjson.loads(await ws.recv())
        if frame[3] == "phx_reply" and frame[1] == ref:
            return frame[4]  # type: ignore[no-any-return]


async def start_gateways(
    start: Callable[..., Awaitable[Child]], tasks_port: int, count: int
) -> tuple[list[Child], int]:
    """One gateway on a port of its own, or `count` on one port with SO_REUSEPORT; the
    gateways and the port."""
    tasks_addr = f"127.0.0.1:{tasks_port}"
    if count == 1:
        gateway = await start("gateway", "--serve", "gateway", "--tasks-addr", tasks_addr)
        return [gateway], await ready_port(gateway)
    port = free_port()
    gateways = []
    for i in range(count):
        args = ("--serve", "gateway", "--tasks-addr", tasks_addr, "--port", str(port))
        gateway = await start(f"gateway-{i + 1}", *args, "--reuse-port")
        if await ready_port(gateway) != port:
            raise RuntimeError(f"{gateway.name} did not bind {port}")
        gateways.append(gateway)
    return gateways, port


async def run_gateway_bench(
    connections: int = 20000, clients: int = 500, gateways: int = 1
) -> list[str]:
    """Lines to print: held sockets and RSS per connection, heartbeat p99 while holding them,
    then join / llm_generate ack latency beside a bare websocket echo (same run). With
    `gateways` > 1, that many gateway processes share one port."""
    fd_limit = raise_nofile()
    lines = [f"gateway bench: {connections} idle sockets, {clients} concurrent clients"]
    if gateways > 1:
        lines[0] += f", {gateways} gateway processes on one port (GATEWAY_REUSE_PORT)"
    async with asyncio.timeout(240), children() as start:
        tasks = await start("tasks", "--serve", "tasks")
        tasks_port = await ready_port(tasks)
        gateway_children, gateway_port = await start_gateways(start, tasks_port, gateways)
        echo = await start("echo", "--serve", "echo")
        echo_port = await ready_port(echo)
        if connections > 0:
            lines += await connection_bench(
                start, gateway_children, gateway_port, connections, fd_limit
            )
        if clients > 0:
            measured = [*gateway_children, tasks]
            cpu = {c.name: cpu_s(c.process.pid) for c in measured}
            client_cpu = time.process_time()
            lines += await latency_bench(gateway_port, echo_port, clients, rounds=5)
            used = {c.name: cpu_s(c.process.pid) - cpu[c.name] for c in measured}
            client_used = time.process_time() - client_cpu
            gateway_used = sum(used[c.name] for c in gateway_children)
            lines.append(
                f"CPU during the latency runs: gateway {gateway_used:.1f} s, "
                f"TaskService {used['tasks']:.1f} s, clients {client_used:.1f} s"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_gateway", description=__doc__)
    parser.add_argument("--connections", type=int, default=20000, help="idle sockets to hold")
    parser.add_argument("--clients", type=int, default=500, help="concurrent clients")
    parser.add_argument(
        "--gateways",
        type=int,
        default=1,
        help="gateway processes sharing one port with GATEWAY_REUSE_PORT (default 1: one, "
        "on a port of its own)",
    )
    # Internal: the child processes.
    parser.add_argument("--serve", choices=["tasks", "gateway", "echo"], help=argparse.SUPPRESS)
    parser.add_argument("--tasks-addr", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hold", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--first-user", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve == "tasks":
        uvloop.run(serve_tasks())
    elif args.serve == "gateway":
        uvloop.run(serve_gateway(args.tasks_addr, args.port, args.reuse_port))
    elif args.serve == "echo":
        uvloop.run(serve_echo())
    elif args.hold:
        uvloop.run(hold(args.hold, args.count, args.first_user))
    else:
        if args.gateways < 1:
            parser.error("--gateways must be at least 1")
        bench = run_gateway_bench(args.connections, args.clients, args.gateways)
        for line in uvloop.run(bench):
            print(line)


if __name__ == "__main__":
    main()
