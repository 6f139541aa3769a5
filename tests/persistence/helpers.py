"""Helpers the persistence tests share: bounded polling, publishing as task_svc does, and
watching the SQL a repository sends."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import psycopg
from nats.aio.client import Client
from nats.js.client import JetStreamContext
from psycopg import sql
from sqlalchemy import event as sa_event

from persistence_svc.backlog import Backlog
from persistence_svc.config import Settings
from persistence_svc.consumer import EventConsumer
from persistence_svc.repository import Repository
from persistence_svc.server import SERVICE_NAME, USER_SERVICE_NAME
from persistence_svc.service import HistoryService
from persistence_svc.users import PreferencesCache, UserService
from svckit.errors import ServiceError
from svckit.grpc_server import GrpcServer, insecure_channel
from svckit.lifecycle import cancel_and_wait
from switchboard.v1 import events_pb2, history_pb2, history_pb2_grpc
from tests.conftest import timeout
from tests.postgres import Cluster, sqlalchemy_url

T = TypeVar("T")

# Short fetches so that stop() (which lets the fetch in flight end) is quick in tests.
FETCH_S = 0.2


@asynccontextmanager
async def running(consumer: EventConsumer) -> AsyncIterator[EventConsumer]:
    await consumer.start()
    task = asyncio.create_task(consumer.run(), name="test-consumer")
    try:
        yield consumer
    finally:
        consumer.stop()
        await asyncio.wait_for(asyncio.shield(task), timeout(10))
        await cancel_and_wait(task)


async def publish(js: JetStreamContext, event: events_pb2.LifecycleEvent) -> None:
    """As task_svc publishes: subject switchboard.tasks.<task_id>.<kind>, id <task_id>:<seq>."""
    kind = events_pb2.LifecycleKind.Name(event.kind).removeprefix("LIFECYCLE_KIND_").lower()
    await js.publish(
        f"switchboard.tasks.{event.task_id}.{kind}",
        event.SerializeToString(),
        headers={"Nats-Msg-Id": f"{event.task_id}:{event.seq}"},
    )


async def publish_snapshot(js: JetStreamContext, snapshot: history_pb2.TaskSnapshot) -> None:
    """As task_svc publishes a snapshot (history.proto): subject
    switchboard.tasks.<task_id>.snapshot, id <task_id>:snapshot:<seq>."""
    task_id, seq = snapshot.state.task_id, snapshot.state.seq
    await js.publish(
        f"switchboard.tasks.{task_id}.snapshot",
        snapshot.SerializeToString(),
        headers={"Nats-Msg-Id": f"{task_id}:snapshot:{seq}"},
    )


@dataclass
class Bus:
    nc: Client
    js: JetStreamContext


@contextmanager
def statements(repo: Repository) -> Iterator[list[str]]:
    """Every SQL statement the repository's engine sends while the block runs."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    sa_event.listen(repo.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa_event.remove(repo.engine.sync_engine, "before_cursor_execute", record)


@dataclass
class Stubs:
    history: history_pb2_grpc.HistoryServiceStub
    users: history_pb2_grpc.UserServiceStub
    address: str  # where they are served, for another client (a gateway under test)


@asynccontextmanager
async def served(repository: Repository, backlog: Backlog | None = None) -> AsyncIterator[Stubs]:
    """HistoryService and UserService on `repository`, over a real gRPC server on port 0
    (no preferences cache: every call reaches the database; DeleteAllTasks reads the
    lifecycle events on their way from `backlog`, none without it)."""
    history = HistoryService(repository, backlog)
    users = UserService(repository, PreferencesCache(0))

    def register(server: grpc.aio.Server) -> None:
        history_pb2_grpc.add_HistoryServiceServicer_to_server(history, server)
        history_pb2_grpc.add_UserServiceServicer_to_server(users, server)

    server = GrpcServer("127.0.0.1:0", register, [SERVICE_NAME, USER_SERVICE_NAME])
    await server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        async with insecure_channel(address) as channel:
            yield Stubs(
                history_pb2_grpc.HistoryServiceStub(channel),
                history_pb2_grpc.UserServiceStub(channel),
                address,
            )
    finally:
        await server.stop(0)


async def rpc_error(call: Any) -> ServiceError:
    """The typed error a gRPC call answers (it must fail)."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return ServiceError.from_rpc_error(error)
    raise AssertionError("the call succeeded")


async def fresh_database_settings(cluster: Cluster, nats_url: str, prefix: str) -> Settings:
    """persistence_svc's settings on a fresh database of `cluster` (which a test may stop and
    start: the outage tests), retrying soon after the database is back."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(cluster.admin_url, autocommit=True) as c:
        await c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return Settings(
        nats_url=nats_url,
        database_url=sqlalchemy_url(cluster.admin_url, name),
        history_svc_listen="127.0.0.1:0",
        persistence_retry_max_s=0.3,
    )
