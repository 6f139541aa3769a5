"""The registry: every live TaskServer by task id (O(1)), and ownership claims.

A claim is what a Watch on a not-yet-submitted task holds: the watcher's user owns the task
id while it waits (docs/protocol.md: the user who first joins or submits owns the topic),
and is woken when the task is submitted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from svckit.errors import ServiceError
from switchboard.v1 import common_pb2
from task_svc.task_server import TaskServer


def forbidden(task_id: str) -> ServiceError:
    return ServiceError(common_pb2.ERROR_CODE_FORBIDDEN, f"task {task_id} belongs to another user")


@dataclass
class Claim:
    task_id: str
    user_id: str
    holders: int = 0
    submitted: asyncio.Future[TaskServer] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Registry:
    def __init__(self) -> None:
        self._servers: dict[str, TaskServer] = {}
        self._claims: dict[str, Claim] = {}

    def __len__(self) -> int:
        return len(self._servers)

    def get(self, task_id: str) -> TaskServer | None:
        return self._servers.get(task_id)

    def owner(self, task_id: str) -> str | None:
        server = self._servers.get(task_id)
        if server is not None:
            return server.user_id
        claim = self._claims.get(task_id)
        return claim.user_id if claim is not None else None

    def check_owner(self, task_id: str, user_id: str) -> None:
        owner = self.owner(task_id)
        if owner is not None and owner != user_id:
            raise forbidden(task_id)

    def add(self, server: TaskServer) -> None:
        if server.task_id in self._servers:
            raise ValueError(f"task {server.task_id} is already registered")
        self._servers[server.task_id] = server
        claim = self._claims.pop(server.task_id, None)
        if claim is not None and not claim.submitted.done():
            claim.submitted.set_result(server)

    def remove(self, server: TaskServer) -> None:
        """Forget `server` (only that object: a newer server for the id stays)."""
        if self._servers.get(server.task_id) is server:
            del self._servers[server.task_id]

    def servers(self) -> list[TaskServer]:
        return list(self._servers.values())

    def drop_claims(self, matches: Callable[[str], bool], why: ServiceError) -> None:
        """Fail the claims whose task id `matches` (their shard moved to another node)."""
        for task_id in [t for t in self._claims if matches(t)]:
            claim = self._claims.pop(task_id)
            if not claim.submitted.done():
                claim.submitted.set_exception(why)

    def claim(self, task_id: str, user_id: str) -> Claim:
        """Claim an unsubmitted task id for `user_id` (FORBIDDEN if another user owns it)."""
        self.check_owner(task_id, user_id)
        claim = self._claims.get(task_id)
        if claim is None:
            claim = self._claims[task_id] = Claim(task_id, user_id)
        claim.holders += 1
        return claim

    def release(self, claim: Claim) -> None:
        claim.holders -= 1
        if claim.holders <= 0 and self._claims.get(claim.task_id) is claim:
            del self._claims[claim.task_id]
            if not claim.submitted.done():
                claim.submitted.cancel()
