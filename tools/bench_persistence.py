"""`make bench`, persistence part: lifecycle events per second written to PostgreSQL through
the real path (JetStream durable consumer → batched, idempotent repository transaction), beside
a bare batched INSERT loop of rows of the same shape into the same database, in the same run.

    .venv/bin/python -m tools.bench_persistence [--events 15000] [--postgres-url URL]

Both use a fresh database, dropped afterwards. The ratio says what the real path costs over
the floor: per batch it also creates users, locks and updates task rows.

A second part measures the live case, where events trickle in and each message is a batch of
its own (as in the running stack): the consumer's own CPU per generation (QUEUED, STARTED, one
task_svc snapshot, COMPLETED), beside a consumer that only fetches and acks. The consumer runs
in a thread of its own there, so that `time.thread_time()` counts its work and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import uvloop
from psycopg import sql
from sqlalchemy.engine import make_url

from persistence_svc.consumer import EventConsumer
from persistence_svc.events import ParsedEvent, parse_event
from persistence_svc.repository import ApplyResult, Repository
from svckit.nats import connect_nats, ensure_stream, task_events_stream_config
from switchboard.v1 import common_pb2, events_pb2, history_pb2
from tools.natsserver import start_nats

DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
BATCH_SIZE = 256  # the consumer's default (PERSISTENCE_BATCH_SIZE)
LIVE_GENERATIONS = 150
Kind = events_pb2.LifecycleKind


def lifecycle_events(count: int) -> list[events_pb2.LifecycleEvent]:
    """`count` events, three per task (QUEUED, STARTED, COMPLETED), as task_svc publishes."""
    t0 = datetime(2026, 11, 29, tzinfo=UTC)
    events: list[events_pb2.LifecycleEvent] = []
    for index in range((count + 2) // 3):
        task_id, user = str(uuid.uuid4()), f"user-{index % 50}"
        for seq, kind, status in (
            (1, Kind.LIFECYCLE_KIND_QUEUED, common_pb2.TASK_STATUS_QUEUED),
            (2, Kind.LIFECYCLE_KIND_STARTED, common_pb2.TASK_STATUS_PROCESSING),
            (9, Kind.LIFECYCLE_KIND_COMPLETED, common_pb2.TASK_STATUS_COMPLETED),
        ):
            event = events_pb2.LifecycleEvent(
                task_id=task_id,
                user_id=user,
                seq=seq,
                kind=kind,
                status=status,
                prompt="Why is the sky blue?",
                model="local-small",
                priority=1,
                attempt=1,
            )
            if kind == Kind.LIFECYCLE_KIND_COMPLETED:
                event.content = "Rayleigh scattering: shorter wavelengths scatter more."
                event.usage.CopyFrom(common_pb2.Usage(prompt_tokens=6, completion_tokens=9))
            event.at.FromDatetime(t0 + timedelta(milliseconds=index * 10 + seq))
            events.append(event)
    return events[:count]


def libpq_url(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


@asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A new database on the server of `admin_url`; yields its libpq URL; dropped after."""
    name = f"sb_bench_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield libpq_url(admin_url, name)
    finally:
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


async def bare_insert_rate(url: str, events: list[events_pb2.LifecycleEvent]) -> float:
    """Rows/s of a bare loop: executemany of task_events-shaped rows, one transaction per
    batch of BATCH_SIZE: the floor of what any consumer can write."""
    rows = []
    for event in events:
        parsed = parse_event(event)
        rows.append(
            (
                parsed.task_id,
                parsed.seq,
                parsed.kind,
                parsed.status,
                parsed.at,
                json.dumps(parsed.payload()),
            )
        )
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute(
            "CREATE TABLE bench_floor (task_id uuid, seq bigint, kind varchar(16),"
            " status varchar(16), at timestamptz, payload json, PRIMARY KEY (task_id, seq))"
        )
        await conn.commit()
        started = time.perf_counter()
        for start in range(0, len(rows), BATCH_SIZE):
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO bench_floor VALUES (%s, %s, %s, %s, %s, %s)",
                    rows[start : start + BATCH_SIZE],
                )
            await conn.commit()
        return len(rows) / (time.perf_counter() - started)


