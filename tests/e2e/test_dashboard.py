"""The operator dashboard (gateway_svc/admin.py: GET /admin on the WebSocket port, the page
gateway_svc/static/admin.html and its dashboard.js on the `admin:dashboard` channel) in a
real headless Chromium, against the whole stack as separate processes:

- a generation shows up as its task's row, processing with progress, and leaves the list of
  active tasks once its client has the answer;
- a task whose provider (an OpenAI-compatible server in this test) answers 503, with one
  attempt allowed, is dead-lettered and shows up as a dead letter; with the provider healthy
  again, the row's retry button runs it again and its client gets the answer;
- a user who is not in GATEWAY_ADMIN_USERS is refused: the page says so and shows nothing.

The browser is Debian's /usr/bin/chromium (`make test` installs it), driven by playwright,
which never downloads a browser of its own. Screenshots go to the test's tmp_path."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from gateway_svc.phoenix_client import Channel, PhoenixClient
from tests.conftest import timeout
from tests.e2e.conftest import running_stack
from tests.llm.http_fake import Recorded
from tests.llm.http_fake import Reply as ErrorReply
from tests.llm.openai_server import MODEL, FakeOpenAI, Reply, api_error, completion
from tools.stack import Stack, dev_token

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
ANSWER = ["Hello", " from", " the", " fake", " provider"]
NO_SNAPSHOT = "\u2013"  # what admin.html shows in #sockets until a snapshot comes
OVERLOADED = api_error("The server is overloaded or not ready yet.", "server_error")
SECONDS = re.compile(r"^\d+\.\d$")  # how the page shows a wait or a lag
NONZERO_RATE = re.compile(r"^(0\.[1-9]|[1-9]\d*\.\d)$")  # a throughput above 0, as shown


def ms(seconds: float) -> float:
    """A playwright timeout (milliseconds), scaled like every test timeout."""
    return timeout(seconds) * 1000


class SwitchableOpenAI(FakeOpenAI):
    """OpenAI's wire format; every request gets OpenAI's 503 while `failing` is set."""

    def __init__(self) -> None:
        super().__init__(Reply(payloads=completion(ANSWER)))
        self.failing = True

    def check(self, request: Recorded) -> ErrorReply | None:
        if self.failing:
            return ErrorReply(503, body=OVERLOADED)
        return super().check(request)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: `make chromium` installs it"
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"], timeout=ms(30)
        )
        try:
            yield launched
        finally:
            await launched.close()


class Dashboard:
    """One open dashboard page; JavaScript errors on it are collected in `errors`."""

    def __init__(self, page: Page, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.set_default_timeout(ms(10))

    @classmethod
    async def open(cls, browser: Browser, stack: Stack, user: str, shots: Path) -> Dashboard:
        page = await browser.new_page(viewport={"width": 1100, "height": 900})
        dashboard = cls(page, shots)
        url = f"http://127.0.0.1:{stack.config.gateway_port}/admin?token={dev_token(user)}"
        response = await page.goto(url, timeout=ms(10))
        assert response is not None and response.ok, response and response.status
        return dashboard

    async def live(self) -> None:
        await expect(self.page.locator("#status")).to_have_text("live", timeout=ms(10))

    def task_row(self, task_id: str) -> Locator:
        return self.page.locator(f'#tasks tbody tr[data-id="{task_id}"]')

    def dead_letter_row(self, task_id: str) -> Locator:
        return self.page.locator(f'#dead_letters tbody tr[data-id="{task_id}"]')

    async def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


async def generate(client: PhoenixClient, prompt: str, model: str | None = None) -> Channel:
    """Start a generation on a new task's channel; the channel, its id in `.topic`."""
    channel = await client.join(f"task:{uuid.uuid4()}")
    payload: dict[str, Any] = {"prompt": prompt}
    if model is not None:
        payload["model"] = model
    reply = await channel.push("llm_generate", payload)
    assert reply.ok, reply.response
    return channel


async def until_terminal(channel: Channel) -> list[tuple[str, dict[str, Any]]]:
    """Every push of `channel` up to and including the task's answer or error."""
    pushes = []
    async for message in channel.messages():
        pushes.append((message.event, message.payload))
        if message.event in ("llm_response", "error", "phx_error"):
            break
    return pushes


def task_id_of(channel: Channel) -> str:
    return channel.topic.removeprefix("task:")


