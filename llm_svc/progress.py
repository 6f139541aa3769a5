"""Progress of one generation, in 0.0 to 1.0: from completion tokens against the expected
length (the provider's estimate, else max_tokens). Sans-I/O.

Without an estimate, max_tokens is only a ceiling (answers are often a tenth of it), so
progress is then the larger of the linear share of max_tokens and a saturating curve
1 - exp(-tokens / typical) over a typical answer length: it moves visibly from the first
tokens, slows down as the answer grows, and is exact when the answer runs to max_tokens.

llm.proto promises that progress never goes backwards and ends at 1.0: while streaming it is
held below 1.0 (a model may write past its estimate), and `finish()` gives exactly 1.0.
"""

from __future__ import annotations

import math

STREAMING_CAP = 0.99
TYPICAL_ANSWER_TOKENS = 300


class ProgressTracker:
    def __init__(
        self, expected_tokens: int, step: float = 0.01, typical_tokens: int | None = None
    ) -> None:
        self.expected_tokens = max(expected_tokens, 1)
        self.step = step
        self.typical_tokens = typical_tokens  # None: `expected_tokens` is an estimate
        self.tokens = 0
        self.reported = 0.0  # the last value handed out

    def _value(self) -> float:
        value = self.tokens / self.expected_tokens
        if self.typical_tokens:
            value = max(value, 1.0 - math.exp(-self.tokens / self.typical_tokens))
        return value

    def advance(self, tokens: int) -> float | None:
        """Count `tokens` more completion tokens; the new progress if it moved by at least
        one step since the last report (so long answers do not flood the stream), else None."""
        self.tokens += max(tokens, 0)
        value = min(self._value(), STREAMING_CAP)
        if value - self.reported >= self.step - 1e-9:
            self.reported = value
            return value
        return None

    def finish(self) -> float:
        self.reported = 1.0
        return 1.0
