"""`make bench ARGS="--only paced"`: how many concurrent streaming generations one process
set carries. N WebSocket clients (a user each) run K generations back to back through the
real stack, the local model paced at 20 ms a token and asked for 50 tokens, so one generation
ideally completes in 1.0 s; printed beside the bare websocket and gRPC floors of the same run.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from llm_svc.providers.local import compose_answer
from tools.bench import BenchClient, grpc_unary_floor, websocket_echo_floor
from tools.benchstats import Sample
from tools.stack import Stack, StackConfig, dev_token

TOKEN_DELAY_MS = 20
ANSWER_TOKENS = 50
IDEAL_S = ANSWER_TOKENS * TOKEN_DELAY_MS / 1000
GENERATION_TIMEOUT_S = 30.0  # join → llm_generate → terminal push → leave, at most
CONNECT_TIMEOUT_S = 60.0  # all N sockets open within this
FLOOR_TIMEOUT_S = 120.0
STACK_ENV = {
    "LOCAL_MODEL_TOKEN_DELAY_MS": str(TOKEN_DELAY_MS),
    "LOG_LEVEL": "WARNING",
    "LLM_DEFAULT_MODEL": "local",
    # Measured here: how many streams the processes carry, not the per-user limits.
    "GATEWAY_GENERATE_RATE_PER_S": "0",
    "GATEWAY_MAX_CONNECTIONS_PER_USER": "0",
    "TASK_CONCURRENCY": "2000",
}


class GenerationFailed(Exception):
    """A generation that ended without its `llm_response`; the message is the reason."""


@dataclass
class Results:
    acks: list[float] = field(default_factory=list)
    first_chunks: list[float] = field(default_factory=list)
    completions: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)


def paced_prompt(index: int) -> str:
    """A prompt whose local answer has at least ANSWER_TOKENS tokens (answers vary with the
    prompt, about 45 to 52), so every generation is cut at max_tokens: exactly 50 tokens."""
    for nonce in range(1000):
        prompt = (
            f"Paced stream {index}.{nonce}: how did the operators of telephone switchboards "
            "connect one caller to another?"
        )
        if len(compose_answer(prompt)) >= ANSWER_TOKENS:
            return prompt
    raise RuntimeError(f"no local answer of {ANSWER_TOKENS} tokens; has the local model changed?")


def reason(payload: object, *keys: str) -> str:
    """The first of `keys` found in `payload` (nested via "response"), for failure counts."""
    if not isinstance(payload, dict):
        return repr(payload)
    for key in keys:
        if key in payload:
            return str(payload[key])
    return reason(payload["response"], *keys) if "response" in payload else repr(payload)


async def generate(client: BenchClient, prompt: str, results: Results) -> None:
    """One generation on a fresh `task:<uuid4>` topic; its latencies go into `results`."""
    topic = f"task:{uuid.uuid4()}"
    join_ref = await client.send(None, topic, "phx_join", {})
    joined = (await client.until(topic, {"phx_reply"}))[4]
    if not isinstance(joined, dict) or joined.get("status") != "ok":
        raise GenerationFailed(f"join: {reason(joined, 'reason')}")
    payload = {"prompt": prompt, "options": {"max_tokens": ANSWER_TOKENS}}
    started = time.perf_counter()
    ref = await client.send(join_ref, topic, "llm_generate", payload)
    ack = first_chunk = None
    events = {"phx_reply", "chunk", "llm_response", "error", "phx_error", "phx_close"}
    while True:
        frame = await client.until(topic, events)
        elapsed = time.perf_counter() - started
        event, body = frame[3], frame[4]
        if event == "phx_reply" and frame[1] == ref:
            if not isinstance(body, dict) or body.get("status") != "ok":
                raise GenerationFailed(f"refused: {reason(body, 'reason')}")
            ack = elapsed
        elif event == "chunk" and first_chunk is None:
            first_chunk = elapsed
        elif event == "llm_response":
            break
        elif event in ("error", "phx_error", "phx_close"):
            raise GenerationFailed(f"{event}: {reason(body, 'code', 'reason')}")
    await client.send(join_ref, topic, "phx_leave", {})
    tokens = reason(body.get("usage") if isinstance(body, dict) else None, "completion_tokens")
    if ack is None or first_chunk is None or tokens != str(ANSWER_TOKENS):
        raise GenerationFailed(f"incomplete: ack {ack}, first chunk {first_chunk}, {tokens}")
    results.acks.append(ack)
    results.first_chunks.append(first_chunk)
    results.completions.append(elapsed)


async def stream(client: BenchClient, prompt: str, generations: int, results: Results) -> None:
    """One client: `generations` generations back to back, each bounded in time."""
    for done in range(generations):
        try:
            async with asyncio.timeout(GENERATION_TIMEOUT_S):
                await generate(client, prompt, results)
        except GenerationFailed as error:
            results.failures[str(error)] += 1
        except TimeoutError:
            results.failures[f"timeout after {GENERATION_TIMEOUT_S:g} s"] += 1
        except ConnectionClosed as error:
            results.failures[f"socket closed ({error.rcvd.code if error.rcvd else '-'})"] += (
                generations - done
            )
            return


async def open_clients(stack: Stack, streams: int) -> list[BenchClient]:
    def url(index: int) -> str:  # a user per client, as in life (limits are per user)
        return f"{stack.config.socket_url}?token={dev_token(f'paced-{index}')}&vsn=2.0.0"

    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        opened = await asyncio.gather(
            *(connect(url(i), max_queue=None) for i in range(streams)), return_exceptions=True
        )
    sockets = [ws for ws in opened if isinstance(ws, ClientConnection)]
    if len(sockets) < streams:
        await asyncio.gather(*(ws.close() for ws in sockets))
        error = next(e for e in opened if isinstance(e, BaseException))
        raise RuntimeError(f"{streams - len(sockets)} of {streams} sockets failed") from error
    return [BenchClient(ws) for ws in sockets]


async def run_paced(stack: Stack, prompts: list[str], generations: int) -> tuple[Results, float]:
    """(results, elapsed seconds) of a client per prompt x `generations` generations each."""
    clients = await open_clients(stack, len(prompts))
    try:
        await stream(clients[0], prompts[0], 1, Results())  # warm-up, not counted
        results = Results()
        started = time.perf_counter()
        await asyncio.gather(
            *(stream(c, p, generations, results) for c, p in zip(clients, prompts, strict=True))
        )
        return results, time.perf_counter() - started
    finally:
        await asyncio.gather(*(client.ws.close() for client in clients))


async def run_paced_bench(streams: int, generations: int, floor_rounds: int) -> list[str]:
    """`floor_rounds` calls of the sequential floor; a hundredth of it per concurrent client."""
    concurrent_rounds = max(1, floor_rounds // 100)
    prompts = [paced_prompt(i) for i in range(streams)]
    async with asyncio.timeout(FLOOR_TIMEOUT_S):
        ws_floor = await websocket_echo_floor(streams, concurrent_rounds)
        grpc_seq = await grpc_unary_floor(1, floor_rounds)
        grpc_conc = await grpc_unary_floor(streams, concurrent_rounds)
    with tempfile.TemporaryDirectory() as scratch:
        stack = Stack(StackConfig.on_free_ports(Path(scratch), extra_env=STACK_ENV))
        try:
            await stack.start()
            results, elapsed = await run_paced(stack, prompts, generations)
        finally:
            await stack.stop()
    n = f"x{streams}"
    samples = [
        Sample(f"llm_generate ack {n}", results.acks, elapsed),
        Sample(f"first chunk {n}", results.first_chunks, elapsed),
        Sample(f"completion (50 tokens) {n}", results.completions, elapsed),
    ]
    total = streams * generations
    failures = ", ".join(f"{why}: {count}" for why, count in results.failures.most_common(5))
    lines = [
        f"{streams} streams x {generations} generations of {ANSWER_TOKENS} tokens, local model "
        f"at {TOKEN_DELAY_MS} ms a token, SQLite history",
        *(sample.row() for sample in (ws_floor, grpc_seq, grpc_conc)),
        f"{'ideal completion (50 x 20 ms)':<40} {'':<8} p50={IDEAL_S * 1000:8.3f} ms",
        *(sample.row() for sample in samples if sample.latencies_s),
        f"throughput: {len(results.completions) / elapsed:.1f} tasks/s "
        f"(ideal {streams / IDEAL_S:.1f}/s), failures: {results.failures.total()} of {total}"
        + (f" ({failures})" if failures else ""),
    ]
    if results.completions:
        completion = samples[2]
        lines.append(
            f"stretch: completion p50 / ideal = {completion.pct(0.5) / 1000 / IDEAL_S:.2f}x, "
            f"p99 / ideal = {completion.pct(0.99) / 1000 / IDEAL_S:.2f}x"
        )
    return lines
