"""The accounts migrations on SQLite and on a real PostgreSQL server: empty to head, then no-ops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect

from citadel.accounts.migrate import ACCOUNTS
from citadel.accounts.schema import Base
from citadel.migrations import Upgrade
from citadel.stores.sql import build_engine

from support import scratch_database

TABLES = {"teams", "users", "api_keys", ACCOUNTS.version_table}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URI of a database with nothing in it: a new SQLite file, or a new PostgreSQL database."""
    with scratch_database(request.param, tmp_path / "accounts.db") as uri:
        yield uri


def _describe(connection: Connection) -> dict[str, Any]:
    inspector = inspect(connection)
    digest_indexes = inspector.get_indexes("api_keys")
    return {
        "tables": set(inspector.get_table_names()),
        "users": {c["name"] for c in inspector.get_columns("users")},
        "api_keys": {c["name"] for c in inspector.get_columns("api_keys")},
        "unique digest": any(
            i["column_names"] == ["digest"] and i["unique"] for i in digest_indexes
        ),
        "revision": MigrationContext.configure(
            connection, opts={"version_table": ACCOUNTS.version_table}
        ).get_current_revision(),
        "drift": compare_metadata(
            MigrationContext.configure(
                connection, opts={"include_name": ACCOUNTS.only, "compare_type": True}
            ),
            Base.metadata,
        ),
    }


async def _inspect(uri: str) -> dict[str, Any]:
    engine = build_engine(uri)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_describe)
    finally:
        await engine.dispose()


def test_upgrade_creates_the_tables_and_a_second_upgrade_does_nothing(empty_database: str) -> None:
    """Empty to head creates the three tables as schema.py describes them; again, nothing."""

    async def main() -> tuple[Upgrade, Upgrade]:
        engine = build_engine(empty_database)
        try:
            return await ACCOUNTS.upgrade_engine(engine), await ACCOUNTS.upgrade_engine(engine)
        finally:
            await engine.dispose()

    first, second = asyncio.run(main())
    assert Upgrade(before=None, after=ACCOUNTS.head()) == first
    assert Upgrade(before=ACCOUNTS.head(), after=ACCOUNTS.head()) == second
    assert not second.changed
    found = asyncio.run(_inspect(empty_database))
    assert TABLES <= found["tables"]
    assert {
        "id",
        "name",
        "email",
        "team_id",
        "tier",
        "status",
        "created_at",
        "overrides",
        "deleted_at",
    } == found["users"]
    assert {
        "id",
        "user_id",
        "name",
        "digest",
        "prefix",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
        "budget_micros",
        "models",
        "requests_per_minute",
        "tokens_per_minute",
    } == found["api_keys"]
    assert found["unique digest"]
    assert ACCOUNTS.head() == found["revision"]
    assert [] == found["drift"]  # the migrations build exactly what schema.py declares


def test_upgrade_by_uri_from_async_and_sync_code(empty_database: str) -> None:
    """upgrade(uri) and upgrade_sync(uri) both bring a database to head, and repeat harmlessly."""
    asyncio.run(ACCOUNTS.upgrade(empty_database))
    ACCOUNTS.upgrade_sync(empty_database)
    assert ACCOUNTS.head() == asyncio.run(_inspect(empty_database))["revision"]


def test_simultaneous_upgrades_do_not_collide(empty_database: str) -> None:
    """Three processes' worth of upgrades at once (separate engines): one migrates, all succeed."""

    async def one() -> Upgrade:
        engine = build_engine(empty_database)
        try:
            return await ACCOUNTS.upgrade_engine(engine)
        finally:
            await engine.dispose()

    async def main() -> list[Upgrade]:
        return list(await asyncio.gather(one(), one(), one()))

    results = asyncio.run(main())
    assert 1 == sum(r.changed for r in results)
    assert {ACCOUNTS.head()} == {r.after for r in results}


def test_the_migrations_ship_inside_the_package() -> None:
    """The Alembic environment and the first revision are files of the installed package."""
    folder = Path(ACCOUNTS.script_location())
    assert (folder / "env.py").is_file()
    assert (folder / "script.py.mako").is_file()
    assert (folder / "versions" / "0001_accounts.py").is_file()
    assert (folder / "versions" / "0004_account_deletion.py").is_file()
    assert "0004" == ACCOUNTS.head()
