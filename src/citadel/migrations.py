"""Alembic run from code, for each part of Citadel that keeps tables (accounts, the usage ledger).

No ``alembic.ini`` is needed: the configuration is built here, its script location is the
``migrations`` folder shipped inside the part's package, and the database connection is handed to
Alembic's environment (the part's ``migrations/env.py``, which calls ``run_environment``) already
open.

All migrations run in one transaction, so a failed upgrade leaves the database as it was. A lock
taken first serialises concurrent upgrades (several replicas starting at once): PostgreSQL takes a
transaction-scoped advisory lock, SQLite the database's write lock (``BEGIN IMMEDIATE``, which
also makes its DDL transactional). Whoever comes second finds the database at head and does
nothing, as does any upgrade of a database already at head.

Each part keeps its version in a table of its own and compares only its own tables, so the parts
may share one database (the default) or each have their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, MetaData, pool, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = ["Migrations", "Upgrade", "run_environment"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Upgrade:
    """What an upgrade did: the revision found, and the revision left (the head)."""

    before: str | None  # None: the database had none of the part's tables
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


class Migrations:
    """The migrations of one part: ``package``'s ``migrations`` folder, for ``metadata``'s tables.

    ``metadata`` is a function so that the schema module is imported only when needed.
    """

    def __init__(
        self,
        *,
        package: str,
        version_table: str,
        lock_id: int,
        metadata: Callable[[], MetaData],
    ) -> None:
        self.package = package
        self.version_table = version_table
        self._lock_id = lock_id  # any fixed 64-bit number, shared by every process migrating
        self.metadata = metadata

    def only(self, name: str | None, type_: str, parent_names: object) -> bool:
        """Alembic's ``include_name`` filter: compare only this part's tables, so that tables
        other parts keep in the same database never show up as ones to drop."""
        if type_ == "table":
            return name in self.metadata().tables
        return True

    def script_location(self) -> str:
        """The folder of the Alembic environment and revisions, inside the installed package."""
        location = files(self.package) / "migrations"
        if not isinstance(location, Path):  # e.g. a zipped install: Alembic needs real files
            raise RuntimeError(f"the migrations of {self.package} are not on the file system")
        return str(location)

    def alembic_config(self, url: str | None = None) -> Config:
        """An Alembic configuration for these migrations; ``url`` only for the offline mode."""
        config = Config()
        config.set_main_option("script_location", self.script_location())
        if url is not None:
            config.attributes["url"] = url  # not a main option: "%" in a password would break it
        return config

    def head(self) -> str | None:
        """The newest revision shipped."""
        return ScriptDirectory.from_config(self.alembic_config()).get_current_head()

    def current(self, connection: Connection) -> str | None:
        """The revision the database behind ``connection`` is at (None: not migrated)."""
        opts = {"version_table": self.version_table}
        return MigrationContext.configure(connection, opts=opts).get_current_revision()

    def upgrade_connection(self, connection: Connection) -> Upgrade:
        """Upgrade to head on ``connection``, inside its transaction, behind the lock."""
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": self._lock_id})
        elif connection.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        before = self.current(connection)
        config = self.alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        return Upgrade(before=before, after=self.current(connection))

    async def upgrade_engine(self, engine: AsyncEngine) -> Upgrade:
        """Upgrade the database behind ``engine`` to head, in one transaction."""
        async with engine.begin() as connection:
            return await connection.run_sync(self.upgrade_connection)

    async def upgrade(self, uri: str) -> Upgrade:
        """Upgrade the database at ``uri`` to head (StoreUnavailable if unreachable)."""
        from citadel.stores.sql import build_engine, translate_errors

        engine = build_engine(uri)
        try:
            with translate_errors():
                return await self.upgrade_engine(engine)
        finally:
            await engine.dispose()

    def upgrade_sync(self, uri: str) -> Upgrade:
        """``upgrade`` for callers without an event loop."""
        return asyncio.run(self.upgrade(uri))


def run_environment(migrations: Migrations) -> None:
    """The body of a part's ``migrations/env.py``.

    Run from ``Migrations`` with a connection already open and inside a transaction, passed as
    ``config.attributes["connection"]``: the migrations run on that connection and commit with
    it. Run by the ``alembic`` command instead (to write a new revision, say), it opens its own
    async engine on ``sqlalchemy.url``, or prints SQL in offline (``--sql``) mode.
    """
    from alembic import context

    config = context.config
    metadata = migrations.metadata()

    def run(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=migrations.version_table,
            include_name=migrations.only,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER constraints
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def run_on_own_engine(url: str) -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        try:
            async with engine.connect() as connection:
                await connection.run_sync(run)
        finally:
            await engine.dispose()

    def url() -> str:
        found = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
        if not found:
            raise RuntimeError("no database: set sqlalchemy.url or pass a connection")
        from citadel.stores.sql import database_url

        return database_url(str(found))

    if context.is_offline_mode():
        context.configure(
            url=url(),
            target_metadata=metadata,
            version_table=migrations.version_table,
            literal_binds=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    elif (shared := config.attributes.get("connection")) is not None:
        run(shared)
    else:
        asyncio.run(run_on_own_engine(url()))
