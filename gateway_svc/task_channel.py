"""The `task:<uuid>` channel: channel events become TaskService calls, and the task's Watch
stream becomes pushes.

Ordering (docs/protocol.md): the join reply goes out before any push; the events of one
channel are handled one at a time, in arrival order; pushes and replies of one channel go
out in the order they were produced. The `_out` lock is what makes the `llm_generate` ack
precede the `queued` progress push that the same Submit causes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway_svc import metrics as m
from gateway_svc import task_payloads as tp
from gateway_svc.admin import Dashboard
from gateway_svc.direct_submit import DirectSubmit
from gateway_svc.limits import RateLimiter
from gateway_svc.phoenix import Message, reply
from gateway_svc.routes import RETRY_FOR_S, REWATCH_FOR_S, Owner, TaskRoutes, moved
from gateway_svc.user_channel import UserDeps
from gateway_svc.watches import Watch
from svckit import tracing
from svckit.errors import ServiceError
from svckit.lifecycle import cancel_and_wait
from svckit.requests import MAX_PROMPT_CHARS, InvalidRequest, TooLong
from switchboard.v1 import common_pb2, tasks_pb2

log = logging.getLogger(__name__)

Code = common_pb2.ErrorCode
SendFn = Callable[[Message], Awaitable[None]]
CrashFn = Callable[["TaskChannel"], Awaitable[None]]
WritableFn = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class ChannelDeps:
    """What every channel of a gateway shares."""

    routes: TaskRoutes  # each task's task_svc node: its watches, Submits and Cancel
    metrics: m.GatewayMetrics
    generate_limiter: RateLimiter  # per user, across all of the user's sockets
    max_prompt_chars: int = MAX_PROMPT_CHARS
    join_timeout: float = 10.0
    clock: Callable[[], float] = field(default=time.monotonic)
    direct: DirectSubmit | None = None  # stores the jobs of new tasks itself (the acks' path)
    dashboard: Dashboard | None = None  # the admin:dashboard topic's sources (admin.py)
    users: UserDeps | None = None  # the user:<id> topics' history and preferences


class TaskChannel:
    """One joined `task:<uuid>` topic of one socket.

    Lifecycle: `await join(params)` → the I/O layer sends the join reply → `start()` →
    `deliver(message)` for each client event → `await close()`. A Watch stream that breaks
    before the task's terminal event reports `on_crash` (the socket then sends phx_error and
    the client rejoins with `last_seq`).
    """

    def __init__(
        self,
        deps: ChannelDeps,
        user: str,
        topic: str,
        task_id: str,
        join_ref: str | None,
        send: SendFn,
        on_crash: CrashFn,
        writable: WritableFn | None = None,
    ) -> None:
        self.deps = deps
        self.metrics = deps.metrics
        self.user = user
        self.topic = topic
        self.task_id = task_id
        self.join_ref = join_ref
        self._send = send
        self._on_crash = on_crash
        self._writable = writable
        self._join_timeout = deps.join_timeout
        self._watch: Watch | None = None
        self._last_seq = 0  # of the last event pushed (or the join's last_seq)
        self._terminal = False
        self._closed = False
        self._new_since: float | None = None  # when the join found the task new (unsubmitted)
        self._out = asyncio.Lock()
        self._inbox: collections.deque[Message] = collections.deque()
        self._pump: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._timing: _Timing | None = None  # of the generation accepted on this channel

    # -- join -------------------------------------------------------------------------------

    async def join(self, params: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Open Watch(after_seq=last_seq); its first message is the join reply's response."""
        ok, response = await self._join(params)
        self.metrics.joins.labels("ok" if ok else "error").inc()
        return ok, response

    async def _join(self, params: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        try:
            after_seq = tp.last_seq_of(params)
        except InvalidRequest as error:
            return False, {"reason": "invalid_request", "message": error.message}
        self._last_seq = after_seq
        try:
            first = await asyncio.wait_for(self._open_watch(after_seq), self._join_timeout)
        except ServiceError as refusal:
            if refusal.code == Code.ERROR_CODE_FORBIDDEN:
                return False, {"reason": "unauthorized"}
            log.warning("join failed", extra={"topic": self.topic, "error": repr(refusal)})
            return False, tp.error_reply(refusal)
        except TimeoutError:
            log.warning("join timed out", extra={"topic": self.topic})
            return False, {"reason": "timeout", "message": "the task service did not answer"}
        if first is None or not first.HasField("state"):
            if self._watch is not None:
                self._watch.cancel()
            log.error("watch began without a state", extra={"topic": self.topic})
            return False, {"reason": "internal", "message": "no task state"}
        self._terminal = first.state.status in tp.TERMINAL
        if first.state.status == tp.Status.TASK_STATUS_UNSPECIFIED:
            self._new_since = self.deps.clock()
        return True, tp.state_payload(first.state)

    async def _open_watch(
        self, after_seq: int, retry_for_s: float = RETRY_FOR_S
    ) -> tasks_pb2.WatchResponse | None:
        """Watch at the task's node (asked again wherever it moves meanwhile): its first
        response, the watch then in `self._watch`."""

        async def watch_at(owner: Owner) -> tasks_pb2.WatchResponse | None:
            request = tasks_pb2.WatchRequest(
                task_id=self.task_id, user_id=self.user, after_seq=after_seq
            )
            watch = owner.watches.open(request)
            try:
                first = await watch.read()
            except BaseException:
                watch.cancel()
                raise
            self._watch = watch
            return first

        return await self.deps.routes.call(self.task_id, watch_at, retry_for_s=retry_for_s)

    async def _rewatch(self) -> bool:
        """The task's node went away or handed its shard over: watch at its new node from
        the last seq pushed, so the client sees one gap-free sequence. False if that fails
        (the client then rejoins, after phx_error)."""
        if self._watch is not None:
            self._watch.cancel()
        try:
            first = await self._open_watch(self._last_seq, REWATCH_FOR_S)
        except ServiceError as error:
            log.warning("rewatch failed", extra={"topic": self.topic, "error": repr(error)})
            return False
        if first is not None and first.HasField("state"):
            self._terminal = self._terminal or first.state.status in tp.TERMINAL
        log.info("watching at the task's new node", extra={"topic": self.topic})
        return True

    def start(self) -> None:
        """Begin pushing the task's events; call after the join reply has been sent."""
        self._pump = asyncio.create_task(self._pump_events(), name=f"pump {self.topic}")

    async def _pump_events(self) -> None:
        try:
            while True:
                try:
                    await self._push_events()
                    break
                except ServiceError as error:
                    if self._closed or self._terminal or not moved(error):
                        raise
                    if not await self._rewatch():
                        raise
        except ServiceError as error:
            if self._closed:
                return
            log.warning(
                "watch broke",
                extra={"topic": self.topic, "code": error.reason, "error": error.message},
            )
        except Exception:
            if self._closed:
                return
            log.exception("watch pump failed", extra={"topic": self.topic})
        if not self._terminal and not self._closed:
            # The stream ended early and no node took it up: phx_error makes the client
            # rejoin with last_seq and catch up from the new stream.
            await self._on_crash(self)

    async def _push_events(self) -> None:
        """Push the watch's events until it ends (raises ServiceError if it breaks)."""
        while True:
            if self._writable is not None:
                await self._writable()  # the socket's queue paces the watch
            assert self._watch is not None
            message = await self._watch.read()
            if message is None:
                return
            if not message.HasField("event"):
                continue
            event = message.event
            self._new_since = None  # submitted: only task_svc knows what became of it
            ends = tp.is_terminal(event)
            self._terminal = self._terminal or ends
            self._last_seq = max(self._last_seq, event.seq)
            push = tp.event_push(event)
            if push is not None:
                self.metrics.pushed(push[0])
                if self._timing is not None:
                    self._timed(push[0], ends)
                async with self._out:
                    await self._send(Message(self.join_ref, None, self.topic, *push))

    # -- client events ----------------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        """Queue a client event; events are handled one at a time, in order."""
        self._inbox.append(message)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(), name=f"inbox {self.topic}")

    async def _drain(self) -> None:
        while self._inbox:
            message = self._inbox.popleft()
            try:
                await self._handle(message)
            except Exception:
                log.exception("channel event failed", extra={"topic": self.topic})
                await self._on_crash(self)
                return

    async def _reply(self, ref: str | None, status: str, response: dict[str, Any]) -> None:
        await self._send(reply(self.join_ref, ref, self.topic, status, response))

    async def _handle(self, message: Message) -> None:
        match message.event:
            case "llm_generate":
                await self._generate(message)
            case "cancel":
                await self._cancel(message)
            case _:
                log.info("unknown event", extra={"topic": self.topic, "event": message.event})
                await self._reply(message.ref, "error", {"reason": "unknown event"})

    async def _generate(self, message: Message) -> None:
        started = time.monotonic()
        # Current: the Submit's log lines (a refusal) carry the trace id.
        with tracing.span("llm_generate", attributes={"task_id": self.task_id}) as span:
            response = await self._submit(message, started, tracing.traceparent(span))
            tracing.failed(span, response["reason"] if response is not None else "")
        self.metrics.ack.observe(time.monotonic() - started)
        self.metrics.generates.labels("ok" if response is None else "error").inc()

    async def _default_model(self) -> str:
        """The user's stored default model (set_preferences), if llm_svc still offers it."""
        assert self.deps.users is not None
        users = self.deps.users
        model = await users.preferences.default_model(self.user)
        if model and users.catalog is not None:
            try:
                await users.catalog.resolve(model)
            except ServiceError:
                return ""  # no longer offered: the service default
        return model

    def _timed(self, event: str, ends: bool) -> None:
        """Time the accepted generation's first chunk and its end (this channel's pushes)."""
        timing = self._timing
        assert timing is not None
        elapsed = time.monotonic() - timing.started
        if event == "chunk" and not timing.chunked:
            timing.chunked = True
            self.metrics.first_chunk.labels(timing.model).observe(elapsed)
        elif ends:
            self._timing = None
            self.metrics.generation.labels(timing.model).observe(elapsed)

    async def _submit(
        self, message: Message, started: float, traceparent: str
    ) -> dict[str, Any] | None:
        """Validate, rate-limit, Submit, reply; the error response when refused. Checks run
        cheapest first, so a refused push never reaches task_svc."""
        try:
            request = tp.submit_request(
                self.task_id, self.user, message.payload, self.deps.max_prompt_chars
            )
            request.traceparent = traceparent
            if not request.model and self.deps.users is not None:
                request.model = await self._default_model()
        except InvalidRequest as error:
            if isinstance(error, TooLong):
                self.metrics.limit(m.LIMIT_PROMPT_SIZE)
            refused = {"reason": "invalid_request", "message": error.message}
            await self._reply(message.ref, "error", refused)
            return refused
        wait_ms = self.deps.generate_limiter.take(self.user, self.deps.clock())
        if wait_ms:
            self.metrics.limit(m.LIMIT_GENERATE_RATE)
            self.metrics.rate_limited.labels("gateway").inc()
            limited = {
                "reason": "rate_limited",
                "message": f"too many generations; retry in {wait_ms} ms",
                "retry_after_ms": wait_ms,
            }
            await self._reply(message.ref, "error", limited)
            return limited
        # Holding `_out` keeps the pushes this Submit causes behind its reply.
        async with self._out:
            try:
                response = await self._store_here(request)
                if response is None:
                    response = await self.deps.routes.call(
                        self.task_id, lambda owner: owner.submits.submit(request)
                    )
            except ServiceError as refusal:
                log.info("submit refused", extra={"topic": self.topic, "error": repr(refusal)})
                if refusal.code == Code.ERROR_CODE_RATE_LIMITED:
                    self.metrics.rate_limited.labels("task_svc").inc()
                error_response = tp.error_reply(refusal)
                await self._reply(message.ref, "error", error_response)
                return error_response
            await self._reply(message.ref, "ok", tp.submit_reply(self.task_id, response))
            if not response.duplicate:
                self._timing = _Timing(started, response.state.model or "default")
            return None

    async def _store_here(
        self, request: tasks_pb2.SubmitRequest
    ) -> tasks_pb2.SubmitResponse | None:
        """The ack's own path (direct_submit.py), for a task known to be new; None when
        task_svc must answer."""
        direct, new_since = self.deps.direct, self._new_since
        self._new_since = None  # a second push on this channel asks task_svc
        if direct is None or new_since is None:
            return None
        if self.deps.clock() - new_since > direct.max_age_s:
            return None
        started = time.monotonic()
        response = await direct.submit(request)
        if response is not None:
            self.metrics.ack_store.observe(time.monotonic() - started)
        return response

    async def _cancel(self, message: Message) -> None:
        async with self._out:
            try:
                response = await self.deps.routes.cancel(self.task_id, self.user)
            except ServiceError as refusal:
                await self._reply(message.ref, "error", tp.error_reply(refusal))
                return
            await self._reply(message.ref, "ok", tp.state_payload(response.state))

    # -- shutdown ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop pushing and handling; idempotent. Safe to call from the channel's own tasks."""
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
        me = asyncio.current_task()
        await cancel_and_wait(*(t for t in (self._pump, self._worker) if t is not me))


@dataclass
class _Timing:
    """When this channel's generation was pushed, and for which model (the catalogue's)."""

    started: float
    model: str
    chunked: bool = False
