"""The user channel's `delete_task` between task_svc (the fake TaskService) and a real
HistoryService on SQLite: task_svc says whose a task is. A task of the user's that history
holds no row of yet (its events still on their way) is answered deleted and tombstoned for
that user, so its events are dropped when they come; another user's task is answered like a
missing one and leaves nothing behind.

And `delete_all` across two task_svc nodes (two fake TaskServices, the gateway's routes
told where each task's shard is): the user's unfinished tasks at both are cancelled, at the
node holding each, before history removes their tasks; another user's are untouched; and
while a node cannot list the user's tasks, nothing is cancelled nor deleted."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import AsyncExitStack
from typing import Any, cast

import grpc
import pytest
from nats.js.client import JetStreamContext
from sqlalchemy import select

from gateway_svc.phoenix import Message
from gateway_svc.phoenix_client import PhoenixClient
from gateway_svc.routes import Owner, TaskRoutes
from gateway_svc.user_channel import (
    CONFIRM_DELETE_ALL,
    Preferences,
    UserChannel,
    UserDeps,
    UserFeed,
)
from persistence_svc import models
from persistence_svc.repository import Repository
from svckit.errors import ServiceError
from svckit.grpc_server import GrpcServer
from svckit.membership import Held, MembershipView, _Seen
from svckit.shards import Lease, Member, shard_of
from switchboard.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
from tests.conftest import timeout
from tests.gateway.fake_tasks import FakeTasks, OneCall
from tests.gateway.live import running_stack
from tests.persistence.factory import completed_lifecycle
from tests.persistence.helpers import Stubs, served

Status = common_pb2.TaskStatus


async def tombstones(repo: Repository) -> dict[tuple[str, str], bool]:
    """(task id, owner): confirmed, of every tombstone."""
    deleted, users = models.deleted_tasks, models.users
    query = select(deleted.c.task_id, users.c.external_id, deleted.c.confirmed).join(
        users, users.c.id == deleted.c.user_id
    )
    async with repo.engine.connect() as conn:
        rows = await conn.execute(query)
        return {(str(task), owner): bool(confirmed) for task, owner, confirmed in rows}


async def test_delete_task_goes_by_whose_task_task_svc_says_it_is(repository: Repository) -> None:
    async with (
        served(repository) as history,
        running_stack(history_svc_addr=history.address) as stack,
        await PhoenixClient.connect(stack.base, token=stack.token("alice")) as alice,
        await PhoenixClient.connect(stack.base, token=stack.token("bob")) as bob,
    ):
        task_id = str(uuid.uuid4())
        task = await alice.join(f"task:{task_id}")
        assert (await task.push("llm_generate", {"prompt": "Delete me at once"})).ok
        alices, bobs = await alice.join("user:alice"), await bob.join("user:bob")

        refused = await bobs.push("delete_task", {"task_id": task_id})
        assert (refused.status, refused.response) == ("ok", {"deleted": False})
        assert await tombstones(repository) == {}  # history was not even asked

        deleted = await alices.push("delete_task", {"task_id": task_id})
        assert (deleted.status, deleted.response) == ("ok", {"deleted": True})
        # History had no row of it: the tombstone is alice's, and not confirmed by history.
        assert await tombstones(repository) == {(task_id, "alice"): False}
        stray = await alices.push("delete_task", {"task_id": str(uuid.uuid4())})
        assert stray.response == {"deleted": False}  # neither task_svc nor history knew it

    # Its events, when they come, are dropped.
    result = await repository.apply(completed_lifecycle(task_id))
    assert (result.events_recorded, result.events_dropped) == (0, 3)
    assert await repository.get_task(task_id, "alice") is None


# -- delete_all across nodes -----------------------------------------------------------


class NodeTasks(FakeTasks):
    """One task_svc node: the fake, with the user-scoped list task_svc answers."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse_list: ServiceError | None = None
        self.lists: list[str] = []  # the users asked for

    async def ListUserTasks(self, request, context):  # type: ignore[no-untyped-def]
        self.lists.append(request.user_id)
        if self.refuse_list is not None:
            await self.refuse_list.abort(context)
        ids = [
            task_id
            for task_id, task in self.tasks.items()
            if task.state.user_id == request.user_id and not task.terminal
        ]
        return tasks_pb2.ListUserTasksResponse(task_ids=ids, node="fake")

    async def queued(self, task_id: str, user: str) -> None:
        request = tasks_pb2.SubmitRequest(task_id=task_id, user_id=user, prompt="still going")
        await self.Submit(request, OneCall())  # type: ignore[no-untyped-call]

    def status(self, task_id: str) -> common_pb2.TaskStatus.ValueType:
        return self.tasks[task_id].state.status


