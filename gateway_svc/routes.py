"""Where each task's TaskService is: the task_svc node holding the task's shard, as the
membership in NATS says (svckit/membership.py), or TASK_SVC_ADDR while none is known (no
NATS, a single task_svc of an older kind, a shard between two holders for a moment).

Each node is an `Owner`: its own watch stream, submit stream and control stub, opened the
first time one of its tasks is asked for and closed with the gateway. A gateway never needs
to know how many nodes there are: the membership tells it, and a node asked for a task that
is not its own answers UNAVAILABLE (`moved`), after which the caller asks here again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from gateway_svc.submits import Submits
from gateway_svc.watches import TaskWatches
from svckit.errors import ServiceError, typed
from svckit.grpc_server import insecure_channel
from svckit.membership import MembershipView
from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
Code = common_pb2.ErrorCode
# A task_svc node gone or a shard moving: asked again (where the membership says) for this
# long before a call fails; a watch, for longer: a dead node's shards move after its lease
# (TASK_LEASE_S), and a NATS node lost at the same time may slow their take-over.
RETRY_FOR_S = 15.0
REWATCH_FOR_S = 60.0
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
LIST_TIMEOUT_S = 5.0  # a node's list of one user's tasks (a pass over its jobs)


@dataclass
class Owner:
    """One task_svc node, as this gateway talks to it."""

    address: str
    watches: TaskWatches  # every channel's watch at this node, over one stream
    submits: Submits  # every llm_generate's Submit to it, over one stream of its own
    stub: tasks_pb2_grpc.TaskServiceStub  # Cancel, on the submits' connection
    channels: tuple[grpc.aio.Channel, ...] = ()  # closed with it (none for the fallback's)

    @classmethod
    def connect(cls, address: str) -> Owner:
        channel = insecure_channel(address)
        # Submits and Cancel on a connection of their own: an ack never queues behind the
        # watches' traffic.
        control = insecure_channel(address)
        stub = tasks_pb2_grpc.TaskServiceStub(control)
        return cls(
            address,
            TaskWatches(tasks_pb2_grpc.TaskServiceStub(channel)),
            Submits(stub),
            stub,
            (channel, control),
        )

    async def close(self) -> None:
        await self.watches.close()
        await self.submits.close()
        for channel in self.channels:
            await channel.close()


def moved(error: ServiceError) -> bool:
    """Whether asking again elsewhere may succeed: the node refused a task that is not its
    own, or it could not be reached (killed, restarting)."""
    return error.code in (Code.ERROR_CODE_UNAVAILABLE, Code.ERROR_CODE_NETWORK)


class TaskRoutes:
    def __init__(self, fallback: Owner, view: MembershipView | None = None) -> None:
        self.fallback = fallback
        self.view = view
        self._owners: dict[str, Owner] = {}  # by address

    def owner(self, task_id: str) -> Owner:
        """The node to ask about `task_id` now."""
        lease = self.view.owner_of(task_id) if self.view is not None else None
        if lease is None:
            return self.fallback
        return self._at(lease.address, lease.node)

    def addresses(self) -> dict[str, str]:
        """Every live task_svc node's address by node id (the fallback's alone, under "",
        while none is known)."""
        live = self.view.live() if self.view is not None else {}
        addresses = {node: m.address for node, m in live.items() if m.address}
        return addresses or {"": self.fallback.address}

    def nodes(self) -> list[Owner]:
        """Every live task_svc node, one Owner per address."""
        owners = {address: self._at(address, node) for node, address in self.addresses().items()}
        return list(owners.values())

    def _at(self, address: str, node: str) -> Owner:
        if address == self.fallback.address:
            return self.fallback
        owner = self._owners.get(address)
        if owner is None:
            owner = self._owners[address] = Owner.connect(address)
            log.info("task_svc node reached", extra={"node": node, "address": address})
        return owner

    async def call(
        self,
        task_id: str,
        call: Callable[[Owner], Awaitable[T]],
        *,
        retry_for_s: float = RETRY_FOR_S,
    ) -> T:
        """`call` at the task's node, asked again at wherever the membership then says while
        the node refuses it as not its own or cannot be reached, for up to `retry_for_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_for_s
        delay = RETRY_FIRST_S
        while True:
            try:
                return await call(self.owner(task_id))
            except ServiceError as error:
                if not moved(error) or loop.time() + delay > deadline:
                    raise
                log.debug("task_svc asked again", extra={"task_id": task_id, "e": error.message})
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def cancel(self, task_id: str, user_id: str) -> tasks_pb2.CancelResponse:
        """Cancel `task_id` as its user `user_id`, at whichever node holds it."""
        request = tasks_pb2.CancelRequest(task_id=task_id, user_id=user_id)

        async def at(owner: Owner) -> tasks_pb2.CancelResponse:
            response: tasks_pb2.CancelResponse = await typed(owner.stub.Cancel(request))
            return response

        return await self.call(task_id, at)

    async def user_tasks(self, user_id: str) -> tuple[set[str], bool]:
        """The ids of `user_id`'s tasks that have not ended, at every node, and whether some
        node has more than it listed. Raises ServiceError when a node does not answer: its
        tasks cannot be told apart from none."""
        request = tasks_pb2.ListUserTasksRequest(user_id=user_id)
        answers = await asyncio.gather(
            *(
                typed(owner.stub.ListUserTasks(request, timeout=LIST_TIMEOUT_S))
                for owner in self.nodes()
            )
        )
        # A shard moving between two nodes may show one task at both: a set.
        ids = {task_id for answer in answers for task_id in answer.task_ids}
        return ids, any(answer.more for answer in answers)

    async def close(self) -> None:
        owners, self._owners = list(self._owners.values()), {}
        for owner in [self.fallback, *owners]:
            await owner.close()
        if self.view is not None:
            await self.view.close()
