"""The NATS connection and the JetStream layout that task_svc and persistence_svc share.

Layout (docs/architecture.md): jobs live on a work-queue stream
(`switchboard.jobs.<shard>.<queue>`, svckit/shards.py; message id = task id, so Submit is
idempotent through JetStream's duplicate window);
lifecycle events on a limits stream (`switchboard.tasks.<task_id>.<kind>`, message id
`<task_id>:<seq>`) that persistence_svc consumes with a durable consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import nats
import nats.errors
from nats.aio.client import Client
from nats.errors import NoServersError
from nats.js.api import PubAck, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from svckit.shards import JOBS_SUBJECT_PREFIX, job_subject, shard_of

log = logging.getLogger(__name__)

T = TypeVar("T")

MIN_SERVER_VERSION = (2, 11)

JOBS_STREAM = "SB_JOBS"
# task_svc's QueueBoard (events.proto), on core NATS: not stored, only the last one counts.
QUEUE_BOARD_SUBJECT = "switchboard.queues"
TASK_EVENTS_STREAM = "SB_TASK_EVENTS"
TASK_EVENTS_SUBJECT_PREFIX = "switchboard.tasks"

# task_svc's checkpoints share the lifecycle stream, on their own subject per task: task_svc
# reads them back after a crash; persistence_svc acks them without storing (not history).
SNAPSHOT_SUFFIX = ".snapshot"


PUBLISH_TIMEOUT_S = 5.0
# nats-py's own drain timeout is 30 s, longer than a pod's termination grace; a drain that
# has not finished by then is given up (what it did not flush is redelivered or retried).
DRAIN_TIMEOUT_S = 3.0  # a PubAck not back by then: the job is not known to be stored


class NotConnected(nats.errors.Error):
    def __str__(self) -> str:
        return "nats: not connected"


class JobPublisher(Protocol):
    """What stores a job: AckedPublisher (nats-py) or DirectPublisher (the acks' own)."""

    @property
    def connected(self) -> bool: ...

    async def publish(
        self, subject: str, payload: bytes, *, timeout: float, headers: dict[str, str]
    ) -> PubAck: ...


async def store_job(
    publisher: JobPublisher, task_id: str, queue: str, job: bytes, msg_id: str
) -> PubAck:
    """Store a job on SB_JOBS and await its PubAck: the one way in, for the gateway's acks
    and task_svc's Submit alike. Deduplicated on `msg_id` within the duplicate window.
    Refused at once while NATS is disconnected: the publish would only wait in the reconnect
    buffer for a PubAck that cannot come in time."""
    if not publisher.connected:
        raise NotConnected
    return await publisher.publish(
        job_subject(shard_of(task_id), queue),
        job,
        timeout=PUBLISH_TIMEOUT_S,
        headers={"Nats-Msg-Id": msg_id},
    )


def snapshot_subject(task_id: str) -> str:
    return f"{TASK_EVENTS_SUBJECT_PREFIX}.{task_id}{SNAPSHOT_SUFFIX}"


def is_snapshot(subject: str) -> bool:
    """Whether a message on the lifecycle stream is a checkpoint (by its subject alone)."""
    return subject.endswith(SNAPSHOT_SUFFIX)


# Submit retries within this window are deduplicated by JetStream on the message id.
DUPLICATE_WINDOW_S = 24 * 3600.0


def jobs_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=JOBS_STREAM,
        subjects=[f"{JOBS_SUBJECT_PREFIX}.>"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


def task_events_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=TASK_EVENTS_STREAM,
        subjects=[f"{TASK_EVENTS_SUBJECT_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=7 * 24 * 3600.0,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


def servers_of(url: str) -> list[str]:
    """NATS_URL may list a cluster's servers, comma-separated: the client picks one and
    fails over to the others."""
    return [part.strip() for part in url.split(",") if part.strip()]


ENSURE_ATTEMPTS = 5
ENSURE_RETRY_S = 0.5
NO_PEERS_FOR_PLACEMENT = 10005  # JetStream's error while a cluster peer is still joining


class NatsVersionError(RuntimeError):
    pass


LinkChanged = Callable[[bool], Awaitable[None]]


async def connect_nats(
    url: str,
    name: str,
    first_connect_timeout: float = 30.0,
    on_link: LinkChanged | None = None,
) -> Client:
    """Connect, retrying the first connection for `first_connect_timeout` seconds (services
    may start before NATS), and refuse a server older than 2.11 (older servers silently
    ignore settings we rely on). Once connected, the client reconnects forever; `on_link`
    is told False when the connection drops and True when it is back."""
    nc: Client | None = None

    async def disconnected() -> None:
        if nc is not None and nc.is_closed:
            return  # closed on purpose (shutdown), not lost
        log.warning("nats disconnected", extra={"url": url})
        if on_link is not None:
            await on_link(False)

    async def reconnected() -> None:
        log.info("nats reconnected", extra={"url": url})
        if on_link is not None:
            await on_link(True)

    deadline = asyncio.get_running_loop().time() + first_connect_timeout
    while True:
        try:
            nc = await nats.connect(
                servers_of(url),
                name=name,
                connect_timeout=2,
                reconnect_time_wait=1,
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
            )
            break
        except (OSError, NoServersError) as error:
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionError(f"cannot reach NATS at {url}") from error
            log.warning("nats not reachable yet", extra={"url": url})
            await asyncio.sleep(0.5)
    version = nc.connected_server_version
    if (version.major, version.minor) < MIN_SERVER_VERSION:
        await nc.close()
        raise NatsVersionError(
            f"nats-server {version} at {url} is too old: 2.11 or newer is required"
        )
    log.info("nats connected", extra={"url": url, "server_version": str(version)})
    return nc


async def while_forming(what: str, request: Callable[[], Awaitable[T]]) -> T:
    """Make a JetStream management request (create a stream or a bucket). On a NATS cluster
    that has just formed, one may get no answer (another process's stream is still forming)
    or "no suitable peers" (a peer is not known to be online yet): it is asked again, a few
    times."""
    for attempt in range(1, ENSURE_ATTEMPTS + 1):
        try:
            return await request()
        except (TimeoutError, APIError) as error:
            placement = isinstance(error, APIError) and error.err_code == NO_PEERS_FOR_PLACEMENT
            if attempt == ENSURE_ATTEMPTS or not (placement or isinstance(error, TimeoutError)):
                raise
            log.warning("jetstream not ready yet; again", extra={"for": what, "e": repr(error)})
            await asyncio.sleep(ENSURE_RETRY_S)
    raise AssertionError("unreachable")


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it to `config` if it exists."""
    assert config.name is not None
    await while_forming(config.name, lambda: _ensure_stream(js, config))


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("stream created", extra={"stream": config.name})
    else:
        await js.update_stream(config)


async def close_nats(nc: Client) -> None:
    """Drain (flushing pending acks and publishes), or just close when NATS is unreachable:
    shutdown must finish either way; what was not acked is redelivered later."""
    if nc.is_closed:
        return
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            await nc.drain()
    except (nats.errors.Error, OSError, TimeoutError) as error:
        log.warning("nats drain failed; closing", extra={"error": repr(error)})
        # The server may be gone. Then nats-py's close writes what it had pending to a
        # transport already closed, which uvloop refuses with a RuntimeError and CPython
        # 3.13.0's own transport with a TypeError (its write callback is cleared at close).
        with contextlib.suppress(nats.errors.Error, OSError, RuntimeError, TypeError):
            await nc.close()
