"""THE one seam to the database: every statement on the data of persistence_svc runs here
(its driver set-up in database.py, the schema's in migrate.py and migrations/, rows turned
into messages in rows.py), and every driver error becomes a persistence_svc.errors error here.

Writes (`apply`) are idempotent and ordered by each task's seq (DESIGN.md, persistence_svc):
an event is recorded once by (task_id, seq), and a task's fields move only forward; what a
batch changes is decided by plan.py. Snapshots keep the latest one per active task
(snapshots.py). Reads return protobuf messages ready for the gRPC services.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Self

from alembic.util import CommandError as AlembicError
from google.protobuf.json_format import MessageToDict
from sqlalchemy import and_, bindparam, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from persistence_svc import migrate, models
from persistence_svc.cursor import Cursor
from persistence_svc.database import INSERTS, boundary, create_engine
from persistence_svc.errors import InvalidCursor, StorageRejected, StorageUnavailable
from persistence_svc.events import ParsedEvent, parse_event
from persistence_svc.plan import plan_batch
from persistence_svc.rows import (
    task_select,
    to_history_task,
    to_lifecycle_event,
    to_preferences,
    uuid_or_none,
)
from persistence_svc.snapshots import ParsedSnapshot, parse_snapshot, snapshot_from_json
from switchboard.v1 import events_pb2, history_pb2

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class ApplyResult:
    events_recorded: int  # new task_events rows (duplicates are not counted)
    tasks_changed: int
    snapshots_written: int = 0  # task_snapshots rows written (a newer one replaced)


@dataclass(frozen=True)
class SnapshotPage:
    snapshots: list[history_pb2.TaskSnapshot]  # in task id order
    next_cursor: str  # "" on the last page


@dataclass(frozen=True)
class TaskPage:
    tasks: list[history_pb2.HistoryTask]  # newest first
    next_cursor: Cursor | None  # None on the last page


class Repository:
    """Owns the engine. `await Repository.open(url)`; `await repo.close()` disposes the pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._insert = INSERTS[engine.dialect.name]
        self._schema_ready = False
        self._schema_lock = asyncio.Lock()

    @classmethod
    async def open(cls, url: str, *, create_schema: bool = True) -> Self:
        """Build the engine; migrate the schema to head now, and again before the first use if
        the database is down at start (the service starts whatever order things come up in).
        `create_schema=False`: leave the schema alone until the first use."""
        repo = cls(create_engine(url))
        if create_schema:
            try:
                await repo.ensure_schema()
            except StorageUnavailable as error:
                log.warning("database not ready at start", extra={"error": str(error)})
        return repo

    async def close(self) -> None:
        await self.engine.dispose()

    async def ensure_schema(self) -> None:
        """Apply the Alembic migrations (once per process; again later if the database was
        down). Concurrent starts are serialised by the migration lock (migrate.py)."""
        if self._schema_ready:
            return
        async with self._schema_lock:
            if self._schema_ready:
                return
            try:
                async with boundary():
                    await migrate.upgrade(self.engine.url)
            except StorageRejected as error:
                # A constraint error while migrating is not about any event: try again later.
                raise StorageUnavailable(f"schema migration failed: {error}") from error
            except AlembicError as error:
                # A database migrated by a newer release (a revision we do not know), or a
                # broken revision: loud, and retried, never a reason to drop events.
                raise StorageUnavailable(f"schema migration failed: {error}") from error
            self._schema_ready = True

    async def ping(self) -> None:
        async with boundary(), self.engine.connect() as conn:
            await conn.execute(select(1))

    # -- writes ---------------------------------------------------------------------------

    async def apply(
        self,
        events: Sequence[events_pb2.LifecycleEvent],
        snapshots: Sequence[history_pb2.TaskSnapshot] = (),
    ) -> ApplyResult:
        """Apply a batch of lifecycle events and published snapshots in ONE transaction: all
        of it is written, or none of it.

        Raises InvalidEvent (nothing written) for an event or snapshot that can never apply:
        check them one by one with `events.parse_event` / `snapshots.parse_snapshot` first.
        StorageUnavailable: retry later. StorageRejected: the data itself was refused; apply
        the items one by one to find it.
        """
        now = datetime.now(UTC)
        parsed: dict[tuple[uuid.UUID, int], ParsedEvent] = {}
        for message in events:
            one = parse_event(message, now)
            parsed.setdefault((one.task_id, one.seq), one)  # a duplicate within the batch
        published: dict[uuid.UUID, ParsedSnapshot] = {}
        for snapshot in snapshots:
            snap = parse_snapshot(snapshot, now)
            held = published.get(snap.task_id)
            if held is None or snap.replaces(held.seq):
                published[snap.task_id] = snap
        if not parsed and not published:
            return ApplyResult(0, 0)
        await self.ensure_schema()
        async with boundary(), self.engine.begin() as conn:
            return await self._apply(conn, list(parsed.values()), published, now)

    async def _apply(
        self,
        conn: AsyncConnection,
        batch: list[ParsedEvent],
        published: dict[uuid.UUID, ParsedSnapshot],
        now: datetime,
    ) -> ApplyResult:
        owners = {e.user_id for e in batch} | {snap.user_id for snap in published.values()}
        user_pks = await self._ensure_users(owners, conn, now)

        # FOR UPDATE (PostgreSQL; SQLite locks the whole file anyway): two consumers applying
        # events of one task serialise here, so the version check in the plan cannot race.
        task_ids = {e.task_id for e in batch} | set(published)
        rows = await conn.execute(
            select(models.tasks).where(models.tasks.c.id.in_(task_ids)).with_for_update()
        )
        existing = {row.id: dict(row._mapping) for row in rows}
        plan = plan_batch(existing, batch, published, user_pks, now)
        inserts, updates = plan.inserts, plan.updates

        if inserts:
            await conn.execute(models.tasks.insert(), inserts)
        if updates:
            # One executemany (pipelined by psycopg), not a statement per row.
            columns = [c.name for c in models.tasks.c if c.name not in ("id", "user_id")]
            await conn.execute(
                update(models.tasks)
                .where(models.tasks.c.id == bindparam("row_id"))
                .values({name: bindparam(name) for name in columns}),
                [{"row_id": row["id"], **{name: row[name] for name in columns}} for row in updates],
            )
        recorded = 0
        if batch:
            # executemany, not one multi-VALUES statement: SQLAlchemy caches the compiled
            # form ("insertmanyvalues" batches it), instead of compiling a new, longer
            # statement for every batch.
            result = await conn.execute(
                self._insert(models.task_events)
                .on_conflict_do_nothing(index_elements=["task_id", "seq"])
                # RETURNING (PostgreSQL, SQLite 3.35+): rowcount of a multi-row insert is not
                # reliable across drivers; the returned rows are exactly the new ones.
                .returning(models.task_events.c.seq),
                [
                    {
                        "task_id": e.task_id,
                        "seq": e.seq,
                        "kind": e.kind,
                        "status": e.status,
                        "at": e.at,
                        "payload": e.payload(),
                    }
                    for e in batch
                ],
            )
            recorded = len(result.all())
        written = await self._write_snapshots(conn, plan.keep)
        return ApplyResult(recorded, len(inserts) + len(updates), written)

    async def _ensure_users(
        self, external_ids: set[str], conn: AsyncConnection, now: datetime
    ) -> dict[str, uuid.UUID]:
        """The user row of each external id, created on first sight."""
        known = await self._user_pks(conn, external_ids)
        missing = external_ids - set(known)
        if not missing:
            return known
        await conn.execute(
            self._insert(models.users).on_conflict_do_nothing(index_elements=["external_id"]),
            [
                {
                    "id": uuid.uuid4(),
                    "external_id": ext,
                    "name": ext,
                    "email": None,
                    "preferences": {},
                    "created_at": now,
                    "updated_at": now,
                }
                for ext in sorted(missing)
            ],
        )
        # Read back: a concurrent writer may have created some of them first.
        return known | await self._user_pks(conn, missing)

    async def _user_pks(
        self, conn: AsyncConnection, external_ids: set[str]
    ) -> dict[str, uuid.UUID]:
        rows = await conn.execute(
            select(models.users.c.external_id, models.users.c.id).where(
                models.users.c.external_id.in_(external_ids)
            )
        )
        return {ext: pk for ext, pk in rows}

    async def _write_snapshots(
        self, conn: AsyncConnection, keep: dict[uuid.UUID, ParsedSnapshot | None]
    ) -> int:
        """Drop the snapshots of ended tasks; store each candidate that is newer than the
        stored one (snapshots.ParsedSnapshot.replaces). Returns how many were stored."""
        ended = [task_id for task_id, snap in keep.items() if snap is None]
        if ended:
            await conn.execute(
                delete(models.task_snapshots).where(models.task_snapshots.c.task_id.in_(ended))
            )
        candidates = {task_id: snap for task_id, snap in keep.items() if snap is not None}
        if not candidates:
            return 0
        stored = await conn.execute(
            select(models.task_snapshots.c.task_id, models.task_snapshots.c.seq)
            .where(models.task_snapshots.c.task_id.in_(candidates))
            .with_for_update()
        )
        stored_seq: dict[uuid.UUID, int] = {task_id: seq for task_id, seq in stored}
        newer = [
            snap for snap in candidates.values() if snap.replaces(stored_seq.get(snap.task_id))
        ]
        if not newer:
            return 0
        await conn.execute(
            delete(models.task_snapshots).where(
                models.task_snapshots.c.task_id.in_([snap.task_id for snap in newer])
            )
        )
        await conn.execute(
            models.task_snapshots.insert(),
            [
                {
                    "task_id": snap.task_id,
                    "seq": snap.seq,
                    "state": snap.state_json(),
                    "taken_at": snap.taken_at,
                }
                for snap in newer
            ],
        )
        return len(newer)

    # -- reads ----------------------------------------------------------------------------

    async def get_task(self, task_id: str, user_id: str) -> history_pb2.HistoryTask | None:
        """The task if it exists AND belongs to `user_id` (external id); else None, so that
        another user's task looks exactly like a missing one."""
        pk = uuid_or_none(task_id)
        if pk is None:
            return None
        await self.ensure_schema()
        async with boundary(), self.engine.connect() as conn:
            row = (
                await conn.execute(
                    task_select().where(
                        models.tasks.c.id == pk, models.users.c.external_id == user_id
                    )
                )
            ).first()
        return None if row is None else to_history_task(row)

    async def list_tasks(
        self, user_id: str, page_size: int = 0, after: Cursor | None = None
    ) -> TaskPage:
        """A user's tasks, newest first (created_at, then id, descending), one page at a time."""
        size = min(page_size, MAX_PAGE_SIZE) if page_size > 0 else DEFAULT_PAGE_SIZE
        query = task_select().where(models.users.c.external_id == user_id)
        if after is not None:
            # Keyset pagination: stable while rows are added, no OFFSET scan.
            query = query.where(
                or_(
                    models.tasks.c.created_at < after.created_at,
                    and_(
                        models.tasks.c.created_at == after.created_at,
                        models.tasks.c.id < after.task_id,
                    ),
                )
            )
        query = query.order_by(models.tasks.c.created_at.desc(), models.tasks.c.id.desc())
        await self.ensure_schema()
        async with boundary(), self.engine.connect() as conn:
            rows = (await conn.execute(query.limit(size + 1))).all()
        page = rows[:size]
        next_cursor = None
        if len(rows) > size:
            last = page[-1]
            next_cursor = Cursor(last.created_at, last.id)
        return TaskPage([to_history_task(row) for row in page], next_cursor)

    async def get_task_events(
        self, task_id: str, user_id: str
    ) -> list[events_pb2.LifecycleEvent] | None:
        """The task's event trail in seq order, or None if not found for this user."""
        pk = uuid_or_none(task_id)
        if pk is None:
            return None
        await self.ensure_schema()
        owned = (
            select(models.tasks.c.id)
            .join(models.users, models.users.c.id == models.tasks.c.user_id)
            .where(models.tasks.c.id == pk, models.users.c.external_id == user_id)
        )
        async with boundary(), self.engine.connect() as conn:
            if (await conn.execute(owned)).first() is None:
                return None
            rows = await conn.execute(
                select(models.task_events.c.payload)
                .where(models.task_events.c.task_id == pk)
                .order_by(models.task_events.c.seq)
            )
            payloads = list(rows.scalars())
        return [to_lifecycle_event(payload) for payload in payloads]

    async def list_snapshots(
        self, task_ids: Sequence[str] = (), page_size: int = 0, cursor: str = ""
    ) -> SnapshotPage:
        """The latest snapshot of every active task (or of `task_ids`), in task id order, a
        page at a time; `cursor` is the previous page's next_cursor (the last task id)."""
        size = min(page_size, MAX_PAGE_SIZE) if page_size > 0 else DEFAULT_PAGE_SIZE
        query = select(models.task_snapshots.c.task_id, models.task_snapshots.c.state)
        if task_ids:
            wanted = [pk for pk in map(uuid_or_none, task_ids) if pk is not None]
            query = query.where(models.task_snapshots.c.task_id.in_(wanted))
        if cursor:
            after = uuid_or_none(cursor)
            if after is None:
                raise InvalidCursor("not a cursor from this service")
            query = query.where(models.task_snapshots.c.task_id > after)
        query = query.order_by(models.task_snapshots.c.task_id).limit(size + 1)
        await self.ensure_schema()
        async with boundary(), self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        page = rows[:size]
        next_cursor = str(page[-1].task_id) if len(rows) > size else ""
        return SnapshotPage([snapshot_from_json(row.state) for row in page], next_cursor)

    async def get_preferences(self, user_id: str) -> history_pb2.Preferences:
        """A user's preferences (external id); the user row is created on first sight."""
        await self.ensure_schema()
        async with boundary(), self.engine.begin() as conn:
            await self._ensure_users({user_id}, conn, datetime.now(UTC))
            stored = (
                await conn.execute(
                    select(models.users.c.preferences).where(models.users.c.external_id == user_id)
                )
            ).scalar_one()
        return to_preferences(stored)

    async def set_preferences(
        self, user_id: str, preferences: history_pb2.Preferences
    ) -> history_pb2.Preferences:
        """Replace a user's preferences as a whole; returns what is stored."""
        value = MessageToDict(preferences, preserving_proto_field_name=True)
        now = datetime.now(UTC)
        await self.ensure_schema()
        async with boundary(), self.engine.begin() as conn:
            await self._ensure_users({user_id}, conn, now)
            await conn.execute(
                update(models.users)
                .where(models.users.c.external_id == user_id)
                .values(preferences=value, updated_at=now)
            )
        return to_preferences(value)
