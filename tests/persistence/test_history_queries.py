"""ListTasks' status filter and previews, and CountTasks, over gRPC on both databases."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest

from persistence_svc.events import STATUS_NAMES, STATUS_VALUES
from persistence_svc.repository import Repository
from svckit.errors import Code
from switchboard.v1 import common_pb2, history_pb2, history_pb2_grpc
from tests.conftest import timeout
from tests.persistence.factory import T0, lifecycle_ending, new_task_id
from tests.persistence.helpers import rpc_error, served, statements

Status = common_pb2.TaskStatus


@pytest.fixture
async def history(repository: Repository) -> AsyncIterator[history_pb2_grpc.HistoryServiceStub]:
    async with served(repository) as stubs:
        yield stubs.history


async def add(
    repository: Repository, status: str, *, user: str = "alice", minute: int = 0, **kw: str
) -> str:
    task_id = new_task_id()
    at = T0 + timedelta(minutes=minute)
    await repository.apply(lifecycle_ending(status, task_id, user=user, at=at, **kw))
    return task_id


async def list_all(
    history: history_pb2_grpc.HistoryServiceStub, **fields: object
) -> list[history_pb2.ListTasksResponse]:
    """Every page of a listing, following next_cursor."""
    pages: list[history_pb2.ListTasksResponse] = []
    cursor = ""
    while True:
        request = history_pb2.ListTasksRequest(user_id="alice", cursor=cursor, **fields)  # type: ignore[arg-type]
        page = await history.ListTasks(request, timeout=timeout(5))
        pages.append(page)
        if not page.next_cursor:
            return pages
        cursor = page.next_cursor


async def test_the_status_filter_returns_only_that_status_newest_first_in_pages(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    cycle = ["completed", "failed", "queued", "completed", "cancelled", "processing"]
    created: dict[str, list[tuple[int, str]]] = {name: [] for name in STATUS_NAMES.values()}
    for minute, status in enumerate(cycle * 2):
        created[status].append((minute, await add(repository, status, minute=minute)))
        # Another user's task of the same status at the same time: never listed.
        await add(repository, status, user="bob", minute=minute)
    for _ in range(2):  # two more at the same minute: the id breaks the tie, as without a filter
        created["completed"].append((30, await add(repository, "completed", minute=30)))
    # Newest first: created_at, then id, descending (uuid order is the databases' order).
    newest_first = {
        status: [t for _, t in sorted(tasks, key=lambda m: (m[0], uuid.UUID(m[1])), reverse=True)]
        for status, tasks in created.items()
    }

    pages = await list_all(history, status=Status.TASK_STATUS_COMPLETED, page_size=2)
    assert [len(page.tasks) for page in pages] == [2, 2, 2]  # 6 completed: the last page ends it
    listed = [task for page in pages for task in page.tasks]
    assert {task.status for task in listed} == {Status.TASK_STATUS_COMPLETED}
    assert {task.user_id for task in listed} == {"alice"}
    assert [task.task_id for task in listed] == newest_first["completed"]

    for status, expected in newest_first.items():
        pages = await list_all(history, status=STATUS_VALUES[status], page_size=1)
        assert [t.task_id for page in pages for t in page.tasks] == expected, status

    # Unspecified: every status, still newest first across the pages.
    pages = await list_all(history, page_size=5)
    everything = [t for page in pages for t in page.tasks]
    assert len(everything) == 14 and len(pages) == 3
    assert [t.created_at.ToSeconds() for t in everything] == sorted(
        (t.created_at.ToSeconds() for t in everything), reverse=True
    )
    assert {t.status for t in everything} == set(STATUS_VALUES.values())


async def test_a_cursor_of_a_filtered_page_continues_that_filter(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    failed = [await add(repository, "failed", minute=m) for m in range(0, 6, 2)]
    for minute in range(1, 6, 2):
        await add(repository, "completed", minute=minute)
    request = history_pb2.ListTasksRequest(
        user_id="alice", status=Status.TASK_STATUS_FAILED, page_size=1
    )
    first = await history.ListTasks(request, timeout=timeout(5))
    assert [t.task_id for t in first.tasks] == [failed[2]] and first.next_cursor
    request.cursor = first.next_cursor
    second = await history.ListTasks(request, timeout=timeout(5))
    # Minute 3's completed task lies between them: skipped by the filter, not by the cursor.
    assert [t.task_id for t in second.tasks] == [failed[1]]


async def test_previews_are_cut_in_the_query(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    long_text = "héllo 🙂 wörld, " * 100  # non-ASCII: characters, not bytes, are counted
    long_task = await add(repository, "completed", minute=2, content=long_text)
    short_task = await add(repository, "completed", minute=1, content="Short.")
    await add(repository, "queued", minute=0)  # no response at all

    with statements(repository) as sent:
        page = await history.ListTasks(
            history_pb2.ListTasksRequest(user_id="alice", preview_chars=7), timeout=timeout(5)
        )
    responses = {t.task_id: t.response for t in page.tasks}
    assert responses[long_task] == "héllo 🙂" == long_text[:7]
    assert responses[short_task] == "Short."  # shorter than the preview: whole
    assert all(len(text) <= 7 for text in responses.values())
    assert len(responses) == 3
    assert any("substr" in text.lower() for text in sent)  # cut by the database

    whole = await history.ListTasks(
        history_pb2.ListTasksRequest(user_id="alice"), timeout=timeout(5)
    )
    assert {t.task_id: t.response for t in whole.tasks}[long_task] == long_text
    # Only `response` is cut: the other fields are as GetTask gives them.
    task = await history.GetTask(
        history_pb2.GetHistoryTaskRequest(task_id=long_task, user_id="alice"), timeout=timeout(5)
    )
    preview = next(t for t in page.tasks if t.task_id == long_task)
    task.response = preview.response
    assert preview == task


async def test_count_tasks_by_status_in_one_query(
    repository: Repository, history: history_pb2_grpc.HistoryServiceStub
) -> None:
    mine = ["completed", "completed", "failed", "cancelled", "queued", "processing", "completed"]
    for minute, status in enumerate(mine):
        await add(repository, status, minute=minute)
    for status in ("completed", "failed", "failed"):
        await add(repository, status, user="bob")

    counts = await history.CountTasks(
        history_pb2.CountTasksRequest(user_id="alice"), timeout=timeout(5)
    )
    assert dict(counts.by_status) == {
        "queued": 1,
        "processing": 1,
        "completed": 3,
        "failed": 1,
        "cancelled": 1,
    }
    assert counts.total == 7
    bob = await history.CountTasks(history_pb2.CountTasksRequest(user_id="bob"), timeout=timeout(5))
    assert (bob.by_status["completed"], bob.by_status["failed"], bob.total) == (1, 2, 3)
    nobody = await history.CountTasks(
        history_pb2.CountTasksRequest(user_id="carol"), timeout=timeout(5)
    )
    assert dict(nobody.by_status) == dict.fromkeys(STATUS_NAMES.values(), 0)
    assert nobody.total == 0

    with statements(repository) as sent:
        assert (await repository.count_tasks("alice"))["completed"] == 3
    assert len(sent) == 1 and "GROUP BY" in sent[0].upper()


@pytest.mark.parametrize(
    "call",
    [
        ("ListTasks", history_pb2.ListTasksRequest(user_id="alice", status=99)),  # type: ignore[arg-type]
        ("ListTasks", history_pb2.ListTasksRequest(user_id="alice", preview_chars=-1)),
        ("CountTasks", history_pb2.CountTasksRequest(user_id="")),
        ("DeleteTask", history_pb2.DeleteTaskRequest(task_id=new_task_id(), user_id="")),
        ("DeleteAllTasks", history_pb2.DeleteAllTasksRequest(user_id="a\x00b")),
    ],
)
async def test_bad_requests_are_invalid(
    history: history_pb2_grpc.HistoryServiceStub, call: tuple[str, object]
) -> None:
    method, request = call
    error = await rpc_error(getattr(history, method)(request, timeout=timeout(5)))
    assert error.code == Code.ERROR_CODE_INVALID_REQUEST
    assert error.kind.status == grpc.StatusCode.INVALID_ARGUMENT
