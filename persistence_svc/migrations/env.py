"""The Alembic environment.

Two ways in:
- `persistence_svc.migrate` (what the service runs at start) passes an open, already
  transactional connection in `config.attributes["connection"]`, so the upgrade runs inside its
  transaction and under its lock.
- The alembic CLI (`alembic -c persistence_svc/alembic.ini upgrade head`, or `revision
  --autogenerate` for a new revision) connects to DATABASE_URL itself through
  `persistence_svc.migrate`, with the same lock.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from persistence_svc import migrate
from persistence_svc.config import Settings
from persistence_svc.models import Base


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things: later revisions use batch mode (copy and move).
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _cli_logging() -> None:
    # Only from the CLI: the service has its own JSON logging.
    if context.config.config_file_name is not None:
        fileConfig(context.config.config_file_name, disable_existing_loggers=False)


def run_offline() -> None:
    _cli_logging()
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url") or Settings().database_url,
        target_metadata=Base.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    _cli_logging()
    url = context.config.get_main_option("sqlalchemy.url") or Settings().database_url
    asyncio.run(migrate.run_locked(url, run_on))


if context.is_offline_mode():
    run_offline()
else:
    run_online()
