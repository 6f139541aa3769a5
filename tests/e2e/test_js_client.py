"""The official npm `phoenix` client (1.8.x, Node 20, `ws` as transport) against the real
stack: connect, join, llm_generate, streamed events, leave; and a gateway restart in the
middle of a generation (close 1001 → reconnect → rejoin with last_seq → catch up)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from llm_svc.providers.local import compose_answer
from tests.conftest import timeout
from tools.stack import Stack, dev_token

pytestmark = pytest.mark.e2e

JS_DIR = Path(__file__).resolve().parent.parent / "js"
PROMPT = "What did a switchboard operator do?"


class Scenario:
    """One run of tests/js/scenario.mjs, read line by line as it prints."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, name: str, stack: Stack, env: dict[str, str] | None = None) -> Scenario:
        node = shutil.which("node")
        assert node, "node (20+) is needed for the phoenix client tests"
        assert (JS_DIR / "node_modules" / "phoenix").exists(), (
            "tests/js/node_modules is missing: `make test` installs it (npm ci)"
        )
        url = f"ws://127.0.0.1:{stack.config.gateway_port}/socket"
        process = await asyncio.create_subprocess_exec(
            node,
            "scenario.mjs",
            name,
            url,
            dev_token("js-user"),
            cwd=JS_DIR,
            env={"PATH": "/usr/bin:/bin", "PROMPT": PROMPT, **(env or {})},
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def next(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout(30))
        assert line, f"scenario ended early; it said: {self.lines}"
        message: dict[str, Any] = json.loads(line)
        self.lines.append(message)
        assert message["type"] != "fail", message
        return message

    async def until(self, kind: str) -> dict[str, Any]:
        while (message := await self.next())["type"] != kind:
            pass
        return message

    async def finish(self) -> dict[str, Any]:
        done = await self.until("done")
        assert await asyncio.wait_for(self.process.wait(), timeout(10)) == 0
        return done


def check_stream(done: dict[str, Any]) -> None:
    events = done["events"]
    assert done["last"] == "llm_response" and done["left"] is True
    assert done["channel_state"] == "closed"
    final = events[-1]
    expected = "".join(compose_answer(PROMPT, 0))
    assert final["event"] == "llm_response" and final["content"] == expected
    assert any(e["event"] == "progress" for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs)), "events repeated or out of order"


@pytest.mark.parametrize("scenario", ["generate", "generate-authtoken"])
async def test_phoenix_js_client_generates(sqlite_stack: Stack, scenario: str) -> None:
    run = await Scenario.start(scenario, sqlite_stack)
    assert (await run.until("joined"))["response"] == {"status": "new"}
    ack = await run.until("ack")
    assert ack["reply"]["status"] == "queued" and "position" in ack["reply"]
    done = await run.finish()
    check_stream(done)
    chunks = "".join(e["delta"] for e in done["events"] if e["event"] == "chunk")
    assert chunks == done["events"][-1]["content"]


@pytest.mark.parametrize("sqlite_stack", [{"LOCAL_MODEL_TOKEN_DELAY_MS": "40"}], indirect=True)
async def test_phoenix_js_client_survives_a_gateway_restart(sqlite_stack: Stack) -> None:
    run = await Scenario.start("rejoin-after-restart", sqlite_stack)
    await run.until("mid-stream")
    await sqlite_stack.restart_service("gateway_svc")
    closed = await run.until("close")
    assert closed["code"] == 1001, closed
    rejoined = await run.until("joined")
    assert rejoined["response"]["status"] in ("processing", "completed")
    done = await run.finish()
    check_stream(done)
    # Every chunk exactly once across the restart: together they are the whole answer.
    chunks = "".join(e["delta"] for e in done["events"] if e["event"] == "chunk")
    assert chunks == done["events"][-1]["content"]
