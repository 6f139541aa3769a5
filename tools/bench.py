"""`make bench`: end-to-end generation latency and throughput through the real stack, printed
beside the floors of the bare transports measured in the same run (a bare websocket echo,
a bare grpc.aio unary call), so ratios can be compared on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from svckit.grpc_server import GrpcServer, insecure_channel
from tools.natsserver import free_port
from tools.stack import Stack, StackConfig, dev_token


@dataclass
class Sample:
    name: str
    latencies_s: list[float]
    elapsed_s: float

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.elapsed_s

    def row(self) -> str:
        return (
            f"{self.name:<38} n={len(self.latencies_s):<6} p50={self.pct(0.50):8.3f} ms "
            f"p99={self.pct(0.99):8.3f} ms  {self.rate:9.1f}/s"
        )


async def measure(name: str, clients: int, one: Callable[[int], Awaitable[list[float]]]) -> Sample:
    """Run `one(client_index)` for `clients` concurrent clients; each returns its latencies."""
    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return Sample(name, [x for r in results for x in r], elapsed)


async def websocket_echo_floor(clients: int, rounds: int) -> Sample:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    port = free_port()
    frame = orjson.dumps([None, "1", "phoenix", "heartbeat", {}]).decode()
    async with serve(echo, "127.0.0.1", port):

        async def one(_: int) -> list[float]:
            out = []
            async with connect(f"ws://127.0.0.1:{port}") as ws:
                for _ in range(rounds):
                    t = time.perf_counter()
                    await ws.send(frame)
                    await ws.recv()
                    out.append(time.perf_counter() - t)
            return out

        return await measure(f"floor: websocket echo x{clients}", clients, one)


async def grpc_unary_floor(clients: int, rounds: int) -> Sample:
    server = GrpcServer("127.0.0.1:0", lambda s: None, [])
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            await stub.Check(request)

            async def one(_: int) -> list[float]:
                out = []
                for _ in range(rounds):
                    t = time.perf_counter()
                    await stub.Check(request)
                    out.append(time.perf_counter() - t)
                return out

            return await measure(f"floor: grpc.aio unary x{clients}", clients, one)
    finally:
        await server.stop(0)


class BenchClient:
    """The frames a Swift app sends for one generation, in Phoenix V2."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ref = 0

    def next_ref(self) -> str:
        self.ref += 1
        return str(self.ref)

    async def send(self, join_ref: str | None, topic: str, event: str, payload: object) -> str:
        ref = self.next_ref()
        await self.ws.send(orjson.dumps([join_ref, ref, topic, event, payload]).decode())
        return ref

    async def until(self, topic: str, events: set[str]) -> list[object]:
        while True:
            frame = orjson.loads(await self.ws.recv())
            if frame[2] == topic and frame[3] in events:
                return list(frame)

    async def generate(self, prompt: str) -> tuple[float, float]:
        """One generation on a new topic: (ack latency, end-to-end latency) in seconds."""
        topic = f"task:{uuid.uuid4()}"
        join_ref = await self.send(None, topic, "phx_join", {})
        await self.until(topic, {"phx_reply"})
        started = time.perf_counter()
        await self.send(join_ref, topic, "llm_generate", {"prompt": prompt})
        acked = 0.0
        while True:
            frame = await self.until(topic, {"phx_reply", "llm_response", "error"})
            if frame[3] == "phx_reply":
                acked = time.perf_counter() - started
                continue
            if frame[3] == "error":
                raise RuntimeError(f"generation failed: {frame[4]}")
            done = time.perf_counter() - started
            await self.send(join_ref, topic, "phx_leave", {})
            return acked, done


async def generation_bench(stack: Stack, clients: int, rounds: int) -> tuple[Sample, Sample]:
    url = f"{stack.config.socket_url}?token={dev_token('bench')}&vsn=2.0.0"
    acks: list[float] = []

    async def one(i: int) -> list[float]:
        out = []
        async with connect(url, max_queue=None) as ws:
            client = BenchClient(ws)
            for r in range(rounds):
                ack, done = await client.generate(f"benchmark prompt {i}-{r}")
                acks.append(ack)
                out.append(done)
        return out

    await measure("warm-up", min(clients, 4), one)
    acks.clear()
    e2e = await measure(f"end-to-end generation x{clients}", clients, one)
    return Sample(f"llm_generate ack x{clients}", acks, e2e.elapsed_s), e2e


async def run(clients: int, rounds: int, floor_rounds: int) -> None:
    print(f"Switchboard bench: {clients} concurrent clients x {rounds} generations, local model")
    print("at zero delay, SQLite history; floors measured in this same run.\n")
    ws_seq = await websocket_echo_floor(1, floor_rounds)
    ws_conc = await websocket_echo_floor(clients, max(1, floor_rounds // 10))
    grpc_seq = await grpc_unary_floor(1, floor_rounds)
    grpc_conc = await grpc_unary_floor(clients, max(1, floor_rounds // 10))
    with tempfile.TemporaryDirectory() as scratch:
        config = StackConfig.on_free_ports(
            Path(scratch), extra_env={"LOCAL_MODEL_TOKEN_DELAY_MS": "0", "LOG_LEVEL": "WARNING"}
        )
        stack = Stack(config)
        try:
            await stack.start()
            single_ack, single = await generation_bench(stack, 1, max(10, rounds))
            ack, e2e = await generation_bench(stack, clients, rounds)
        finally:
            await stack.stop()
    for sample in (ws_seq, ws_conc, grpc_seq, grpc_conc, single_ack, single, ack, e2e):
        print(sample.row())
    print()
    print(
        f"ratios (p50): one generation / websocket echo = "
        f"{single.pct(0.5) / ws_seq.pct(0.5):.1f}x, "
        f"ack / websocket echo = {single_ack.pct(0.5) / ws_seq.pct(0.5):.1f}x, "
        f"one generation / grpc unary = {single.pct(0.5) / grpc_seq.pct(0.5):.1f}x"
    )
    print(
        f"throughput: {e2e.rate:.1f} tasks/s with {clients} clients "
        f"(mean {statistics.mean(e2e.latencies_s) * 1000:.1f} ms per task)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10, help="generations per client")
    parser.add_argument("--floor-rounds", type=int, default=2000)
    args = parser.parse_args()
    uvloop.run(run(args.clients, args.rounds, args.floor_rounds))


if __name__ == "__main__":
    main()
