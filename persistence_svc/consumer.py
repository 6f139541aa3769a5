"""The durable JetStream pull consumer that turns lifecycle events into history.

Delivery rules (JetStream, explicit ack): a lifecycle event is acked only after the batch
holding it is committed, so a crash between the two redelivers it, and the repository's
idempotent apply makes the redelivery a no-op. Batches are settled in order: one batch is
fetched ahead while the one before it is written, never more. A message that can never be
applied (not a LifecycleEvent, no task id) is logged and terminated (`+TERM`) so it never
blocks the stream. If the database is down, the batch (and the one fetched ahead) is nak'ed
with a delay (`-NAK {"delay": ns}`) and we back off: the events wait in JetStream and
nothing is lost.

task_svc's snapshots travel on the same stream (svckit.nats.is_snapshot): they are acked at once,
neither decoded nor written. Events of a task deleted from history (HistoryService.DeleteTask)
are dropped by the repository inside the batch's transaction and acked with the batch: a
deleted task is never written again.

Traces: each event carrying a `traceparent` header gets a `history write` span for the write
of its batch. A batch holds many traces, so no span is current while it is written, and
batch-wide log lines join none; a batch of one traced event is that event's write, and has
its span current. A line about one event (refused, undecodable) names its trace explicitly
(`tracing.trace_fields`). Without tracing no span is made and nothing is attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import DecodeError
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError
from opentelemetry.trace import Span

from persistence_svc.errors import InvalidEvent, StorageRejected, StorageUnavailable
from persistence_svc.events import ParsedEvent, parse_event
from persistence_svc.metrics import PersistenceMetrics
from persistence_svc.repository import Repository
from svckit import tracing
from svckit.nats import TASK_EVENTS_STREAM, TASK_EVENTS_SUBJECT_PREFIX, is_snapshot
from svckit.pull import PullFeed
from svckit.tracing import TRACEPARENT
from switchboard.v1 import events_pb2

log = logging.getLogger(__name__)

DURABLE_NAME = "persistence"
SUBJECT = f"{TASK_EVENTS_SUBJECT_PREFIX}.>"
# Far above the default 1000: a backlog built while the database was down is delivered in
# full once it is back, instead of trickling in 1000 at a time.
MAX_ACK_PENDING = 100_000
# Back-off while the database is down: nak delays and fetch pauses, capped.
RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
# An event the database refuses on its own this many times is terminated (and logged).
MAX_REJECTED_DELIVERIES = 3


def consumer_config(ack_wait_s: float) -> ConsumerConfig:
    return ConsumerConfig(
        name=DURABLE_NAME,
        durable_name=DURABLE_NAME,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,  # never give up on an event because the database was down long
        max_ack_pending=MAX_ACK_PENDING,
        filter_subject=SUBJECT,
    )


@dataclass
class ConsumerStats:
    batches: int = 0  # committed batches
    acked: int = 0  # lifecycle events committed (dropped ones included), and snapshots
    dropped: int = 0  # events of deleted tasks, acked without being written
    snapshots: int = 0  # acked without touching the database
    terminated: int = 0  # undecodable or invalid messages
    nacked: int = 0  # sent back because the database was unavailable
    failed_writes: int = 0  # batch writes that raised (unavailable, refused or a bug)


class EventConsumer:
    """Fetch a batch, apply it in one transaction, ack it; repeat until `stop()`.

    `await consumer.start()` creates or updates the durable consumer and binds to it; the
    owner runs `await consumer.run()` as a task, calls `stop()` at shutdown and awaits that
    task: the batch in flight is finished (applied and acked, or nak'ed) before `run` returns,
    and a batch fetched ahead is handed back to JetStream (nak'ed) unwritten.
    """

    def __init__(
        self,
        nc: Client,
        repository: Repository,
        *,
        batch_size: int = 256,
        ack_wait_s: float = 60.0,
        fetch_timeout_s: float = 1.0,
        retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
        linger_s: float = 0.0,
        on_database: Callable[[bool], Awaitable[None]] | None = None,
        metrics: PersistenceMetrics | None = None,
    ) -> None:
        self.js = nc.jetstream()
        self.repository = repository
        self.batch_size = batch_size
        self.ack_wait_s = ack_wait_s
        self.fetch_timeout_s = fetch_timeout_s
        self.retry_delays_s = tuple(retry_delays_s)
        # After a batch smaller than batch_size (no backlog), wait this long before taking
        # the next: events wait in JetStream, and fewer, larger transactions cost less.
        self.linger_s = linger_s
        self.stats = ConsumerStats()
        self.metrics = metrics if metrics is not None else PersistenceMetrics()
        # Told False when the database refuses a batch as unavailable, True when a batch is
        # written again, and either from the server's own check while no write is due (see
        # note_database; the server's health entry for HistoryService follows it).
        self.on_database = on_database
        self.database_up = True
        self._failures = 0
        self._retry_in_s = 0.0  # set by a back-off: run() pauses this long before going on
        self._stopping = asyncio.Event()
        self._feed = PullFeed(nc, TASK_EVENTS_STREAM, DURABLE_NAME, batch=batch_size)

    async def start(self) -> None:
        config = consumer_config(self.ack_wait_s)
        try:
            # Create, or update the settings of the durable consumer left by an earlier run.
            await self.js.add_consumer(TASK_EVENTS_STREAM, config=config)
        except BadRequestError as error:
            # A setting JetStream cannot change in place: keep the existing consumer (and its
            # position in the stream) rather than lose it.
            log.warning("consumer settings not updated", extra={"error": str(error)})
        await self._feed.start()
        log.info("consuming lifecycle events", extra={"stream": TASK_EVENTS_STREAM})

    def stop(self) -> None:
        """Stop fetching; the batch in flight still completes."""
        self._stopping.set()

    async def run(self) -> None:
        if not self._feed.started:
            raise RuntimeError("call start() first")
        ahead: asyncio.Task[list[Msg]] | None = None
        try:
            while not self._stopping.is_set():
                messages = await (ahead if ahead is not None else self._fetch())
                ahead = None
                if not messages:
                    continue
                if self._failures == 0 and not self._stopping.is_set():
                    # Fetch the next batch while this one is written: the database and
                    # JetStream round trips overlap. One batch ahead at most, started only
                    # once the batch before is in hand, so memory and unacked messages stay
                    # bounded; it is written only after this one is settled.
                    linger = self.linger_s if len(messages) < self.batch_size else 0.0
                    ahead = asyncio.create_task(self._fetch(linger), name="persistence-fetch-ahead")
                try:
                    await self.process(messages)
                except NatsError as error:
                    # An ack/nak lost with the connection: JetStream redelivers after
                    # ack_wait and the repository makes that a no-op.
                    log.warning("settling a batch failed", extra={"error": str(error)})
                if self._retry_in_s:
                    if ahead is not None:
                        # The database is down: the batch fetched meanwhile goes back too,
                        # rather than wait out the back-off unacked.
                        await self._hand_back(await ahead, self._retry_in_s)
                        ahead = None
                    await self._pause(self._retry_in_s)
                    self._retry_in_s = 0.0
            if ahead is not None:
                # Stopping: JetStream redelivers it at once, to our next run or a replica.
                await self._hand_back(await ahead, 0.0)
                ahead = None
        finally:
            if ahead is not None:
                # Cancelled mid-batch: whatever the fetch had taken is redelivered after
                # ack_wait, as after a crash.
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, NatsError):
                    await ahead
            with contextlib.suppress(NatsError):
                # Delivered and never taken: back to JetStream at once, as a batch ahead.
                await self._hand_back(await self._feed.close(), 0.0)

    async def process(self, messages: Sequence[Msg]) -> None:
        """Apply one fetched batch and settle every message in it."""
        now = datetime.now(UTC)  # the time of events that carry none
        batch: list[tuple[Msg, ParsedEvent]] = []
        for msg in messages:
            if is_snapshot(msg.subject):
                await msg.ack()
                self.stats.acked += 1
                self.stats.snapshots += 1
                self.metrics.snapshot()
                continue
            parsed = await self._decode(msg, now)
            if parsed is not None:
                batch.append((msg, parsed))
        if not batch:
            return
        try:
            committed = await self._write(batch)
        except StorageUnavailable as error:
            await self.note_database(False)
            await self._back_off([msg for msg, _ in batch], error)
            return
        except StorageRejected as error:
            log.error("batch refused, applying one by one", extra={"error": str(error)})
            await self._apply_one_by_one(batch)
            return
        except Exception as error:
            # A bug of ours must neither kill the consumer nor lose events: keep them in
            # JetStream and retry, loudly.
            log.exception("unexpected error applying a batch")
            await self._back_off([msg for msg, _ in batch], error)
            return
        await self._ack(batch, committed)

    async def _write(self, batch: Sequence[tuple[Msg, ParsedEvent]]) -> float:
        """Apply `batch` in one transaction; the wall-clock time it was committed at. Each
        traced event (its `traceparent` header) gets a span for the write."""
        spans = _write_spans(batch) if tracing.enabled() else []
        # Current only for a batch of one event: with many, what is logged meanwhile is
        # about all of them, and making one's span current would file it under that trace.
        alone = spans[0] if len(batch) == 1 and spans else None
        try:
            with tracing.current(alone):
                result = await self.repository.apply_parsed([parsed for _, parsed in batch])
        except Exception as error:
            self.stats.failed_writes += 1
            self.metrics.write_errors.inc()
            for span in spans:
                tracing.end(span, error=type(error).__name__)
            raise
        for span in spans:
            tracing.end(span)
        self.stats.dropped += result.events_dropped
        return time.time()

    async def _fetch(self, linger_s: float = 0.0) -> list[Msg]:
        """The next batch, taken after `linger_s`; empty when nothing came within
        fetch_timeout_s."""
        if linger_s > 0:
            await self._pause(linger_s)
        try:
            return await self._feed.take(self.fetch_timeout_s)
        except NatsError as error:
            # Disconnected: the client reconnects on its own; try again shortly.
            log.warning("fetch failed", extra={"error": str(error)})
            await self._pause(1.0)
            return []

    async def _decode(self, msg: Msg, now: datetime) -> ParsedEvent | None:
        # Decoded and checked once, here: the repository takes the parsed event.
        try:
            return parse_event(events_pb2.LifecycleEvent.FromString(msg.data), now)
        except (DecodeError, InvalidEvent) as error:
            log.error(
                "dropping a lifecycle message that can never be applied",
                extra={"subject": msg.subject, "error": str(error), **_trace_of(msg)},
            )
            await msg.term()
            self.stats.terminated += 1
            return None

    async def _apply_one_by_one(self, batch: list[tuple[Msg, ParsedEvent]]) -> None:
        # One event the database refuses (a constraint, a value out of range) must not hold
        # back the others: isolate it, log it and, after a few deliveries, terminate it. It
        # stays in the stream (limits retention) for a replay once the cause is fixed.
        for index, (msg, parsed) in enumerate(batch):
            try:
                committed = await self._write([(msg, parsed)])
            except StorageUnavailable as error:
                await self.note_database(False)
                await self._back_off([m for m, _ in batch[index:]], error)
                return
            except StorageRejected as error:
                deliveries = msg.metadata.num_delivered or 1
                given_up = deliveries >= MAX_REJECTED_DELIVERIES
                log.error(
                    "database refused a lifecycle message",
                    extra={
                        "subject": msg.subject,
                        "deliveries": deliveries,
                        "given_up": given_up,
                        "error": str(error),
                        **_trace_of(msg),
                    },
                )
                if given_up:
                    await msg.term()
                    self.stats.terminated += 1
                else:
                    await msg.nak(delay=self.retry_delays_s[0])
                    self.stats.nacked += 1
            else:
                await self._ack([(msg, parsed)], committed)

    async def note_database(self, up: bool) -> None:
        """The outcome of a write, or of the server's check while no write is due: tell
        `on_database` when it differs from the last one."""
        self.metrics.database_up.set(1 if up else 0)
        if up == self.database_up:
            return
        self.database_up = up
        if up:  # going down is logged by _back_off, with what waits in JetStream
            log.info("database back")
        if self.on_database is not None:
            await self.on_database(up)

    async def _ack(self, batch: Sequence[tuple[Msg, ParsedEvent]], committed: float) -> None:
        """Ack a batch committed at `committed` (the database took it: it is up)."""
        await self.note_database(True)
        self.metrics.written(batch, committed)
        for msg, _ in batch:
            await msg.ack()
        self.stats.batches += 1
        self.stats.acked += len(batch)
        self._failures = 0

    async def _back_off(self, messages: Sequence[Msg], error: Exception) -> None:
        """Nak the batch with the next delay; run() then pauses that long."""
        delay = self.retry_delays_s[min(self._failures, len(self.retry_delays_s) - 1)]
        self._failures += 1
        log.warning(
            "database unavailable, events left in JetStream",
            extra={"error": str(error), "messages": len(messages), "retry_in_s": delay},
        )
        await self._hand_back(messages, delay)
        self._retry_in_s = delay

    async def _hand_back(self, messages: Sequence[Msg], delay: float) -> None:
        """Nak unwritten messages: JetStream redelivers them after `delay` seconds."""
        for msg in messages:
            await msg.nak(delay=delay or None)
        self.stats.nacked += len(messages)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)


def _write_spans(batch: Sequence[tuple[Msg, ParsedEvent]]) -> list[Span | None]:
    """A `history write` span for each event that carries its trace."""
    spans = []
    for msg, _ in batch:
        parent = _traceparent(msg)
        if parent:
            spans.append(tracing.start("history write", parent, {"subject": msg.subject}))
    return spans


def _traceparent(msg: Msg) -> str:
    return (msg.headers or {}).get(TRACEPARENT, "")


def _trace_of(msg: Msg) -> dict[str, str]:
    """The `extra` naming the trace of the event in `msg` (nothing when untraced or off)."""
    return tracing.trace_fields(_traceparent(msg))
