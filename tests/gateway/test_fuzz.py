"""Malformed frames: the codec raises only ProtocolError, and whatever decodes is handled by
the state machine without an exception."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_svc.channels import SocketState, StartChannel
from gateway_svc.phoenix import ProtocolError, Vsn, decode, encode
from gateway_svc.task_payloads import task_id_of

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=8,
)
topics = st.sampled_from(
    ["phoenix", "task:0b7e2a4e-3c1f-4f57-9a7e-0e6f1f0c9a11", "task:x", "", "rooms:1"]
)
events = st.sampled_from(["phx_join", "phx_leave", "heartbeat", "llm_generate", "cancel", ""])
refs = st.none() | st.sampled_from(["1", "2", "3"]) | st.integers() | st.booleans()
frames = st.one_of(
    st.text(),
    st.binary(),
    json_values.map(lambda v: json.dumps(v)),
    st.tuples(refs, refs, topics | st.text(), events | st.text(), json_values).map(
        lambda t: json.dumps(list(t))
    ),
    st.fixed_dictionaries(
        {"topic": topics, "event": events, "payload": json_values, "ref": refs}
    ).map(json.dumps),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(frames, min_size=10, max_size=12), st.sampled_from([Vsn.V1, Vsn.V2]), st.booleans())
def test_malformed_frames_never_raise_anything_but_protocol_error(
    sequence: list[str | bytes], vsn: Vsn, join_ok: bool
) -> None:
    state = SocketState(lambda t: task_id_of(t) is not None, max_channels=2)
    for frame in sequence:
        try:
            message = decode(frame, vsn)
        except ProtocolError:
            continue
        for action in state.receive(message):
            if isinstance(action, StartChannel):
                for then in state.join_finished(action, join_ok, {}):
                    encode(then.message, vsn)  # type: ignore[union-attr]
        assert len(state.joined) <= 2
