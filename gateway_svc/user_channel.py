"""The app's own history on its one socket: the `user:<id>` channel (docs/protocol.md).

A socket may join only its own user's topic. The join reply holds the user's preferences and
task counts by status; then the channel answers `list_tasks`, `get_task`, `delete_task`,
`delete_all` and `set_preferences` from persistence_svc (HistoryService, UserService; the two
deletes cancel at task_svc first what has not ended), and
pushes `task_updated` {task_id, status, progress, preview?, seq} whenever any of the user's
tasks is queued, starts, completes, fails or is cancelled, from whichever device or socket:
the lifecycle events the stack already publishes, followed by one JetStream ordered consumer
per gateway (`UserFeed`). `seq` is the event's stream sequence: a rejoin with `last_seq` gets
the updates it missed (up to `CATCH_UP_MAX` events back; further away, the reply says
`resync` and the app lists its tasks again).

While the database is down the history calls answer `unavailable` with `retry_after_ms`
(persistence_svc's own error), and generation goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from gateway_svc import task_payloads as tp
from gateway_svc.phoenix import Message, reply
from gateway_svc.routes import TaskRoutes
from svckit.catalog import ModelCatalog
from svckit.errors import ServiceError, typed
from svckit.lifecycle import cancel_and_wait
from svckit.nats import TASK_EVENTS_STREAM, TASK_EVENTS_SUBJECT_PREFIX, is_snapshot
from svckit.preferences import check_preferences
from svckit.requests import InvalidRequest
from switchboard.v1 import common_pb2, events_pb2, history_pb2, history_pb2_grpc

log = logging.getLogger(__name__)

USER_PREFIX = "user:"
PREVIEW_CHARS = 200
PAGE_MAX = 100
CATCH_UP_MAX = 10_000  # events a rejoin reads back at most to find what it missed
PREFERENCES_TTL_S = 30.0
PREFERENCES_MAX_USERS = 100_000  # users' default models one gateway keeps (about 30 MB)
CALL_TIMEOUT_S = 5.0
CONFIRM_DELETE_ALL = "delete all my tasks"
# delete_all: cancels at once (each waits for its task's end), and rounds of listing and
# cancelling for a user with more tasks than a node lists at a time (1000 each).
CANCEL_PARALLEL = 32
CANCEL_ROUNDS = 10
Status = common_pb2.TaskStatus
SendFn = Callable[[Message], Awaitable[None]]
Update = dict[str, Any]


def user_of(topic: str) -> str | None:
    return topic[len(USER_PREFIX) :] or None if topic.startswith(USER_PREFIX) else None


def update_of(event: events_pb2.LifecycleEvent, seq: int) -> Update:
    """The `task_updated` push for one lifecycle event."""
    update: Update = {
        "task_id": event.task_id,
        "status": tp.status_name(event.status),
        "progress": round(event.progress, 3),
        "seq": seq,
    }
    if event.content:
        update["preview"] = event.content[:PREVIEW_CHARS]
    return update


# -- the feed: every lifecycle event, to the user channels joined on this gateway -----------


@dataclass
class UserFeed:
    """Lifecycle events from SB_TASK_EVENTS to the joined user channels, by user. Started
    with the first join, so a gateway with no user channel reads nothing."""

    nc: Client | None
    listeners: defaultdict[str, set[Callable[[Update], None]]] = field(
        default_factory=lambda: defaultdict(set)
    )
    _sub: Any = None
    _starting: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def listen(self, user: str, listener: Callable[[Update], None]) -> None:
        self.listeners[user].add(listener)
        async with self._starting:
            if self._sub is None and self.nc is not None:
                config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
                self._sub = await self.nc.jetstream().subscribe(
                    f"{TASK_EVENTS_SUBJECT_PREFIX}.>",
                    stream=TASK_EVENTS_STREAM,
                    ordered_consumer=True,
                    config=config,
                    cb=self._heard,
                )

    def forget(self, user: str, listener: Callable[[Update], None]) -> None:
        listeners = self.listeners.get(user)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self.listeners[user]

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None

    async def _heard(self, msg: Msg) -> None:
        update = _update_of_msg(msg, self.listeners.keys())
        if update is None:
            return
        user, change = update
        for listener in list(self.listeners.get(user, ())):
            listener(change)

    async def missed(self, user: str, last_seq: int) -> list[Update] | None:
        """The user's updates after stream sequence `last_seq`; None when that is further
        back than CATCH_UP_MAX events (or gone from the stream)."""
        if self.nc is None:
            return []
        js = self.nc.jetstream()
        info = await js.stream_info(TASK_EVENTS_STREAM)
        last, first = info.state.last_seq, info.state.first_seq
        if last - last_seq > CATCH_UP_MAX or last_seq + 1 < first:
            return None
        if last_seq >= last:
            return []
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last_seq + 1
        )
        sub = await js.subscribe(
            f"{TASK_EVENTS_SUBJECT_PREFIX}.>",
            stream=TASK_EVENTS_STREAM,
            ordered_consumer=True,
            config=config,
        )
        found: list[Update] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=CALL_TIMEOUT_S)
                update = _update_of_msg(msg, (user,))
                if update is not None:
                    found.append(update[1])
                if msg.metadata.sequence.stream >= last:
                    return found
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


def _update_of_msg(msg: Msg, users: Any) -> tuple[str, Update] | None:
    if is_snapshot(msg.subject):
        return None
    try:
        event = events_pb2.LifecycleEvent.FromString(msg.data)
    except Exception:  # not ours to judge: persistence_svc logs undecodable events
        return None
    if event.user_id not in users:
        return None
    return event.user_id, update_of(event, msg.metadata.sequence.stream)


# -- preferences: the default model an llm_generate without one gets ----------------------


@dataclass
class Preferences:
    """Each user's stored default model, which an llm_generate without a model needs on its
    ack's path. Read once per user and kept: older than PREFERENCES_TTL_S it is still used,
    while one read in the background refreshes it, and a burst of generations makes one
    read, not one each. The read starts when the user's socket connects (`prefetch`), so
    that even a user's first generation here seldom waits for UserService, which answers
    from persistence_svc, the process served last when the CPUs are busy. A change made on
    this gateway is seen at once; one made on another, by the generations after the next
    refresh. The users least recently asked for are forgotten past `max_users`."""

    users: history_pb2_grpc.UserServiceStub
    clock: Callable[[], float] = time.monotonic
    max_users: int = PREFERENCES_MAX_USERS
    _cache: OrderedDict[str, tuple[float, str]] = field(default_factory=OrderedDict)
    _reading: dict[str, asyncio.Task[str]] = field(default_factory=dict)

    async def default_model(self, user: str) -> str:
        """The user's default model, or "" (none stored, or the database is away)."""
        cached = self._cache.get(user)
        if cached is None:
            return await asyncio.shield(self._read(user))  # a caller's cancel ends only its wait
        self._cache.move_to_end(user)
        if self.clock() - cached[0] >= PREFERENCES_TTL_S:
            self._read(user)
        return cached[1]

    def prefetch(self, user: str) -> None:
        """Start reading `user`'s default model unless it is known or being read."""
        if user not in self._cache:
            self._read(user)

    def stored(self, user: str, prefs: history_pb2.Preferences) -> None:
        self._keep(user, (self.clock(), prefs.default_model))

    def _keep(self, user: str, entry: tuple[float, str]) -> None:
        self._cache[user] = entry
        self._cache.move_to_end(user)
        while len(self._cache) > self.max_users:
            self._cache.popitem(last=False)

    async def close(self) -> None:
        await cancel_and_wait(*self._reading.values())

    def _read(self, user: str) -> asyncio.Task[str]:
        task = self._reading.get(user)
        if task is None:
            task = asyncio.create_task(self._get(user, self.clock()), name=f"preferences {user}")
            self._reading[user] = task
            task.add_done_callback(lambda done: self._forget(user, done))
        return task

    def _forget(self, user: str, task: asyncio.Task[str]) -> None:
        if self._reading.get(user) is task:
            del self._reading[user]

    async def _get(self, user: str, asked: float) -> str:
        try:
            prefs = await self.users.GetPreferences(
                history_pb2.GetPreferencesRequest(user_id=user), timeout=CALL_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            log.info("preferences not read", extra={"user": user, "code": error.code().name})
            prefs = None
        cached = self._cache.get(user)
        if prefs is None or (cached is not None and cached[0] > asked):
            # Unread (what is cached stands), or set here while this read was under way.
            return cached[1] if cached is not None else ""
        self._keep(user, (asked, prefs.default_model))
        return str(prefs.default_model)


@dataclass
class UserDeps:
    """What every user channel of a gateway shares."""

    history: history_pb2_grpc.HistoryServiceStub
    preferences: Preferences
    feed: UserFeed
    routes: TaskRoutes
    catalog: ModelCatalog | None = None  # to refuse unknown models (None: llm_svc is asked later)


def _time(stamp: Any) -> str | None:
    return stamp.ToDatetime().isoformat() + "Z" if stamp.seconds or stamp.nanos else None


def _task_payload(task: history_pb2.HistoryTask, text_key: str) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "prompt": task.prompt,
        "status": tp.status_name(task.status),
        "model": task.model,
        "progress": round(task.progress, 3),
        "created_at": _time(task.created_at),
        "completed_at": _time(task.completed_at),
        text_key: task.response,
    }