async def node(stack: AsyncExitStack) -> tuple[NodeTasks, str]:
    fake = NodeTasks()
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: tasks_pb2_grpc.add_TaskServiceServicer_to_server(fake, s),
        ["switchboard.v1.TaskService"],
    )
    await server.start()
    stack.push_async_callback(server.stop, 0)
    return fake, f"127.0.0.1:{server.port}"


def two_nodes(first: str, second: str, second_holds: list[str]) -> MembershipView:
    """A membership view (no NATS) in which both nodes are alive and `second` holds the
    shards of `second_holds`, `first` every other one (as the fallback)."""
    view = MembershipView(cast(JetStreamContext, None), lease_s=60.0)
    now = time.monotonic()
    view.nodes = {"n1": _Seen(Member("n1", first), now), "n2": _Seen(Member("n2", second), now)}
    view.leases = {shard_of(t): Held(Lease("n2", second), 0) for t in second_holds}
    return view


def ids_on_other_shards(count: int, taken: list[str]) -> list[str]:
    shards, ids = {shard_of(t) for t in taken}, list[str]()
    while len(ids) < count:
        task_id = str(uuid.uuid4())
        if shard_of(task_id) not in shards:
            ids.append(task_id)
            shards.add(shard_of(task_id))
    return ids


async def delete_all(deps: UserDeps, user: str) -> tuple[str, dict[str, Any]]:
    """One delete_all on a user channel of `user`: the reply's status and response."""
    sent: asyncio.Queue[Message] = asyncio.Queue()

    async def send(message: Message) -> None:
        sent.put_nowait(message)

    channel = UserChannel(deps, user, f"user:{user}", "1", send)
    channel.start()
    try:
        payload = {"confirm": CONFIRM_DELETE_ALL}
        channel.deliver(Message("1", "2", channel.topic, "delete_all", payload))
        async with asyncio.timeout(timeout(10)):
            answer = await sent.get()
    finally:
        await channel.close()
    return answer.payload["status"], answer.payload["response"]


async def test_delete_all_cancels_the_users_tasks_at_every_node_then_deletes_history(
    repository: Repository,
) -> None:
    async with AsyncExitStack() as stack:
        (first, first_addr), (second, second_addr) = await node(stack), await node(stack)
        there = ids_on_other_shards(2, [])  # alice's and bob's tasks at the second node
        here = ids_on_other_shards(2, there)  # at the first (no lease: the fallback)
        routes = TaskRoutes(Owner.connect(first_addr), two_nodes(first_addr, second_addr, there))
        stack.push_async_callback(routes.close)
        history: Stubs = await stack.enter_async_context(served(repository))
        deps = UserDeps(history.history, Preferences(history.users), UserFeed(None), routes)

        alices_here, bobs_here = here
        alices_there, bobs_there = there
        for fake, task_id, user in (
            (first, alices_here, "alice"),
            (first, bobs_here, "bob"),
            (second, alices_there, "alice"),
            (second, bobs_there, "bob"),
        ):
            await fake.queued(task_id, user)
        written, bobs_written = str(uuid.uuid4()), str(uuid.uuid4())
        await repository.apply(completed_lifecycle(written))
        await repository.apply(completed_lifecycle(bobs_written, user="bob"))

        # A node that cannot say what alice still runs: nothing is cancelled nor deleted.
        second.refuse_list = ServiceError(common_pb2.ERROR_CODE_UNAVAILABLE, "restarting")
        status, response = await delete_all(deps, "alice")
        assert (status, response["reason"]) == ("error", "unavailable")
        assert first.lists == second.lists == ["alice"]
        assert first.status(alices_here) == second.status(alices_there) == Status.TASK_STATUS_QUEUED
        assert await repository.get_task(written, "alice") is not None

        second.refuse_list = None
        status, response = await delete_all(deps, "alice")
        assert (status, response) == ("ok", {"deleted": 1})  # the row; no backlog here
        # Each cancelled at its own node (the other node answers NOT_FOUND, which would
        # leave it queued), bob's left alone.
        assert (
            first.status(alices_here) == second.status(alices_there) == Status.TASK_STATUS_CANCELLED
        )
        assert first.status(bobs_here) == second.status(bobs_there) == Status.TASK_STATUS_QUEUED
        assert await repository.get_task(written, "alice") is None
        assert await repository.get_task(bobs_written, "bob") is not None
        assert first.lists == second.lists == ["alice"] * 2  # never anyone else's


async def test_list_user_tasks_is_not_an_admin_call() -> None:
    """The gateway's own service token may list a user's tasks (ListActiveTasks, the
    operator's, it may not)."""
    async with AsyncExitStack() as stack:
        _, address = await node(stack)
        owner = Owner.connect(address)
        stack.push_async_callback(owner.close)
        request = tasks_pb2.ListUserTasksRequest(user_id="alice")
        assert list((await owner.stub.ListUserTasks(request)).task_ids) == []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await owner.stub.ListActiveTasks(tasks_pb2.ListActiveTasksRequest())
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
