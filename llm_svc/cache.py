"""An in-memory `ResponseCache`: bounded (least recently used out first), entries expire.

Keyed by everything that shapes an answer: the model, its upstream name, the prompt, the
system prompt, max_tokens and temperature. The generator reads it only when every model of
a chain failed, so a stale answer beats none, within the TTL.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from cachetools import TTLCache

from llm_svc.catalogue import ModelEntry
from llm_svc.policy import CachedAnswer
from llm_svc.providers.base import ProviderRequest


def cache_key(model: ModelEntry, request: ProviderRequest) -> str:
    parts = (
        model.id,
        request.model,
        request.system,
        request.prompt,
        str(request.max_tokens),
        repr(request.temperature),
    )
    # A digest keeps long prompts out of the key (memory), and the parts unambiguous.
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part.encode())
    return digest.hexdigest()


class MemoryResponseCache:
    def __init__(
        self,
        max_entries: int = 1000,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        # cachetools: least recently used out first when full, expired after `ttl_s`.
        self._entries: TTLCache[str, CachedAnswer] = TTLCache(
            maxsize=max(max_entries, 1), ttl=ttl_s, timer=clock
        )

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, model: ModelEntry, request: ProviderRequest) -> CachedAnswer | None:
        return self._entries.get(cache_key(model, request))

    async def put(self, model: ModelEntry, request: ProviderRequest, answer: CachedAnswer) -> None:
        if self.max_entries > 0:
            self._entries[cache_key(model, request)] = answer
