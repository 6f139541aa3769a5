"""The user channel's `delete_task` between task_svc (the fake TaskService) and a real
HistoryService on SQLite: task_svc says whose a task is. A task of the user's that history
holds no row of yet (its events still on their way) is answered deleted and tombstoned for
that user, so its events are dropped when they come; another user's task is answered like a
missing one and leaves nothing behind."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from gateway_svc.phoenix_client import PhoenixClient
from persistence_svc import models
from persistence_svc.repository import Repository
from tests.gateway.live import running_stack
from tests.persistence.factory import completed_lifecycle
from tests.persistence.helpers import served


@pytest.fixture
async def repository(tmp_path: Path) -> AsyncIterator[Repository]:
    repo = await Repository.open(f"sqlite+aiosqlite:///{tmp_path / 'history.db'}")
    try:
        yield repo
    finally:
        await repo.close()


async def tombstones(repo: Repository) -> dict[tuple[str, str], bool]:
    """(task id, owner): confirmed, of every tombstone."""
    deleted, users = models.deleted_tasks, models.users
    query = select(deleted.c.task_id, users.c.external_id, deleted.c.confirmed).join(
        users, users.c.id == deleted.c.user_id
    )
    async with repo.engine.connect() as conn:
        rows = await conn.execute(query)
        return {(str(task), owner): bool(confirmed) for task, owner, confirmed in rows}


async def test_delete_task_goes_by_whose_task_task_svc_says_it_is(repository: Repository) -> None:
    async with (
        served(repository) as history,
        running_stack(history_svc_addr=history.address) as stack,
        await PhoenixClient.connect(stack.base, token=stack.token("alice")) as alice,
        await PhoenixClient.connect(stack.base, token=stack.token("bob")) as bob,
    ):
        task_id = str(uuid.uuid4())
        task = await alice.join(f"task:{task_id}")
        assert (await task.push("llm_generate", {"prompt": "Delete me at once"})).ok
        alices, bobs = await alice.join("user:alice"), await bob.join("user:bob")

        refused = await bobs.push("delete_task", {"task_id": task_id})
        assert (refused.status, refused.response) == ("ok", {"deleted": False})
        assert await tombstones(repository) == {}  # history was not even asked

        deleted = await alices.push("delete_task", {"task_id": task_id})
        assert (deleted.status, deleted.response) == ("ok", {"deleted": True})
        # History had no row of it: the tombstone is alice's, and not confirmed by history.
        assert await tombstones(repository) == {(task_id, "alice"): False}
        stray = await alices.push("delete_task", {"task_id": str(uuid.uuid4())})
        assert stray.response == {"deleted": False}  # neither task_svc nor history knew it

    # Its events, when they come, are dropped.
    result = await repository.apply(completed_lifecycle(task_id))
    assert (result.events_recorded, result.events_dropped) == (0, 3)
    assert await repository.get_task(task_id, "alice") is None
