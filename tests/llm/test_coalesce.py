"""Coalescing at the source (llm_svc/coalesce.py): fewer events, the same text, nothing held
back at the start or the end, and the provider stream closed when the consumer goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from llm_svc.coalesce import Window, coalesce
from llm_svc.providers.local import TOKENS_PER_DELTA, compose_answer
from llm_svc.server import LlmServer
from svckit.grpc_server import insecure_channel
from switchboard.v1 import common_pb2, llm_pb2, llm_pb2_grpc
from tests.conftest import timeout
from tests.llm.fakes import settings
from tests.llm.streams import check_stream, kinds, progress_values

Event = llm_pb2.GenerateEvent


def delta(text: str, progress: float | None = None) -> Event:
    event = Event(delta=llm_pb2.TextDelta(text=text))
    if progress is not None:
        event.delta.progress.progress = progress
    return event


def final(content: str) -> Event:
    return Event(final=llm_pb2.GenerationFinal(content=content, model="m"))


class Source:
    """A stream fed by the test: `put` an event, `end()`; records whether it was closed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.closed = asyncio.Event()

    def put(self, *events: Event) -> None:
        for event in events:
            self.queue.put_nowait(event)

    def end(self) -> None:
        self.queue.put_nowait(None)

    async def events(self) -> AsyncGenerator[Event, None]:
        try:
            while (event := await self.queue.get()) is not None:
                yield event
        finally:
            self.closed.set()


async def test_a_burst_becomes_first_delta_then_one_delta_then_final() -> None:
    source = Source()
    source.put(
        delta("a", 0.1),
        delta("b", 0.2),
        delta("c", 0.3),
        Event(progress=llm_pb2.GenerationProgress(progress=1.0)),
        final("abc"),
    )
    source.end()
    async with aclosing(coalesce(source.events(), window=Window(60))) as stream:
        events = [event async for event in stream]
    assert kinds(events) == ["delta", "delta", "final"]
    assert [e.delta.text for e in events[:2]] == ["a", "bc"]
    # Progress rides with the text, the latest value wins.
    assert progress_values(events) == [0.1, 1.0]
    check_stream(events)


async def test_held_text_goes_out_when_the_window_closes_without_waiting_for_more() -> None:
    source = Source()
    stream = coalesce(source.events(), window=Window(0.05))
    source.put(delta("first"))
    assert (await anext(stream)).delta.text == "first"  # never held back
    source.put(delta(" second"), delta(" third"))
    # The provider then stalls: the timer flushes what is held.
    held = await asyncio.wait_for(anext(stream), timeout(5))
    assert held.delta.text == " second third"
    source.put(final("first second third"))
    assert (await anext(stream)).HasField("final")
    await stream.aclose()
    assert source.closed.is_set()


async def test_a_delta_after_a_quiet_window_goes_out_at_once() -> None:
    # A clock the test moves: a minute-long window has passed, so the next delta is sent
    # without waiting for a timer (one would not fire within the test's bounded wait).
    now = [0.0]
    source = Source()
    stream = coalesce(source.events(), window=Window(60), clock=lambda: now[0])
    source.put(delta("a"))
    await anext(stream)
    now[0] = 61.0
    source.put(delta("b"))
    assert (await asyncio.wait_for(anext(stream), timeout(5))).delta.text == "b"
    await stream.aclose()


def test_the_window_widens_with_the_streams_open_up_to_its_cap() -> None:
    window = Window(base_s=0.05, events_per_s=1000, max_s=0.25)
    assert window.seconds() == 0.05  # none open
    window.streams = 50  # 20 events a second each is within the budget
    assert window.seconds() == 0.05
    window.streams = 100
    assert window.seconds() == 0.1
    window.streams = 10_000
    assert window.seconds() == 0.25
    assert Window(base_s=0.05, events_per_s=0).seconds() == 0.05  # no budget: fixed


async def burst_after(window: Window, now: list[float]) -> list[str]:
    """A stream's texts when its first delta goes out at 0 and two more come at 1.5 s."""
    source = Source()
    async with aclosing(coalesce(source.events(), window, clock=lambda: now[0])) as stream:
        now[0] = 0.0
        source.put(delta("a"))
        texts = [(await anext(stream)).delta.text]
        now[0] = 1.5
        source.put(delta("b"), delta("c"))
        source.end()
        return texts + [event.delta.text async for event in stream]


async def test_while_other_streams_are_open_a_stream_holds_its_deltas_longer() -> None:
    now = [0.0]
    window = Window(base_s=1.0, events_per_s=1.0, max_s=60.0)
    # Alone: 1.5 s after the last event is past the 1 s window, "b" goes out at once.
    assert await burst_after(window, now) == ["a", "b", "c"]
    other = Source()
    async with aclosing(coalesce(other.events(), window)) as open_stream:
        other.put(delta("x"))
        await anext(open_stream)
        assert window.streams == 1
        # Two open: a 2 s window, so "b" is held and leaves with "c".
        assert await burst_after(window, now) == ["a", "bc"]
    assert window.streams == 0


async def test_an_error_flushes_what_is_held_first() -> None:
    source = Source()
    error = Event(error=common_pb2.Error(code=common_pb2.ERROR_CODE_NETWORK, message="x"))
    source.put(delta("a"), delta("b"), error)
    source.end()
    async with aclosing(coalesce(source.events(), window=Window(60))) as stream:
        events = [event async for event in stream]
    assert kinds(events) == ["delta", "delta", "error"]


async def test_a_handover_to_the_next_model_is_never_merged_away() -> None:
    source = Source()
    handover = Event(progress=llm_pb2.GenerationProgress(progress=0.3, fallback_model="backup"))
    source.put(delta("a"), delta("b"), handover, delta("c", 0.5), final("abc"))
    source.end()
    async with aclosing(coalesce(source.events(), window=Window(60))) as stream:
        events = [event async for event in stream]
    assert kinds(events) == ["delta", "delta", "progress", "delta", "final"]
    assert [e.delta.text for e in events if e.HasField("delta")] == ["a", "b", "c"]
    assert events[2].progress.fallback_model == "backup"


async def test_closing_the_stream_closes_the_source() -> None:
    source = Source()
    stream = coalesce(source.events(), window=Window(60))
    source.put(delta("a"))
    await anext(stream)
    await stream.aclose()
    await asyncio.wait_for(source.closed.wait(), timeout(5))


async def test_window_zero_passes_every_event_through() -> None:
    source = Source()
    source.put(delta("a"), delta("b"), final("ab"))
    source.end()
    async with aclosing(coalesce(source.events(), window=Window(0))) as stream:
        assert kinds([e async for e in stream]) == ["delta", "delta", "final"]


async def test_llm_svc_coalesces_a_fast_local_stream() -> None:
    server = LlmServer(settings(llm_coalesce_ms=1000))
    await server.start()
    prompt = "Tell me about telephone switchboards and their operators"
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            request = llm_pb2.GenerateRequest(request_id="r", user_id="u", prompt=prompt)
            events = [e async for e in stub.Generate(request, timeout=timeout(10))]
    finally:
        await server.shutdown()
    tokens = compose_answer(prompt)
    assert len(tokens) > 20
    # The model's first delta alone (the tokens it had at once), the rest in one delta with
    # progress 1.0, then the final.
    assert kinds(events) == ["delta", "delta", "final"]
    assert events[0].delta.text == "".join(tokens[:TOKENS_PER_DELTA])
    assert check_stream(events).final.content == "".join(tokens)
