"""The SSE decoder, on literal streams (HTML Living Standard, 9.2.6 examples)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from llm_svc.providers.sse import SseDecoder, SseEvent

STREAM = (
    ": a comment, skipped\r\n"
    "data: first\r\n"
    "\r\n"
    "event: usage\n"
    "id: 7\n"
    "data:two\n"
    "data:  lines\n"
    "retry: 10\n"
    "\n"
    "data\n"
    "\n"
    "event: empty\n"
    "\n"
    "data: [DONE]\r\r\n"
)
EVENTS = [
    SseEvent("first"),
    SseEvent("two\n lines", event="usage", id="7"),
    SseEvent("", id="7"),  # a bare "data" field is an empty data line; ids persist
    SseEvent("[DONE]", id="7"),  # "event: empty" alone had no data: no event
]


def test_literal_stream() -> None:
    assert SseDecoder().feed(STREAM) == EVENTS


def test_an_unterminated_event_is_not_dispatched() -> None:
    decoder = SseDecoder()
    assert decoder.feed("data: half") == []
    assert decoder.feed("\n") == []
    assert decoder.feed("\n") == [SseEvent("half")]


def test_a_cr_at_the_end_of_a_chunk_waits_for_a_possible_lf() -> None:
    decoder = SseDecoder()
    assert decoder.feed("data: a\r") == []
    assert decoder.feed("\n\r") == []
    assert decoder.feed("\n") == [SseEvent("a")]


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_split_of_the_stream_gives_the_same_events(cuts: list[int]) -> None:
    decoder = SseDecoder()
    bounds = [0, *sorted(cuts), len(STREAM)]
    events = []
    for start, end in itertools.pairwise(bounds):
        events += decoder.feed(STREAM[start:end])
    assert events == EVENTS
