"""svckit/nats_wire.py: the NATS commands a publisher sends and the parser of what the
server sends, without sockets."""

from __future__ import annotations

import orjson
import pytest

from svckit import nats_wire as w

SERVER_BYTES = (
    b'INFO {"server_id":"x","max_payload":1048576,"headers":true}\r\n'
    b"PING\r\n+OK\r\n"
    b"MSG _R.1 1 5\r\nhello\r\n"
    b"MSG a.b 7 reply.to 0\r\n\r\n"
    b"HMSG _R.2 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
    b'HMSG _R.3 1 the.reply 18 23\r\nNATS/1.0\r\nK: v\r\n\r\n{"a":\r\n'
    b"PONG\r\n-ERR 'Authorization Violation'\r\n"
)
EXPECTED = [
    w.Info({"server_id": "x", "max_payload": 1048576, "headers": True}),
    w.Ping(),
    w.Ok(),
    w.Message("_R.1", "1", "", b"", b"hello"),
    w.Message("a.b", "7", "reply.to", b"", b""),
    w.Message("_R.2", "1", "", b"NATS/1.0 503\r\n\r\n", b""),
    w.Message("_R.3", "1", "the.reply", b"NATS/1.0\r\nK: v\r\n\r\n", b'{"a":'),
    w.Pong(),
    w.Err("Authorization Violation"),
]


def test_the_parser_reads_every_operation_in_one_piece() -> None:
    assert w.Parser().feed(SERVER_BYTES) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16])
def test_the_parser_reads_the_same_whatever_the_pieces(size: int) -> None:
    parser = w.Parser()
    ops: list[w.ServerOp] = []
    for start in range(0, len(SERVER_BYTES), size):
        ops += parser.feed(SERVER_BYTES[start : start + size])
    assert ops == EXPECTED


def test_a_message_carries_its_status_code() -> None:
    plain, _, no_responders, with_headers = [op for op in EXPECTED if isinstance(op, w.Message)]
    assert no_responders.status == "503"
    assert with_headers.status == "" and plain.status == ""


@pytest.mark.parametrize(
    "garbage",
    [
        b"HELLO there\r\n",
        b"MSG only-a-subject\r\n",
        b"MSG s 1 notanumber\r\n",
        b"HMSG s 1 10 5\r\n",  # headers larger than the whole
        b"MSG s 1 3\r\nabcXY",  # the payload not followed by CRLF
        b"INFO {not json\r\n",
    ],
)
def test_what_is_not_nats_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(w.ProtocolError):
        w.Parser().feed(garbage)


def test_an_endless_control_line_is_a_protocol_error() -> None:
    parser = w.Parser()
    with pytest.raises(w.ProtocolError):
        for _ in range(100):
            parser.feed(b"x" * 1024)


def test_hpub_frames_headers_and_payload_with_their_sizes() -> None:
    data = w.hpub("jobs.1", "_R.9", {"Nats-Msg-Id": "t-1"}, b"job")
    block = b"NATS/1.0\r\nNats-Msg-Id: t-1\r\n\r\n"
    assert data == b"HPUB jobs.1 _R.9 %d %d\r\n%sjob\r\n" % (len(block), len(block) + 3, block)
    # What a server would deliver of it parses back to the same headers and payload.
    delivered = data.replace(b"HPUB jobs.1 _R.9", b"HMSG jobs.1 1 _R.9", 1)
    (message,) = w.Parser().feed(delivered)
    assert isinstance(message, w.Message)
    assert (message.headers, message.payload, message.reply) == (block, b"job", "_R.9")


def test_a_header_cannot_forge_another_or_a_command() -> None:
    data = w.hpub("s", "r", {"K": "v\r\nPUB x 1\r\n"}, b"")
    assert b"K: vPUB x 1\r\n\r\n" in data
    with pytest.raises(ValueError):
        w.hpub("s", "r", {"Bad Key": "v"}, b"")


def test_connect_and_sub_commands() -> None:
    data = w.connect({"verbose": False, "user": "u"})
    assert data.startswith(b"CONNECT ") and data.endswith(b"\r\n")
    assert orjson.loads(data[8:-2]) == {"verbose": False, "user": "u"}
    assert w.sub("_R.*", "1") == b"SUB _R.* 1\r\n"