async def test_a_task_shows_up_progresses_and_leaves_the_list_when_done(
    request: pytest.FixtureRequest, tmp_path: Path, browser: Browser
) -> None:
    # About 40 words of answer at 120 ms each: several snapshots see it running.
    env = {"LOCAL_MODEL_TOKEN_DELAY_MS": "120"}
    async with running_stack(request, tmp_path / "var", env=env) as stack:
        dashboard = await Dashboard.open(browser, stack, "admin", tmp_path)
        await dashboard.live()
        async with await PhoenixClient.connect(
            stack.config.socket_url, token=dev_token("alice")
        ) as client:
            channel = await generate(client, "Show me on the operator dashboard, please")
            task_id = task_id_of(channel)
            follower = asyncio.create_task(until_terminal(channel))
            try:
                # Its row, at one snapshot: processing, some progress, alice's.
                seen = await dashboard.page.wait_for_function(
                    """(id) => {
                        const row = document.querySelector(`#tasks tbody tr[data-id="${id}"]`);
                        if (!row) return null;
                        const status = row.querySelector("td.status").textContent;
                        const progress = row.querySelector("progress").value;
                        const cells = [...row.querySelectorAll("td")].map((td) => td.textContent);
                        const cancel = row.querySelector('button[data-action="cancel_task"]');
                        return status === "processing" && progress > 0
                            ? { progress, cells, cancel: cancel !== null } : null;
                    }""",
                    arg=task_id,
                    timeout=ms(15),
                )
                row = await seen.json_value()
                assert 0 < row["progress"] < 1, row
                assert row["cells"][:3] == [task_id, "alice", "processing"], row
                assert row["cells"][4] == "local", row
                assert row["cancel"], row  # an active task can be cancelled from the page
                # Its queue's row says how long its oldest job waits, and history its lag.
                queue = dashboard.page.locator('#queues tbody tr[data-id="local"] td')
                await expect(queue.nth(0)).to_have_text("local")
                await expect(queue.nth(2)).to_have_text(SECONDS)
                await expect(dashboard.page.locator("#history_lag")).to_have_text(SECONDS)
                await dashboard.screenshot("task-processing")

                pushes = await asyncio.wait_for(follower, timeout(30))
                assert pushes[-1][0] == "llm_response", pushes[-3:]
            finally:
                follower.cancel()
            # Ended: no longer an active task, gone at the next snapshot, and counted in its
            # queue's runs finished per second (over the last 10 s: at least 0.1).
            await expect(dashboard.task_row(task_id)).to_have_count(0, timeout=ms(5))
            await expect(queue.nth(7)).to_have_text(NONZERO_RATE, timeout=ms(5))
        await dashboard.screenshot("task-done")
        assert dashboard.errors == []


async def test_a_dead_letter_is_retried_from_the_page_and_completes(
    request: pytest.FixtureRequest, tmp_path: Path, browser: Browser
) -> None:
    provider = SwitchableOpenAI()
    async with provider:
        env = {
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": f"{provider.origin}/v1",
            "LLM_RETRY_MAX_ATTEMPTS": "1",  # llm_svc tries the provider once ...
            "TASK_MAX_ATTEMPTS": "1",  # ... and task_svc runs the task once: dead-lettered
        }
        async with running_stack(request, tmp_path / "var", env=env) as stack:
            dashboard = await Dashboard.open(browser, stack, "admin", tmp_path)
            await dashboard.live()
            async with await PhoenixClient.connect(
                stack.config.socket_url, token=dev_token("alice")
            ) as client:
                channel = await generate(client, "Fail for now, please", model=MODEL)
                task_id = task_id_of(channel)
                pushes = await asyncio.wait_for(until_terminal(channel), timeout(30))
                event, error = pushes[-1]
                assert event == "error", pushes[-3:]
                assert provider.requests, "the provider was never asked"

                letter = dashboard.dead_letter_row(task_id)
                await expect(letter).to_have_count(1, timeout=ms(10))
                await expect(letter.locator("td").nth(3)).to_have_text("1")  # attempts
                await expect(
                    letter.locator('button[data-action="discard_dead_letter"]')
                ).to_have_count(1)
                await dashboard.screenshot("dead-letter")

                provider.failing = False
                await letter.locator('button[data-action="retry_dead_letter"]').click()
                # Requeued: out of the dead-letter queue (RequeueDeadLetter removes it last).
                await expect(letter).to_have_count(0, timeout=ms(10))

                # The task runs again under its id, its seq going on: the client, back on
                # its channel from the last seq it saw, gets the answer.
                again = await client.join(f"task:{task_id}", {"last_seq": error["seq"]})
                rerun = await asyncio.wait_for(until_terminal(again), timeout(30))
                event, answer = rerun[-1]
                assert event == "llm_response", rerun[-3:]
                assert answer["content"] == "".join(ANSWER)
                assert answer["model"] == MODEL
                assert all(payload["seq"] > error["seq"] for _, payload in rerun)
                await expect(dashboard.task_row(task_id)).to_have_count(0, timeout=ms(5))
                await expect(letter).to_have_count(0)
            await dashboard.screenshot("dead-letter-retried")
            assert dashboard.errors == []


async def test_a_user_who_is_not_an_admin_is_refused(
    request: pytest.FixtureRequest, tmp_path: Path, browser: Browser
) -> None:
    async with running_stack(request, tmp_path / "var") as stack:
        dashboard = await Dashboard.open(browser, stack, "alice", tmp_path)
        await expect(dashboard.page.locator("#status")).to_have_text(
            "refused: unauthorized", timeout=ms(10)
        )
        # Nothing of the snapshot reached the page.
        await expect(dashboard.page.locator("#sockets")).to_have_text(NO_SNAPSHOT)
        await expect(dashboard.page.locator("#tasks tbody tr")).to_have_count(0)
        await dashboard.screenshot("refused")
        assert dashboard.errors == []
