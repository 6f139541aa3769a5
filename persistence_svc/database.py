"""The driver side of the repository seam (only repository.py imports this): engine set-up
per backend, and the translation of driver errors into persistence_svc errors."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import ColumnElement, any_, bindparam, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from persistence_svc.errors import PersistenceError, StorageRejected, StorageUnavailable

# INSERT ... ON CONFLICT DO NOTHING exists in both dialects, with the same API.
INSERTS: dict[str, Callable[..., Any]] = {
    "postgresql": postgresql.insert,
    "sqlite": sqlite.insert,
}


def in_list(column: ColumnElement[Any], name: str, dialect: str) -> ColumnElement[bool]:
    """`column IN (:name)`, bound to a list at execution. On PostgreSQL it is `= ANY(:name)`
    with one array parameter: the statement text stays the same for any number of values, so
    psycopg converts it once (it re-parses statements of more than 50 parameters every time)
    and the server can keep it prepared. Elsewhere an expanding IN."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


def json_dumps(value: Any) -> str:
    """JSON columns' serializer: orjson, several times faster than json.dumps (which would
    otherwise encode every task_events payload), and compact."""
    return orjson.dumps(value).decode()


def create_engine(url: str) -> AsyncEngine:
    """An async engine for `url` (SQLite through aiosqlite, PostgreSQL through psycopg 3)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend not in INSERTS:
        raise ValueError(f"unsupported database {backend!r}: use sqlite+aiosqlite or postgresql")
    if backend == "sqlite":
        _make_sqlite_folder(parsed)
        engine = create_async_engine(url, json_serializer=json_dumps)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping: after a PostgreSQL restart, pooled connections are dead; test before use.
    # connect_timeout: a dead host must fail fast (StorageUnavailable), not hang a batch.
    return create_async_engine(
        url,
        json_serializer=json_dumps,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        connect_args={"connect_timeout": 5},
    )


def create_migration_engine(url: str | URL) -> AsyncEngine:
    """A one-connection engine for schema migrations, where DDL must be transactional.

    PostgreSQL has transactional DDL. pysqlite (under aiosqlite) does not open a transaction
    before DDL, so each CREATE TABLE would commit on its own and a crash half-way would leave a
    half-made schema; here the driver's own BEGIN is turned off and we emit BEGIN IMMEDIATE,
    which also takes SQLite's write lock at once, so two processes migrating at the same time
    run one after the other (the other waits busy_timeout). This is SQLAlchemy's documented
    recipe for transactional DDL on pysqlite/aiosqlite.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(parsed, poolclass=NullPool, connect_args={"connect_timeout": 5})
    _make_sqlite_folder(parsed)
    engine = create_async_engine(parsed, poolclass=NullPool)
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    event.listen(engine.sync_engine, "connect", _sqlite_no_driver_begin)
    event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
    return engine


def _make_sqlite_folder(parsed: URL) -> None:
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_no_driver_begin(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None


def _sqlite_begin_immediate(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # busy_timeout waits for the writer instead of failing at once (first: switching a new
    # database to WAL needs the lock too); SQLite leaves foreign keys off unless asked; WAL
    # lets readers run during a write.
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    _switch_to_wal(cursor)
    cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """Switching a new database to WAL takes an exclusive lock that SQLite does not always
    wait for under busy_timeout (several processes opening a new file at once get "database
    is locked" at once): retry it, bounded. This runs in the driver's thread, not the loop."""
    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == 99:
                raise
            time.sleep(0.05)


def _translate(error: Exception) -> PersistenceError:
    if isinstance(error, sa_exc.IntegrityError | sa_exc.DataError):
        return StorageRejected(str(error.orig if isinstance(error, sa_exc.DBAPIError) else error))
    # Everything else (connection refused or lost, pool timeout, lock timeout, a schema not
    # there yet) is treated as transient: the events stay in JetStream and come back.
    return StorageUnavailable(f"{type(error).__name__}: {error}")


@contextlib.asynccontextmanager
async def boundary() -> AsyncIterator[None]:
    """Let persistence_svc errors through; turn driver errors into them."""
    try:
        yield
    except PersistenceError:
        raise
    except (sa_exc.SQLAlchemyError, OSError) as error:
        raise _translate(error) from error
