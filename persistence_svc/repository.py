"""THE one seam to the database: every statement on the data of persistence_svc runs here
(its driver set-up in database.py, the schema's in migrate.py and migrations/, rows turned
into messages in rows.py), and every driver error becomes a persistence_svc.errors error here.

Writes (`apply_parsed`, or `apply` from messages) are idempotent and ordered by each task's
seq (docs/architecture.md, persistence_svc): an event is recorded once by (task_id, seq), and
a task's fields move only forward; what a batch changes is decided by plan.py. A batch costs
the same few statements whatever its size: lock its task rows, one upsert of the changed rows,
look up the tombstones of the tasks it created (deleted_tasks: a deleted task's late events
are dropped, never written again), one insert of the events (and, for owners this process
has not seen yet, their lookup). Reads return protobuf messages ready for the gRPC services.

Deletes (`delete_task`, `delete_all_tasks`) remove a task's row and its trail and leave its
tombstone, for the deleting user only, in one transaction on the writers' connection: in this
process they take turns with the batches. Across processes, a delete and a batch meet on the
task's row: the delete locks the rows it removes in id order, as a batch does, and claims the
id of a task with no row yet by inserting a stand-in row (removed in the same transaction),
which waits for a batch creating that task, or makes the batch wait (see `_claim`).
Tombstones are pruned once no event of theirs can arrive any more (`prune_tombstones`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

from alembic.util import CommandError as AlembicError
from sqlalchemy import and_, bindparam, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from persistence_svc import migrate, models
from persistence_svc.cursor import Cursor
from persistence_svc.database import INSERTS, boundary, create_engine, in_list
from persistence_svc.errors import StorageRejected, StorageUnavailable, WriteConflict
from persistence_svc.events import STATUS_NAMES, ParsedEvent, parse_event
from persistence_svc.known_users import KnownUsers
from persistence_svc.plan import plan_batch
from persistence_svc.rows import (
    preferences_json,
    task_select,
    to_history_task,
    to_lifecycle_event,
    to_preferences,
    uuid_or_none,
)
from switchboard.v1 import events_pb2, history_pb2

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Task ids per statement when deleting: SQLite caps a statement's parameters (32 766), and a
# user may have more tasks than that.
DELETE_CHUNK = 1000
# Tombstones removed per transaction when pruning: each holds the writers' lock briefly.
PRUNE_CHUNK = 1000
# The columns an upsert of a task row writes: all but its identity and its owner.
_TASK_FIELDS = tuple(c.name for c in models.tasks.c if c.name not in ("id", "user_id"))


@dataclass(frozen=True)
class ApplyResult:
    events_recorded: int  # new task_events rows (duplicates are not counted)
    tasks_changed: int  # task rows created or updated
    events_dropped: int = 0  # events of deleted (tombstoned) tasks: settled, not written


@dataclass(frozen=True)
class _Removal:
    rows: int  # task rows removed
    tombstoned: int  # tombstones left that were not there before


@dataclass(frozen=True)
class TaskPage:
    tasks: list[history_pb2.HistoryTask]  # newest first
    next_cursor: Cursor | None  # None on the last page


class _WriteStatements:
    """The write path's statements, built once per dialect: SQLAlchemy then finds each in its
    compiled cache instead of building and compiling a new one per batch, and the texts stay
    short and fixed (psycopg converts them once; the server prepares them)."""

    def __init__(self, dialect: str) -> None:
        insert = INSERTS[dialect]
        tasks, events, users = models.tasks, models.task_events, models.users
        deleted = models.deleted_tasks
        # preserve_rowcount: the summed rowcount of an executemany, read before SQLAlchemy
        # closes the cursor (without it psycopg's reads as -1); cheaper than RETURNING,
        # which would turn each executemany into one long statement built per batch.
        counted = {"preserve_rowcount": True}
        # FOR UPDATE (PostgreSQL; on SQLite the writers hold the file's write lock from the
        # start, see Repository._write_transaction): two consumers applying events of one
        # task serialise here, so the version check in the plan cannot race. In id order,
        # so that two batches sharing tasks lock them in the same order and cannot deadlock.
        self.lock_tasks = (
            select(tasks)
            .where(in_list(tasks.c.id, "ids", dialect))
            .order_by(tasks.c.id)
            .with_for_update()
        )
        # The rows we locked are ours to overwrite; a row that did not exist when we read
        # may have been created since by another writer, which we must not overwrite:
        # `read_version` guards both (plan.NEW_TASK matches no row), and a row left
        # unwritten shows in the rowcount.
        upsert = insert(tasks)
        self.upsert_tasks = upsert.on_conflict_do_update(
            index_elements=[tasks.c.id],
            set_={name: upsert.excluded[name] for name in _TASK_FIELDS},
            where=tasks.c.version == bindparam("read_version"),
        ).execution_options(**counted)
        self.insert_events = (
            insert(events)
            .on_conflict_do_nothing(index_elements=["task_id", "seq"])
            .execution_options(**counted)
        )
        self.find_deleted = select(deleted.c.task_id, deleted.c.user_id).where(
            in_list(deleted.c.task_id, "ids", dialect)
        )
        # The deletes (see Repository._remove). A stand-in row claims a task id with no row.
        self.claim_tasks = (
            insert(tasks).on_conflict_do_nothing(index_elements=[tasks.c.id]).returning(tasks.c.id)
        )
        self.insert_tombstones = (
            insert(deleted)
            .on_conflict_do_nothing(index_elements=["task_id", "user_id"])
            .execution_options(**counted)
        )
        self.delete_events = delete(events).where(in_list(events.c.task_id, "ids", dialect))
        self.delete_tasks = delete(tasks).where(in_list(tasks.c.id, "ids", dialect))
        self.find_users = select(users.c.external_id, users.c.id).where(
            in_list(users.c.external_id, "external_ids", dialect)
        )
        self.insert_users = insert(users).on_conflict_do_nothing(index_elements=["external_id"])


class Repository:
    """Owns the engine. `await Repository.open(url)`; `await repo.close()` disposes the pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sql = _WriteStatements(engine.dialect.name)
        self._sqlite = engine.dialect.name == "sqlite"
        self._users = KnownUsers()
        self._writer: AsyncConnection | None = None  # see _write_transaction
        self._writer_lock = asyncio.Lock()
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
        async with self._writer_lock:
            await self._drop_writer()
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

    async def apply(self, events: Sequence[events_pb2.LifecycleEvent]) -> ApplyResult:
        """Check and apply lifecycle events as they come off the wire (tests, tools; the
        consumer checks each message as it decodes it and calls `apply_parsed`).

        Raises InvalidEvent, with nothing written, if any event can never apply (check them
        one by one with `events.parse_event` first); otherwise as `apply_parsed`.
        """
        now = datetime.now(UTC)
        return await self.apply_parsed([parse_event(message, now) for message in events])

    async def apply_parsed(self, events: Sequence[ParsedEvent]) -> ApplyResult:
        """Apply a batch of checked lifecycle events in ONE transaction: all of it is written,
        or none of it.

        StorageUnavailable (WriteConflict included): retry later. StorageRejected: the data
        itself was refused; apply the events one by one to find the one.
        """
        unique: dict[tuple[uuid.UUID, int], ParsedEvent] = {}
        for one in events:
            unique.setdefault((one.task_id, one.seq), one)  # a duplicate within the batch
        if not unique:
            return ApplyResult(0, 0)
        batch = list(unique.values())
        now = datetime.now(UTC)
        await self.ensure_schema()
        try:
            async with boundary(), self._write_transaction() as conn:
                result, owners = await self._write(conn, batch, now)
        except StorageRejected:
            # A cached owner that is gone (a database restored under us) would be refused by
            # the foreign key on every retry: look the owners up again.
            self._users.forget()
            raise
        self._users.remember(owners)  # committed: from now on these keys exist for good
        return result

    @contextlib.asynccontextmanager
    async def _write_transaction(self) -> AsyncIterator[AsyncConnection]:
        """A transaction on the connection the writes keep from batch to batch.

        A pool checkout per batch would cost a round trip of its own (pool_pre_ping) and the
        pool's bookkeeping, on every batch. Kept, the connection is never tested before use:
        instead, any failure throws it away, so a database restart costs one batch that is
        nak'ed and redelivered (nothing was acked), and the next batch connects afresh.

        On SQLite the transaction takes the write lock first (BEGIN IMMEDIATE): pysqlite would
        begin it only at the first INSERT, leaving the reads before it (the task rows, the
        tombstones) outside it, so that another process's delete committed in between would
        be undone by the upsert. PostgreSQL locks the rows themselves (FOR UPDATE).
        """
        async with self._writer_lock:
            if self._writer is None:
                self._writer = await self.engine.connect()
            try:
                async with self._writer.begin():
                    if self._sqlite:
                        await self._writer.exec_driver_sql("BEGIN IMMEDIATE")
                    yield self._writer
            except BaseException:
                await self._drop_writer()
                raise

    async def _drop_writer(self) -> None:
        conn, self._writer = self._writer, None
        if conn is not None:
            # invalidate, not a return to the pool: the connection may be dead, and its
            # reset would fail (and be logged) there.
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def _write(
        self, conn: AsyncConnection, batch: list[ParsedEvent], now: datetime
    ) -> tuple[ApplyResult, dict[str, uuid.UUID]]:
        owners, missing = self._users.split({e.user_id for e in batch})
        if missing:
            owners |= await self._ensure_users(missing, conn, now)
        sql = self._sql
        task_ids = list({e.task_id for e in batch})
        rows = await conn.execute(sql.lock_tasks, {"ids": task_ids})
        existing = {row.id: dict(row._mapping) for row in rows}
        unseen = [task_id for task_id in task_ids if task_id not in existing]
        plan = plan_batch(existing, batch, owners, now)  # adds the rows of the unseen tasks
        written = 0
        if plan.rows:
            # One executemany (pipelined by psycopg) for new and changed rows alike.
            written = (await conn.execute(sql.upsert_tasks, plan.rows)).rowcount
            if written != len(plan.rows):
                raise WriteConflict(
                    f"{len(plan.rows) - written} task row(s) created by another writer "
                    "since this batch read them"
                )
        dropped = 0
        # A task with a row has no tombstone of its owner (a delete removes the row and
        # leaves the tombstone at once, and a batch never keeps a row it finds tombstoned
        # here), so only the tasks this batch created are looked up; after the upsert: a
        # delete that claimed one of them (Repository._claim) has committed by now, and
        # its tombstone shows.
        dead = await self._deleted_by_owner(conn, unseen, existing) if unseen else set()
        if dead:
            await conn.execute(sql.delete_tasks, {"ids": list(dead)})
            kept = [e for e in batch if e.task_id not in dead]
            dropped, batch, written = len(batch) - len(kept), kept, written - len(dead)
            log.info(
                "dropping lifecycle events of deleted tasks",
                extra={"events": dropped, "tasks": len(dead)},
            )
        recorded = 0
        if batch:
            result = await conn.execute(sql.insert_events, [_event_row(e) for e in batch])
            recorded = result.rowcount
        return ApplyResult(recorded, written, dropped), owners

    async def _deleted_by_owner(
        self,
        conn: AsyncConnection,
        task_ids: list[uuid.UUID],
        rows: dict[uuid.UUID, dict[str, Any]],
    ) -> set[uuid.UUID]:
        """Those of `task_ids` that their row's owner deleted. Another user's tombstone of the
        same id (a delete of an id that user does not own) is no reason to drop anything."""
        found = await conn.execute(self._sql.find_deleted, {"ids": task_ids})
        return {task_id for task_id, user_pk in found if rows[task_id]["user_id"] == user_pk}

    # -- deletes --------------------------------------------------------------------------

    async def delete_task(self, task_id: str, user_id: str) -> bool:
        """Remove the task of `user_id` (external id) for good: its row, its trail, and a
        tombstone so that its late events are dropped. True when the user had such a task
        (removed now, or by an earlier call: a retry). False when history holds no task of
        theirs under this id; the tombstone is left all the same, for this user only, since
        such a task may still be on its way (deleted before its first event was written):
        its events are dropped when they come. Another user's task is never touched: events
        are dropped only under the tombstone of their own user."""
        pk = uuid_or_none(task_id)
        if pk is None:
            return False
        await self.ensure_schema()
        tasks, deleted = models.tasks, models.deleted_tasks
        now = datetime.now(UTC)
        async with boundary(), self._write_transaction() as conn:
            owner = await self._user_pk(conn, user_id, now)
            earlier = select(deleted.c.confirmed).where(
                deleted.c.task_id == pk, deleted.c.user_id == owner
            )
            confirmed_before = bool((await conn.execute(earlier)).scalar())
            own = select(tasks.c.id).where(tasks.c.id == pk, tasks.c.user_id == owner)
            removal = await self._remove(conn, owner, own, [pk], now, confirmed=False)
            return removal.rows > 0 or confirmed_before

    async def delete_all_tasks(self, user_id: str, in_flight: Collection[str] = ()) -> int:
        """Remove every task of `user_id` as `delete_task` does, in one transaction, and
        tombstone `in_flight` too: the ids of the user's tasks whose events are on their way
        (not written yet; service.HistoryService finds them in JetStream), so that those
        tasks never show either. How many tasks were removed: rows, and in-flight tasks not
        deleted before (a task created while this runs is not among them)."""
        ids = [pk for pk in map(uuid_or_none, in_flight) if pk is not None]
        await self.ensure_schema()
        now = datetime.now(UTC)
        async with boundary(), self._write_transaction() as conn:
            if not ids and await self._owner(conn, user_id) is None:
                return 0  # nothing of theirs: no user row made for it
            owner = await self._user_pk(conn, user_id, now)
            owned = select(models.tasks.c.id).where(models.tasks.c.user_id == owner)
            removal = await self._remove(conn, owner, owned, ids, now, confirmed=True)
            return removal.tombstoned

    async def _owner(self, conn: AsyncConnection, user_id: str) -> uuid.UUID | None:
        """users.id of an external id, or None."""
        query = select(models.users.c.id).where(models.users.c.external_id == user_id)
        pk: uuid.UUID | None = (await conn.execute(query)).scalar()
        return pk

    async def _user_pk(self, conn: AsyncConnection, user_id: str, now: datetime) -> uuid.UUID:
        """users.id of an external id, created on first sight: a user whose first task is
        deleted before any of its events is written needs a row for its tombstone."""
        return (await self._ensure_users({user_id}, conn, now))[user_id]

    async def _remove(
        self,
        conn: AsyncConnection,
        owner: uuid.UUID,
        which: Any,
        claims: Sequence[uuid.UUID],
        now: datetime,
        *,
        confirmed: bool,
    ) -> _Removal:
        """Remove the task rows `which` selects and their events, and tombstone them and
        `claims` (task ids that may have no row yet) for `owner`. A tombstone is
        `confirmed` when it removed a row, or when `confirmed` says the claims are known
        tasks of the owner.

        The rows are locked in id order, then the claims inserted, as a batch locks its rows
        and then inserts (so that the two cannot deadlock); locked again then, for the rows
        of claims that a batch committed meanwhile. Locked, a row cannot change under us,
        and a batch that waited for it then finds it gone and its tombstone there."""
        tasks, sql = models.tasks, self._sql
        lock = which.order_by(tasks.c.id).with_for_update()
        locked = list((await conn.execute(lock)).scalars())
        stand_ins = await self._claim(conn, owner, claims, now)
        if claims:
            locked = list((await conn.execute(lock)).scalars())
        rows = {pk for pk in locked if pk not in stand_ins}
        known = rows | set(claims) if confirmed else rows
        ids = sorted({*locked, *claims})
        tombstoned = 0
        for start in range(0, len(ids), DELETE_CHUNK):
            chunk = ids[start : start + DELETE_CHUNK]
            tombstones = [
                {"task_id": pk, "user_id": owner, "deleted_at": now, "confirmed": pk in known}
                for pk in chunk
            ]
            tombstoned += (await conn.execute(sql.insert_tombstones, tombstones)).rowcount
            with_rows = [pk for pk in chunk if pk in rows or pk in stand_ins]
            if with_rows:
                await conn.execute(sql.delete_events, {"ids": with_rows})  # they refer to it
                await conn.execute(sql.delete_tasks, {"ids": with_rows})
        return _Removal(len(rows), tombstoned)

    async def _claim(
        self, conn: AsyncConnection, owner: uuid.UUID, task_ids: Sequence[uuid.UUID], now: datetime
    ) -> set[uuid.UUID]:
        """Insert a stand-in row for each of `task_ids` that has none; the ids inserted. The
        stand-ins go with the rows `_remove` deletes: no one else ever sees them.

        Why (PostgreSQL; on SQLite the writers take turns on the file's lock): a task with no
        row has nothing to lock, and a batch creating it while we tombstone it would not see
        our tombstone (read before our commit) nor we its row (not committed when we look),
        and the task would stay. Inserting its id meets the batch on the primary key: our
        insert waits for a batch that inserted it first, after which we delete its row like
        any other; or the batch's insert waits for our commit, and its tombstone check, made
        after its insert (Repository._write), finds our tombstone."""
        if not task_ids:
            return set()
        stand_in = {"user_id": owner, "status": "queued", "created_at": now, "updated_at": now}
        inserted = await conn.execute(
            self._sql.claim_tasks, [{"id": pk, **stand_in} for pk in sorted(task_ids)]
        )
        return set(inserted.scalars())

    async def prune_tombstones(self, older_than: datetime, *, chunk: int = PRUNE_CHUNK) -> int:
        """Remove the tombstones of deletes made before `older_than`, at most `chunk` per
        transaction (each a short hold of the writers' lock); how many were removed."""
        deleted = models.deleted_tasks
        oldest = select(deleted.c.task_id).where(deleted.c.deleted_at < older_than).limit(chunk)
        prune = delete(deleted).where(
            deleted.c.deleted_at < older_than, deleted.c.task_id.in_(oldest)
        )
        await self.ensure_schema()
        pruned = 0
        while True:
            async with boundary(), self._write_transaction() as conn:
                removed = (await conn.execute(prune)).rowcount
            pruned += removed
            if removed < chunk:
                return pruned
            await asyncio.sleep(0)  # let a batch waiting for the lock go first

    async def _ensure_users(
        self, external_ids: set[str], conn: AsyncConnection, now: datetime
    ) -> dict[str, uuid.UUID]:
        """The user row of each external id, created on first sight."""
        known = await self._user_pks(conn, external_ids)
        missing = external_ids - set(known)
        if not missing:
            return known
        await conn.execute(
            self._sql.insert_users,
            [
                {
                    "id": uuid.uuid4(),
                    "external_id": ext,
                    "name": "",  # until the user gives one (set_preferences)
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
        rows = await conn.execute(self._sql.find_users, {"external_ids": list(external_ids)})
        return {ext: pk for ext, pk in rows}

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
        self,
        user_id: str,
        page_size: int = 0,
        after: Cursor | None = None,
        *,
        status: str = "",
        preview_chars: int = 0,
    ) -> TaskPage:
        """A user's tasks, newest first (created_at, then id, descending), one page at a time.

        `status` (a stored status name, "" for all) filters in the query itself, so that the
        pages, and the cursor continuing after the last row, hold only that status.
        `preview_chars` > 0 cuts each response in the query (rows.task_select)."""
        size = min(page_size, MAX_PAGE_SIZE) if page_size > 0 else DEFAULT_PAGE_SIZE
        query = task_select(preview_chars).where(models.users.c.external_id == user_id)
        if status:
            query = query.where(models.tasks.c.status == status)
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

    async def count_tasks(self, user_id: str) -> dict[str, int]:
        """A user's tasks by stored status name, in one GROUP BY; every status is present
        (0 when the user has none), so a caller need not know which ones exist."""
        tasks = models.tasks
        query = (
            select(tasks.c.status, func.count())
            .join(models.users, models.users.c.id == tasks.c.user_id)
            .where(models.users.c.external_id == user_id)
            .group_by(tasks.c.status)
        )
        await self.ensure_schema()
        async with boundary(), self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        counts = dict.fromkeys(STATUS_NAMES.values(), 0)
        counts.update({status: int(n) for status, n in rows})
        return counts

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

    async def get_preferences(self, user_id: str) -> history_pb2.Preferences:
        """A user's preferences, name and email (external id); empty for a user never seen.
        A read only: it writes nothing, so it never waits for the database's write lock,
        which the history consumer holds for its batches (on SQLite, reads that created the
        user's row queued behind them: 300 new users' first llm_generate acks, which read
        the default model, waited 2.5 s at the median and up to the gateway's 5 s timeout)."""
        users = models.users
        await self.ensure_schema()
        query = select(users.c.preferences, users.c.name, users.c.email).where(
            users.c.external_id == user_id
        )
        async with boundary(), self.engine.connect() as conn:
            row = (await conn.execute(query)).one_or_none()
        if row is None:
            return history_pb2.Preferences()
        stored, name, email = row
        return to_preferences(stored, name, email)

    async def set_preferences(
        self, user_id: str, preferences: history_pb2.Preferences
    ) -> history_pb2.Preferences:
        """Replace a user's preferences, name and email as a whole; returns what is stored."""
        value = preferences_json(preferences)
        email = preferences.email or None  # none given: NULL, as for a user never asked
        now = datetime.now(UTC)
        await self.ensure_schema()
        async with boundary(), self.engine.begin() as conn:
            await self._ensure_users({user_id}, conn, now)
            await conn.execute(
                update(models.users)
                .where(models.users.c.external_id == user_id)
                .values(preferences=value, name=preferences.name, email=email, updated_at=now)
            )
        return to_preferences(value, preferences.name, email)


def _event_row(event: ParsedEvent) -> dict[str, Any]:
    return {
        "task_id": event.task_id,
        "seq": event.seq,
        "kind": event.kind,
        "status": event.status,
        "at": event.at,
        "payload": event.payload(),
    }
