"""The operator dashboard (Oban Web and Phoenix LiveDashboard are the references): a static page
served by the gateway (`GET /admin`, gateway_svc/static/) and the `admin:dashboard` channel it
joins over the gateway's own Phoenix protocol, open only to the users in GATEWAY_ADMIN_USERS.

Joined, the channel pushes a `snapshot` every `interval_s` (the join reply is the latest one):
queues (the task_svc nodes' QueueBoards, summed; a queue's oldest wait is the longest of any
node's, its throughput the runs all nodes finished per second over THROUGHPUT_WINDOW_S), the
tasks that have not ended (every node's ListActiveTasks), dead letters, providers (llm_svc's
ListProviders), this gateway's sockets and channels, and history's backlog and lag
(`_history`: from persistence_svc's durable consumer in JetStream). The
operator's actions are events on the channel: `cancel_task`, `retry_dead_letter`,
`discard_dead_letter` {task_id}, each replied ok or with the error's reason.

The socket's token proved the operator; the gateway then calls task_svc and llm_svc as the
`admin` caller (svckit/service_auth.py), which their admin RPCs require. A source that does
not answer leaves its part of the snapshot empty and names it in `unavailable`.

One snapshot per refresh for the whole gateway: every admin channel is sent the one the
dashboard's refresher made (started when the first admin joins, stopped when the last
leaves, cancelled at shutdown), so the RPCs behind it run once per refresh however many
operators watch. A channel whose socket is slow skips to the latest rather than queue them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerInfo
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from gateway_svc import task_payloads as tp
from gateway_svc.metrics import GatewayMetrics
from gateway_svc.phoenix import Message, reply
from gateway_svc.routes import Owner, TaskRoutes
from svckit.errors import ServiceError, typed
from svckit.grpc_server import insecure_channel
from svckit.lifecycle import cancel_and_wait
from svckit.metrics import sample
from svckit.nats import QUEUE_BOARD_SUBJECT, TASK_EVENTS_STREAM, TASK_EVENTS_SUBJECT_PREFIX
from svckit.service_auth import ADMIN
from switchboard.v1 import common_pb2, events_pb2, llm_pb2, llm_pb2_grpc, tasks_pb2, tasks_pb2_grpc

log = logging.getLogger(__name__)

ADMIN_TOPIC = "admin:dashboard"
STATIC = Path(__file__).parent / "static"
# GET path → (file, content type) of the page and its two scripts.
PAGES = {
    "/admin": ("admin.html", "text/html; charset=utf-8"),
    "/admin/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/admin/phoenix.min.js": ("phoenix.min.js", "text/javascript; charset=utf-8"),
}
HISTORY_CONSUMER = "persistence"  # persistence_svc/consumer.py's durable ...
HISTORY_SUBJECT = f"{TASK_EVENTS_SUBJECT_PREFIX}.>"  # ... and what it filters
CALL_TIMEOUT_S = 2.0
BOARD_STALE_S = 3.0  # a node's QueueBoard not heard for this long no longer counts
LIST_LIMIT = 100
SendFn = Callable[[Message], Awaitable[None]]
Snapshot = dict[str, Any]


def page(path: str) -> tuple[bytes, str] | None:
    """The static file served at `path` (body, content type), or None."""
    found = PAGES.get(path)
    if found is None:
        return None
    name, content_type = found
    return (STATIC / name).read_bytes(), content_type


THROUGHPUT_WINDOW_S = 10.0  # a queue's throughput: runs finished over about this long


@dataclass
class _Board:
    """A node's latest QueueBoard, and its finished counts over the last
    THROUGHPUT_WINDOW_S (oldest first), which its throughput is read from."""

    board: events_pb2.QueueBoard
    heard_at: float
    finished: collections.deque[tuple[float, dict[str, int]]] = field(
        default_factory=collections.deque
    )

    def heard(self, board: events_pb2.QueueBoard, at: float) -> None:
        self.board, self.heard_at = board, at
        counts = {s.queue: s.finished for s in board.queues}
        if self.finished and any(counts.get(q, 0) < n for q, n in self.finished[-1][1].items()):
            self.finished.clear()  # the node restarted: its counts began again
        self.finished.append((at, counts))
        while at - self.finished[0][0] > THROUGHPUT_WINDOW_S:
            self.finished.popleft()

    def throughput(self, queue: str) -> float:
        """Runs of `queue` finished per second on this node over the window (0 until two
        boards are in)."""
        (first_at, first), (last_at, last) = self.finished[0], self.finished[-1]
        if last_at <= first_at:
            return 0.0
        return (last.get(queue, 0) - first.get(queue, 0)) / (last_at - first_at)


@dataclass
class Dashboard:
    """What every admin channel of this gateway reads and acts through."""

    admins: frozenset[str]
    routes: TaskRoutes
    metrics: GatewayMetrics
    llm_addr: str
    nc: Client | None = None
    interval_s: float = 1.0
    wall: Callable[[], float] = time.time  # against JetStream's timestamps (history lag)
    boards: dict[str, _Board] = field(default_factory=dict)  # by node
    _stubs: dict[str, tasks_pb2_grpc.TaskServiceStub] = field(default_factory=dict)
    _channels: list[grpc.aio.Channel] = field(default_factory=list)
    _llm: llm_pb2_grpc.LlmServiceStub | None = None
    _sub: Subscription | None = None
    # The shared snapshots: the refresher while an admin watches, the latest one and its
    # round (counting every snapshot made), and an event set when the next one is out.
    _watchers: int = 0
    _refresher: asyncio.Task[None] | None = None
    _latest: Snapshot | None = None
    _round: int = 0
    _published: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def watchers(self) -> int:
        """Admin channels joined now."""
        return self._watchers

    @property
    def refresher(self) -> asyncio.Task[None] | None:
        """The task making the shared snapshots (None while no admin watches)."""
        return self._refresher

    async def start(self) -> None:
        if self.nc is not None:
            self._sub = await self.nc.subscribe(QUEUE_BOARD_SUBJECT, cb=self._heard)

    async def close(self) -> None:
        await cancel_and_wait(self._refresher)
        self._refresher = None
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
        for channel in self._channels:
            await channel.close()

    async def _heard(self, msg: Msg) -> None:
        try:
            board = events_pb2.QueueBoard.FromString(msg.data)
        except Exception:  # a bad board must not stop the others
            log.warning("unreadable queue board ignored")
            return
        now = time.monotonic()
        known = self.boards.get(board.node)
        if known is None:
            known = self.boards[board.node] = _Board(board, now)
        known.heard(board, now)

    # -- the admin callers -------------------------------------------------------------

    def _stub(self, address: str) -> tasks_pb2_grpc.TaskServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = insecure_channel(address, caller=ADMIN)
            self._channels.append(channel)
            stub = self._stubs[address] = tasks_pb2_grpc.TaskServiceStub(channel)
        return stub

    def _llm_stub(self) -> llm_pb2_grpc.LlmServiceStub:
        if self._llm is None:
            channel = insecure_channel(self.llm_addr, caller=ADMIN)
            self._channels.append(channel)
            self._llm = llm_pb2_grpc.LlmServiceStub(channel)
        return self._llm

    # -- the shared snapshots ----------------------------------------------------------

    async def watch(self) -> tuple[int, Snapshot]:
        """An admin channel joins: the latest snapshot and its round (the first admin waits
        for the refresher's first). Every `watch` is paired with an `unwatch`, even when
        this is cancelled."""
        self._watchers += 1
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh(), name="dashboard snapshots")
        return await self.after(0)

    async def unwatch(self) -> None:
        """An admin channel left; the last one stops the refresher."""
        self._watchers -= 1
        if self._watchers > 0:
            return
        refresher, self._refresher = self._refresher, None
        self._latest = None  # stale by the next join: it waits for a fresh one
        await cancel_and_wait(refresher)

    async def after(self, seen: int) -> tuple[int, Snapshot]:
        """The latest snapshot once its round is past `seen`, and that round (a reader that
        fell behind skips the rounds it missed)."""
        while self._latest is None or self._round <= seen:
            await self._published.wait()
        return self._round, self._latest

    async def _refresh(self) -> None:
        while True:
            try:
                snapshot = await self.snapshot()
            except Exception:  # sources' failures are in `unavailable`: this is a bug
                # Nothing published: the channels (and a join) wait for the next round.
                log.exception("dashboard snapshot failed")
            else:
                self._publish(snapshot)
            await asyncio.sleep(self.interval_s)

    def _publish(self, snapshot: Snapshot) -> None:
        self._latest, self._round = snapshot, self._round + 1
        # A new event for the next round: the waiters of this one wake, whoever waits
        # from now on waits for the next.
        published, self._published = self._published, asyncio.Event()
        published.set()

    # -- the snapshot ------------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """A snapshot made now (the refresher's; every channel gets it)."""
        parts = {
            "tasks": self._tasks(),
            "dead_letters": self._dead_letters(),
            "providers": self._providers(),
            "history": self._history(),
        }
        results = await asyncio.gather(*parts.values(), return_exceptions=True)
        out: dict[str, Any] = {"unavailable": []}
        empty: dict[str, Any] = {
            "tasks": [],
            "dead_letters": [],
            "providers": [],
            "history": {"pending": None, "lag_s": None},
        }
        for name, result in zip(parts, results, strict=True):
            if isinstance(result, BaseException):
                log.info("dashboard source failed", extra={"source": name, "e": repr(result)})
                out["unavailable"].append(name)
                out[name] = empty.get(name)
            else:
                out[name] = result
        history = out.pop("history")
        out["history_pending"], out["history_lag_s"] = history["pending"], history["lag_s"]
        out["queues"] = self._queues()
        out["sockets"] = int(sample(self.metrics.registry, "switchboard_sockets"))
        out["channels"] = int(sample(self.metrics.registry, "switchboard_channels"))
        return out

    def _queues(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        totals: dict[str, dict[str, Any]] = {}
        for known in self.boards.values():
            if now - known.heard_at > BOARD_STALE_S:
                continue
            for s in known.board.queues:
                q = totals.setdefault(
                    s.queue,
                    {"queue": s.queue, "waiting": 0, "running": 0, "concurrency": 0,
                     "mean_run_s": 0.0, "max_depth": 0, "oldest_s": 0.0,
                     "throughput_per_s": 0.0},
                )  # fmt: skip
                q["throughput_per_s"] += known.throughput(s.queue)  # every node's runs
                q["waiting"] += sum(s.waiting_by_priority)
                q["oldest_s"] = max(q["oldest_s"], s.oldest_s)  # the longest wait of any node
                q["running"] += s.concurrency - s.free_slots
                q["concurrency"] += s.concurrency
                q["max_depth"] += s.max_depth
                q["mean_run_s"] = max(q["mean_run_s"], s.mean_run_s)
        return sorted(totals.values(), key=lambda q: q["queue"])

    async def _tasks(self) -> list[dict[str, Any]]:
        request = tasks_pb2.ListActiveTasksRequest(limit=LIST_LIMIT)
        calls = [
            self._stub(address).ListActiveTasks(request, timeout=CALL_TIMEOUT_S)
            for address in self.routes.addresses().values()
        ]
        tasks = []
        for answer in await asyncio.gather(*calls):
            for state in answer.tasks:
                tasks.append(
                    {
                        "task_id": state.task_id,
                        "user_id": state.user_id,
                        "status": tp.status_name(state.status),
                        "progress": round(state.progress, 3),
                        "model": state.model,
                        "node": answer.node,
                    }
                )
        return tasks

    async def _dead_letters(self) -> list[dict[str, Any]]:
        request = tasks_pb2.ListDeadLettersRequest(limit=LIST_LIMIT)
        stub = self._stub(self.routes.fallback.address)  # any node: the stream is shared
        answer = await stub.ListDeadLetters(request, timeout=CALL_TIMEOUT_S)
        return [
            {
                "task_id": letter.task_id,
                "user_id": letter.user_id,
                "queue": letter.queue,
                "error": letter.error.message,
                "attempts": letter.attempts,
            }
            for letter in answer.dead_letters
        ]

    async def _providers(self) -> list[dict[str, Any]]:
        request = llm_pb2.ListProvidersRequest()
        answer = await self._llm_stub().ListProviders(request, timeout=CALL_TIMEOUT_S)
        return [
            {
                "provider": p.provider,
                "breaker": p.breaker,
                "requests": p.requests,
                "errors": p.errors,
                "mean_first_token_s": p.mean_first_token_s,
                "mean_total_s": p.mean_total_s,
            }
            for p in answer.providers
        ]

    async def _history(self) -> dict[str, Any]:
        """History's backlog (lifecycle events persistence_svc has not written yet: its
        durable consumer's pending and unacked) and lag (how long the oldest of them has
        waited, 0 with none); both None without NATS. One consumer info, and one message
        read while there is a backlog."""
        if self.nc is None:
            return {"pending": None, "lag_s": None}
        js = self.nc.jetstream(timeout=CALL_TIMEOUT_S)
        info = await js.consumer_info(TASK_EVENTS_STREAM, HISTORY_CONSUMER, timeout=CALL_TIMEOUT_S)
        pending = int((info.num_pending or 0) + (info.num_ack_pending or 0))
        lag_s = await self._history_lag_s(js, info) if pending else 0.0
        return {"pending": pending, "lag_s": lag_s}

    async def _history_lag_s(self, js: JetStreamContext, info: ConsumerInfo) -> float:
        """The age of the oldest unwritten event. persistence_svc acks an event once its
        batch is committed, and everything up to the consumer's ack floor is acked, so the
        first message of its subjects past the floor is the oldest not written; its
        JetStream timestamp (the NATS server's clock, against ours: 0 at worst) dates it.
        Unlike switchboard_history_lag_seconds (measured at each commit), this grows while
        nothing is written, during a database outage."""
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        try:
            oldest = await js.get_msg(
                TASK_EVENTS_STREAM, seq=floor + 1, subject=HISTORY_SUBJECT, next=True
            )
        except NotFoundError:
            return 0.0  # written since the consumer info
        if oldest.time is None:
            return 0.0
        return max(0.0, self.wall() - oldest.time.timestamp())

    # -- the operator's actions --------------------------------------------------------

    async def act(self, event: str, task_id: str) -> dict[str, Any]:
        """Carry out `event` on `task_id`: its reply's response (raises ServiceError)."""
        match event:
            case "cancel_task":
                return await self._cancel(task_id)
            case "retry_dead_letter":
                return await self._retry(task_id)
            case "discard_dead_letter":
                request = tasks_pb2.DiscardDeadLetterRequest(task_id=task_id)
                stub = self._stub(self.routes.fallback.address)
                answer = await typed(stub.DiscardDeadLetter(request, timeout=CALL_TIMEOUT_S))
                return {"discarded": answer.discarded}
        raise ServiceError(common_pb2.ERROR_CODE_INVALID_REQUEST, f"unknown event {event!r}")

    async def _cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel another user's task: task_svc checks the owner, so ask it as the owner
        (its user as listed by the node holding it)."""
        response = await self.routes.cancel(task_id, await self._owner_of(task_id))
        return tp.state_payload(response.state)

    async def _owner_of(self, task_id: str) -> str:
        for task in await self._tasks():
            if task["task_id"] == task_id:
                return str(task["user_id"])
        raise ServiceError(common_pb2.ERROR_CODE_NOT_FOUND, f"no active task {task_id}")

    async def _retry(self, task_id: str) -> dict[str, Any]:
        async def requeue_at(owner: Owner) -> tasks_pb2.RequeueDeadLetterResponse:
            request = tasks_pb2.RequeueDeadLetterRequest(task_id=task_id)
            stub = self._stub(owner.address)
            answer: tasks_pb2.RequeueDeadLetterResponse = await typed(
                stub.RequeueDeadLetter(request, timeout=CALL_TIMEOUT_S)
            )
            return answer

        answer = await self.routes.call(task_id, requeue_at)
        return tp.state_payload(answer.state)


class AdminChannel:
    """One joined `admin:dashboard` topic of one socket (the same life as a TaskChannel:
    join, start, deliver, close)."""

    def __init__(
        self, dashboard: Dashboard, user: str, topic: str, join_ref: str | None, send: SendFn
    ) -> None:
        self.dashboard = dashboard
        self.user = user
        self.topic = topic
        self.join_ref = join_ref
        self._send = send
        self._pusher: asyncio.Task[None] | None = None
        self._actions: set[asyncio.Task[None]] = set()
        self._watching = False  # counted among the dashboard's watchers
        self._seen = 0  # the round of the last snapshot sent

    async def join(self, params: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        if self.user not in self.dashboard.admins:
            log.warning("dashboard refused", extra={"user": self.user})
            return False, {"reason": "unauthorized"}
        log.info("dashboard joined", extra={"user": self.user})
        self._watching = True  # before the await: a join cancelled meanwhile still leaves
        self._seen, snapshot = await self.dashboard.watch()
        return True, snapshot

    def start(self) -> None:
        self._pusher = asyncio.create_task(self._push(), name="dashboard snapshots")

    async def _push(self) -> None:
        while True:
            self._seen, snapshot = await self.dashboard.after(self._seen)
            await self._send(Message(self.join_ref, None, self.topic, "snapshot", snapshot))

    def deliver(self, message: Message) -> None:
        task = asyncio.create_task(self._act(message), name=f"dashboard {message.event}")
        self._actions.add(task)
        task.add_done_callback(self._actions.discard)

    async def _act(self, message: Message) -> None:
        task_id = message.payload.get("task_id") if isinstance(message.payload, dict) else None
        if not isinstance(task_id, str) or tp.task_id_of(f"{tp.TOPIC_PREFIX}{task_id}") is None:
            await self._reply(message, "error", {"reason": "invalid_request"})
            return
        try:
            response = await self.dashboard.act(message.event, task_id)
        except ServiceError as error:
            log.info("dashboard action refused", extra={"event": message.event, "e": repr(error)})
            await self._reply(message, "error", tp.error_reply(error))
            return
        log.info("dashboard action", extra={"event": message.event, "task_id": task_id})
        await self._reply(message, "ok", response)

    async def _reply(self, message: Message, status: str, response: dict[str, Any]) -> None:
        await self._send(reply(self.join_ref, message.ref, self.topic, status, response))

    async def close(self) -> None:
        await cancel_and_wait(self._pusher)
        for task in list(self._actions):
            await cancel_and_wait(task)
        if self._watching:
            self._watching = False
            await self.dashboard.unwatch()
