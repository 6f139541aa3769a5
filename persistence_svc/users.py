"""UserService: a user's preferences, read and written over gRPC through a write-through cache.

Writes go to the database first and then to the cache (never the other way round), so the
cache never holds what the database refused. The cache is per process: with several replicas
another replica's write is seen here after at most `ttl_s`, the bound on staleness.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

from persistence_svc.repository import Repository
from persistence_svc.service import Context, call_storage, require_user
from svckit.errors import rpc
from svckit.preferences import check_preferences
from switchboard.v1 import history_pb2, history_pb2_grpc


class PreferencesCache:
    """A bounded LRU of external user id → Preferences, each entry valid for `ttl_s`."""

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        # cachetools: least recently used out first when full, expired after `ttl_s`.
        self._entries: TTLCache[str, bytes] = TTLCache(
            maxsize=max(max_entries, 1), ttl=ttl_s, timer=clock
        )

    def get(self, user_id: str) -> history_pb2.Preferences | None:
        data = self._entries.get(user_id)
        # Stored serialized: a caller that mutates what it got cannot change the cache.
        return None if data is None else history_pb2.Preferences.FromString(data)

    def put(self, user_id: str, preferences: history_pb2.Preferences) -> None:
        if self.max_entries > 0 and self.ttl_s > 0:
            self._entries[user_id] = preferences.SerializeToString()

    def __len__(self) -> int:
        return len(self._entries)


class UserService(history_pb2_grpc.UserServiceServicer):
    def __init__(self, repository: Repository, cache: PreferencesCache | None = None) -> None:
        self.repository = repository
        self.cache = cache if cache is not None else PreferencesCache()

    @rpc
    async def GetPreferences(
        self, request: history_pb2.GetPreferencesRequest, context: Context
    ) -> history_pb2.Preferences:
        require_user(request.user_id)
        cached = self.cache.get(request.user_id)
        if cached is not None:
            return cached
        preferences = await call_storage(self.repository.get_preferences(request.user_id))
        self.cache.put(request.user_id, preferences)
        return preferences

    @rpc
    async def SetPreferences(
        self, request: history_pb2.SetPreferencesRequest, context: Context
    ) -> history_pb2.Preferences:
        require_user(request.user_id)
        check_preferences(request.preferences)
        stored = await call_storage(
            self.repository.set_preferences(request.user_id, request.preferences)
        )
        self.cache.put(request.user_id, stored)
        return stored
