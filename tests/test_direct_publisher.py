"""svckit/direct_publisher.py: the acks' own NATS connection, against a real nats-server:
PubAcks and refusals as js.publish gives them, a lost server failing what waits at once and
a returning one taken up again, credentials from the URL, a server it cannot speak to left
alone."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import nats.errors
import nats.js.errors
import pytest
import uvloop
from nats.aio.client import Client

from svckit.direct_publisher import DirectPublisher
from svckit.nats import JOBS_STREAM, NotConnected
from tests.conftest import eventually, jobs_stream_at, timeout
from tools.natsserver import start_nats

SUBJECT = "switchboard.jobs.3.default"


async def connected(url: str) -> DirectPublisher:
    publisher = DirectPublisher(url, "test acks")
    publisher.start()
    async with asyncio.timeout(timeout(10)):
        await publisher.wait_connected()
    return publisher


async def test_a_publish_returns_its_pub_ack_and_a_repeat_is_a_duplicate(
    nats_url: str, jobs_nc: Client
) -> None:
    publisher = await connected(nats_url)
    try:
        headers = {"Nats-Msg-Id": "t-1"}
        ack = await publisher.publish(SUBJECT, b"job", timeout=5, headers=headers)
        assert (ack.stream, ack.seq, ack.duplicate) == (JOBS_STREAM, 1, None)
        again = await publisher.publish(SUBJECT, b"job", timeout=5, headers=headers)
        assert again.duplicate and again.seq == 1
        stored = await jobs_nc.jetstream().get_last_msg(JOBS_STREAM, SUBJECT)
        assert stored.data == b"job" and (stored.headers or {}).get("Nats-Msg-Id") == "t-1"
        # Many at once: each answer goes to its own publish.
        acks = await asyncio.gather(
            *(
                publisher.publish(SUBJECT, b"x", timeout=5, headers={"Nats-Msg-Id": f"m-{i}"})
                for i in range(50)
            )
        )
        assert sorted(a.seq for a in acks) == list(range(2, 52))
    finally:
        await publisher.close()
    assert not publisher.connected


async def test_a_subject_no_stream_takes_raises_as_js_publish_does(
    nats_url: str, jobs_nc: Client
) -> None:
    publisher = await connected(nats_url)
    try:
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await publisher.publish("nowhere.at.all", b"x", timeout=5, headers={})
        # A refusal by the stream itself (a wrong expected stream) is an APIError.
        with pytest.raises(nats.js.errors.APIError):
            await publisher.publish(
                SUBJECT, b"x", timeout=5, headers={"Nats-Expected-Stream": "OTHER"}
            )
    finally:
        await publisher.close()


async def test_a_lost_server_fails_what_waits_and_a_returning_one_is_taken_up(
    tmp_path: Path,
) -> None:
    server = await start_nats(tmp_path / "js")
    await (await jobs_stream_at(server.url)).close()
    publisher = await connected(server.url)
    try:
        server.process.send_signal(signal.SIGSTOP)  # the publish waits for an answer...
        waiting = asyncio.create_task(publisher.publish(SUBJECT, b"x", timeout=30, headers={}))
        await asyncio.sleep(0)
        server.process.kill()  # ...that cannot come: the connection's end fails it at once
        server.process.wait()
        async with asyncio.timeout(timeout(10)):
            with pytest.raises(nats.errors.ConnectionClosedError):
                await waiting
        assert not publisher.connected
        with pytest.raises(NotConnected):
            await publisher.publish(SUBJECT, b"x", timeout=5, headers={})
        back = await start_nats(tmp_path / "js", port=server.port)
        try:
            async with asyncio.timeout(timeout(20)):
                await publisher.wait_connected()
            ack = await publisher.publish(SUBJECT, b"y", timeout=5, headers={})
            assert ack.stream == JOBS_STREAM
        finally:
            back.stop()
    finally:
        await publisher.close()
        server.stop()


async def test_a_server_that_stops_answering_pings_is_dropped_and_taken_up_again(
    tmp_path: Path,
) -> None:
    server = await start_nats(tmp_path / "js")
    publisher = DirectPublisher(server.url, "test acks", ping_interval_s=0.2)
    publisher.start()
    try:
        async with asyncio.timeout(timeout(10)):
            await publisher.wait_connected()
        server.process.send_signal(signal.SIGSTOP)  # the socket stays open, nothing answers

        async def dropped() -> bool:
            return not publisher.connected

        await eventually(dropped)
        server.process.send_signal(signal.SIGCONT)
        async with asyncio.timeout(timeout(20)):
            await publisher.wait_connected()
    finally:
        server.process.send_signal(signal.SIGCONT)
        await publisher.close()
        server.stop()


@pytest.mark.parametrize(
    ("server_args", "credentials", "wrong"),
    [
        (["--user", "ack", "--pass", "s3cret"], "ack:s3cret", "ack:wrong"),
        (["--auth", "t0ken"], "t0ken", "wr0ng"),
    ],
    ids=["user and password", "token"],
)
async def test_credentials_come_from_the_url(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    server_args: list[str],
    credentials: str,
    wrong: str,
) -> None:
    server = await start_nats(tmp_path / "js", extra_args=server_args)
    try:
        url = f"nats://{credentials}@127.0.0.1:{server.port}"
        await (await jobs_stream_at(url)).close()
        publisher = await connected(url)
        try:
            assert (await publisher.publish(SUBJECT, b"x", timeout=5, headers={})).seq == 1
        finally:
            await publisher.close()
        caplog.set_level(logging.INFO, logger="svckit.direct_publisher")
        refused = DirectPublisher(f"nats://{wrong}@127.0.0.1:{server.port}", "test acks")
        refused.start()
        try:

            async def refusal_logged() -> bool:
                return any("Authorization" in str(getattr(r, "e", "")) for r in caplog.records)

            await eventually(refusal_logged)
            assert not refused.connected
        finally:
            await refused.close()
    finally:
        server.stop()


async def test_a_server_asking_for_tls_is_left_to_nats_py() -> None:
    async def tls_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"tls","tls_required":true}\r\n')
        await writer.drain()
        await reader.read()  # until the publisher hangs up
        writer.close()

    server = await asyncio.start_server(tls_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    publisher = DirectPublisher(f"nats://127.0.0.1:{port}", "test acks")
    publisher.start()
    try:
        assert publisher._runner is not None
        async with asyncio.timeout(timeout(10)):
            await publisher._runner  # it gives up on this server for good
        assert not publisher.connected
    finally:
        await publisher.close()
        server.close()
        await server.wait_closed()


def test_it_runs_on_uvloop_as_the_services_do(nats_url: str, jobs_nc: Client) -> None:
    """uvloop's transports differ from asyncio's (they are not asyncio.Transport
    subclasses): the connection must come up and publish there too."""

    async def publish_once() -> int:
        publisher = await connected(nats_url)
        try:
            return (await publisher.publish(SUBJECT, b"x", timeout=5, headers={})).seq
        finally:
            await publisher.close()

    assert uvloop.run(publish_once()) == 1