def subject(event: events_pb2.LifecycleEvent) -> str:
    return f"switchboard.tasks.{event.task_id}.{Kind.Name(event.kind)[15:].lower()}"


async def consumer_rate(url: str, events: list[events_pb2.LifecycleEvent]) -> tuple[float, float]:
    """Events/s, and CPU seconds per event, from the consumer's start until every event
    (published beforehand to a real nats-server) is applied and acked."""
    with tempfile.TemporaryDirectory(prefix="sb-bench-nats-") as store:
        nats = await start_nats(Path(store))
        nc = await connect_nats(nats.url, "bench-persistence")
        sqlalchemy_url = make_url(url).set(drivername="postgresql+psycopg")
        repository = await Repository.open(sqlalchemy_url.render_as_string(hide_password=False))
        try:
            js = nc.jetstream()
            await ensure_stream(js, task_events_stream_config())
            for start in range(0, len(events), 500):
                await asyncio.gather(
                    *(
                        js.publish(
                            subject(e),
                            e.SerializeToString(),
                            headers={"Nats-Msg-Id": f"{e.task_id}:{e.seq}"},
                        )
                        for e in events[start : start + 500]
                    )
                )
            consumer = EventConsumer(nc, repository, batch_size=BATCH_SIZE, fetch_timeout_s=0.2)
            await consumer.start()
            started, cpu_started = time.perf_counter(), time.process_time()
            runner = asyncio.create_task(consumer.run(), name="bench-consumer")
            # Polling every 5 ms: the stats are plain counters, and 5 ms is noise beside the
            # seconds the run takes.
            while consumer.stats.acked < len(events) and not runner.done():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            consumer.stop()
            await runner
            if consumer.stats.acked < len(events):
                raise RuntimeError(f"consumer stopped at {consumer.stats.acked} events")
            return len(events) / elapsed, cpu / len(events)
        finally:
            await repository.close()
            await nc.close()
            nats.stop()


class NoDatabase(Repository):
    """The live floor: a repository that writes nothing, so the consumer only fetches and acks."""

    async def apply_parsed(self, events: Sequence[ParsedEvent]) -> ApplyResult:
        return ApplyResult(0, 0)


def live_messages(generations: int) -> list[tuple[str, bytes]]:
    """(subject, data) in publishing order: per generation QUEUED, STARTED, a snapshot of the
    running task as task_svc checkpoints it, COMPLETED."""
    messages: list[tuple[str, bytes]] = []
    events = lifecycle_events(generations * 3)
    for index in range(0, len(events), 3):
        queued, started, done = events[index : index + 3]
        snapshot = history_pb2.TaskSnapshot(
            state=common_pb2.TaskState(
                task_id=started.task_id,
                user_id=started.user_id,
                status=common_pb2.TASK_STATUS_PROCESSING,
                progress=0.5,
                content="Rayleigh scattering: shorter",
                model=started.model,
                seq=5,
                prompt=started.prompt,
            )
        )
        messages += [(subject(e), e.SerializeToString()) for e in (queued, started)]
        messages.append(
            (f"switchboard.tasks.{started.task_id}.snapshot", snapshot.SerializeToString())
        )
        messages.append((subject(done), done.SerializeToString()))
    return messages


@dataclass
class LiveConsumer:
    """A consumer running in a thread of its own (`run`), shared with the publisher's thread:
    it reads `acked()` and calls `stop()`; `cpu_s` is the thread's CPU while it consumed."""

    nats_url: str
    database_url: str | None  # None: the no-database floor
    ready: threading.Event = field(default_factory=threading.Event)
    cpu_s: float = 0.0
    _consumer: EventConsumer | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None

    def acked(self) -> int:
        return self._consumer.stats.acked if self._consumer is not None else 0

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def run(self) -> None:
        uvloop.run(self._consume())

    async def _consume(self) -> None:
        nc = await connect_nats(self.nats_url, "bench-live-consumer")
        if self.database_url is None:
            repository: Repository = await NoDatabase.open(
                "sqlite+aiosqlite:///:memory:", create_schema=False
            )
        else:
            repository = await Repository.open(self.database_url)
        consumer = EventConsumer(nc, repository, fetch_timeout_s=0.2)
        await consumer.start()
        self._consumer, self._loop, self._stop = (
            consumer,
            asyncio.get_running_loop(),
            asyncio.Event(),
        )
        started = time.thread_time()
        runner = asyncio.create_task(consumer.run())
        self.ready.set()
        await self._stop.wait()
        self.cpu_s = time.thread_time() - started
        consumer.stop()
        await runner
        await repository.close()
        await nc.close()


