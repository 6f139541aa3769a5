"""The operator dashboard's gateway side (admin.py): its static page and scripts, the
`admin:dashboard` topic open to admin users only, and a snapshot that says which sources did
not answer. (tests/e2e/test_dashboard.py drives the page in Chromium against the whole
stack.)"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from gateway_svc.admin import _Board
from gateway_svc.direct_submit import DirectSubmit
from persistence_svc.consumer import DURABLE_NAME, consumer_config
from svckit.catalog import ModelCatalog
from svckit.nats import (
    QUEUE_BOARD_SUBJECT,
    TASK_EVENTS_STREAM,
    TASK_EVENTS_SUBJECT_PREFIX,
    connect_nats,
    ensure_stream,
    task_events_stream_config,
)
from switchboard.v1 import events_pb2
from tests.conftest import eventually, publish_until_heard
from tests.gateway.live import Stack, recv, running_stack, send
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


class NoModels:
    """llm_svc's ListModels for a catalogue nothing here resolves through."""

    async def ListModels(self, request: Any, timeout: float | None = None) -> Any:
        raise AssertionError("not asked")


def board(node: str, oldest_s: float, waiting: list[int]) -> bytes:
    stats = events_pb2.QueueStats(
        queue="default",
        waiting_by_priority=waiting,
        free_slots=1,
        concurrency=2,
        mean_run_s=oldest_s / 10,
        max_depth=10,
        oldest_s=oldest_s,
    )
    return events_pb2.QueueBoard(queues=[stats], node=node).SerializeToString()


async def test_the_snapshot_shows_history_backlog_and_lag_and_each_queues_oldest_wait(
    nats_url: str,
) -> None:
    nc = await connect_nats(nats_url, "test")
    js = nc.jetstream()
    await ensure_stream(js, task_events_stream_config())
    await js.add_consumer(TASK_EVENTS_STREAM, config=consumer_config(60.0))  # persistence_svc's
    stored = [await js.publish(f"{TASK_EVENTS_SUBJECT_PREFIX}.t-{n}.queued", b"") for n in (1, 2)]
    stored_at = []
    for ack in stored:
        message = await js.get_msg(TASK_EVENTS_STREAM, ack.seq)
        assert message.time is not None
        stored_at.append(message.time.timestamp())
    catalog = ModelCatalog(NoModels())  # type: ignore[arg-type]
    direct = DirectSubmit(await connect_nats(nats_url, "gateway"), catalog)
    try:
        async with running_stack(
            direct=direct,
            task_svc_addr=NOWHERE["task_svc_addr"],
            llm_svc_addr=NOWHERE["llm_svc_addr"],
        ) as stack:
            dashboard = stack.gateway.dashboard
            dashboard.wall = lambda: stored_at[0] + 30.0
            await direct.nc.flush()  # the dashboard's subscription is on the server
            boards = [
                (QUEUE_BOARD_SUBJECT, board("a", 2.5, [1, 1])),
                (QUEUE_BOARD_SUBJECT, board("b", 7.25, [2])),
            ]
            await publish_until_heard(nc, boards, lambda: len(dashboard.boards) == 2)
            async with connect(stack.url("admin")) as ws:
                await send(ws, ["1", "1", "admin:dashboard", "phx_join", {}])
                joined = await recv(ws)
            snapshot = joined[4]["response"]
            assert "history" not in snapshot["unavailable"]
            assert snapshot["history_pending"] == 2
            assert snapshot["history_lag_s"] == pytest.approx(30.0)  # the oldest event's age
            assert snapshot["queues"] == [
                {
                    "queue": "default",
                    "waiting": 4,
                    "running": 2,
                    "concurrency": 4,
                    "mean_run_s": 0.725,
                    "max_depth": 20,
                    "oldest_s": 7.25,  # the longest wait of any node
                    "throughput_per_s": 0.0,  # one board per node: no rate yet
                }
            ]

            # The oldest one written (acked): the lag is now the next one's.
            history = await js.pull_subscribe_bind(durable=DURABLE_NAME, stream=TASK_EVENTS_STREAM)
            (first,) = await history.fetch(1)
            await first.ack_sync()
            later = await dashboard.snapshot()
            assert later["history_pending"] == 1
            assert later["history_lag_s"] == pytest.approx(stored_at[0] + 30.0 - stored_at[1])
            (second,) = await history.fetch(1)
            await second.ack_sync()
            caught_up = await dashboard.snapshot()
            assert caught_up["history_pending"] == 0 and caught_up["history_lag_s"] == 0.0
    finally:
        await direct.close()
        await nc.close()


async def test_every_admin_channel_gets_the_one_snapshot_made_per_refresh() -> None:
    nowhere = NOWHERE["task_svc_addr"], NOWHERE["llm_svc_addr"]
    async with running_stack(task_svc_addr=nowhere[0], llm_svc_addr=nowhere[1]) as stack:
        dashboard = stack.gateway.dashboard
        made: list[int] = []

        async def snapshot() -> dict[str, Any]:  # the RPCs behind a snapshot, counted
            made.append(len(made) + 1)
            return {"made": made[-1]}

        dashboard.snapshot = snapshot  # type: ignore[method-assign]
        dashboard.interval_s = 0.05
        async with connect(stack.url("admin")) as first, connect(stack.url("admin")) as second:
            joins = []
            for ws in (first, second):
                await send(ws, ["1", "1", "admin:dashboard", "phx_join", {}])
                joins.append((await recv(ws))[4]["response"]["made"])
            assert joins == [1, 1]  # the second admin is answered with the latest one

            async def pushed(ws: Any) -> list[int]:
                return [(await recv(ws))[4]["made"] for _ in range(3)]

            rounds = [await pushed(first), await pushed(second)]
            # Had each channel made its own, no snapshot would reach both.
            assert set(rounds[0]) & set(rounds[1])
            assert all(r == sorted(set(r)) and r[0] > 1 and r[-1] <= len(made) for r in rounds)
            await first.close()

            async def one_admin_left() -> bool:
                return dashboard.watchers == 1

            await eventually(one_admin_left)
            refresher = dashboard.refresher
            assert refresher is not None and not refresher.done()
            after_first_left = len(made)
            while (await recv(second))[4]["made"] <= after_first_left:
                pass  # older ones, sent before: still refreshed for the one left

        async def none_left() -> bool:
            return dashboard.refresher is None

        await eventually(none_left)
        assert refresher.cancelled()  # the last one to leave stopped it


def test_a_queues_throughput_is_its_runs_finished_per_second_over_the_window() -> None:
    def stats(finished: int) -> events_pb2.QueueBoard:
        queue = events_pb2.QueueStats(queue="default", finished=finished)
        return events_pb2.QueueBoard(queues=[queue], node="a")

    known = _Board(stats(100), 0.0)
    known.heard(stats(100), 0.0)
    assert known.throughput("default") == 0.0  # one board: no rate yet
    known.heard(stats(110), 2.0)
    known.heard(stats(130), 4.0)
    assert known.throughput("default") == pytest.approx(7.5)  # 30 runs in 4 s
    known.heard(stats(150), 12.0)  # the board of 0 s is out of the window now
    assert known.throughput("default") == pytest.approx(4.0)  # 40 runs in 10 s
    known.heard(stats(3), 13.0)  # the node restarted: its counts began again
    assert known.throughput("default") == 0.0
    known.heard(stats(13), 15.0)
    assert known.throughput("default") == pytest.approx(5.0)
    assert known.throughput("other") == 0.0
