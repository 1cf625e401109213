"""Alembic environment: migrations of the catalog models (run through pony_common.catalog.db.upgrade, which hands
in a connection held under the migration lock)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from pony_common.catalog.db import migration_connection
from pony_common.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    with migration_connection(config.get_main_option("sqlalchemy.url")) as connection:  # the alembic CLI
        run_migrations(connection)


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
