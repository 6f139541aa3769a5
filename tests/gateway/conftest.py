"""`stack`: a live gateway over a fake TaskService (see live.py). Parametrize it indirectly
with a dict of Settings overrides."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from persistence_svc.repository import Repository
from tests.gateway.live import Stack, running_stack


@pytest.fixture
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    async with running_stack(**getattr(request, "param", {})) as live:
        yield live


@pytest.fixture
async def repository(tmp_path: Path) -> AsyncIterator[Repository]:
    """History on a SQLite file of the test's own (served to the gateway by the tests that
    need a real persistence_svc: tests.persistence.helpers.served)."""
    repo = await Repository.open(f"sqlite+aiosqlite:///{tmp_path / 'history.db'}")
    try:
        yield repo
    finally:
        await repo.close()
