"""The socket state machine, with literal V2 frames in and out (docs/protocol.md, "Events")."""

from __future__ import annotations

from gateway_svc.channels import (
    Deliver,
    LimitHit,
    Send,
    SocketState,
    StartChannel,
    StopChannel,
)
from gateway_svc.phoenix import Vsn, decode, encode

T = "task:1"
U = "task:2"
UNMATCHED = '{"status":"error","response":{"reason":"unmatched topic"}}'
TOO_MANY = '{"status":"error","response":{"reason":"too many channels joined"}}'


def handles(topic: str) -> bool:
    return topic.startswith("task:")


def run(state: SocketState, frame: str, join_ok: bool = True) -> list[str]:
    """Feed one frame; render Sends as literal frames and effects as short strings. Joins are
    completed at once, ok with {"status": "new"} (or refused)."""
    out: list[str] = []
    for action in state.receive(decode(frame, Vsn.V2)):
        match action:
            case Send(message):
                out.append(encode(message, Vsn.V2).decode())
            case StopChannel(topic, join_ref):
                out.append(f"stop {topic} {join_ref}")
            case Deliver(message, join_ref):
                out.append(f"deliver {message.event} to {message.topic} {join_ref}")
            case StartChannel():
                out.append(f"start {action.topic} {action.join_ref} {action.params}")
                response = {"status": "new"} if join_ok else {"reason": "unauthorized"}
                for then in state.join_finished(action, join_ok, response):
                    assert isinstance(then, Send)
                    out.append(encode(then.message, Vsn.V2).decode())
    return out


def test_heartbeat_is_answered_joined_or_not() -> None:
    state = SocketState(handles)
    expected = ['[null,"7","phoenix","phx_reply",{"status":"ok","response":{}}]']
    assert run(state, '[null,"7","phoenix","heartbeat",{}]') == expected
    run(state, f'["1","1","{T}","phx_join",{{}}]')
    assert run(state, '[null,"7","phoenix","heartbeat",{}]') == expected


def test_join_ok_then_events_go_to_the_channel() -> None:
    state = SocketState(handles)
    assert run(state, f'["1","1","{T}","phx_join",{{"last_seq":3}}]') == [
        f"start {T} 1 {{'last_seq': 3}}",
        f'["1","1","{T}","phx_reply",{{"status":"ok","response":{{"status":"new"}}}}]',
    ]
    assert run(state, f'["1","2","{T}","llm_generate",{{}}]') == [f"deliver llm_generate to {T} 1"]
    # join_ref null also reaches the current channel (V1 clients send none).
    assert run(state, f'[null,"3","{T}","cancel",{{}}]') == [f"deliver cancel to {T} 1"]


def test_join_refused_leaves_the_topic_unjoined() -> None:
    state = SocketState(handles)
    assert run(state, f'["1","1","{T}","phx_join",{{}}]', join_ok=False) == [
        f"start {T} 1 {{}}",
        f'["1","1","{T}","phx_reply",{{"status":"error","response":{{"reason":"unauthorized"}}}}]',
    ]
    assert run(state, f'["1","2","{T}","cancel",{{}}]') == [
        f'[null,"2","{T}","phx_reply",{UNMATCHED}]'
    ]


def test_unmatched_topic_join() -> None:
    state = SocketState(handles)
    assert run(state, '["1","1","rooms:lobby","phx_join",{}]') == [
        f'[null,"1","rooms:lobby","phx_reply",{UNMATCHED}]'
    ]
    assert run(state, '["1","1","phoenix","phx_join",{}]') == [
        f'[null,"1","phoenix","phx_reply",{UNMATCHED}]'
    ]


def test_event_on_a_topic_not_joined_is_unmatched() -> None:
    state = SocketState(handles)
    assert run(state, f'[null,"4","{T}","llm_generate",{{}}]') == [
        f'[null,"4","{T}","phx_reply",{UNMATCHED}]'
    ]


