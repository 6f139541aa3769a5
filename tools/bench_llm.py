"""llm_svc overhead: generations per second and added latency of LlmService.Generate over a
local fake OpenAI-compatible server with zero delay, beside a bare httpx streaming request
to the same server, at the same concurrency, in the same run.

Both paths stream the same answer from the same server (the wire-format fake of the tests);
the difference is what llm_svc adds: gRPC, the catalogue, guards (breaker, rate limiter with
limits off), quota, progress, the cache write. Everything shares one event loop, as an
in-process LlmServer does, so the figures are CPU cost, not network.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import httpx
import uvloop

from llm_svc.config import Settings
from llm_svc.providers.registry import tls_context
from llm_svc.server import LlmServer
from svckit.grpc_server import insecure_channel
from switchboard.v1 import llm_pb2, llm_pb2_grpc
from tests.llm.openai_server import FakeOpenAI, Reply, completion
from tools.benchstats import Sample, measure

MODEL = "gpt-4o-mini"
MESSAGES = [0]  # gRPC messages in the last generation (deltas, progress, final)
KEY = "sk-bench"
# Only what the bench uses, without rate limits: it measures overhead, not our limits.
MODELS_TOML = f"""
default_order = ["{MODEL}"]

[[models]]
id = "local"
provider = "local"
max_tokens = 256

[[models]]
id = "{MODEL}"
provider = "openai"
max_tokens = 1024
fallback = ["local"]
"""


def request_body(prompt: str) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def bare_httpx(base_url: str, clients: int, rounds: int) -> Sample:
    """The floor: each concurrent client its own httpx.AsyncClient (one kept-alive
    connection each), reading the stream to its end and nothing more."""
    headers = {"Authorization": f"Bearer {KEY}", "Accept": "text/event-stream"}
    url = base_url + "/chat/completions"
    # One client each: a single shared httpcore pool serves 16 concurrent streams with
    # tails of hundreds of ms (measured here), which would flatter llm_svc's figures.
    https = [httpx.AsyncClient(verify=tls_context(), timeout=30) for _ in range(clients)]
    try:

        async def one(index: int) -> None:
            body = request_body(f"bench {index}")
            async with https[index].stream("POST", url, json=body, headers=headers) as response:
                async for _ in response.aiter_bytes():
                    pass

        await measure("warm-up", clients, 2, one)
        return await measure(f"bare httpx stream x{clients}", clients, rounds, one)
    finally:
        for http in https:
            await http.aclose()


async def through_llm_svc(base_url: str, clients: int, rounds: int, scratch: Path) -> Sample:
    models = scratch / "models.toml"
    models.write_text(MODELS_TOML)
    settings = Settings(
        llm_svc_listen="127.0.0.1:0",
        llm_models_file=models,
        openai_api_key=KEY,  # type: ignore[arg-type]
        openai_base_url=base_url,
        gemini_api_key=None,
        anthropic_api_key=None,
        llm_default_model="",
        llm_user_daily_requests=0,
        llm_user_daily_tokens=0,
        llm_provider_limits={},
        llm_http_max_connections=clients * 2,
        llm_shutdown_grace_s=1.0,
    )
    server = LlmServer(settings)
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub: llm_pb2_grpc.LlmServiceAsyncStub = llm_pb2_grpc.LlmServiceStub(channel)  # type: ignore[assignment]

            async def one(index: int) -> None:
                request = llm_pb2.GenerateRequest(
                    user_id=f"bench-{index}", model=MODEL, prompt=f"bench {index}"
                )
                final = None
                messages = 0
                async for event in stub.Generate(request):
                    messages += 1
                    if event.HasField("final"):
                        final = event.final
                    elif event.HasField("error"):
                        raise RuntimeError(f"generation failed: {event.error.message}")
                if final is None or final.from_fallback or final.model != MODEL:
                    raise RuntimeError("llm_svc did not answer from the fake provider")
                MESSAGES[0] = messages

            await measure("warm-up", clients, 2, one)
            return await measure(f"llm_svc Generate (gRPC) x{clients}", clients, rounds, one)
    finally:
        await server.shutdown()


async def run_llm_bench(clients: int = 16, rounds: int = 25, tokens: int = 20) -> list[str]:
    """The lines to print: both paths at 1 client and at `clients`, and what llm_svc adds."""
    fake = FakeOpenAI(Reply(payloads=completion([f" tok{i}" for i in range(tokens)])))
    base_url = await fake.start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            samples = []
            for concurrency, count in ((1, rounds * 4), (clients, rounds)):
                bare = await bare_httpx(base_url, concurrency, count)
                fake.requests.clear()
                svc = await through_llm_svc(base_url, concurrency, count, Path(scratch))
                fake.requests.clear()
                samples.append((bare, svc))
    finally:
        await fake.stop()
    lines = [
        f"llm_svc over a zero-delay fake OpenAI-compatible server ({tokens} tokens an answer,",
        f"{MESSAGES[0]} gRPC messages a generation), beside a bare httpx streaming request to",
        "the same server, same run, one event loop:",
    ]
    for bare, svc in samples:
        lines += [bare.row(), svc.row()]
        lines.append(
            f"{'  llm_svc adds':<40} p50=+{svc.pct(0.5) - bare.pct(0.5):.3f} ms "
            f"p99=+{svc.pct(0.99) - bare.pct(0.99):.3f} ms; "
            f"generations/s {svc.rate / bare.rate:.0%} of bare"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=25, help="generations per client")
    parser.add_argument("--tokens", type=int, default=20, help="tokens in each answer")
    args = parser.parse_args()
    for line in uvloop.run(run_llm_bench(args.clients, args.rounds, args.tokens)):
        print(line)


if __name__ == "__main__":
    main()
