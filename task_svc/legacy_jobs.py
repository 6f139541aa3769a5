"""Jobs stored before tasks were sharded: on `switchboard.jobs.<queue>`, held by one durable
consumer named TASK_CONSUMER over all of SB_JOBS. After an upgrade nobody would ever consume
them, and that consumer's filter (`switchboard.jobs.>`) overlaps every shard's, which a
work-queue stream refuses. So the node that takes shard 0 first removes the old consumer
(its deliveries come back), then moves each old job onto its shard's subject (message id
`<task_id>:moved:<seq>`, so two movers store it once) and only then acks the old message: a
crash in between leaves it to be moved again, deduplicated.

A moved job may have run before the upgrade (an old task_svc killed mid-run): its header
says so, and the engine recovers it like any redelivered job (what was stored about the task
says whether it finished, and where its seq goes on).
"""

from __future__ import annotations

import contextlib
import logging

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from svckit.nats import JOBS_STREAM, PUBLISH_TIMEOUT_S
from svckit.shards import JOBS_SUBJECT_PREFIX, job_subject, queue_of, shard_of
from switchboard.v1 import events_pb2

log = logging.getLogger(__name__)

LEGACY_SUBJECTS = f"{JOBS_SUBJECT_PREFIX}.*"  # one token after the prefix: the queue
MOVED_HEADER = "Switchboard-Moved"  # on a moved job: it may have run before
BATCH = 256


async def move_legacy_jobs(js: JetStreamContext, old_consumer: str) -> int:
    """Move every pre-sharding job to its shard's subject; how many were moved."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(JOBS_STREAM, old_consumer)
    # Named, and removed first: a work-queue stream takes one consumer per filter, so one
    # left by an attempt cut short (a NATS node killed mid-request) would refuse every
    # new one, and shard 0 with it, until its inactivity threshold ran out.
    mover = f"{old_consumer}-legacy-move"
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(JOBS_STREAM, mover)
    config = ConsumerConfig(
        durable_name=mover,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=LEGACY_SUBJECTS,
        inactive_threshold=60.0,
    )
    info = await js.add_consumer(JOBS_STREAM, config)
    if not info.num_pending:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(JOBS_STREAM, info.name)
        return 0
    sub = await js.pull_subscribe_bind(durable=info.name, stream=JOBS_STREAM)
    moved = 0
    try:
        while True:
            try:
                msgs = await sub.fetch(BATCH, timeout=1.0)
            except nats.errors.TimeoutError:
                break
            for msg in msgs:
                await _move(js, msg)
                moved += 1
    finally:
        with contextlib.suppress(nats.errors.Error, OSError):
            await sub.unsubscribe()
        with contextlib.suppress(NotFoundError, nats.errors.Error):
            await js.delete_consumer(JOBS_STREAM, info.name)
    log.info("jobs stored before sharding moved to their shards", extra={"count": moved})
    return moved


async def _move(js: JetStreamContext, msg: Msg) -> None:
    try:
        task_id = events_pb2.Job.FromString(msg.data).task_id
    except Exception:
        task_id = ""
    if not task_id:
        log.error("undecodable old job terminated", extra={"subject": msg.subject})
        await msg.term()
        return
    seq = msg.metadata.sequence.stream
    headers = {"Nats-Msg-Id": f"{task_id}:moved:{seq}", MOVED_HEADER: "1"}
    subject = job_subject(shard_of(task_id), queue_of(msg.subject))
    await js.publish(subject, msg.data, timeout=PUBLISH_TIMEOUT_S, headers=headers)
    await msg.ack()
