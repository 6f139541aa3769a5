"""The primary keys of users already in the database, by external id, kept in process so that
a batch of lifecycle events does not look its owners up again.

Sound because this service never deletes or re-keys a user: once a row is committed, its key
is its key for good. The repository adds keys only after the transaction that read or created
them has committed (a key from a rolled-back insert must never be remembered), and forgets
everything when the database refuses a batch, in case the database was replaced under us.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

DEFAULT_MAX_ENTRIES = 100_000


class KnownUsers:
    """A bounded map external id -> users.id; when full, the oldest entries go first (a miss
    costs one SELECT, so recency bookkeeping on every hit would not pay for itself)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._pks: dict[str, uuid.UUID] = {}

    def split(self, external_ids: Iterable[str]) -> tuple[dict[str, uuid.UUID], set[str]]:
        """The known keys among `external_ids`, and the ids still to look up."""
        known: dict[str, uuid.UUID] = {}
        missing: set[str] = set()
        for external_id in external_ids:
            pk = self._pks.get(external_id)
            if pk is None:
                missing.add(external_id)
            else:
                known[external_id] = pk
        return known, missing

    def remember(self, pks: Mapping[str, uuid.UUID]) -> None:
        """Call only once the rows behind `pks` are committed."""
        self._pks.update(pks)
        while len(self._pks) > self.max_entries:
            del self._pks[next(iter(self._pks))]

    def forget(self) -> None:
        self._pks.clear()

    def __len__(self) -> int:
        return len(self._pks)
