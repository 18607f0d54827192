"""The usage ledger's migrations, on SQLite and PostgreSQL: empty to head builds exactly what
``schema.py`` declares; m0002 fills the narrow rollups from the full ones a m0001 ledger holds;
downgrading drops them and upgrading again builds them again."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, delete, func, insert, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from citadel.metering.events import UsageEvent
from citadel.metering.ledger import COLUMNS, Ledger, event_row, rebuild_rollups, rollup_rows
from citadel.metering.migrate import LEDGER
from citadel.metering.schema import (
    FULL_KEY,
    ROLLUPS,
    metadata,
    rollup_key,
    usage_daily,
    usage_events,
    usage_hourly,
)
from citadel.stores.sql import build_engine

from support import scratch_database, usage_event

NARROW = {t.name for t, _ in ROLLUPS} - {"usage_hourly", "usage_daily"}
# What m0004 added: the columns of events and rollups written before it lacked them.
M0004_EVENT_COLUMNS = ("reason", "refused")
M0004_MEASURES = ("refusals", "failures")


def _before_m0004(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as a ledger before m0004 holds them (without the columns m0004 added)."""
    dropped = {*M0004_EVENT_COLUMNS, *M0004_MEASURES}
    return [{k: v for k, v in row.items() if k not in dropped} for row in rows]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URI of a database with nothing in it: a new SQLite file, or a new PostgreSQL database."""
    with scratch_database(request.param, tmp_path / "ledger.db") as uri:
        yield uri


def _to(revision: str, *, down: bool = False) -> Any:
    def migrate(connection: Connection) -> None:
        config = LEDGER.alembic_config()
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)

    return migrate


def _describe(connection: Connection) -> dict[str, Any]:
    return {
        "tables": set(inspect(connection).get_table_names()),
        "revision": MigrationContext.configure(
            connection, opts={"version_table": LEDGER.version_table}
        ).get_current_revision(),
        "drift": compare_metadata(
            MigrationContext.configure(
                connection, opts={"include_name": LEDGER.only, "compare_type": True}
            ),
            metadata,
        ),
    }


def events(count: int) -> list[UsageEvent]:
    return [
        UsageEvent(
            event_id=f"{i:032x}",
            time=1_717_243_200.0 + i * 1111.0,  # across hours and days
            request_id=f"req-{i}",
            user=f"usr_{i % 5}",
            team=("team_a", "team_b", "")[i % 3],
            key_id="key",
            tier=("free", "pro")[i % 2],
            endpoint="chat",
            model=f"m{i % 2}",
            deployment=f"m{i % 2}-{i % 4 // 2}",
            prompt_tokens=i,
            completion_tokens=2 * i,
            latency_seconds=0.5,
            ttft_seconds=0.25 if i % 3 else None,
            status=500 if i % 7 == 0 else 200,
            streamed=bool(i % 3),
            cancelled=False,
            usage_estimated=False,
            cost_micros=3 * i,
        )
        for i in range(1, 301)
    ]


async def _contents(
    engine: AsyncEngine, *, before_m0004: bool = False
) -> dict[str, list[tuple[Any, ...]]]:
    """Every rollup's rows (without the columns m0004 added, given ``before_m0004``)."""
    async with engine.connect() as conn:
        found = {}
        for table, _ in ROLLUPS:
            columns = [c for c in table.c if not (before_m0004 and c.name in M0004_MEASURES)]
            statement = select(*columns).order_by(*table.primary_key.columns)
            found[table.name] = [tuple(row) for row in await conn.execute(statement)]
        return found


def test_empty_to_head_builds_the_schema_and_again_does_nothing(empty_database: str) -> None:
    """Every table schema.py declares, no drift, the head revision; a second upgrade: nothing."""
    first = asyncio.run(LEDGER.upgrade(empty_database))
    second = asyncio.run(LEDGER.upgrade(empty_database))
    assert (None, LEDGER.head()) == (first.before, first.after)
    assert not second.changed

    async def describe() -> dict[str, Any]:
        engine = build_engine(empty_database)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(_describe)
        finally:
            await engine.dispose()

    found = asyncio.run(describe())
    assert set(metadata.tables) <= found["tables"]
    assert "m0004" == LEDGER.head() == found["revision"]
    assert [] == found["drift"]  # the migrations build exactly what schema.py declares


def test_m0002_fills_the_narrow_rollups_from_a_m0001_ledger(empty_database: str) -> None:
    """A ledger written under m0001 (events and the full rollups) gains narrow rollups holding
    the same sums; down to m0001 drops them and leaves the rest; up again fills them again."""
    rows = [event_row(e) for e in events(300)]

    async def body() -> None:
        engine = build_engine(empty_database)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_to("m0001"))
            async with engine.begin() as conn:
                old_events = _before_m0004([dict(zip(COLUMNS, r, strict=True)) for r in rows])
                await conn.execute(insert(usage_events), old_events)
                for table in (usage_hourly, usage_daily):
                    width = 3600 if table is usage_hourly else 86400
                    old = _before_m0004(rollup_rows(rows, width, FULL_KEY))
                    await conn.execute(insert(table), old)
            async with engine.begin() as conn:
                await conn.run_sync(_to("m0002"))
            migrated = await _contents(engine, before_m0004=True)
            for table, width in ROLLUPS:
                expected = rollup_rows(rows, width, rollup_key(table))
                assert len(expected) == len(migrated[table.name]), table.name
                assert sum(r["requests"] for r in expected) == 300
                assert [r["cost_micros"] for r in expected] == [
                    row[len(rollup_key(table)) + 5] for row in migrated[table.name]
                ], table.name
            async with engine.begin() as conn:
                await conn.run_sync(_to("head"))
            await rebuild_rollups(engine)  # the product's own rebuild agrees with the migration
            rebuilt = await _contents(engine)
            assert {k: len(v) for k, v in migrated.items()} == {
                k: len(v) for k, v in rebuilt.items()
            }
            async with engine.begin() as conn:
                await conn.run_sync(_to("m0001", down=True))
                found = await conn.run_sync(_describe)
            assert "m0001" == found["revision"]
            assert not NARROW & found["tables"]
            assert {"usage_events", "usage_hourly", "usage_daily"} <= found["tables"]
            async with engine.begin() as conn:
                await conn.run_sync(_to("m0003"))
            assert migrated == await _contents(engine, before_m0004=True)
        finally:
            await engine.dispose()

    asyncio.run(body())


