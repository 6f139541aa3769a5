"""Fixtures for persistence_svc: every repository/service test runs on SQLite (a temp file)
and on PostgreSQL (a fresh database from tests.postgres, or skipped with the reason).

`database_url` is a database already at the head migration (a copy of one migrated once per
process: faster than migrating each); `empty_database_url` is an empty one, for the
migration tests.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from persistence_svc import migrate
from persistence_svc.repository import Repository
from svckit.nats import connect_nats, ensure_stream, task_events_stream_config
from tests.persistence.helpers import Bus
from tests.postgres import postgres_database, postgres_template

_sqlite_template: Path | None = None


async def _migrated_sqlite_file() -> Path:
    global _sqlite_template
    if _sqlite_template is None:
        path = Path(tempfile.mkdtemp(prefix="sb-sqlite-template-")) / "history.db"
        await migrate.upgrade(f"sqlite+aiosqlite:///{path}")  # closes its connection
        _sqlite_template = path
    return _sqlite_template


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        path = tmp_path / "db" / "history.db"
        path.parent.mkdir()
        shutil.copyfile(await _migrated_sqlite_file(), path)
        yield f"sqlite+aiosqlite:///{path}"
    else:
        template = await postgres_template("head", migrate.upgrade)
        async with postgres_database(template=template) as url:
            yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'db' / 'history.db'}"
    else:
        async with postgres_database() as url:
            yield url


@pytest.fixture
async def repository(database_url: str) -> AsyncIterator[Repository]:
    repo = await Repository.open(database_url)
    try:
        yield repo
    finally:
        await repo.close()


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    """A NATS connection with the SB_TASK_EVENTS stream in place."""
    nc = await connect_nats(nats_url, "test")
    js = nc.jetstream()
    await ensure_stream(js, task_events_stream_config())
    try:
        yield Bus(nc, js)
    finally:
        await nc.close()
