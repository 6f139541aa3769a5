"""Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
Jitter"): the one formula behind llm_svc's retries of a model and task_svc's retries of a job.
Each caller keeps its own rule of when to give up; see docs/architecture.md, "Libraries", for
why no retry library runs the loop."""

from __future__ import annotations

import random


def full_jitter(attempt: int, base_s: float, max_s: float) -> float:
    """A delay drawn uniformly from [0, min(max_s, base_s * 2^(attempt-1))], `attempt`
    counting from 1."""
    return random.uniform(0, min(max_s, base_s * 2 ** max(attempt - 1, 0)))