def test_migrate_rebuild_rollups_recomputes_them_from_the_events(
    empty_database: str, tmp_path: Path
) -> None:
    """``citadel migrate --rebuild-rollups`` (as an operator runs it) puts back rollups that a
    bulk load left empty or an accident damaged: equal to what the writer had built."""
    ledger_uri = empty_database.replace("sqlite://", "sqlite+aiosqlite://", 1)
    config = tmp_path / "citadel.yaml"
    config.write_text(
        f'accounts:\n  database: "sqlite+aiosqlite:///{tmp_path / "accounts.db"}"\n'
        f'metering:\n  database: "{ledger_uri}"\n',
        encoding="utf-8",
    )

    def citadel(*args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CITADEL_", "SQL_"))}
        done = subprocess.run(
            [sys.executable, "-m", "citadel", "--config", str(config), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert 0 == done.returncode, done.stderr
        return done

    citadel("migrate")
    rows = [event_row(e) for e in events(300)]

    async def load_then_damage() -> dict[str, list[tuple[Any, ...]]]:
        engine = build_engine(ledger_uri)
        try:
            await Ledger(engine).write_rows(rows)  # the writer's own rollups: the reference
            written = await _contents(engine)
            async with engine.begin() as conn:
                await conn.execute(delete(usage_hourly))
                await conn.execute(update(usage_daily).values(requests=0))
            return written
        finally:
            await engine.dispose()

    written = asyncio.run(load_then_damage())
    assert written != _read(ledger_uri)
    out = citadel("migrate", "--rebuild-rollups").stdout
    assert "rollups rebuilt from the events" in out
    assert written == _read(ledger_uri)
    assert 300 == sum(row[len(FULL_KEY) + 1] for row in written["usage_daily"])


def _read(uri: str) -> dict[str, list[tuple[Any, ...]]]:
    async def read() -> dict[str, list[tuple[Any, ...]]]:
        engine = build_engine(uri)
        try:
            return await _contents(engine)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_m0004_adds_reason_refused_and_the_refusal_and_failure_counts(empty_database: str) -> None:
    """A ledger written under m0003 gains ``reason``/``refused`` on its events ('' and false)
    and ``refusals``/``failures`` in its rollups (0); events written after it are counted in
    them; a rebuild recounts the failures of the old events; down to m0003 drops the columns."""
    rows = [event_row(e) for e in events(300)]
    failed = sum(1 for r in rows if r[COLUMNS.index("status")] >= 500)
    assert failed > 0

    async def body() -> None:
        engine = build_engine(empty_database)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_to("m0003"))
            async with engine.begin() as conn:
                old_events = _before_m0004([dict(zip(COLUMNS, r, strict=True)) for r in rows])
                await conn.execute(insert(usage_events), old_events)
            async with engine.begin() as conn:
                await conn.run_sync(_to("head"))
            async with engine.connect() as conn:
                found = (
                    await conn.execute(
                        select(usage_events.c.reason, usage_events.c.refused).distinct()
                    )
                ).all()
            assert [("", False)] == [tuple(r) for r in found]
            await Ledger(engine).write(_refusals(3))
            assert (3, 3, 0) == await _counts(engine, usage_hourly)  # only the new events
            await rebuild_rollups(engine)
            for table, _ in ROLLUPS:
                assert (303, 3, failed) == await _counts(engine, table), table.name
            async with engine.begin() as conn:
                await conn.run_sync(_to("m0003", down=True))
                columns = {c["name"] for c in await conn.run_sync(_columns, "usage_events")}
                measures = {c["name"] for c in await conn.run_sync(_columns, "usage_daily_team")}
            assert not set(M0004_EVENT_COLUMNS) & columns
            assert not set(M0004_MEASURES) & measures
            assert "cost_micros" in columns
            assert "requests" in measures
        finally:
            await engine.dispose()

    asyncio.run(body())


def _columns(connection: Connection, table: str) -> list[dict[str, Any]]:
    return list(inspect(connection).get_columns(table))


def _refusals(count: int) -> list[UsageEvent]:
    return [
        usage_event(
            event_id=f"f{i:031x}",
            time=1_717_243_200.0 + i,
            request_id=f"refused-{i}",
            deployment="",
            prompt_tokens=0,
            completion_tokens=0,
            status=429,
            cost_micros=0,
            reason="requests_per_minute",
            refused=True,
        )
        for i in range(count)
    ]


async def _counts(engine: AsyncEngine, table: Any) -> tuple[int, ...]:
    """A rollup's requests, refusals and failures in all."""
    async with engine.connect() as conn:
        found = await conn.execute(
            select(
                func.sum(table.c.requests), func.sum(table.c.refusals), func.sum(table.c.failures)
            )
        )
        return tuple(int(v) for v in found.one())
