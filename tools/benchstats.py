"""Latency samples shared by the benchmarks: percentiles, rates and one printed row each."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass
class Sample:
    name: str
    latencies_s: list[float]
    elapsed_s: float

    def pct(self, q: float) -> float:
        """The q-quantile latency in ms."""
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.elapsed_s

    def row(self) -> str:
        return (
            f"{self.name:<40} n={len(self.latencies_s):<6} p50={self.pct(0.50):8.3f} ms "
            f"p99={self.pct(0.99):8.3f} ms  {self.rate:9.1f}/s"
        )


async def measure(
    name: str, clients: int, rounds: int, one: Callable[[int], Awaitable[None]]
) -> Sample:
    """`clients` concurrent clients, each timing `one(client_index)` `rounds` times."""
    latencies: list[float] = []

    async def client(index: int) -> None:
        for _ in range(rounds):
            started = time.perf_counter()
            await one(index)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return Sample(name, latencies, time.perf_counter() - started)
