"""The package's own errors: the repository turns every driver error into one of these, so
nothing above it needs to know SQLAlchemy, aiosqlite or psycopg."""

from __future__ import annotations


class PersistenceError(Exception):
    """Base of every persistence_svc error."""


class StorageUnavailable(PersistenceError):
    """The database cannot be reached or refused the work for a transient reason (connection
    lost, server restarting, lock timeout). The caller retries later: nothing was written."""


class WriteConflict(StorageUnavailable):
    """Another writer (a second replica) created a task row between this batch's read and its
    write. Nothing was written; the batch applies when retried (it then reads that row), so
    the caller treats it like any transient failure and never gives the events up."""


class StorageRejected(PersistenceError):
    """The database refused the data itself (a constraint, a value out of range). Retrying
    the same batch as a whole will fail again; retrying events one by one isolates the bad one."""


class InvalidEvent(PersistenceError):
    """A lifecycle event that can never be applied (no task id, a task id that is not a UUID,
    no user, no seq)."""

    def __init__(self, message: str, *, task_id: str = "", seq: int = 0) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.seq = seq


class InvalidCursor(PersistenceError):
    """A ListTasks cursor this service did not produce."""
