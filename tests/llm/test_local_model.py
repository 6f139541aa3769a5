"""The built-in local model: a pure, deterministic answer, streamed token by token (the tokens
already due together)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_svc.catalogue import DEFAULT_MODELS_FILE, Catalogue
from llm_svc.providers.base import Finish, ProviderRequest, TextDelta
from llm_svc.providers.local import (
    DEFAULT_MAX_TOKENS,
    TOKENS_PER_DELTA,
    LocalProvider,
    answer_text,
    complete,
    compose_answer,
    count_tokens,
    tokenize,
)


def test_answer_is_deterministic_and_quotes_the_prompt() -> None:
    prompt = "Write a haiku about the sea"
    tokens = compose_answer(prompt, 256)
    assert tokens == compose_answer(prompt, 256)
    text = "".join(tokens)
    assert f'You asked: "{prompt}"' in text
    assert "6 words" in text and "27 characters" in text
    assert 20 <= len(tokens) <= 80  # a few dozen tokens by default
    assert compose_answer("Write a limerick", 256) != tokens


def test_long_prompts_are_quoted_in_part() -> None:
    prompt = " ".join(f"word{i}" for i in range(40))
    text = answer_text(prompt)
    assert '"word0 word1' in text and 'word11 …"' in text and "word12 " not in text
    assert "40 words" in text


def test_tokens_are_word_sized_and_carry_their_spacing() -> None:
    assert tokenize("Hello  big\nworld") == ["Hello", "  big", "\nworld"]
    tokens = compose_answer("hi there", 256)
    assert all(len(t.split()) == 1 for t in tokens)
    assert "".join(tokens) == answer_text("hi there")


def test_max_tokens_truncates_with_length() -> None:
    full = complete("Hello there", 256)
    assert full.finish_reason == "stop"
    cut = complete("Hello there", 5)
    assert cut.finish_reason == "length"
    assert cut.tokens == full.tokens[:5] == tuple(compose_answer("Hello there", 5))
    exact = complete("Hello there", len(full.tokens))
    assert exact.finish_reason == "stop"


def test_usage_counts_system_prompt_and_completion() -> None:
    result = complete("one two three", 4, system="be brief")
    assert result.usage.prompt_tokens == 5
    assert result.usage.completion_tokens == 4
    assert result.usage.total_tokens == 9
    assert count_tokens("") == 0


def test_zero_max_tokens_means_the_model_default() -> None:
    catalogue = Catalogue.load(DEFAULT_MODELS_FILE, {"local"})
    assert catalogue.models["local"].max_tokens == DEFAULT_MAX_TOKENS
    assert compose_answer("Hello", 0) == compose_answer("Hello") == compose_answer("Hello", 256)
    assert complete("Hello").finish_reason == "stop"


@given(st.text(max_size=200), st.integers(min_value=1, max_value=100))
def test_truncation_is_a_prefix_of_the_full_answer(prompt: str, max_tokens: int) -> None:
    tokens = compose_answer(prompt, max_tokens)
    assert len(tokens) <= max_tokens
    assert answer_text(prompt).startswith("".join(tokens))


async def test_provider_streams_the_composed_answer() -> None:
    provider = LocalProvider(token_delay_s=0)
    request = ProviderRequest(model="switchboard-local-1", prompt="Tell me a story", max_tokens=7)
    events = [event async for event in provider.stream(request)]
    # At zero delay every token is due at once: the seven come as one delta.
    assert events[:-1] == [TextDelta("".join(compose_answer("Tell me a story", 7)), tokens=7)]
    assert events[-1] == Finish("length", complete("Tell me a story", 7).usage)
    assert provider.estimate_tokens(request) == 7


async def test_a_paced_stream_gives_the_same_tokens() -> None:
    request = ProviderRequest(model="switchboard-local-1", prompt="Pace me", max_tokens=3)
    events = [event async for event in LocalProvider(token_delay_s=0.001).stream(request)]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert "".join(e.text for e in deltas) == "".join(compose_answer("Pace me", 3))
    assert sum(e.tokens for e in deltas) == 3


class _Clock:
    """A clock a test moves, and a sleep that moves it (recording each wait)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(round(seconds, 6))
        self.now += seconds


async def test_tokens_a_busy_process_is_late_for_come_at_once() -> None:
    clock = _Clock()
    provider = LocalProvider(token_delay_s=0.02, sleep=clock.sleep, clock=clock.time)
    request = ProviderRequest(model="switchboard-local-1", prompt="Pace me", max_tokens=5)
    deltas = []
    async for event in provider.stream(request):
        if isinstance(event, TextDelta):
            deltas.append(event)
            if len(deltas) == 1:
                clock.now += 0.05  # busy elsewhere: tokens 2 and 3 fall due meanwhile
    first, second, third, fourth, fifth = compose_answer("Pace me", 5)
    # Token n is due at n * 20 ms, not 20 ms after the last one was read: tokens 2 and 3
    # (due at 40 and 60 ms, read at 70) in one delta at once, 10 ms on for the 4th, 20 for
    # the 5th.
    assert deltas == [
        TextDelta(first),
        TextDelta(second + third, tokens=2),
        TextDelta(fourth),
        TextDelta(fifth),
    ]
    assert clock.waits == [0.02, 0.0, 0.01, 0.02]
    assert clock.now == pytest.approx(0.10)


async def test_at_zero_delay_deltas_of_a_few_tokens_each_after_a_turn_of_the_loop() -> None:
    clock = _Clock()
    provider = LocalProvider(token_delay_s=0, sleep=clock.sleep, clock=clock.time)
    prompt = "Tell me a long story " * 3
    request = ProviderRequest(model="switchboard-local-1", prompt=prompt, max_tokens=0)
    events = [event async for event in provider.stream(request)]
    deltas = [e for e in events if isinstance(e, TextDelta)]
    tokens = complete(prompt, 0).tokens
    assert len(tokens) > 2 * TOKENS_PER_DELTA
    assert [e.tokens for e in deltas[:-1]] == [TOKENS_PER_DELTA] * (len(deltas) - 1)
    assert sum(e.tokens for e in deltas) == len(tokens)
    assert "".join(e.text for e in deltas) == "".join(tokens)
    assert clock.waits == [0.0] * len(deltas)  # a cancel is seen between any two
