"""Alembic's environment for the usage-ledger tables.

``citadel.metering.migrate`` runs it with a connection already open and inside a transaction,
passed as ``config.attributes["connection"]``; the migrations then run on that connection and
commit with it. Run by the ``alembic`` command instead (to write a new revision, say), it opens
its own async engine on ``sqlalchemy.url``, or prints SQL in offline (``--sql``) mode.

The version is kept in its own table, ``alembic_version_metering``.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import create_async_engine

from citadel.metering.migrate import VERSION_TABLE, metering_only
from citadel.metering.schema import metadata

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=metering_only,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER constraints
        compare_type=True,
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_on_own_engine(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database: set sqlalchemy.url or pass a connection")
    from citadel.accounts.sql import database_url

    return database_url(str(url))


if context.is_offline_mode():
    context.configure(
        url=_url(),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif (shared := config.attributes.get("connection")) is not None:
    _run(shared)
else:
    asyncio.run(_run_on_own_engine(_url()))
