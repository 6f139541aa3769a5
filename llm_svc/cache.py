"""An in-memory `ResponseCache`: bounded (least recently used out first), entries expire.

Keyed by everything that shapes an answer: the model, its upstream name, the prompt, the
system prompt, max_tokens and temperature. The generator reads it only when every model of
a chain failed, so a stale answer beats none, within the TTL.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

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
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, model: ModelEntry, request: ProviderRequest) -> CachedAnswer | None:
        key = cache_key(model, request)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, answer = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return answer

    async def put(self, model: ModelEntry, request: ProviderRequest, answer: CachedAnswer) -> None:
        if self.max_entries <= 0:
            return
        key = cache_key(model, request)
        self._entries[key] = (self._clock() + self.ttl_s, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
