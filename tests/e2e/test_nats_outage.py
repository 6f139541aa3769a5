"""NATS down mid-stream: a running generation keeps streaming to its client. task_svc cannot
store checkpoints meanwhile, and its seq reserve (TASK_SEQ_RESERVE) is what lets events go on
without them. When NATS is back, the history catches up and holds one COMPLETED."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from gateway_svc.phoenix_client import PhoenixClient
from switchboard.v1 import events_pb2
from tests.conftest import timeout
from tests.e2e.conftest import running_stack
from tests.e2e.history import terminal_history
from tests.llm import openai_server as oai
from tools.natsserver import start_nats
from tools.stack import dev_token

pytestmark = pytest.mark.e2e

TOKENS = 300  # events, each on its own: far past the old reserve of 64


async def test_a_stream_goes_on_while_nats_is_down(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    tokens = [f" w{i}" for i in range(TOKENS)]
    provider = oai.FakeOpenAI(oai.Reply(payloads=oai.completion(tokens), every_s=0.005))
    env = {
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": await provider.start(),
        "LLM_DEFAULT_MODEL": "gpt-4o-mini",
        "LLM_COALESCE_MS": "0",  # every token an event
        "GATEWAY_GENERATE_RATE_PER_S": "0",
    }
    try:
        async with running_stack(request, tmp_path / "var", "sqlite", env) as stack:
            assert stack.nats is not None
            task_id = str(uuid.uuid4())
            chunks = 0
            url = stack.config.socket_url
            async with await PhoenixClient.connect(url, token=dev_token("alice")) as client:
                channel = await client.join(f"task:{task_id}")
                assert (await channel.push("llm_generate", {"prompt": "Go on"})).ok
                async with asyncio.timeout(timeout(30)):
                    async for message in channel.messages():
                        if message.event == "chunk":
                            chunks += 1
                            if chunks == 1:
                                stack.nats.stop()  # NATS goes down mid-stream
                        if message.event in ("llm_response", "error"):
                            assert message.event == "llm_response", message.payload
                            break
                assert stack.nats.process.poll() is not None  # it was down all along
                assert chunks == TOKENS
            var = stack.config.var_dir
            stack.nats = await start_nats(var / "nats", stack.config.nats_port, var / "nats.log")
            _, trail = await terminal_history(stack, task_id, "alice", seconds=60)
            assert [e.kind for e in trail].count(events_pb2.LIFECYCLE_KIND_COMPLETED) == 1
    finally:
        await provider.stop()
