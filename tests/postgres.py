"""A fresh, uniquely named PostgreSQL database per use, dropped afterwards.

    from tests.postgres import postgres_database

    async with postgres_database() as url:
        # url == "postgresql+psycopg://postgres@127.0.0.1:5432/sb_test_<16 hex>"
        ...  # DATABASE_URL for a service, or create_async_engine(url)

Where the server comes from, in order:
1. SB_TEST_POSTGRES_URL (a libpq URL of a superuser on the maintenance database), default
   `postgresql://postgres@127.0.0.1:5432/postgres` (trust auth, as on CI machines), if it
   answers. Set SB_TEST_POSTGRES_URL=none to skip this step.
2. Otherwise a throwaway cluster: initdb + pg_ctl (from PATH or /usr/lib/postgresql/*/bin) in a
   temporary folder, on a free port, started once per test process and removed at exit. As root
   (initdb refuses root) it runs as the `postgres` system user when there is one.
3. Otherwise `pytest.skip(...)` with the reason.

`own_cluster()` gives a test a throwaway cluster of its own, which it may stop and start again
(a real database outage).
"""

from __future__ import annotations

import asyncio
import atexit
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import psycopg.errors
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from tools.natsserver import free_port

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class Cluster:
    """A throwaway PostgreSQL cluster in a temporary folder, on its own port, that a test may
    stop and start again (same data, same port) to make a real database outage."""

    root: Path
    pg_ctl: str
    run_as: list[str]
    port: int
    # Off for speed in throwaway databases; on where a test kills the server and counts on
    # every acknowledged commit surviving (off, a commit may sit in WAL buffers for 200 ms).
    synchronous_commit: bool = False

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls, *, synchronous_commit: bool = False) -> Cluster:
        """initdb + pg_ctl start; raises RuntimeError with the reason."""
        initdb, pg_ctl = _find_binary("initdb"), _find_binary("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("no initdb/pg_ctl found (PATH, /usr/lib/postgresql/*/bin)")
        run_as: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                owner = None
            if owner is None or runuser is None:
                raise RuntimeError("running as root and no `postgres` user/runuser for initdb")
            run_as = [runuser, "-u", "postgres", "--"]
        root = Path(tempfile.mkdtemp(prefix="sb-pg-"))
        if owner is not None:
            os.chmod(root, 0o755)
            os.chown(root, owner.pw_uid, owner.pw_gid)
        cluster = cls(root, pg_ctl, run_as, free_port(), synchronous_commit)
        init_args = ["-D", str(cluster.data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        init = subprocess.run(
            [*run_as, initdb, *init_args, "--no-sync"],
            capture_output=True,
            text=True,
            check=False,
        )
        if init.returncode != 0:
            cluster.remove()
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-500:]}")
        try:
            cluster.start()
        except RuntimeError:
            cluster.remove()
            raise
        return cluster

    def start(self) -> None:
        """Start (or start again) and wait until it accepts connections (pg_ctl -w)."""
        options = f"-c listen_addresses=127.0.0.1 -c port={self.port}"
        options += f" -c unix_socket_directories={self.root}"
        # fsync only matters if the OS crashes; the server's own crash loses nothing without it.
        options += " -c fsync=off -c full_page_writes=off"
        options += f" -c synchronous_commit={'on' if self.synchronous_commit else 'off'}"
        log_file = self.root / "log"
        args = ["-D", str(self.data_dir), "-o", options, "-l", str(log_file), "-w", "start"]
        start = subprocess.run(
            [*self.run_as, self.pg_ctl, *args],
            capture_output=True,
            text=True,
            check=False,
        )
        if start.returncode != 0:
            log = log_file.read_text(errors="replace")[-500:] if log_file.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {start.stderr.strip()[-300:]} {log}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data (`fast`: disconnect clients, roll back their
        transactions; `immediate`: as if the machine lost power)."""
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.data_dir), "-m", mode, "-w", "stop"],
            capture_output=True,
            check=False,
        )

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


_admin_url: str | None = None
_skip_reason: str | None = None


async def _reachable(url: str) -> str | None:
    """None if `url` accepts a connection, else why not."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=3)
    except psycopg.Error as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    await conn.close()
    return None


def _find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


@contextmanager
def own_cluster() -> Iterator[Cluster]:
    """A cluster of the caller's own (to stop, kill and restart), with synchronous commits,
    removed afterwards; `pytest.skip` when none can be made here."""
    try:
        cluster = Cluster.create(synchronous_commit=True)
    except RuntimeError as error:
        pytest.skip(f"no throwaway PostgreSQL cluster: {error}")
    try:
        yield cluster
    finally:
        cluster.remove()


async def postgres_admin_url() -> str:
    """The libpq URL of a superuser connection to a usable server (see the module docstring),
    found once per process; `pytest.skip` when there is none."""
    global _admin_url, _skip_reason
    if _admin_url is not None:
        return _admin_url
    if _skip_reason is not None:
        pytest.skip(_skip_reason)
    configured = os.environ.get("SB_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)
    why_not_server = "SB_TEST_POSTGRES_URL=none"
    if configured.lower() != "none":
        problem = await _reachable(configured)
        if problem is None:
            _admin_url = configured
            return configured
        why_not_server = f"{configured} unreachable ({problem})"
    try:
        cluster = Cluster.create()
    except RuntimeError as error:
        _skip_reason = f"no PostgreSQL: {why_not_server}; throwaway cluster: {error}"
        pytest.skip(_skip_reason)
    atexit.register(cluster.remove)
    _admin_url = cluster.admin_url
    return _admin_url


def sqlalchemy_url(libpq_url: str, database: str) -> str:
    """The SQLAlchemy URL (psycopg 3 async driver) of `database` on the server of `libpq_url`."""
    url = make_url(libpq_url).set(drivername="postgresql+psycopg", database=database)
    return url.render_as_string(hide_password=False)


@asynccontextmanager
async def postgres_database(prefix: str = "sb_test", template: str = "") -> AsyncIterator[str]:
    """Create a fresh database (a copy of `template` if given), yield its SQLAlchemy URL,
    drop it (with its connections)."""
    admin = await postgres_admin_url()
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        for attempt in range(20):
            try:
                await conn.execute(create)
                break
            except psycopg.errors.ObjectInUse:
                # "source database is being accessed by other users": a background worker
                # visiting the template for a moment. Bounded retries.
                if attempt == 19:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
    try:
        yield sqlalchemy_url(admin, name)
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            # FORCE (PostgreSQL 13+): a service under test may still hold pooled connections.
            await conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


_templates: dict[str, str] = {}


async def postgres_template(key: str, prepare: Callable[[str], Awaitable[None]]) -> str:
    """The name of a database made once per process by `await prepare(sqlalchemy_url)` (for
    instance: apply the migrations), to copy with `postgres_database(template=...)`; dropped
    at exit. Copying a template is faster than preparing every database anew."""
    if key in _templates:
        return _templates[key]
    admin = await postgres_admin_url()
    name = f"sb_template_{uuid.uuid4().hex[:16]}"
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    atexit.register(_drop_at_exit, admin, name)
    await prepare(sqlalchemy_url(admin, name))  # must leave no connection open
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        # No connections to it from now on (autovacuum skips it too): a copy fails while
        # anyone is connected to its template.
        await conn.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name))
        )
    _templates[key] = name
    return name


def _drop_at_exit(admin: str, name: str) -> None:
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    except psycopg.Error:
        pass  # a throwaway cluster already gone
