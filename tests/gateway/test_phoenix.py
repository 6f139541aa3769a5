"""The codec, with literal frames (docs/protocol.md, "Frames")."""

from __future__ import annotations

import orjson
import pytest

from gateway_svc.phoenix import Message, ProtocolError, Vsn, decode, encode, parse_vsn, reply


def test_v2_frame_decodes_and_extra_elements_are_ignored() -> None:
    frame = '["1","2","task:x","llm_generate",{"prompt":"hi"},"extra",7]'
    assert decode(frame, Vsn.V2) == Message("1", "2", "task:x", "llm_generate", {"prompt": "hi"})


def test_v2_null_refs_and_bytes_input() -> None:
    assert decode(b'[null,"5","phoenix","heartbeat",{}]', Vsn.V2) == Message(
        None, "5", "phoenix", "heartbeat", {}
    )


def test_numeric_refs_are_echoed_as_strings() -> None:
    message = decode('[1, 2, "t", "e", {}]', Vsn.V2)
    assert (message.join_ref, message.ref) == ("1", "2")
    assert encode(reply(message.join_ref, message.ref, "t", "ok", {}), Vsn.V2) == (
        b'["1","2","t","phx_reply",{"status":"ok","response":{}}]'
    )


@pytest.mark.parametrize(
    "frame",
    [
        "",
        "not json",
        "{}",
        "[]",
        '["1","1","t","e"]',
        '["1","1","t","e",[]]',
        '["1","1","t","e","payload"]',
        '["1","1","t","e",null]',
        '[true,"1","t","e",{}]',
        '["1",1.5,"t","e",{}]',
        '["1","1","","e",{}]',
        '["1","1",5,"e",{}]',
        '["1","1","t","",{}]',
        '["1","1","t",null,{}]',
        "[1e999999]",
    ],
)
def test_bad_v2_frames_raise_protocol_error(frame: str) -> None:
    with pytest.raises(ProtocolError):
        decode(frame, Vsn.V2)


def test_v1_frame_with_and_without_join_ref() -> None:
    frame = '{"topic":"task:x","event":"phx_join","payload":{},"ref":"1"}'
    assert decode(frame, Vsn.V1) == Message(None, "1", "task:x", "phx_join", {})
    frame = '{"topic":"t","event":"e","payload":{"a":1},"ref":null,"join_ref":"3"}'
    assert decode(frame, Vsn.V1) == Message("3", None, "t", "e", {"a": 1})


@pytest.mark.parametrize(
    "frame",
    [
        '["1","1","t","e",{}]',
        '{"event":"e","payload":{},"ref":"1"}',
        '{"topic":"t","payload":{},"ref":"1"}',
        '{"topic":"t","event":"e","ref":"1"}',
        '{"topic":"t","event":"e","payload":[],"ref":"1"}',
        '{"topic":"t","event":"e","payload":{},"ref":{}}',
    ],
)
def test_bad_v1_frames_raise_protocol_error(frame: str) -> None:
    with pytest.raises(ProtocolError):
        decode(frame, Vsn.V1)


def test_v2_server_frames() -> None:
    assert encode(Message("3", None, "task:x", "chunk", {"delta": "a", "seq": 2}), Vsn.V2) == (
        b'["3",null,"task:x","chunk",{"delta":"a","seq":2}]'
    )
    assert encode(Message("3", "3", "task:x", "phx_close", {}), Vsn.V2) == (
        b'["3","3","task:x","phx_close",{}]'
    )


def test_v1_server_frames_have_exactly_four_keys() -> None:
    frame = encode(reply("3", "4", "task:x", "ok", {"a": 1}), Vsn.V1)
    assert orjson.loads(frame) == {
        "topic": "task:x",
        "event": "phx_reply",
        "payload": {"status": "ok", "response": {"a": 1}},
        "ref": "4",
    }


@pytest.mark.parametrize(
    ("value", "vsn"),
    [
        ("2.0.0", Vsn.V2),
        ("2.0.13", Vsn.V2),
        ("1.0.0", Vsn.V1),
        (None, Vsn.V1),
        ("3.0.0", None),
        ("2.1.0", None),
        ("2.0", None),
        ("", None),
        ("2.0.x", None),
    ],
)
def test_vsn_selection(value: str | None, vsn: Vsn | None) -> None:
    assert parse_vsn(value) is vsn
