"""`make bench`: end-to-end generation latency and throughput through the real stack, printed
beside the floors of the bare transports measured in the same run (a bare websocket echo,
a bare grpc.aio unary call), so ratios can be compared on a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import orjson
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

from svckit.grpc_server import GrpcServer, insecure_channel
from tools.benchstats import Sample, measure
from tools.natsserver import free_port
from tools.stack import Stack, StackConfig, dev_token


async def websocket_echo_floor(clients: int, rounds: int) -> Sample:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    port = free_port()
    frame = orjson.dumps([None, "1", "phoenix", "heartbeat", {}]).decode()
    async with serve(echo, "127.0.0.1", port):
        sockets = [await connect(f"ws://127.0.0.1:{port}") for _ in range(clients)]

        async def one(index: int) -> None:
            await sockets[index].send(frame)
            await sockets[index].recv()

        try:
            return await measure(f"floor: websocket echo x{clients}", clients, rounds, one)
        finally:
            for ws in sockets:
                await ws.close()


async def grpc_unary_floor(clients: int, rounds: int) -> Sample:
    server = GrpcServer("127.0.0.1:0", lambda s: None, [])
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest()
            await stub.Check(request)

            async def one(_: int) -> None:
                await stub.Check(request)

            return await measure(f"floor: grpc.aio unary x{clients}", clients, rounds, one)
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
        if event == "phx_join":
            join_ref = ref  # as every Phoenix client does: a join's ref is its join_ref
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
    """(llm_generate ack latency, end-to-end generation latency) over `clients` sockets."""

    def url(index: int) -> str:  # a user per client, as in life (limits are per user)
        return f"{stack.config.socket_url}?token={dev_token(f'bench-{index}')}&vsn=2.0.0"

    sockets = [BenchClient(await connect(url(i), max_queue=None)) for i in range(clients)]
    acks: list[float] = []

    async def one(index: int) -> None:
        ack, _ = await sockets[index].generate(f"benchmark prompt {index}-{len(acks)}")
        acks.append(ack)

    try:
        await measure("warm-up", clients, 1, one)
        acks.clear()
        e2e = await measure(f"end-to-end generation x{clients}", clients, rounds, one)
    finally:
        for client in sockets:
            await client.ws.close()
    return Sample(f"llm_generate ack x{clients}", acks, e2e.elapsed_s), e2e


async def run_stack_bench(clients: int, rounds: int, floor_rounds: int) -> list[str]:
    """Generations through the whole stack (real processes), local model at zero delay."""
    ws_seq = await websocket_echo_floor(1, floor_rounds)
    ws_conc = await websocket_echo_floor(clients, max(1, floor_rounds // 10))
    grpc_seq = await grpc_unary_floor(1, floor_rounds)
    grpc_conc = await grpc_unary_floor(clients, max(1, floor_rounds // 10))
    with tempfile.TemporaryDirectory() as scratch:
        config = StackConfig.on_free_ports(
            Path(scratch),
            extra_env={
                "LOCAL_MODEL_TOKEN_DELAY_MS": "0",
                "LOG_LEVEL": "WARNING",
                "LLM_DEFAULT_MODEL": "local",
                # Measured here: the path, not the per-user generate rate limit.
                "GATEWAY_GENERATE_RATE_PER_S": "0",
                "TASK_CONCURRENCY": "64",
            },
        )
        stack = Stack(config)
        try:
            await stack.start()
            single_ack, single = await generation_bench(stack, 1, max(10, rounds))
            ack, e2e = await generation_bench(stack, clients, rounds)
        finally:
            await stack.stop()
    samples = (ws_seq, ws_conc, grpc_seq, grpc_conc, single_ack, single, ack, e2e)
    return [
        f"{clients} concurrent clients x {rounds} generations, local model at zero delay "
        "(42 tokens), SQLite history",
        *(sample.row() for sample in samples),
        f"ratios (p50): one generation / websocket echo = "
        f"{single.pct(0.5) / ws_seq.pct(0.5):.1f}x, "
        f"ack / websocket echo = {single_ack.pct(0.5) / ws_seq.pct(0.5):.1f}x, "
        f"one generation / grpc unary = {single.pct(0.5) / grpc_seq.pct(0.5):.1f}x",
        f"throughput: {e2e.rate:.1f} tasks/s with {clients} clients "
        f"(mean {statistics.mean(e2e.latencies_s) * 1000:.1f} ms per task)",
    ]


SECTIONS = ("stack", "paced", "gateway", "tasks", "llm", "persistence")


async def run(args: argparse.Namespace) -> None:
    for section in args.only or SECTIONS:
        print(f"\n== {section} ==", flush=True)
        if section == "stack":
            lines = await run_stack_bench(args.clients, args.rounds, args.floor_rounds)
        elif section == "paced":
            from tools.bench_paced import run_paced_bench

            lines = await run_paced_bench(
                args.paced_streams, args.paced_generations, args.floor_rounds
            )
        elif section == "gateway":
            from tools.bench_gateway import run_gateway_bench

            lines = await run_gateway_bench()
        elif section == "tasks":
            from tools.bench_tasks import run_task_bench

            lines = await run_task_bench()
        elif section == "llm":
            from tools.bench_llm import run_llm_bench

            lines = await run_llm_bench()
        elif section == "persistence":
            from tools.bench_persistence import DEFAULT_POSTGRES_URL, run_persistence_bench

            url = args.postgres_url or os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
            lines = await run_persistence_bench(url)
        print("\n".join(lines), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run one section")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10, help="generations per client")
    parser.add_argument("--floor-rounds", type=int, default=2000)
    parser.add_argument("--paced-streams", type=int, default=300, help="paced: clients")
    parser.add_argument(
        "--paced-generations", type=int, default=3, help="paced: generations per client"
    )
    parser.add_argument("--postgres-url", default="", help="persistence section's server")
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
