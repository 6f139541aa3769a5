"""Exponential backoff, the one formula behind every wait before trying again: llm_svc's
retries of a model, task_svc's retries of a job and of a cut run, the TaskServer supervisor's
restarts and `make run`'s. Each caller keeps its own rule of when to give up; see
docs/architecture.md, "Libraries", for why no retry library runs the loop."""

from __future__ import annotations

import random


def exponential(attempt: int, base_s: float, max_s: float) -> float:
    """base_s * 2^(attempt-1), at most max_s; `attempt` counts from 1."""
    return min(max_s, base_s * 2.0 ** max(attempt - 1, 0))


def full_jitter(attempt: int, base_s: float, max_s: float) -> float:
    """A delay drawn uniformly from [0, exponential(...)] (AWS architecture blog,
    "Exponential Backoff And Jitter"): callers retrying at once do not retry together."""
    return random.uniform(0, exponential(attempt, base_s, max_s))
