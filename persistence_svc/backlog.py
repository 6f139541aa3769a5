"""The lifecycle events on their way to history: those SB_TASK_EVENTS holds past the durable
consumer's ack floor (consumer.py), which the database has not taken yet (a batch in flight,
a backlog while it catches up, events waiting out an outage).

DeleteAllTasks reads them to find the user's tasks that history holds no row of yet, so that
they are tombstoned with the rest instead of appearing once their events are written.
"""

from __future__ import annotations

import contextlib
import logging

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from persistence_svc.consumer import DURABLE_NAME, SUBJECT
from svckit.nats import TASK_EVENTS_STREAM, is_snapshot
from switchboard.v1 import events_pb2

log = logging.getLogger(__name__)

# A backlog longer than this is not read through for one call: the call is refused as
# unavailable until the database has caught up (a few seconds of writes at most).
MAX_SCAN = 50_000
# How long the next message of the scan may take to come before the scan gives up.
NEXT_TIMEOUT_S = 2.0


class BacklogUnavailable(Exception):
    """The backlog could not be read (NATS unreachable, or too long to read now)."""


class Backlog:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        max_scan: int = MAX_SCAN,
        next_timeout_s: float = NEXT_TIMEOUT_S,
    ) -> None:
        self.js = js
        self.max_scan = max_scan
        self.next_timeout_s = next_timeout_s

    async def tasks_of(self, user_id: str) -> set[str]:
        """The ids of `user_id`'s tasks with an event in the backlog now. Raises
        BacklogUnavailable when it cannot tell."""
        try:
            # The floor first: whatever is acked after it is read too, never missed.
            consumer = await self.js.consumer_info(TASK_EVENTS_STREAM, DURABLE_NAME)
            stream = await self.js.stream_info(TASK_EVENTS_STREAM)
        except (NatsError, TimeoutError) as error:
            raise BacklogUnavailable(f"lifecycle events not reachable: {error}") from error
        first = max(consumer.ack_floor.stream_seq + 1, stream.state.first_seq)
        last = stream.state.last_seq
        if last < first:
            return set()
        if last - first + 1 > self.max_scan:
            raise BacklogUnavailable(f"{last - first + 1} lifecycle events not written yet")
        return await self._scan(user_id, first, last)

    async def _scan(self, user_id: str, first: int, last: int) -> set[str]:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first)
        found: set[str] = set()
        try:
            sub = await self.js.subscribe(
                SUBJECT, stream=TASK_EVENTS_STREAM, ordered_consumer=True, config=config
            )
        except (NatsError, TimeoutError) as error:
            raise BacklogUnavailable(f"lifecycle events not readable: {error}") from error
        try:
            while True:
                msg = await sub.next_msg(timeout=self.next_timeout_s)
                task_id = _task_of(msg, user_id)
                if task_id:
                    found.add(task_id)
                if msg.metadata.sequence.stream >= last:
                    return found
        except (NatsError, TimeoutError) as error:
            raise BacklogUnavailable(f"lifecycle events not read through: {error}") from error
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()


def _task_of(msg: Msg, user_id: str) -> str:
    """The task id of a lifecycle event of `user_id`'s, else "" (a checkpoint, another
    user's, or a message the consumer will terminate)."""
    if is_snapshot(msg.subject):
        return ""
    try:
        event = events_pb2.LifecycleEvent.FromString(msg.data)
    except Exception:  # undecodable: the consumer logs and terminates it
        return ""
    return event.task_id if event.user_id == user_id else ""
