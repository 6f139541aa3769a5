"""The operator dashboard's gateway side (admin.py): its static page and scripts, the
`admin:dashboard` topic open to admin users only, and a snapshot that says which sources did
not answer. (tests/e2e/test_dashboard.py drives the page in Chromium against the whole
stack.)"""

from __future__ import annotations

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.gateway.live import Stack, recv, send
from tools.natsserver import free_port

NOWHERE = {"task_svc_addr": f"127.0.0.1:{free_port()}", "llm_svc_addr": f"127.0.0.1:{free_port()}"}


def http_base(stack: Stack) -> str:
    return stack.base.replace("ws://", "http://").removesuffix("/socket")


async def test_the_page_and_its_scripts_are_served_and_nothing_else(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=http_base(stack), trust_env=False) as client:
        page = await client.get("/admin", params={"token": "whatever"})
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "admin:dashboard" in page.text or "/admin/dashboard.js" in page.text
        for script in ("/admin/dashboard.js", "/admin/phoenix.min.js"):
            answer = await client.get(script)
            assert answer.status_code == 200, script
            assert answer.headers["content-type"].startswith("text/javascript")
            assert int(answer.headers["content-length"]) == len(answer.content) > 1000
        assert (await client.get("/admin/../pyproject.toml")).status_code == 404
        assert (await client.get("/elsewhere")).status_code == 404


@pytest.mark.parametrize("stack", [NOWHERE], indirect=True)
async def test_an_admin_joins_and_gets_a_snapshot_naming_what_did_not_answer(
    stack: Stack,
) -> None:
    async with connect(stack.url("admin")) as ws:
        await send(ws, ["1", "1", "admin:dashboard", "phx_join", {}])
        joined = await recv(ws)
        assert joined[3] == "phx_reply" and joined[4]["status"] == "ok", joined
        snapshot = joined[4]["response"]
        assert snapshot["sockets"] == 1 and snapshot["channels"] == 0
        assert sorted(snapshot["unavailable"]) == ["dead_letters", "providers", "tasks"]
        assert snapshot["tasks"] == [] and snapshot["queues"] == []
        # An action for an id that is no task id is refused before anything is called.
        await send(ws, ["1", "2", "admin:dashboard", "cancel_task", {"task_id": "nope"}])
        refused = await recv(ws)
        assert refused[4] == {"status": "error", "response": {"reason": "invalid_request"}}


async def test_a_user_who_is_no_admin_is_refused(stack: Stack) -> None:
    async with connect(stack.url("alice")) as ws:
        await send(ws, ["1", "1", "admin:dashboard", "phx_join", {}])
        assert await recv(ws) == [
            "1",
            "1",
            "admin:dashboard",
            "phx_reply",
            {"status": "error", "response": {"reason": "unauthorized"}},
        ]
