"""The durable consumer end to end: a real nats-server (fixture), a real database."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Sequence

import psycopg
from psycopg import sql
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence_svc import models
from persistence_svc.consumer import DURABLE_NAME, EventConsumer, consumer_config
from persistence_svc.errors import StorageRejected, StorageUnavailable
from persistence_svc.events import ParsedEvent
from persistence_svc.repository import ApplyResult, Repository
from svckit import tracing
from svckit.nats import TASK_EVENTS_STREAM
from svckit.tracing import TRACEPARENT
from switchboard.v1 import common_pb2, events_pb2, history_pb2
from tests.conftest import eventually, timeout, until
from tests.persistence.factory import Kind, completed_lifecycle, new_task_id
from tests.persistence.helpers import FETCH_S, Bus, publish, running
from tests.postgres import postgres_admin_url, sqlalchemy_url
from tests.traces import in_memory_traces, json_lines, trace_id


async def completed(repo: Repository, task_id: str) -> history_pb2.HistoryTask | None:
    task = await repo.get_task(task_id, "alice")
    return task if task and task.status == common_pb2.TASK_STATUS_COMPLETED else None


async def event_rows(repo: Repository) -> int:
    async with repo.engine.connect() as conn:
        query = select(func.count()).select_from(models.task_events)
        return int((await conn.execute(query)).scalar_one())


async def test_events_become_history(bus: Bus, repository: Repository) -> None:
    task_ids = [new_task_id() for _ in range(3)]
    async with running(EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)) as consumer:
        for task_id in task_ids:
            for event in completed_lifecycle(task_id):
                await publish(bus.js, event)
        for task_id in task_ids:
            task = await eventually(functools.partial(completed, repository, task_id))
            assert task.response == "Rayleigh."
        await until(lambda: consumer.stats.acked == 9)
    trail = await repository.get_task_events(task_ids[0], "alice")
    assert trail is not None and [e.seq for e in trail] == [1, 2, 7]
    info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert info.config.max_ack_pending is not None and info.config.max_ack_pending > 1000


async def test_redelivery_does_not_duplicate(bus: Bus, repository: Repository) -> None:
    """A crash after the commit and before the ack: the batch is delivered again, the
    repository ignores it, and the consumer acks it this time."""
    task_id = new_task_id()
    for event in completed_lifecycle(task_id):
        await publish(bus.js, event)
    await bus.js.add_consumer(TASK_EVENTS_STREAM, config=consumer_config(60.0))
    sub = await bus.js.pull_subscribe_bind(durable=DURABLE_NAME, stream=TASK_EVENTS_STREAM)
    first = await sub.fetch(3, timeout=timeout(5))
    await repository.apply([events_pb2.LifecycleEvent.FromString(m.data) for m in first])
    for msg in first:
        await msg.nak()  # as if we had died before acking: JetStream redelivers at once
    await sub.unsubscribe()

    async with running(EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)) as consumer:
        await until(lambda: consumer.stats.acked == 3)
    assert await event_rows(repository) == 3
    task = await repository.get_task(task_id, "alice")
    assert task is not None and task.version == 7
    info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
    assert info.num_ack_pending == 0


async def test_same_event_published_twice_is_recorded_once(
    bus: Bus, repository: Repository
) -> None:
    task_id = new_task_id()
    queued, started, done = completed_lifecycle(task_id)
    async with running(EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)) as consumer:
        await publish(bus.js, queued)
        await publish(bus.js, started)
        # A republish after JetStream's duplicate window (a different message id).
        await bus.js.publish(f"switchboard.tasks.{task_id}.started", started.SerializeToString())
        await publish(bus.js, done)
        await eventually(lambda: completed(repository, task_id))
        await until(lambda: consumer.stats.acked == 4)
    assert await event_rows(repository) == 3


async def test_bad_message_is_terminated_and_does_not_block(
    bus: Bus, repository: Repository
) -> None:
    task_id = new_task_id()
    async with running(EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)) as consumer:
        await bus.js.publish(f"switchboard.tasks.{task_id}.queued", b"\xff not a protobuf")
        bad_id = completed_lifecycle("not-a-uuid")[0]
        await bus.js.publish("switchboard.tasks.not-a-uuid.queued", bad_id.SerializeToString())
        for event in completed_lifecycle(task_id):
            await publish(bus.js, event)
        await eventually(lambda: completed(repository, task_id))
        await until(lambda: consumer.stats.terminated == 2)
    info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
    assert info.num_ack_pending == 0


class FlakyRepository(Repository):
    """The real repository, with a switch that makes the database look down."""

    down = True
    up_for: int | None = None  # when set: down again after this many more batches
    refused = 0  # batches refused while down

    async def apply_parsed(self, events: Sequence[ParsedEvent]) -> ApplyResult:
        if self.down:
            self.refused += 1
            raise StorageUnavailable("connection refused (test)")
        result = await super().apply_parsed(events)
        if self.up_for is not None:
            self.up_for -= 1
            if self.up_for == 0:
                self.down, self.up_for = True, None
        return result


async def test_database_down_keeps_events_until_it_is_back(bus: Bus, database_url: str) -> None:
    repo = await FlakyRepository.open(database_url)
    try:
        task_id = new_task_id()
        told: list[bool] = []

        async def on_database(up: bool) -> None:
            told.append(up)

        consumer = EventConsumer(
            bus.nc,
            repo,
            fetch_timeout_s=FETCH_S,
            retry_delays_s=(0.1, 0.2),
            on_database=on_database,
        )
        async with running(consumer):
            for event in completed_lifecycle(task_id):
                await publish(bus.js, event)
            # Delivered, refused, nak'ed with a delay, delivered again...
            await until(lambda: consumer.stats.nacked >= 6)
            assert consumer.stats.acked == 0
            assert await repo.get_task(task_id, "alice") is None
            assert told == [False]  # once, however many batches were refused
            repo.down = False
            task = await eventually(lambda: completed(repo, task_id))
            assert task.version == 7
            await until(lambda: consumer.stats.acked == 3)
            assert told == [False, True]
        assert await event_rows(repo) == 3
    finally:
        await repo.close()


async def test_durable_position_survives_a_restart(bus: Bus, repository: Repository) -> None:
    first, second = new_task_id(), new_task_id()
    async with running(EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)) as consumer:
        for event in completed_lifecycle(first):
            await publish(bus.js, event)
        await until(lambda: consumer.stats.acked == 3)
    # Published while no consumer runs: the durable consumer picks them up on restart,
    # and does not deliver the first task's events again.
    for event in completed_lifecycle(second):
        await publish(bus.js, event)
    async with running(EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)) as consumer:
        await eventually(lambda: completed(repository, second))
        await until(lambda: consumer.stats.acked == 3)
        assert consumer.stats.acked == 3


async def test_kinds_other_than_completed(bus: Bus, repository: Repository) -> None:
    from tests.persistence.factory import event

    failed, cancelled = new_task_id(), new_task_id()
    error = common_pb2.Error(code=common_pb2.ERROR_CODE_TIMEOUT, message="provider timed out")
    async with running(EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S)):
        await publish(bus.js, event(failed, 1, Kind.LIFECYCLE_KIND_QUEUED))
        await publish(bus.js, event(failed, 4, Kind.LIFECYCLE_KIND_FAILED, error=error))
        await publish(bus.js, event(cancelled, 1, Kind.LIFECYCLE_KIND_QUEUED))
        await publish(bus.js, event(cancelled, 2, Kind.LIFECYCLE_KIND_CANCELLED))

        async def settled() -> bool:
            a = await repository.get_task(failed, "alice")
            b = await repository.get_task(cancelled, "alice")
            return bool(a and b and a.version == 4 and b.version == 2)

        await eventually(settled)
    a = await repository.get_task(failed, "alice")
    b = await repository.get_task(cancelled, "alice")
    assert a is not None and b is not None
    assert (a.status, a.error_message) == (common_pb2.TASK_STATUS_FAILED, "provider timed out")
    assert b.status == common_pb2.TASK_STATUS_CANCELLED


class PickyRepository(Repository):
    """The real repository, refusing (like a constraint would) every event of one task."""

    poisoned = ""

    async def apply_parsed(self, events: Sequence[ParsedEvent]) -> ApplyResult:
        if any(str(event.task_id) == self.poisoned for event in events):
            raise StorageRejected("value refused (test)")
        return await super().apply_parsed(events)


async def test_refused_event_is_isolated_and_the_rest_applied(bus: Bus, database_url: str) -> None:
    repo = await PickyRepository.open(database_url)
    try:
        good, bad = new_task_id(), new_task_id()
        repo.poisoned = bad
        # Published before the consumer starts, so they come in one batch.
        for event in completed_lifecycle(bad) + completed_lifecycle(good):
            await publish(bus.js, event)
        consumer = EventConsumer(bus.nc, repo, fetch_timeout_s=FETCH_S, retry_delays_s=(0.1,))
        async with running(consumer):
            await eventually(functools.partial(completed, repo, good))
            # Each refused event is retried, then given up on its third delivery.
            await until(lambda: consumer.stats.terminated == 3 and consumer.stats.acked == 3)
        assert consumer.stats.nacked == 6
        assert await repo.get_task(bad, "alice") is None
        info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
        assert info.num_ack_pending == 0
    finally:
        await repo.close()


async def test_postgres_that_appears_later_gets_every_event(bus: Bus) -> None:
    """A real outage through the real driver: the database does not exist at start (every
    connection is refused), then is created; the schema and the events follow."""
    admin = await postgres_admin_url()
    name = f"sb_test_late_{uuid.uuid4().hex[:12]}"
    repo = await Repository.open(sqlalchemy_url(admin, name))
    try:
        task_id = new_task_id()
        consumer = EventConsumer(bus.nc, repo, fetch_timeout_s=FETCH_S, retry_delays_s=(0.2,))
        async with running(consumer):
            for event in completed_lifecycle(task_id):
                await publish(bus.js, event)
            await until(lambda: consumer.stats.nacked >= 3)
            async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
                await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            await eventually(functools.partial(completed, repo, task_id))
            await until(lambda: consumer.stats.acked == 3)
    finally:
        await repo.close()
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class GatedRepository(Repository):
    """The real repository, whose writes each wait for the test to let them go (`release`);
    it notes, as each write starts, its batch size and how many messages were acked."""

    consumer: EventConsumer | None = None

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.writes: list[tuple[int, int]] = []  # (batch size, acked when it started)
        self.gate: asyncio.Semaphore | None = asyncio.Semaphore(0)  # None: writes go at once

    def release(self) -> None:
        assert self.gate is not None
        self.gate.release()

    async def apply_parsed(self, events: Sequence[ParsedEvent]) -> ApplyResult:
        assert self.consumer is not None
        self.writes.append((len(events), self.consumer.stats.acked))
        if self.gate is not None:
            await self.gate.acquire()
        return await super().apply_parsed(events)


async def ack_pending(bus: Bus) -> int:
    info = await bus.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
    return info.num_ack_pending or 0


async def test_next_batch_is_fetched_while_one_is_written_one_ahead_at_most(
    bus: Bus, database_url: str
) -> None:
    repo = await GatedRepository.open(database_url)
    try:
        tasks = [new_task_id() for _ in range(4)]
        for task_id in tasks:  # 12 events, in batches of 3
            for one in completed_lifecycle(task_id):
                await publish(bus.js, one)
        consumer = EventConsumer(bus.nc, repo, batch_size=3, fetch_timeout_s=FETCH_S)
        repo.consumer = consumer
        async with running(consumer):
            # While each batch is held in its write, the next one is fetched (6 handed out
            # unacked), and no other: after the last batch nothing is left to fetch (3).
            for index, expected in enumerate((6, 6, 6, 3)):
                await until(lambda i=index: len(repo.writes) == i + 1)  # type: ignore[misc]
                await eventually(lambda e=expected: _pending_is(bus, e))  # type: ignore[misc]
                assert await ack_pending(bus) == expected
                repo.release()
            await until(lambda: consumer.stats.acked == 12)
        # Each batch was written only once the one before was acked: settled in order.
        assert repo.writes == [(3, 0), (3, 3), (3, 6), (3, 9)]
        for task_id in tasks:
            assert await completed(repo, task_id) is not None
    finally:
        await repo.close()


async def _pending_is(bus: Bus, expected: int) -> bool:
    return await ack_pending(bus) == expected


async def test_batch_fetched_ahead_is_handed_back_at_stop(bus: Bus, database_url: str) -> None:
    repo = await GatedRepository.open(database_url)
    try:
        for task_id in (new_task_id(), new_task_id()):
            for one in completed_lifecycle(task_id):
                await publish(bus.js, one)
        consumer = EventConsumer(bus.nc, repo, batch_size=3, fetch_timeout_s=FETCH_S)
        repo.consumer = consumer
        async with running(consumer):
            await until(lambda: len(repo.writes) == 1)  # the first write is under way ...
            await eventually(lambda: _pending_is(bus, 6))  # ... and the next batch fetched
            consumer.stop()
            repo.release()
        assert consumer.stats.acked == 3 and consumer.stats.nacked == 3
        assert await event_rows(repo) == 3
        # Back in JetStream at once (nak'ed), not after ack_wait (60 s): the next run gets
        # them straight away.
        repo.gate = None
        again = EventConsumer(bus.nc, repo, batch_size=3, fetch_timeout_s=FETCH_S)
        repo.consumer = again
        async with running(again):
            await until(lambda: again.stats.acked == 3, seconds=5)
        assert await event_rows(repo) == 6
    finally:
        await repo.close()


async def test_batch_fetched_ahead_goes_back_when_the_database_is_down(
    bus: Bus, database_url: str
) -> None:
    repo = await FlakyRepository.open(database_url)
    try:
        repo.down, repo.up_for = False, 1  # down once the first batch is committed
        task_ids = [new_task_id() for _ in range(3)]
        for task_id in task_ids:
            for one in completed_lifecycle(task_id):
                await publish(bus.js, one)
        consumer = EventConsumer(
            bus.nc, repo, batch_size=3, fetch_timeout_s=FETCH_S, retry_delays_s=(1.0,)
        )
        async with running(consumer):
            # The second batch is refused, and the third, fetched meanwhile, goes back with
            # it at once, unwritten, instead of waiting out the back-off unacked.
            await until(lambda: consumer.stats.nacked >= 6)
            assert (repo.refused, consumer.stats.acked, consumer.stats.nacked) == (1, 3, 6)
            repo.down = False
            await until(lambda: consumer.stats.acked == 9)
        for task_id in task_ids:
            assert await completed(repo, task_id) is not None
        assert await event_rows(repo) == 9
    finally:
        await repo.close()


async def test_events_arriving_while_it_lingers_are_written_in_one_batch(
    bus: Bus, repository: Repository
) -> None:
    first, later = new_task_id(), [new_task_id() for _ in range(3)]
    consumer = EventConsumer(bus.nc, repository, fetch_timeout_s=FETCH_S, linger_s=timeout(2))
    async with running(consumer):
        await publish(bus.js, completed_lifecycle(first)[0])
        await until(lambda: consumer.stats.batches == 1)
        # The consumer now waits before it fetches again: these all go in its next batch.
        for task_id in later:
            await publish(bus.js, completed_lifecycle(task_id)[0])
        await until(lambda: consumer.stats.acked == 4)
    assert consumer.stats.batches == 2


class TellingRepository(PickyRepository):
    """The picky repository, logging each batch it is asked to write (as the real one logs
    the events of deleted tasks it drops)."""

    async def apply_parsed(self, events: Sequence[ParsedEvent]) -> ApplyResult:
        logging.getLogger("test.repository").info("writing", extra={"events": len(events)})
        return await super().apply_parsed(events)


async def publish_traced(bus: Bus, event: events_pb2.LifecycleEvent) -> str:
    """Publish `event` as task_svc does with tracing on, in a trace of its own: its trace id."""
    task = tracing.start("task")
    traceparent = tracing.traceparent(task)
    tracing.end(task)
    kind = events_pb2.LifecycleKind.Name(event.kind).removeprefix("LIFECYCLE_KIND_").lower()
    await bus.js.publish(
        f"switchboard.tasks.{event.task_id}.{kind}",
        event.SerializeToString(),
        headers={"Nats-Msg-Id": f"{event.task_id}:{event.seq}", TRACEPARENT: traceparent},
    )
    return traceparent.split("-")[1]


async def test_a_batch_logs_in_its_events_trace_only_when_it_holds_one(
    bus: Bus, database_url: str
) -> None:
    repo = await TellingRepository.open(database_url)
    loggers = ("test.repository", "persistence_svc.consumer")
    try:
        with in_memory_traces() as exported, json_lines(*loggers) as logs:
            # Published before the consumer starts: one batch of two traces.
            first, second = new_task_id(), new_task_id()
            many = [await publish_traced(bus, completed_lifecycle(t)[0]) for t in (first, second)]
            consumer = EventConsumer(bus.nc, repo, fetch_timeout_s=FETCH_S, retry_delays_s=(0.1,))
            async with running(consumer):
                await until(lambda: consumer.stats.batches == 1)
                alone = await publish_traced(bus, completed_lifecycle(first)[1])
                await until(lambda: consumer.stats.batches == 2)
                # One the database refuses, written on its own, then given up.
                repo.poisoned = bad = new_task_id()
                refused = await publish_traced(bus, completed_lifecycle(bad)[0])
                await until(lambda: consumer.stats.terminated == 1)
                # One that can never be decoded, still naming its trace.
                await bus.js.publish(
                    f"switchboard.tasks.{bad}.queued",
                    b"\xff not a protobuf",
                    headers={TRACEPARENT: f"00-{refused}-00f067aa0ba902b7-01"},
                )
                await until(lambda: consumer.stats.terminated == 2)
    finally:
        await repo.close()
    writes = sorted(trace_id(s) for s in exported.get_finished_spans() if s.name == "history write")
    # Each of its three deliveries is written twice: in its batch, then on its own.
    assert writes == sorted([*many, alone, *[refused] * 6])
    batches = [(line["events"], line.get("trace_id")) for line in logs.written("writing")]
    assert batches[:2] == [(2, None), (1, alone)]  # many traces: none; one: its own
    assert all(trace == refused for _, trace in batches[2:])  # one by one, each in its own
    refusals = logs.written("database refused a lifecycle message")  # after its span ended
    assert [line["trace_id"] for line in refusals] == [refused] * 3
    (undecodable,) = logs.written("dropping a lifecycle message that can never be applied")
    assert undecodable["trace_id"] == refused
