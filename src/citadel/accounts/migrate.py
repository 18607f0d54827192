"""Bring an accounts database up to the newest schema with Alembic, run from code.

No ``alembic.ini`` is needed: the configuration is built here, its script location is the
``migrations`` folder shipped inside the package, and the database connection is handed to
Alembic's environment (``migrations/env.py``) already open.

All migrations run in one transaction, so a failed upgrade leaves the database as it was. A lock
taken first serialises concurrent upgrades (several replicas starting at once): PostgreSQL takes a
transaction-scoped advisory lock, SQLite the database's write lock (``BEGIN IMMEDIATE``, which
also makes its DDL transactional). Whoever comes second finds the database at head and does
nothing, as does any upgrade of a database already at head.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

VERSION_TABLE = "alembic_version_accounts"
# Any fixed 64-bit number, shared by every process migrating the accounts tables.
_PG_LOCK = 0x63_69_74_61_64_65_6C  # "citadel"


@dataclass(frozen=True, kw_only=True, slots=True)
class Upgrade:
    """What an upgrade did: the revision found, and the revision left (the head)."""

    before: str | None  # None: the database had no accounts tables
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def accounts_only(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's ``include_name`` filter: compare only the accounts tables, so that tables other
    parts of Citadel keep in the same database never show up as ones to drop."""
    if type_ == "table":
        from citadel.accounts.schema import Base

        return name in Base.metadata.tables
    return True


def script_location() -> str:
    """The folder of the Alembic environment and revisions, inside the installed package."""
    location = files("citadel.accounts") / "migrations"
    if not isinstance(location, Path):  # e.g. a zipped install: Alembic needs real files
        raise RuntimeError(f"the accounts migrations are not on the file system: {location}")
    return str(location)


def alembic_config(url: str | None = None) -> Config:
    """An Alembic configuration for the accounts migrations; ``url`` only for the offline mode."""
    config = Config()
    config.set_main_option("script_location", script_location())
    if url is not None:
        config.attributes["url"] = url  # not a main option: "%" in a password would break it
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
    """Upgrade the database behind ``engine`` to head, in one transaction."""
    async with engine.begin() as connection:
        return await connection.run_sync(_upgrade)


async def upgrade(uri: str) -> None:
    """Upgrade the accounts database at ``uri`` to head (StoreUnavailable if unreachable)."""
    from citadel.accounts.sql import build_engine, translate_errors

    engine = build_engine(uri)
    try:
        with translate_errors():
            await upgrade_engine(engine)
    finally:
        await engine.dispose()


def upgrade_sync(uri: str) -> None:
    """``upgrade`` for callers without an event loop."""
    asyncio.run(upgrade(uri))