def test_channel_limit() -> None:
    state = SocketState(handles, max_channels=1)
    run(state, f'["1","1","{T}","phx_join",{{}}]')
    assert run(state, f'["2","2","{U}","phx_join",{{}}]') == [
        f'["2","2","{U}","phx_reply",{TOO_MANY}]'
    ]
    # The I/O layer counts the refusal: a LimitHit comes before the reply.
    actions = state.receive(decode(f'["4","4","{U}","phx_join",{{}}]', Vsn.V2))
    assert actions[0] == LimitHit("channels_per_socket")
    assert isinstance(actions[1], Send)
    # A duplicate join of a joined topic does not count against the limit.
    assert run(state, f'["3","3","{T}","phx_join",{{}}]')[0] == f"stop {T} 1"


def test_duplicate_join_stops_old_replies_new_then_closes_old() -> None:
    state = SocketState(handles)
    run(state, f'["1","1","{T}","phx_join",{{}}]')
    assert run(state, f'["5","5","{T}","phx_join",{{}}]') == [
        f"stop {T} 1",
        f"start {T} 5 {{}}",
        f'["5","5","{T}","phx_reply",{{"status":"ok","response":{{"status":"new"}}}}]',
        f'["1","1","{T}","phx_close",{{}}]',
    ]
    assert state.joined == {T: "5"}


def test_stale_join_ref_is_ignored_without_reply() -> None:
    state = SocketState(handles)
    run(state, f'["1","1","{T}","phx_join",{{}}]')
    run(state, f'["5","5","{T}","phx_join",{{}}]')
    assert run(state, f'["1","6","{T}","llm_generate",{{}}]') == []
    assert run(state, f'["1","7","{T}","phx_leave",{{}}]') == []
    assert run(state, f'["5","8","{T}","llm_generate",{{}}]') == [f"deliver llm_generate to {T} 5"]


def test_leave_joined_replies_ok_then_closes_and_forgets() -> None:
    state = SocketState(handles)
    run(state, f'["1","1","{T}","phx_join",{{}}]')
    assert run(state, f'["1","2","{T}","phx_leave",{{}}]') == [
        f"stop {T} 1",
        f'["1","2","{T}","phx_reply",{{"status":"ok","response":{{}}}}]',
        f'["1","1","{T}","phx_close",{{}}]',
    ]
    assert state.joined == {}
    assert run(state, f'["1","3","{T}","cancel",{{}}]') == [
        f'[null,"3","{T}","phx_reply",{UNMATCHED}]'
    ]


def test_leave_not_joined_replies_ok_without_close() -> None:
    state = SocketState(handles)
    assert run(state, f'["9","2","{T}","phx_leave",{{}}]') == [
        f'["9","2","{T}","phx_reply",{{"status":"ok","response":{{}}}}]'
    ]


def test_crash_sends_phx_error_once_and_forgets_the_topic() -> None:
    state = SocketState(handles)
    run(state, f'["1","1","{T}","phx_join",{{}}]')
    assert state.channel_crashed(T, "0") == []  # not the current channel
    [send] = state.channel_crashed(T, "1")
    assert isinstance(send, Send)
    assert encode(send.message, Vsn.V2) == (
        f'["1","1","{T}","phx_error",{{"reason":"channel_crash"}}]'.encode()
    )
    assert state.channel_crashed(T, "1") == []
    assert state.joined == {}
    # The client's rejoin (a new join_ref) succeeds.
    assert run(state, f'["2","2","{T}","phx_join",{{"last_seq":4}}]')[1] == (
        f'["2","2","{T}","phx_reply",{{"status":"ok","response":{{"status":"new"}}}}]'
    )


def test_v1_frames_through_the_state_machine() -> None:
    state = SocketState(handles)
    join = decode(f'{{"topic":"{T}","event":"phx_join","payload":{{}},"ref":"1"}}', Vsn.V1)
    [start] = state.receive(join)
    assert isinstance(start, StartChannel)
    [send] = state.join_finished(start, True, {"status": "new"})
    assert isinstance(send, Send)
    assert encode(send.message, Vsn.V1) == (
        f'{{"topic":"{T}","event":"phx_reply","payload":{{"status":"ok","response":{{"status":"new"}}}},"ref":"1"}}'.encode()
    )
    event = decode(f'{{"topic":"{T}","event":"cancel","payload":{{}},"ref":"2"}}', Vsn.V1)
    assert state.receive(event) == [Deliver(event, None)]
