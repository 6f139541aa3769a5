"""Every TaskServer of one engine: created under one supervisor, found through the registry,
and forgotten `retain_s` after its task finished (history answers for it then)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from svckit.errors import ServiceError
from svckit.shards import shard_of
from switchboard.v1 import events_pb2
from task_svc.config import EngineConfig
from task_svc.registry import Registry
from task_svc.supervisor import Supervisor
from task_svc.task_server import Checkpoint, Host, TaskServer
from task_svc.task_state import TaskCore, TaskSpec

GaveUp = Callable[[TaskServer, BaseException], None]


class Servers:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, gave_up: GaveUp) -> None:
        self.retain_s = config.retain_s
        self.registry = Registry()
        self.supervisor = Supervisor(
            "tasks",
            max_restarts=config.max_restarts,
            period_s=config.restart_period_s,
            backoff_s=config.restart_backoff_s,
        )
        self.host = Host(
            supervisor=self.supervisor,
            watcher_limit=config.watcher_limit,
            checkpoint_every=config.seq_reserve,
            checkpoint=checkpoint,
            gave_up=gave_up,
        )

    def new(self, spec: TaskSpec, *, seq_base: int = 0) -> TaskServer:
        """A server for a new job (registered by the caller once its state is right)."""
        return TaskServer(TaskCore(spec, seq_base=seq_base), self.host)

    def restore(self, last: events_pb2.LifecycleEvent) -> TaskServer:
        """A task that finished before this process started, rebuilt from its terminal
        lifecycle event, registered and retired later."""
        spec = TaskSpec(last.task_id, last.user_id, last.prompt, last.model, last.priority)
        core = TaskCore(spec)
        core.restore_terminal(last)
        server = TaskServer(core, self.host)
        self.registry.add(server)
        self.retire_later(server)
        return server

    def retire_later(self, server: TaskServer) -> None:
        """A finished server leaves memory after `retain_s`."""

        def retire() -> None:
            self.registry.remove(server)
            server.end()

        asyncio.get_running_loop().call_later(self.retain_s, retire)

    def move_away(self, shard: int, why: ServiceError) -> None:
        """Forget every task of `shard` (another node serves it now): its watchers and
        those waiting for its submit are told so, to watch there."""
        for server in self.registry.servers():
            if shard_of(server.task_id) == shard:
                self.registry.remove(server)
                server.move_away()
        self.registry.drop_claims(lambda task_id: shard_of(task_id) == shard, why)

    async def stop(self) -> None:
        await self.supervisor.stop()
