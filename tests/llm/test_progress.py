"""Progress: monotonic, held below 1.0 while streaming, exactly 1.0 at the end."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llm_svc.progress import STREAMING_CAP, ProgressTracker


def test_progress_follows_tokens_against_expected() -> None:
    tracker = ProgressTracker(expected_tokens=4)
    assert [tracker.advance(1) for _ in range(4)] == [0.25, 0.5, 0.75, STREAMING_CAP]
    assert tracker.advance(1) is None  # past the estimate: held, not repeated
    assert tracker.finish() == 1.0


def test_small_steps_are_coalesced() -> None:
    tracker = ProgressTracker(expected_tokens=1000, step=0.01)
    reports = [tracker.advance(1) for _ in range(20)]
    assert [r for r in reports if r is not None] == [0.01, 0.02]


def test_without_an_estimate_progress_moves_early_and_slows_down() -> None:
    tracker = ProgressTracker(expected_tokens=4096, typical_tokens=100)
    early = tracker.advance(10)
    assert early is not None and 0.09 < early < 0.1  # 1 - e^-0.1, not 10/4096
    later = tracker.advance(90)
    assert later is not None and 0.63 < later < 0.64  # 1 - e^-1
    assert tracker.advance(10_000) == STREAMING_CAP
    short = ProgressTracker(expected_tokens=20, typical_tokens=100)
    assert short.advance(10) == 0.5  # a small max_tokens: its linear share is the better guess


@given(
    st.integers(min_value=0, max_value=500),
    st.lists(st.integers(min_value=0, max_value=20), max_size=100),
    st.one_of(st.none(), st.integers(min_value=1, max_value=500)),
)
def test_progress_never_goes_backwards_and_ends_at_one(
    expected: int, steps: list[int], typical: int | None
) -> None:
    tracker = ProgressTracker(expected, typical_tokens=typical)
    values = [v for v in (tracker.advance(n) for n in steps) if v is not None]
    values.append(tracker.finish())
    assert values == sorted(values)
    assert all(0.0 <= v < 1.0 for v in values[:-1])
    assert values[-1] == 1.0
