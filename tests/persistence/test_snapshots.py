"""Snapshots of active tasks: task_svc publishes them, we keep the latest one per active task
and serve them back for its crash recovery (history.proto, TaskSnapshot/SnapshotService)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import grpc
import pytest

from persistence_svc.consumer import EventConsumer
from persistence_svc.errors import InvalidCursor, InvalidEvent
from persistence_svc.repository import Repository
from persistence_svc.server import SNAPSHOT_SERVICE_NAME
from persistence_svc.service import SnapshotService
from persistence_svc.snapshots import parse_snapshot
from svckit.errors import Code, ServiceError
from svckit.grpc_server import GrpcServer, insecure_channel
from switchboard.v1 import common_pb2, history_pb2, history_pb2_grpc
from tests.conftest import eventually, timeout
from tests.persistence.factory import Kind, completed_lifecycle, event, new_task_id, snapshot
from tests.persistence.helpers import FETCH_S, Bus, publish, publish_snapshot, running, until


async def latest(repo: Repository, task_id: str) -> history_pb2.TaskSnapshot | None:
    page = await repo.list_snapshots([task_id])
    return page.snapshots[0] if page.snapshots else None


async def latest_at(repo: Repository, task_id: str, seq: int) -> history_pb2.TaskSnapshot | None:
    held = await latest(repo, task_id)
    return held if held is not None and held.state.seq == seq else None


async def test_latest_snapshot_wins_whatever_the_order(repository: Repository) -> None:
    task_id = new_task_id()
    await repository.apply([], [snapshot(task_id, 5, content="Ray")])
    await repository.apply([], [snapshot(task_id, 9, content="Rayleigh sca")])
    result = await repository.apply([], [snapshot(task_id, 7, content="Rayleigh")])  # late
    assert result.snapshots_written == 0
    held = await latest(repository, task_id)
    assert held is not None and (held.state.seq, held.state.content) == (9, "Rayleigh sca")
    # Within one batch too.
    other = new_task_id()
    await repository.apply([], [snapshot(other, 12), snapshot(other, 3), snapshot(other, 8)])
    held = await latest(repository, other)
    assert held is not None and held.state.seq == 12


async def test_snapshot_before_any_event_creates_the_task_and_events_still_apply(
    repository: Repository,
) -> None:
    task_id = new_task_id()
    await repository.apply([], [snapshot(task_id, 4)])
    task = await repository.get_task(task_id, "alice")
    assert task is not None
    assert (task.status, task.version, task.prompt) == (
        common_pb2.TASK_STATUS_PROCESSING,
        0,
        "Why is the sky blue?",
    )
    queued, started, done = completed_lifecycle(task_id)
    await repository.apply([queued, started])
    # A lifecycle event older than the stored snapshot does not replace it...
    held = await latest(repository, task_id)
    assert held is not None and (held.state.seq, held.state.content) == (4, "Rayl")
    await repository.apply([done])
    task = await repository.get_task(task_id, "alice")
    assert task is not None and (task.status, task.version) == (common_pb2.TASK_STATUS_COMPLETED, 7)
    # ...and the end of the task removes it.
    assert await latest(repository, task_id) is None


async def test_derived_and_published_snapshots(repository: Repository) -> None:
    task_id = new_task_id()
    queued, started, _ = completed_lifecycle(task_id)
    await repository.apply([queued])
    held = await latest(repository, task_id)
    assert held is not None and (held.state.seq, held.state.status) == (
        1,
        common_pb2.TASK_STATUS_QUEUED,
    )
    # At the same seq, task_svc's snapshot (with its text) wins over the derived one...
    await repository.apply([], [snapshot(task_id, 1, status=common_pb2.TASK_STATUS_QUEUED)])
    held = await latest(repository, task_id)
    assert held is not None and held.state.content == "Rayl"
    # ...and a derived one at the same seq does not replace it.
    await repository.apply([started], [snapshot(task_id, 2, content="Rayleigh")])
    result = await repository.apply([started])
    assert result.snapshots_written == 0
    held = await latest(repository, task_id)
    assert held is not None and (held.state.seq, held.state.content) == (2, "Rayleigh")


async def test_no_snapshot_is_kept_for_an_ended_task(repository: Repository) -> None:
    task_id = new_task_id()
    await repository.apply(completed_lifecycle(task_id))
    late = await repository.apply([], [snapshot(task_id, 5)])
    assert late.snapshots_written == 0
    done = snapshot(new_task_id(), 3, status=common_pb2.TASK_STATUS_COMPLETED)
    await repository.apply([], [done])
    assert (await repository.list_snapshots()).snapshots == []


async def test_a_terminal_snapshot_changes_nothing(repository: Repository) -> None:
    """Recovery needs active tasks only: a snapshot saying "completed" is ignored; the
    lifecycle event will end the task and drop its snapshot."""
    task_id = new_task_id()
    await repository.apply([], [snapshot(task_id, 4)])
    await repository.apply([], [snapshot(task_id, 8, status=common_pb2.TASK_STATUS_COMPLETED)])
    held = await latest(repository, task_id)
    assert held is not None and held.state.seq == 4
    task = await repository.get_task(task_id, "alice")
    assert task is not None and task.status == common_pb2.TASK_STATUS_PROCESSING


async def test_list_snapshots_pages_in_task_id_order(repository: Repository) -> None:
    ids = sorted(new_task_id() for _ in range(5))
    await repository.apply([], [snapshot(task_id, 2) for task_id in ids])
    seen: list[str] = []
    cursor = ""
    while True:
        page = await repository.list_snapshots(page_size=2, cursor=cursor)
        seen += [s.state.task_id for s in page.snapshots]
        if not page.next_cursor:
            break
        cursor = page.next_cursor
    assert seen == ids
    some = await repository.list_snapshots([ids[3], ids[1], "not-a-uuid", new_task_id()])
    assert [s.state.task_id for s in some.snapshots] == [ids[1], ids[3]]
    with pytest.raises(InvalidCursor):
        await repository.list_snapshots(cursor="garbage")


async def test_nul_in_partial_text_is_stored(repository: Repository) -> None:
    task_id = new_task_id()
    await repository.apply([], [snapshot(task_id, 3, content="a\x00b")])
    held = await latest(repository, task_id)
    assert held is not None and held.state.content == "a\ufffdb"


@pytest.mark.parametrize(
    ("field", "value"),
    [("task_id", "nope"), ("user_id", ""), ("seq", 0), ("status", 0)],
)
def test_parse_snapshot_refuses_what_can_never_apply(field: str, value: object) -> None:
    message = snapshot(new_task_id(), 3)
    setattr(message.state, field, value)
    with pytest.raises(InvalidEvent):
        parse_snapshot(message)


async def test_snapshots_over_jetstream(bus: Bus, repository: Repository) -> None:
    task_id = new_task_id()
    consumer = EventConsumer(bus.js, repository, fetch_timeout_s=FETCH_S)
    async with running(consumer):
        await publish(bus.js, event(task_id, 1, Kind.LIFECYCLE_KIND_QUEUED))
        await publish_snapshot(bus.js, snapshot(task_id, 6, content="Rayleigh"))
        await bus.js.publish(f"switchboard.tasks.{task_id}.snapshot", b"\xff garbage")
        # The QUEUED event alone may come first, with a snapshot derived from it (seq 1).
        held = await eventually(functools.partial(latest_at, repository, task_id, 6))
        assert held.state.content == "Rayleigh"
        await until(lambda: consumer.stats.acked == 2 and consumer.stats.terminated == 1)
    task = await repository.get_task(task_id, "alice")
    assert task is not None and task.version == 1  # a snapshot is not an event of the trail
    trail = await repository.get_task_events(task_id, "alice")
    assert trail is not None and [e.seq for e in trail] == [1]


@pytest.fixture
async def snapshots_stub(
    repository: Repository,
) -> AsyncIterator[history_pb2_grpc.SnapshotServiceStub]:
    service = SnapshotService(repository)
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: history_pb2_grpc.add_SnapshotServiceServicer_to_server(service, s),
        [SNAPSHOT_SERVICE_NAME],
    )
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield history_pb2_grpc.SnapshotServiceStub(channel)
    finally:
        await server.stop(0)


async def test_list_snapshots_over_grpc(
    repository: Repository, snapshots_stub: history_pb2_grpc.SnapshotServiceStub
) -> None:
    ids = sorted(new_task_id() for _ in range(3))
    await repository.apply([], [snapshot(task_id, 4) for task_id in ids])
    page = await snapshots_stub.ListSnapshots(
        history_pb2.ListSnapshotsRequest(page_size=2), timeout=timeout(5)
    )
    assert [s.state.task_id for s in page.snapshots] == ids[:2]
    rest = await snapshots_stub.ListSnapshots(
        history_pb2.ListSnapshotsRequest(page_size=2, cursor=page.next_cursor), timeout=timeout(5)
    )
    assert [s.state.task_id for s in rest.snapshots] == ids[2:] and rest.next_cursor == ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await snapshots_stub.ListSnapshots(
            history_pb2.ListSnapshotsRequest(cursor="garbage"), timeout=timeout(5)
        )
    assert ServiceError.from_rpc_error(caught.value).code == Code.ERROR_CODE_INVALID_REQUEST