class UserChannel:
    """One joined `user:<id>` topic of one socket (the life of a TaskChannel: join, start,
    deliver, close). Events are handled one at a time, in order."""

    def __init__(
        self, deps: UserDeps, user: str, topic: str, join_ref: str | None, send: SendFn
    ) -> None:
        self.deps = deps
        self.user = user
        self.topic = topic
        self.join_ref = join_ref
        self._send = send
        self._inbox: asyncio.Queue[Message] = asyncio.Queue()
        self._updates: asyncio.Queue[Update] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = False

    # -- join -------------------------------------------------------------------------

    async def join(self, params: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        if user_of(self.topic) != self.user:
            log.warning("user channel of another user refused", extra={"user": self.user})
            return False, {
                "reason": "unauthorized",
                "message": "a user may join only their own topic",
            }
        try:
            response = await self._join_reply(params)
        except ServiceError as error:
            return False, tp.error_reply(error)
        return True, response

    async def _join_reply(self, params: dict[str, Any]) -> dict[str, Any]:
        # Listening first: an update in flight while the reply is built is pushed after it.
        await self.deps.feed.listen(self.user, self._updates.put_nowait)
        self._listening = True
        ask = history_pb2.GetPreferencesRequest(user_id=self.user)
        count = history_pb2.CountTasksRequest(user_id=self.user)
        prefs, counts = await asyncio.gather(
            typed(self.deps.preferences.users.GetPreferences(ask, timeout=CALL_TIMEOUT_S)),
            typed(self.deps.history.CountTasks(count, timeout=CALL_TIMEOUT_S)),
        )
        self.deps.preferences.stored(self.user, prefs)
        response: dict[str, Any] = {
            "preferences": preferences_payload(prefs),
            "counts": {**dict(counts.by_status), "total": counts.total},
        }
        last_seq = params.get("last_seq")
        if isinstance(last_seq, int) and not isinstance(last_seq, bool) and last_seq >= 0:
            missed = await self.deps.feed.missed(self.user, last_seq)
            if missed is None:
                response["resync"] = True
            else:
                response["missed"] = missed
        return response

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._push_updates(), name=f"updates {self.topic}"),
            asyncio.create_task(self._handle_events(), name=f"events {self.topic}"),
        ]

    async def close(self) -> None:
        if self._listening:
            self.deps.feed.forget(self.user, self._updates.put_nowait)
        for task in self._tasks:
            await cancel_and_wait(task)

    # -- pushes -----------------------------------------------------------------------

    async def _push_updates(self) -> None:
        while True:
            update = await self._updates.get()
            await self._send(Message(self.join_ref, None, self.topic, "task_updated", update))

    # -- client events ----------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        self._inbox.put_nowait(message)

    async def _handle_events(self) -> None:
        while True:
            message = await self._inbox.get()
            payload = message.payload if isinstance(message.payload, dict) else {}
            try:
                response = await self._handle(message.event, payload)
            except ServiceError as error:
                log.info(
                    "user channel call refused", extra={"event": message.event, "e": repr(error)}
                )
                await self._reply(message, "error", tp.error_reply(error))
            except Exception:
                log.exception("user channel call failed", extra={"event": message.event})
                await self._reply(message, "error", {"reason": "internal"})
            else:
                await self._reply(message, "ok", response)

    async def _reply(self, message: Message, status: str, response: dict[str, Any]) -> None:
        await self._send(reply(self.join_ref, message.ref, self.topic, status, response))

    async def _handle(self, event: str, payload: dict[str, Any]) -> dict[str, Any]:
        match event:
            case "list_tasks":
                return await self._list(payload)
            case "get_task":
                return await self._get(_task_id(payload))
            case "delete_task":
                return await self._delete(_task_id(payload))
            case "delete_all":
                if payload.get("confirm") != CONFIRM_DELETE_ALL:
                    raise InvalidRequest(f'delete_all needs "confirm": "{CONFIRM_DELETE_ALL}"')
                return await self._delete_all()
            case "set_preferences":
                return await self._set_preferences(payload)
        raise InvalidRequest(f"unknown event {event!r}")

    async def _list(self, payload: dict[str, Any]) -> dict[str, Any]:
        limit, cursor, status = (
            payload.get("limit", 20),
            payload.get("cursor", ""),
            payload.get("status"),
        )
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= PAGE_MAX:
            raise InvalidRequest(f"limit must be 1 to {PAGE_MAX}")
        if not isinstance(cursor, str):
            raise InvalidRequest("cursor must be a string")
        request = history_pb2.ListTasksRequest(
            user_id=self.user, page_size=limit, cursor=cursor, preview_chars=PREVIEW_CHARS
        )
        if status is not None:
            request.status = _status(status)
        page = await typed(self.deps.history.ListTasks(request, timeout=CALL_TIMEOUT_S))
        return {
            "tasks": [_task_payload(task, "preview") for task in page.tasks],
            "next_cursor": page.next_cursor or None,
        }

    async def _get(self, task_id: str) -> dict[str, Any]:
        request = history_pb2.GetHistoryTaskRequest(task_id=task_id, user_id=self.user)
        trail_request = history_pb2.GetTaskEventsRequest(task_id=task_id, user_id=self.user)
        task, trail = await asyncio.gather(
            typed(self.deps.history.GetTask(request, timeout=CALL_TIMEOUT_S)),
            typed(self.deps.history.GetTaskEvents(trail_request, timeout=CALL_TIMEOUT_S)),
        )
        return {
            "task": _task_payload(task, "content"),
            "trail": [
                {
                    "kind": _kind_name(e.kind),
                    "status": tp.status_name(e.status),
                    "seq": e.seq,
                    "at": _time(e.at),
                }
                for e in trail.events
            ],
        }

    async def _delete(self, task_id: str) -> dict[str, Any]:
        """Cancel it first if it still runs, then remove it from history for good.

        task_svc says whose the task is: another user's is left alone (answered like a
        missing one). One it holds as this user's counts as deleted even when history has
        no row of it yet (its first events still on their way): history tombstones the id
        for this user all the same, and drops those events when they come."""
        theirs = False
        try:
            state = (await self.deps.routes.cancel(task_id, self.user)).state
            theirs = state.status != Status.TASK_STATUS_UNSPECIFIED
        except ServiceError as error:
            if error.code == common_pb2.ERROR_CODE_FORBIDDEN:
                return {"deleted": False}
            # Not known to task_svc (ended long ago, or never submitted), or task_svc out
            # of reach: history alone knows what this user had.
        delete = history_pb2.DeleteTaskRequest(task_id=task_id, user_id=self.user)
        done = await typed(self.deps.history.DeleteTask(delete, timeout=CALL_TIMEOUT_S))
        return {"deleted": done.deleted or theirs}

    async def _delete_all(self) -> dict[str, Any]:
        """Cancel the user's tasks that have not ended, at every task_svc node, then remove
        everything of theirs from history.

        In this order, because a cancel returns only once its task's terminal event is
        stored in JetStream: history's delete, which reads the events still on their way
        after that, finds every task cancelled here, written or not, and tombstones it, so
        no late event of it shows it again. If a node cannot be asked or a cancel fails,
        history is not touched: the call is refused and may be made again."""
        for _ in range(CANCEL_ROUNDS):
            task_ids, more = await self.deps.routes.user_tasks(self.user)
            await self._cancel_each(task_ids)
            if not more:
                break
        else:
            raise ServiceError(
                common_pb2.ERROR_CODE_UNAVAILABLE,
                "too many running tasks to cancel at once, retry later",
                retry_after_ms=1000,
            )
        delete = history_pb2.DeleteAllTasksRequest(user_id=self.user)
        done = await typed(self.deps.history.DeleteAllTasks(delete, timeout=CALL_TIMEOUT_S))
        return {"deleted": done.deleted}

    async def _cancel_each(self, task_ids: set[str]) -> None:
        """Cancel each of the user's `task_ids` at its node, CANCEL_PARALLEL at a time; the
        first failure raised once all were tried."""
        slots = asyncio.Semaphore(CANCEL_PARALLEL)

        async def cancel(task_id: str) -> None:
            async with slots:
                try:
                    await self.deps.routes.cancel(task_id, self.user)
                except ServiceError as error:
                    # Ended and forgotten since it was listed: nothing left to stop.
                    if error.code != common_pb2.ERROR_CODE_NOT_FOUND:
                        raise

        results = await asyncio.gather(*map(cancel, task_ids), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _set_preferences(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Change the fields given and keep the others: read, change, write the whole back
        (UserService stores preferences as a whole)."""
        changes = _preference_changes(payload)
        users = self.deps.preferences.users
        ask = history_pb2.GetPreferencesRequest(user_id=self.user)
        current = await typed(users.GetPreferences(ask, timeout=CALL_TIMEOUT_S))
        for key, value in changes.items():
            if key == "extra":
                current.extra.clear()  # given as a whole: a key left out is removed
                current.extra.update(value)
            else:
                setattr(current, key, value)
        check_preferences(current)  # refused whole if any field is bad: nothing half applied
        model = changes.get("default_model")
        if model and self.deps.catalog is not None:
            await self.deps.catalog.resolve(model)  # MODEL_NOT_FOUND for an unknown model
        store = history_pb2.SetPreferencesRequest(user_id=self.user, preferences=current)
        stored = await typed(users.SetPreferences(store, timeout=CALL_TIMEOUT_S))
        self.deps.preferences.stored(self.user, stored)
        return preferences_payload(stored)


def preferences_payload(prefs: history_pb2.Preferences) -> dict[str, Any]:
    """The preferences as the join and set_preferences replies show them."""
    return {
        "default_model": prefs.default_model,
        "name": prefs.name,
        "email": prefs.email,
        "extra": dict(prefs.extra),
    }


def _preference_changes(payload: dict[str, Any]) -> dict[str, Any]:
    """The fields set_preferences was given, of the right JSON types (their values are
    checked with the merged whole, by svckit/preferences.py)."""
    changes: dict[str, Any] = {}
    for key in ("default_model", "name", "email"):
        if key in payload:
            changes[key] = _string(payload[key], key)
    if "extra" in payload:
        extra = payload["extra"]
        if not isinstance(extra, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in extra.items()
        ):
            raise InvalidRequest("extra must be an object of strings")
        changes["extra"] = dict(extra)
    return changes


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string")
    return value


def _kind_name(kind: events_pb2.LifecycleKind.ValueType) -> str:
    return events_pb2.LifecycleKind.Name(kind).removeprefix("LIFECYCLE_KIND_").lower()


def _task_id(payload: dict[str, Any]) -> str:
    task_id = payload.get("task_id")
    canonical = tp.task_id_of(f"{tp.TOPIC_PREFIX}{task_id}") if isinstance(task_id, str) else None
    if canonical is None:
        raise InvalidRequest("task_id must be a UUID")
    return canonical


def _status(name: object) -> common_pb2.TaskStatus.ValueType:
    if isinstance(name, str) and name and name != "new":
        try:
            return Status.Value(f"TASK_STATUS_{name.upper()}")
        except ValueError:
            pass
    raise InvalidRequest(f"unknown status {name!r}")
