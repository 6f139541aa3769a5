"""JetStream publishes whose PubAcks, and JetStream API requests whose answers, come back on
one reply subscription.

nats-py's `js.publish` is a request: per message a random token (`secrets`, so a system
call), an `asyncio.wait_for`, a done-callback and a `json.loads`; about 45 us of CPU on
the client, twice what the publish itself needs (22 us measured side by side). Every
accepted job and every lifecycle event is such a publish, on the ack's path and on the
stream's, so `AckedPublisher` does the same thing the short way: one wildcard subscription
on an inbox of its own, a counter for the reply subject, one timer per message.

The semantics are js.publish's: the call returns the PubAck once JetStream has stored the
message, raises `nats.js.errors.APIError` when JetStream refuses it, `NoStreamResponseError`
when no stream takes the subject, `nats.errors.TimeoutError` when no answer comes in time
(the message may have been stored: publish again with the same `Nats-Msg-Id` and JetStream
keeps one). Replies lost in a reconnect time out the same way. The subscription ends with
the connection (its drain or close).

`request` is the same short way for a JetStream API call (task_svc reads a task's last
stored event with one on every join of a task it does not hold: `js.get_last_msg` cost
about 110 us of CPU a lookup, most of it nats-py's request machinery).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import DEFAULT_PREFIX, PubAck

NO_RESPONDERS = "503"  # the Status header NATS puts on a request nobody can answer
NO_MESSAGE_FOUND = 10037  # a JetStream API error's err_code (a missing stream is another)
API_TIMEOUT_S = 5.0  # nats-py's JetStream default


class AckedPublisher:
    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._prefix = ""  # the reply subjects' inbox, once subscribed
        self._subscribing = asyncio.Lock()
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> PubAck:
        """Publish to JetStream and wait for its PubAck (see the module docstring)."""
        return _pub_ack(await self.request(subject, payload, timeout=timeout, headers=headers))

    async def request(
        self,
        subject: str,
        payload: bytes,
        *,
        timeout: float,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        """Send `payload` to `subject` and wait for the one reply (raises
        `nats.errors.TimeoutError` when none comes in time)."""
        if not self._prefix:
            await self._subscribe()
        token = str(next(self._tokens))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = future
        timer = loop.call_later(timeout, time_out, future)
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            return await future
        finally:
            timer.cancel()
            del self._waiting[token]

    async def _subscribe(self) -> None:
        async with self._subscribing:
            if self._prefix:
                return  # another publish subscribed meanwhile
            inbox = self.nc.new_inbox()
            await self.nc.subscribe(f"{inbox}.*", cb=self._answered)
            self._prefix = f"{inbox}."

    async def _answered(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self._prefix) :])
        if future is not None and not future.done():  # else: timed out meanwhile
            future.set_result(msg)


def _pub_ack(msg: Msg) -> PubAck:
    status = msg.headers.get("Status", "") if msg.headers else ""
    return pub_ack_of(msg.data, status)


def pub_ack_of(data: bytes, status: str) -> PubAck:
    """The PubAck a publish's reply (`data`, and the Status header's code or "") carries;
    raises as js.publish does for a refusal or no stream."""
    answer = _api_answer(data, status, nats.js.errors.NoStreamResponseError)
    if "error" in answer:
        raise nats.js.errors.APIError.from_error(answer["error"])
    return PubAck.from_response(answer)


def time_out(future: asyncio.Future[Any]) -> None:
    """Fail a reply still awaited as nats-py's requests do when none comes in time."""
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


@dataclass(frozen=True)
class StoredMessage:
    subject: str
    data: bytes


async def last_message(
    requests: AckedPublisher, stream: str, subject: str, timeout: float = API_TIMEOUT_S
) -> StoredMessage | None:
    """The last message `stream` holds on `subject` (a wildcard may match several: the last
    of them), None if it holds none: `js.get_last_msg`, over `requests`' subscription. Raises
    what `js.get_last_msg` raises for any other answer or none."""
    msg = await requests.request(
        f"{DEFAULT_PREFIX}.STREAM.MSG.GET.{stream}",
        orjson.dumps({"last_by_subj": subject}),
        timeout=timeout,
    )
    status = msg.headers.get("Status", "") if msg.headers else ""
    answer = _api_answer(msg.data, status, nats.errors.NoRespondersError)
    if "error" in answer:
        if answer["error"].get("err_code") == NO_MESSAGE_FOUND:
            return None
        raise nats.js.errors.APIError.from_error(answer["error"])
    message = answer["message"]
    return StoredMessage(message["subject"], base64.b64decode(message.get("data") or ""))


def _api_answer(data: bytes, status: str, nobody: type[Exception]) -> dict[str, Any]:
    """A JetStream answer's JSON; `nobody` is raised when NATS says no one could answer."""
    if not data and status == NO_RESPONDERS:
        raise nobody
    try:
        answer: dict[str, Any] = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise nats.js.errors.APIError(description="unreadable JetStream answer") from None
    return answer
