"""AckedPublisher against a real nats-server: the PubAck of each publish, JetStream's
refusals and silence as js.publish reports them (svckit/pubacks.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig

from svckit.pubacks import AckedPublisher, StoredMessage, last_message

STREAM = "PUBACKS"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    await client.jetstream().add_stream(StreamConfig(name=STREAM, subjects=["pa.>"]))
    yield client
    await client.close()


async def test_each_publish_gets_its_own_pub_ack_and_a_repeated_id_is_a_duplicate(
    nc: Client,
) -> None:
    acks = AckedPublisher(nc)
    answers = await asyncio.gather(
        *(
            acks.publish(f"pa.{n}", b"x", timeout=5, headers={"Nats-Msg-Id": f"m{n}"})
            for n in range(50)
        )
    )
    assert sorted(ack.seq for ack in answers) == list(range(1, 51))
    assert {ack.stream for ack in answers} == {STREAM}
    js = nc.jetstream()
    for n, ack in enumerate(answers):  # each caller got the ack of its own message
        assert (await js.get_msg(STREAM, ack.seq)).subject == f"pa.{n}"
    again = await acks.publish("pa.7", b"x", timeout=5, headers={"Nats-Msg-Id": "m7"})
    assert again.duplicate and again.seq == answers[7].seq


async def test_refusals_and_silence_raise_what_js_publish_raises(nc: Client) -> None:
    acks = AckedPublisher(nc)
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await acks.publish("nobody.stores.this", b"x", timeout=5)
    wrong_last = {"Nats-Expected-Last-Sequence": "41"}
    with pytest.raises(nats.js.errors.APIError) as refused:
        await acks.publish("pa.a", b"x", timeout=5, headers=wrong_last)
    assert refused.value.err_code == 10071  # wrong last sequence
    await nc.subscribe("silent.listener", cb=_ignore)  # a responder that never answers
    await nc.flush()
    with pytest.raises(nats.errors.TimeoutError):
        await acks.publish("silent.listener", b"x", timeout=0.2)
    assert (await acks.publish("pa.b", b"x", timeout=5)).seq == 1  # still publishing


async def _ignore(_msg: object) -> None:
    pass


async def test_last_message_reads_the_last_of_a_wildcard_and_none_when_nothing_is_stored(
    nc: Client,
) -> None:
    acks = AckedPublisher(nc)
    await acks.publish("pa.t1.queued", b"first", timeout=5)
    await acks.publish("pa.t2.queued", b"other task", timeout=5)
    await acks.publish("pa.t1.done", b"last", timeout=5)
    assert await last_message(acks, STREAM, "pa.t1.>") == StoredMessage("pa.t1.done", b"last")
    assert await last_message(acks, STREAM, "pa.t3.>") is None
    with pytest.raises(nats.js.errors.APIError) as missing:
        await last_message(acks, "NO_SUCH_STREAM", "pa.t1.>")
    assert missing.value.code == 404 and missing.value.err_code != 10037
