"""How long a provider may keep a generation waiting (catalogue `Pacing`, per model):

- `first_token_s`: from the request to the first event of the stream;
- `idle_s`: between two events (keep-alive pings are not events: a stream that only pings
  stalls all the same);
- `deadline_s`: the whole generation, every retry and fallback included.

A stall (first token or idle gap) is a retryable TIMEOUT of the provider, so the generation
retries or falls back, in seconds rather than after a socket read timeout. The deadline is
final: `DeadlinePassed`, not retried, and closing the stream aborts the upstream request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from llm_svc.providers.base import ProviderError
from svckit.errors import ServiceError
from switchboard.v1 import common_pb2

Code = common_pb2.ErrorCode
T = TypeVar("T")


@dataclass(frozen=True)
class Pacing:
    first_token_s: float = 30.0  # reasoning models think before their first token
    idle_s: float = 10.0
    deadline_s: float = 600.0


class DeadlinePassed(ServiceError):
    def __init__(self, deadline_s: float) -> None:
        super().__init__(
            Code.ERROR_CODE_TIMEOUT,
            f"the generation took longer than its deadline of {deadline_s:g}s",
            retryable=False,
        )


async def paced(
    events: AsyncIterator[T], provider: str, pacing: Pacing, deadline_at: float
) -> AsyncIterator[T]:
    """`events`, failing when the next one is late (see the module docstring); `deadline_at`
    is in the event loop's clock."""
    loop = asyncio.get_running_loop()
    wait_s, what = pacing.first_token_s, "no first token"
    while True:
        left_s = deadline_at - loop.time()
        budget = min(wait_s, left_s)
        try:
            async with asyncio.timeout(budget):
                event = await anext(events)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if budget >= left_s:
                raise DeadlinePassed(pacing.deadline_s) from None
            raise ProviderError(
                provider, Code.ERROR_CODE_TIMEOUT, f"{what} within {wait_s:g}s", retryable=True
            ) from None
        yield event  # outside the timeout: the consumer's time is not the provider's
        wait_s, what = pacing.idle_s, "no token"
