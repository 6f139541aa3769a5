"""Users and their preferences: created on first sight (a task's event or a write), read
and written over gRPC (UserService) through a write-through cache."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy import select

from persistence_svc import models
from persistence_svc.errors import StorageUnavailable
from persistence_svc.repository import Repository
from persistence_svc.server import USER_SERVICE_NAME
from persistence_svc.users import PreferencesCache, UserService
from svckit.errors import Code, ServiceError
from svckit.grpc_server import GrpcServer, insecure_channel
from switchboard.v1 import history_pb2, history_pb2_grpc
from tests.conftest import timeout
from tests.persistence.factory import completed_lifecycle, new_task_id


def prefs(model: str = "", **extra: str) -> history_pb2.Preferences:
    return history_pb2.Preferences(default_model=model, extra=extra)


async def user_rows(repo: Repository) -> dict[str, object]:
    async with repo.engine.connect() as conn:
        rows = await conn.execute(select(models.users.c.external_id, models.users.c.preferences))
        return {external_id: stored for external_id, stored in rows}


async def test_a_user_never_seen_reads_empty_preferences_and_the_read_writes_nothing(
    repository: Repository,
) -> None:
    assert await repository.get_preferences("carol") == history_pb2.Preferences()
    assert await user_rows(repository) == {}
    # First sight is a task's lifecycle event (or a write of preferences): one row.
    await repository.apply(completed_lifecycle(new_task_id(), user="carol"))
    await repository.apply(completed_lifecycle(new_task_id(), user="carol"))
    assert await user_rows(repository) == {"carol": {}}
    assert await repository.get_preferences("carol") == history_pb2.Preferences()


async def test_set_replaces_the_preferences_as_a_whole(repository: Repository) -> None:
    await repository.apply(completed_lifecycle(new_task_id(), user="alice"))
    stored = await repository.set_preferences("alice", prefs("gpt-x", theme="dark", lang="fr"))
    assert stored == prefs("gpt-x", theme="dark", lang="fr")
    assert await repository.get_preferences("alice") == stored
    await repository.set_preferences("alice", prefs(lang="de"))
    assert await repository.get_preferences("alice") == prefs(lang="de")
    await repository.set_preferences("dave", prefs("local-small"))  # never seen before
    assert await repository.get_preferences("dave") == prefs("local-small")
    assert await repository.get_preferences("bob") == history_pb2.Preferences()


async def profile_row(repo: Repository, user_id: str) -> tuple[str, str | None, object]:
    users = models.users
    query = select(users.c.name, users.c.email, users.c.preferences).where(
        users.c.external_id == user_id
    )
    async with repo.engine.connect() as conn:
        name, email, stored = (await conn.execute(query)).one()
        return name, email, stored


async def test_name_and_email_are_stored_in_their_columns_and_read_back(
    repository: Repository,
) -> None:
    await repository.apply(completed_lifecycle(new_task_id(), user="erin"))  # first sight
    assert await profile_row(repository, "erin") == ("", None, {})  # no name, no email
    wanted = history_pb2.Preferences(
        default_model="gpt-x", extra={"theme": "dark"}, name="Erin Ö", email="erin@example.com"
    )
    assert await repository.set_preferences("erin", wanted) == wanted
    assert await repository.get_preferences("erin") == wanted
    # In users.name and users.email, and only there: the JSON keeps the rest.
    assert await profile_row(repository, "erin") == (
        "Erin Ö",
        "erin@example.com",
        {"default_model": "gpt-x", "extra": {"theme": "dark"}},
    )
    cleared = history_pb2.Preferences(default_model="gpt-x", name="Erin Ö")
    assert await repository.set_preferences("erin", cleared) == cleared
    assert (await profile_row(repository, "erin"))[:2] == ("Erin Ö", None)  # cleared: NULL
    assert await repository.get_preferences("erin") == cleared


def test_cache_is_a_bounded_lru_with_a_time_to_live() -> None:
    now = [0.0]
    cache = PreferencesCache(max_entries=2, ttl_s=10.0, clock=lambda: now[0])
    cache.put("a", prefs("m-a"))
    cache.put("b", prefs("m-b"))
    assert cache.get("a") == prefs("m-a")  # a is now the most recently used
    cache.put("c", prefs("m-c"))  # evicts b
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (prefs("m-a"), prefs("m-c"))
    got = cache.get("a")
    assert got is not None
    got.default_model = "changed by a caller"
    assert cache.get("a") == prefs("m-a")
    now[0] = 10.0
    assert cache.get("a") is None and len(cache) == 0  # a and c both expired


class SwitchableRepository(Repository):
    """The real repository, whose preference reads can be made to fail or be counted."""

    reads_down = False
    reads = 0

    async def get_preferences(self, user_id: str) -> history_pb2.Preferences:
        self.reads += 1
        if self.reads_down:
            raise StorageUnavailable("connection refused (test)")
        return await super().get_preferences(user_id)


@pytest.fixture
async def switchable(database_url: str) -> AsyncIterator[SwitchableRepository]:
    repo = await SwitchableRepository.open(database_url)
    try:
        yield repo
    finally:
        await repo.close()


@pytest.fixture
async def users(
    switchable: SwitchableRepository,
) -> AsyncIterator[history_pb2_grpc.UserServiceStub]:
    service = UserService(switchable, PreferencesCache())
    server = GrpcServer(
        "127.0.0.1:0",
        lambda s: history_pb2_grpc.add_UserServiceServicer_to_server(service, s),
        [USER_SERVICE_NAME],
    )
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield history_pb2_grpc.UserServiceStub(channel)
    finally:
        await server.stop(0)


async def test_preferences_over_grpc_write_through(
    switchable: SwitchableRepository, users: history_pb2_grpc.UserServiceStub
) -> None:
    empty = await users.GetPreferences(
        history_pb2.GetPreferencesRequest(user_id="alice"), timeout=timeout(5)
    )
    assert empty == history_pb2.Preferences()
    wanted = prefs("gpt-x", theme="dark")
    wanted.name, wanted.email = "Alice", "alice@example.com"
    stored = await users.SetPreferences(
        history_pb2.SetPreferencesRequest(user_id="alice", preferences=wanted),
        timeout=timeout(5),
    )
    assert stored == wanted
    assert await switchable.get_preferences("alice") == wanted  # in the database
    # Served from the cache that the write went through: the database is not read.
    switchable.reads, switchable.reads_down = 0, True
    got = await users.GetPreferences(
        history_pb2.GetPreferencesRequest(user_id="alice"), timeout=timeout(5)
    )
    assert got == wanted and switchable.reads == 0
    # A user not in the cache while the database is down: a typed, retryable error.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.GetPreferences(
            history_pb2.GetPreferencesRequest(user_id="bob"), timeout=timeout(5)
        )
    error = ServiceError.from_rpc_error(caught.value)
    assert (error.code, error.retryable) == (Code.ERROR_CODE_UNAVAILABLE, True)
    assert error.kind.status == grpc.StatusCode.UNAVAILABLE and error.retry_after_ms > 0


@pytest.mark.parametrize(
    "request_",
    [
        history_pb2.SetPreferencesRequest(user_id="", preferences=prefs("m")),
        history_pb2.SetPreferencesRequest(user_id="alice", preferences=prefs("x" * 256)),
        history_pb2.SetPreferencesRequest(user_id="alice", preferences=prefs("a\x00b")),
        history_pb2.SetPreferencesRequest(user_id="alice", preferences=prefs(**{"k": "v" * 5000})),
        history_pb2.SetPreferencesRequest(
            user_id="alice", preferences=prefs(**{f"k{i}": "v" for i in range(65)})
        ),
        # Name and email: their columns' bounds, and an address's shape (svckit/preferences.py).
        history_pb2.SetPreferencesRequest(
            user_id="alice", preferences=history_pb2.Preferences(name="n" * 256)
        ),
        history_pb2.SetPreferencesRequest(
            user_id="alice", preferences=history_pb2.Preferences(email="not an address")
        ),
        history_pb2.SetPreferencesRequest(
            user_id="alice", preferences=history_pb2.Preferences(name="a\x00b")
        ),
    ],
)
async def test_bad_preferences_are_invalid_and_not_stored(
    switchable: SwitchableRepository,
    users: history_pb2_grpc.UserServiceStub,
    request_: history_pb2.SetPreferencesRequest,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await users.SetPreferences(request_, timeout=timeout(5))
    assert ServiceError.from_rpc_error(caught.value).code == Code.ERROR_CODE_INVALID_REQUEST
    assert await user_rows(switchable) == {}