async def live_cpu_per_generation(
    url: str | None, messages: Sequence[tuple[str, bytes]], generations: int
) -> float:
    """The consumer's CPU seconds per generation, each message published once the previous
    one is acked (one message per batch). `url` None: the no-database floor."""
    with tempfile.TemporaryDirectory(prefix="sb-bench-nats-") as store:
        nats = await start_nats(Path(store))
        nc = await connect_nats(nats.url, "bench-live-publisher")
        try:
            js = nc.jetstream()
            await ensure_stream(js, task_events_stream_config())
            database_url = None
            if url is not None:
                parsed = make_url(url).set(drivername="postgresql+psycopg")
                database_url = parsed.render_as_string(hide_password=False)
            live = LiveConsumer(nats.url, database_url)
            thread = threading.Thread(target=live.run, name="bench-live-consumer")
            thread.start()
            await asyncio.to_thread(live.ready.wait)
            for sent, (name, data) in enumerate(messages, start=1):
                await js.publish(name, data, headers={"Nats-Msg-Id": f"{name}:{sent}"})
                # Polled from this thread, whose CPU is not counted.
                while live.acked() < sent and thread.is_alive():  # noqa: ASYNC110
                    await asyncio.sleep(0.0002)
            live.stop()
            await asyncio.to_thread(thread.join)
            return live.cpu_s / generations
        finally:
            await nc.close()
            nats.stop()


async def run_persistence_bench(postgres_url: str, events_count: int = 15_000) -> list[str]:
    """Lines to print. `postgres_url`: a superuser on the server's maintenance database
    (libpq or SQLAlchemy form), which may create and drop databases."""
    admin = libpq_url(postgres_url)
    where = make_url(admin).render_as_string(hide_password=True)
    try:
        probe = await psycopg.AsyncConnection.connect(admin, connect_timeout=3)
    except psycopg.Error as error:
        reason = (str(error).strip().splitlines() or [repr(error)])[0]
        return [f"persistence: PostgreSQL not reachable at {where} ({reason}): skipped"]
    await probe.close()
    events = lifecycle_events(events_count)
    async with fresh_database(admin) as url:
        floor = await bare_insert_rate(url, events)
    async with fresh_database(admin) as url:
        real, cpu_per_event = await consumer_rate(url, events)
    messages = live_messages(LIVE_GENERATIONS)
    live_floor = await live_cpu_per_generation(None, messages, LIVE_GENERATIONS)
    async with fresh_database(admin) as url:
        live_real = await live_cpu_per_generation(url, messages, LIVE_GENERATIONS)
    return [
        f"persistence: {len(events)} lifecycle events, batches of {BATCH_SIZE}, PostgreSQL {where}",
        f"{'floor: bare batched INSERT (executemany)':<46} {floor:10.0f} rows/s",
        f"{'JetStream consumer -> repository (real path)':<46} {real:10.0f} events/s",
        f"{'real / floor':<46} {real / floor:10.2f}",
        f"{'real path, CPU per event (process)':<46} {cpu_per_event * 1e6:10.0f} us",
        f"live: {LIVE_GENERATIONS} generations (QUEUED, STARTED, snapshot, COMPLETED), "
        "one message per batch; the consumer thread's CPU",
        f"{'floor: fetch + ack, no database':<46} {live_floor * 1e3:10.2f} ms/generation",
        f"{'real path':<46} {live_real * 1e3:10.2f} ms/generation",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    )
    parser.add_argument("--events", type=int, default=15_000)
    args = parser.parse_args()
    for line in uvloop.run(run_persistence_bench(args.postgres_url, args.events)):
        print(line)


if __name__ == "__main__":
    main()
