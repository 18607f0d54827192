"""Bring a usage-ledger database up to the newest schema with Alembic, run from code.

The same approach as ``citadel.accounts.migrate``: no ``alembic.ini``, the ``migrations`` folder
shipped in the package, the connection handed to ``migrations/env.py`` already open, every
migration in one transaction behind a lock (PostgreSQL's advisory lock, SQLite's ``BEGIN
IMMEDIATE``). The version is kept in its own table, ``alembic_version_metering``, so the ledger
may share a database with the accounts tables (the default) or live in one of its own.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from citadel.accounts.migrate import Upgrade

__all__ = [
    "VERSION_TABLE",
    "Upgrade",
    "alembic_config",
    "head",
    "metering_only",
    "upgrade",
    "upgrade_engine",
    "upgrade_sync",
]

VERSION_TABLE = "alembic_version_metering"
# Any fixed 64-bit number, shared by every process migrating the ledger tables.
_PG_LOCK = 0x6D_65_74_65_72_69_6E  # "meterin"


def metering_only(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's ``include_name`` filter: compare only the ledger's tables, so that the accounts
    tables in the same database never show up as ones to drop."""
    if type_ == "table":
        from citadel.metering.schema import metadata

        return name in metadata.tables
    return True


def script_location() -> str:
    """The folder of the Alembic environment and revisions, inside the installed package."""
    location = files("citadel.metering") / "migrations"
    if not isinstance(location, Path):  # e.g. a zipped install: Alembic needs real files
        raise RuntimeError(f"the metering migrations are not on the file system: {location}")
    return str(location)


def alembic_config(url: str | None = None) -> Config:
    """An Alembic configuration for the ledger migrations; ``url`` only for the offline mode."""
    config = Config()
    config.set_main_option("script_location", script_location())
    if url is not None:
        config.attributes["url"] = url
    return config


def head() -> str | None:
    """The newest revision shipped."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def _upgrade(connection: Connection) -> Upgrade:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK})
    elif connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    before = _current(connection)
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    return Upgrade(before=before, after=_current(connection))


async def upgrade_engine(engine: AsyncEngine) -> Upgrade:
    """Upgrade the ledger database behind ``engine`` to head, in one transaction."""
    async with engine.begin() as connection:
        return await connection.run_sync(_upgrade)


async def upgrade(uri: str) -> Upgrade:
    """Upgrade the ledger database at ``uri`` to head (StoreUnavailable if unreachable)."""
    from citadel.accounts.sql import build_engine, translate_errors

    engine = build_engine(uri)
    try:
        with translate_errors():
            return await upgrade_engine(engine)
    finally:
        await engine.dispose()


def upgrade_sync(uri: str) -> Upgrade:
    """``upgrade`` for callers without an event loop."""
    return asyncio.run(upgrade(uri))
