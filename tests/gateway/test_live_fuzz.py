"""Thousands of malformed and hostile frames against a LIVE gateway (hypothesis): nothing
crashes, a bystander on another socket is served throughout, and once every socket is gone
the connection, channel, Watch-stream and per-user counts are back to zero.

The gateway runs on its own event loop in a thread; hypothesis drives it with websockets'
synchronous client from the test thread, one hostile socket per example.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import timeout
from tests.gateway.live import Stack, running_stack

T = TypeVar("T")

LIMITS: dict[str, Any] = {
    "gateway_max_frame_bytes": 2048,
    "gateway_max_prompt_chars": 64,
    "gateway_max_channels": 3,
    "gateway_max_connections_per_user": 3,
    "gateway_outbound_max_frames": 16,
    # Sockets whose peer never finishes a close are swept quickly (see Connection.sweep).
    "gateway_idle_timeout_s": 2.0,
    "gateway_close_timeout_s": 1.0,
}
TASKS = [f"task:0b7e2a4e-3c1f-4f57-9a7e-0e6f1f0c9a1{i}" for i in range(4)]
USERS = ["mallory", "trudy", "eve"]


class LiveGateway:
    """A gateway stack on a private loop in a daemon thread, and a bystander client."""

    bystander: Bystander

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._stack_cm = running_stack(**LIMITS)
        self.stack: Stack = self.call(self._stack_cm.__aenter__())
        self.stack.fake.auto_run = True  # generations stream while sockets misbehave

    def call(self, coro: Coroutine[Any, Any, T], seconds: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout(seconds))

    def close(self) -> None:
        try:
            self.call(self._stack_cm.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()


@pytest.fixture(scope="module")
def live() -> Iterator[LiveGateway]:
    gateway = LiveGateway()
    try:
        with connect(gateway.stack.url("bystander"), open_timeout=timeout(5)) as ws:
            gateway.bystander = Bystander(ws)
            yield gateway
    finally:
        gateway.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
refs = st.none() | st.sampled_from(["1", "2", "3", "99"]) | st.integers(-5, 5) | st.booleans()
topics = st.sampled_from([*TASKS, "phoenix", "task:nope", "rooms:lobby", ""]) | st.text(max_size=12)
events = st.sampled_from(
    ["phx_join", "phx_leave", "heartbeat", "llm_generate", "cancel", "phx_reply", "dance"]
)
payloads = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": st.text(max_size=80) | json_values,
            "last_seq": st.integers(-3, 2**64) | json_values,
            "priority": st.integers(-2, 12) | json_values,
            "model": st.text(max_size=10) | json_values,
            "options": st.dictionaries(
                st.sampled_from(["max_tokens", "temperature", "system"]), json_values
            ),
        },
    ),
)
v2_frames = st.tuples(refs, refs, topics, events, payloads).map(lambda f: json.dumps(list(f)))
frames = st.one_of(
    v2_frames,
    v2_frames,
    v2_frames,  # mostly well-formed but hostile; the rest is garbage
    st.text(max_size=40),
    st.binary(max_size=40),
    json_values.map(json.dumps),
    st.just(json.dumps([None, "1", "phoenix", "heartbeat", {"pad": "x" * 4000}])),  # too big
)


class Bystander:
    """A well-behaved client (its own user) on a joined channel; heartbeats must always work."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ref = 0
        join = ["1", "1", TASKS[0].replace("0b7e", "ffff"), "phx_join", {}]
        self.ws.send(orjson.dumps(join).decode())
        assert orjson.loads(self.ws.recv(timeout(5)))[4]["status"] == "ok"

    def heartbeat(self) -> None:
        self.ref += 1
        ref = f"hb{self.ref}"
        self.ws.send(orjson.dumps([None, ref, "phoenix", "heartbeat", {}]).decode())
        while True:
            frame = orjson.loads(self.ws.recv(timeout(5)))
            if frame[1] == ref:
                assert frame[4] == {"status": "ok", "response": {}}
                return


def attack(live: LiveGateway, user: str, sequence: list[str | bytes], read: bool) -> None:
    try:
        ws: ClientConnection = connect(
            live.stack.url(user), open_timeout=timeout(5), close_timeout=timeout(5)
        )
    except InvalidStatus as refused:  # over the per-user connection limit
        assert refused.response.status_code == 403
        return
    with ws, contextlib.suppress(ConnectionClosed):
        for frame in sequence:
            ws.send(frame)
        if read:  # else the socket closes with unread pushes queued
            with contextlib.suppress(TimeoutError):
                while True:
                    ws.recv(0.001)


def test_hostile_frames_against_a_live_gateway(live: LiveGateway) -> None:
    sent: list[int] = []

    @given(
        sequences=st.lists(
            st.tuples(
                st.sampled_from(USERS), st.lists(frames, min_size=8, max_size=25), st.booleans()
            ),
            min_size=1,
            max_size=4,
        )
    )
    @settings(max_examples=130, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def storm(sequences: list[tuple[str, list[str | bytes], bool]]) -> None:
        # Several hostile sockets at once, from threads, as real abuse would come.
        threads = [
            threading.Thread(target=attack, args=(live, user, sequence, read))
            for user, sequence, read in sequences
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout(20))
            assert not thread.is_alive()
        sent.append(sum(len(sequence) for _, sequence, _ in sequences))
        live.bystander.heartbeat()

    storm()
    assert sum(sent) >= 1000  # 130 examples x at least 8 frames
    live.bystander.ws.close()
    # Connections, channels, Watch streams, user slots: a socket whose peer never finished
    # its close is aborted by the sweep within idle/4 + close timeout.
    live.call(live.stack.wait_drained(10), seconds=15)
    stack = live.stack
    assert stack.metric("gateway_bad_frames_total", kind="invalid") > 0
    assert stack.metric("gateway_bad_frames_total", kind="binary") > 0
    assert stack.metric("gateway_limit_hits_total", limit="frame_size") > 0
    assert stack.metric("gateway_joins_total", status="ok") > 0
