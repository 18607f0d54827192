"""The usage ledger in SQL: batches of events stored once each, with their rollups, in one commit.

    ledger = Ledger(build_engine("postgresql://db/citadel"))
    stored = await ledger.write(events)   # how many were new; duplicates are skipped

Theory of operation. An event may reach the ledger more than once: the gateway's spool is
replayed at least once, and a writer that dies between its commit and its XACK gets the batch
redelivered. The ledger absorbs that: ``usage_events`` is keyed by the event id, an event already
there is skipped, and the rollups (``schema.ROLLUPS``: ``usage_hourly`` and ``usage_daily`` by
the full key, and the narrower ones by team, by deployment and by user) are added to from the
rows the insert really added, in the same transaction, so they count each event once too.

- PostgreSQL: the batch is COPYed (binary protocol, asyncpg's ``copy_records_to_table``) into a
  session-local temporary table emptied at each commit, then one statement does the rest:
  ``INSERT INTO usage_events SELECT * FROM`` that table, the new rows summed once by (UTC hour,
  full key), and from those sums one grouped upsert per rollup (``INSERT ... ON CONFLICT DO
  UPDATE``), as CTEs. Usually no event of a batch is stored yet, and a plain INSERT is tried
  first; if one is (a UniqueViolation), the transaction is run again with ``INSERT ... ON
  CONFLICT (event_id) DO NOTHING RETURNING ...``, and the rollups are summed from the RETURNING
  rows only. Four round trips per batch (BEGIN, COPY, the statement, COMMIT), whatever its size.
- SQLite (the embedded default): the write lock is taken first (``BEGIN IMMEDIATE``), the ids
  already stored are looked up, the new events inserted with one executemany, and the rollups
  computed here and upserted.

``rebuild_rollups`` recomputes every rollup from ``usage_events`` in one transaction (after a bulk
load of events, or to repair them; the ledger writers stopped meanwhile): ``usage_hourly`` from
the events, the others from it (``usage_daily``) or from the full rollup of their width.

The wire format, shared with the gateway's sinks and spool: one event is the orjson encoding of
the list ``[2, event_id, time, request_id, user, team, key_id, tier, endpoint, model,
deployment, prompt_tokens, completion_tokens, latency_seconds, ttft_seconds, status, streamed,
cancelled, usage_estimated, cost_micros, reason, refused]`` (the leading 2 is the format's
version). Version 1, the same list without ``reason`` and ``refused``, is still read (entries a
gateway of the previous release left in a stream or spool): its events have reason ``""`` and
are not refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # no stubs, no py.typed
import orjson
from sqlalchemy import insert, select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from citadel.errors import StoreUnavailable
from citadel.metering.events import UsageEvent
from citadel.metering.schema import (
    DAY,
    FULL_KEY,
    HOUR,
    MEASURES,
    ROLLUPS,
    rollup_key,
    usage_events,
)
from citadel.stores.sql import translate_errors

__all__ = [
    "COLUMNS",
    "WIRE_VERSION",
    "Ledger",
    "Row",
    "decode_event",
    "decode_row",
    "encode_event",
    "event_row",
    "rebuild_rollups",
    "rebuild_statements",
    "rollup_rows",
]

WIRE_VERSION = 2
_WIRE_LENGTHS = {1: 20, 2: 22}  # fields of each version still read
DEFAULT_TIMEOUT = 30.0  # seconds for one batch, connecting included
_DEADLOCK_RETRIES = 3
_SQLITE_IN_CHUNK = 500  # ids per "event_id IN (...)" lookup (SQLite's parameter limit)
_SQLITE_SLICE = 250  # rows per executemany: what the event loop is held up by at a time

# usage_events' columns, in the order of ``event_row`` and of the table.
COLUMNS = (
    "event_id",
    "ts",
    "request_id",
    "user_id",
    "team_id",
    "key_id",
    "tier",
    "endpoint",
    "model",
    "deployment",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "ttft_ms",
    "status",
    "streamed",
    "cancelled",
    "usage_estimated",
    "cost_micros",
    "reason",
    "refused",
)


# -- the wire format --------------------------------------------------------------------------


def encode_event(event: UsageEvent) -> bytes:
    """The event as it travels through the stream and the spool (see the module docstring)."""
    return orjson.dumps(
        [
            WIRE_VERSION,
            event.event_id,
            event.time,
            event.request_id,
            event.user,
            event.team,
            event.key_id,
            event.tier,
            event.endpoint,
            event.model,
            event.deployment,
            event.prompt_tokens,
            event.completion_tokens,
            event.latency_seconds,
            event.ttft_seconds,
            event.status,
            event.streamed,
            event.cancelled,
            event.usage_estimated,
            event.cost_micros,
            event.reason,
            event.refused,
        ]
    )


def decode_event(data: bytes | str) -> UsageEvent:
    """The event ``encode_event`` made; ValueError if ``data`` is not one."""
    try:
        v = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"a usage event is not JSON: {data[:80]!r}") from exc
    if not isinstance(v, list) or not v or _WIRE_LENGTHS.get(v[0]) != len(v):
        raise ValueError(f"expected a usage event (a list of 22, version {WIRE_VERSION}): {v!r}")
    try:
        return UsageEvent(
            event_id=_str(v[1]),
            time=float(v[2]),
            request_id=_str(v[3]),
            user=_str(v[4]),
            team=_str(v[5]),
            key_id=_str(v[6]),
            tier=_str(v[7]),
            endpoint=_str(v[8]),
            model=_str(v[9]),
            deployment=_str(v[10]),
            prompt_tokens=int(v[11]),
            completion_tokens=int(v[12]),
            latency_seconds=float(v[13]),
            ttft_seconds=None if v[14] is None else float(v[14]),
            status=int(v[15]),
            streamed=bool(v[16]),
            cancelled=bool(v[17]),
            usage_estimated=bool(v[18]),
            cost_micros=int(v[19]),
            reason=_str(v[20]) if len(v) > 20 else "",
            refused=bool(v[21]) if len(v) > 20 else False,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a usage event has a field of the wrong type: {v!r}") from exc


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, not {value!r}")
    return value


Row = tuple[Any, ...]  # a usage_events row, in the order of COLUMNS

_INT4, _INT2, _INT8 = 2**31, 2**15, 2**63
_REAL_MAX = 1e30  # milliseconds: far below what float4 overflows at
_NUMBER = (int, float)
# The types an event's fields may decode to, as tuples to compare ``map(type, fields)`` with:
# one set lookup checks them all (checking field by field costs more than decoding).
_V1 = frozenset(
    (int, str, t, *(str,) * 8, int, int, latency, ttft, int, bool, bool, bool, int)
    for t in _NUMBER
    for latency in _NUMBER
    for ttft in (type(None), *_NUMBER)
)
_SIGNATURES = _V1 | {(*signature, str, bool) for signature in _V1}


def decode_row(data: bytes) -> Row:
    """The ``usage_events`` row of an encoded event, checked so that the database cannot refuse
    it (types, integer ranges, no NUL in text); ValueError if ``data`` is not an event.

    The ledger writer's fast path: no ``UsageEvent`` is built (that costs more than decoding).
    """
    if b"\\u0000" in data:  # PostgreSQL's text cannot hold NUL
        raise ValueError(f"a usage event has a NUL character: {data[:80]!r}")
    try:
        v = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"a usage event is not JSON: {data[:80]!r}") from exc
    if (
        type(v) is not list
        or tuple(map(type, v)) not in _SIGNATURES
        or _WIRE_LENGTHS.get(v[0]) != len(v)
    ):
        raise ValueError(f"expected a usage event (a list of 22, version {WIRE_VERSION}): {v!r}")
    (_, eid, t, rid, user, team, key, tier, endpoint, model, dep, prompt, completion) = v[:13]
    (latency, ttft, status, streamed, cancelled, estimated, cost) = v[13:20]
    reason, refused = (v[20], v[21]) if len(v) > 20 else ("", False)
    if not (
        0 <= prompt < _INT4
        and 0 <= completion < _INT4
        and 0 <= status < _INT2
        and -_INT8 <= cost < _INT8
        and -_REAL_MAX < latency < _REAL_MAX
        and (ttft is None or -_REAL_MAX < ttft < _REAL_MAX)
    ):
        raise ValueError(f"a usage event has a number out of range: {v!r}")
    try:
        ts = datetime.fromtimestamp(t, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(f"a usage event has an impossible time: {t!r}") from exc
    return (
        eid,
        ts,
        rid,
        user,
        team,
        key,
        tier,
        endpoint,
        model,
        dep,
        prompt,
        completion,
        latency * 1000.0,
        None if ttft is None else ttft * 1000.0,
        status,
        streamed,
        cancelled,
        estimated,
        cost,
        reason,
        refused,
    )


def event_row(event: UsageEvent) -> Row:
    """The event as a ``usage_events`` row, in the order of ``COLUMNS``."""
    ttft = event.ttft_seconds
    return (
        event.event_id,
        datetime.fromtimestamp(event.time, UTC),
        event.request_id,
        event.user,
        event.team,
        event.key_id,
        event.tier,
        event.endpoint,
        event.model,
        event.deployment,
        event.prompt_tokens,
        event.completion_tokens,
        event.latency_seconds * 1000.0,
        None if ttft is None else ttft * 1000.0,
        event.status,
        event.streamed,
        event.cancelled,
        event.usage_estimated,
        event.cost_micros,
        event.reason,
        event.refused,
    )


# -- PostgreSQL ------------------------------------------------------------------------------

_INCOMING = "usage_events_incoming"
# What asyncpg raises when the server or the connection fails. InternalClientError included: a
# pooled connection that received the server's shutdown notice while idle refuses the next query.
_PG_FAILURES = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError)
_CREATE_INCOMING = (
    f"CREATE TEMPORARY TABLE IF NOT EXISTS {_INCOMING} "
    "(LIKE usage_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)


_UNITS = {HOUR: "hour", DAY: "day"}
_FULL = ", ".join(FULL_KEY)
_PG_SUMS = (
    "count(*) AS requests, count(*) FILTER (WHERE status >= 400) AS errors, "
    "sum(prompt_tokens)::int8 AS prompt_tokens, sum(completion_tokens)::int8 AS completion_tokens, "
    "sum(cost_micros)::int8 AS cost_micros, sum(latency_ms::float8) AS latency_ms_sum, "
    "coalesce(sum(ttft_ms::float8), 0) AS ttft_ms_sum, count(ttft_ms) AS ttft_requests, "
    "count(*) FILTER (WHERE refused) AS refusals, "
    "count(*) FILTER (WHERE status >= 500) AS failures"
)
_RESUM = ", ".join(
    f"sum({m})" if m.endswith("_sum") else f"sum({m})::int8" for m in MEASURES
)  # the rollups' own sums, summed again


def _pg_rollups(source: str) -> str:
    """CTEs adding the rows of ``source`` (usage_events' columns) to every rollup: the rows are
    summed once by (UTC hour, full key), and every rollup is upserted from those sums."""
    ctes = [
        f"""batch_hours AS (
    SELECT date_trunc('hour', ts AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS bucket, {_FULL},
        {_PG_SUMS}
    FROM {source}
    GROUP BY 1, {_FULL}
)"""
    ]
    for table, width in ROLLUPS:
        key = ", ".join(rollup_key(table))
        bucket = "bucket" if width == HOUR else _pg_bucket("day", "bucket")
        updates = ", ".join(f"{c} = r.{c} + EXCLUDED.{c}" for c in MEASURES)
        # Buckets in UTC whatever the session's time zone; ORDER BY gives concurrent writers one
        # lock order (fewer deadlocks; a deadlock only rolls the batch back for a retry).
        ctes.append(
            f"""{table.name}_up AS (
    INSERT INTO {table.name} AS r (bucket, {key}, {", ".join(MEASURES)})
    SELECT {bucket}, {key}, {_RESUM}
    FROM batch_hours
    GROUP BY 1, {key}
    ORDER BY 1, {key}
    ON CONFLICT (bucket, {key}) DO UPDATE SET {updates}
)"""
        )
    return ", ".join(ctes)


def _pg_bucket(unit: str, column: str) -> str:
    return f"date_trunc('{unit}', {column} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"


# The usual case: no event of the batch is stored yet. A plain INSERT (cheaper than ON CONFLICT's
# speculative insertion) and the rollups straight from the batch; a UniqueViolation (a
# redelivered or replayed event) rolls the transaction back for _PG_STORE_SKIPPING.
_PG_STORE_NEW = (
    f"WITH inserted AS (INSERT INTO usage_events SELECT * FROM {_INCOMING} RETURNING 1), "
    + _pg_rollups(_INCOMING)
    + "\nSELECT count(*) FROM inserted"
)
# Some events may be stored already: skip them, and roll up only the rows really inserted.
_PG_STORE_SKIPPING = (
    "WITH inserted AS (\n"
    f"    INSERT INTO usage_events SELECT * FROM {_INCOMING}\n"
    "    ON CONFLICT (event_id) DO NOTHING\n"
    "    RETURNING ts, user_id, team_id, model, deployment, tier, status, prompt_tokens,\n"
    "        completion_tokens, cost_micros, latency_ms, ttft_ms, refused\n"
    "), " + _pg_rollups("inserted") + "\nSELECT count(*) FROM inserted"
)


# -- SQLite ----------------------------------------------------------------------------------


# Where each key column is in a Row.
_ROW_INDEX = {name: COLUMNS.index(name) for name in FULL_KEY}


def rollup_rows(
    rows: Iterable[Row], width: int, key: Sequence[str] = FULL_KEY
) -> list[dict[str, Any]]:
    """Ledger rows summed by (bucket ``width`` seconds wide, ``key``'s columns), as rollup rows
    to upsert."""
    at = [_ROW_INDEX[name] for name in key]
    sums: dict[tuple[Any, ...], list[Any]] = {}
    for r in rows:
        group = (int(r[1].timestamp() // width) * width, *(r[i] for i in at))
        acc = sums.get(group)
        if acc is None:
            acc = sums[group] = [0, 0, 0, 0, 0, 0.0, 0.0, 0, 0, 0]
        acc[0] += 1
        acc[1] += r[14] >= 400
        acc[8] += bool(r[20])
        acc[9] += r[14] >= 500
        acc[2] += r[10]
        acc[3] += r[11]
        acc[4] += r[18]
        acc[5] += r[12]
        if r[13] is not None:
            acc[6] += r[13]
            acc[7] += 1
    return [
        {
            "bucket": datetime.fromtimestamp(group[0], UTC),
            **dict(zip(key, group[1:], strict=True)),
            **dict(zip(MEASURES, acc, strict=True)),
        }
        for group, acc in sorted(sums.items())
    ]


# -- rebuilding the rollups -------------------------------------------------------------------


def _sqlite_bucket(unit: str, column: str) -> str:
    # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff', UTC wall time here.
    if unit == "hour":
        return f"substr({column}, 1, 13) || ':00:00.000000'"
    return f"substr({column}, 1, 10) || ' 00:00:00.000000'"


def rebuild_statements(dialect: str) -> list[str]:
    """The SQL that recomputes every rollup from ``usage_events``, in order: empty them, sum the
    events into ``usage_hourly``, then each other rollup from a full one (``usage_daily`` from
    ``usage_hourly``, each narrower one from the full one of its width). To run in one
    transaction, the ledger's writers stopped (or their batches would be counted twice or not
    at all)."""
    bucket = _pg_bucket if dialect == "postgresql" else _sqlite_bucket
    measures = ", ".join(MEASURES)
    events = (
        "count(*), sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END), sum(prompt_tokens), "
        "sum(completion_tokens), sum(cost_micros), sum(CAST(latency_ms AS DOUBLE PRECISION)), "
        "coalesce(sum(CAST(ttft_ms AS DOUBLE PRECISION)), 0), count(ttft_ms), "
        "sum(CASE WHEN refused THEN 1 ELSE 0 END), sum(CASE WHEN status >= 500 THEN 1 ELSE 0 END)"
    )
    resum = ", ".join(
        f"sum({m})" if m.endswith("_sum") else f"CAST(sum({m}) AS BIGINT)" for m in MEASURES
    )
    if dialect == "postgresql":
        statements = [f"TRUNCATE {', '.join(t.name for t, _ in ROLLUPS)}"]
    else:
        statements = [f"DELETE FROM {t.name}" for t, _ in ROLLUPS]
    statements.append(
        f"INSERT INTO usage_hourly (bucket, {_FULL}, {measures}) "
        f"SELECT {bucket('hour', 'ts')}, {_FULL}, {events} FROM usage_events "
        f"GROUP BY 1, {_FULL}"
    )
    statements.append(
        f"INSERT INTO usage_daily (bucket, {_FULL}, {measures}) "
        f"SELECT {bucket('day', 'bucket')}, {_FULL}, {resum} FROM usage_hourly "
        f"GROUP BY 1, {_FULL}"
    )
    for table, width in ROLLUPS:
        if table.name in ("usage_hourly", "usage_daily"):
            continue
        key = ", ".join(rollup_key(table))
        source = "usage_hourly" if width == HOUR else "usage_daily"
        statements.append(
            f"INSERT INTO {table.name} (bucket, {key}, {measures}) "
            f"SELECT bucket, {key}, {resum} FROM {source} GROUP BY bucket, {key}"
        )
    return statements


async def rebuild_rollups(engine: AsyncEngine) -> None:
    """Recompute every rollup from the ledger's events, in one transaction (see
    ``rebuild_statements``): after a bulk load of ``usage_events``, or to repair the rollups.
    Stop the ledger writers first. It takes as long as a scan of the events (wrap it in
    ``asyncio.timeout`` to bound it). StoreUnavailable if the database failed: nothing changed."""
    statements = rebuild_statements(engine.dialect.name)
    with translate_errors():
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                await conn.exec_driver_sql("SET LOCAL work_mem = '256MB'")
            else:
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            for statement in statements:
                await conn.exec_driver_sql(statement)


# -- the ledger ------------------------------------------------------------------------------


class Ledger:
    """Writes batches of usage events into the SQL ledger behind ``engine`` (not owned)."""

    def __init__(self, engine: AsyncEngine, *, operation_timeout: float = DEFAULT_TIMEOUT) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._timeout = operation_timeout

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def write(self, events: Sequence[UsageEvent]) -> int:
        """Store ``events`` and add them to the rollups, in one transaction; return how many were
        new (an id stored already, or repeated in the batch, is skipped). StoreUnavailable if the
        database failed: then nothing of the batch was committed, or all of it was."""
        return await self.write_rows([event_row(e) for e in events])

    async def write_rows(self, rows: Sequence[Row]) -> int:
        """``write`` for rows made by ``event_row`` or ``decode_row`` (the writer's fast path)."""
        unique = list({r[0]: r for r in rows}.values())
        if not unique:
            return 0
        if self._postgres:
            return await self._write_postgres(unique)
        return await self._write_sqlite(unique)

    async def _write_postgres(self, records: list[Row]) -> int:
        async with self._raw() as (conn, pg):
            if not conn.info.get(_INCOMING):
                await pg.execute(_CREATE_INCOMING)
                conn.info[_INCOMING] = True
            statement, deadlocks = _PG_STORE_NEW, 0
            while True:
                try:
                    async with pg.transaction():
                        await pg.copy_records_to_table(_INCOMING, records=records, columns=COLUMNS)
                        stored = await pg.fetchval(statement)
                    break
                except asyncpg.UniqueViolationError:
                    if statement is _PG_STORE_SKIPPING:
                        raise
                    statement = _PG_STORE_SKIPPING
                except asyncpg.DeadlockDetectedError:
                    # Concurrent writers upsert rollup rows in one order, but the server may
                    # still pick this batch as a deadlock's victim: it was rolled back, so
                    # run it again.
                    deadlocks += 1
                    if deadlocks > _DEADLOCK_RETRIES:
                        raise
        return int(stored)

    @contextlib.asynccontextmanager
    async def _raw(self) -> AsyncIterator[tuple[AsyncConnection, asyncpg.Connection]]:
        """A pooled connection and asyncpg's own beneath it (for COPY); a connection an error
        went through is dropped from the pool, since it may be dead or mid-transaction."""
        with translate_errors(self._timeout):
            async with asyncio.timeout(self._timeout), self._engine.connect() as conn:
                raw = await conn.get_raw_connection()
                pg: asyncpg.Connection = raw.driver_connection
                try:
                    yield conn, pg
                except _PG_FAILURES as exc:
                    await conn.invalidate()
                    detail = " ".join(str(exc).split()) or type(exc).__name__
                    raise StoreUnavailable("sql", detail) from exc
                except BaseException:
                    await conn.invalidate()
                    raise

    async def _write_sqlite(self, rows: list[Row]) -> int:
        with translate_errors(self._timeout):
            async with asyncio.timeout(self._timeout), self._engine.begin() as conn:
                # Take the write lock before reading: a reader upgrading to a writer could
                # fail at once ("database is locked") when another process writes too.
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
                known: set[str] = set()
                ids = [r[0] for r in rows]
                for start in range(0, len(ids), _SQLITE_IN_CHUNK):
                    chunk = ids[start : start + _SQLITE_IN_CHUNK]
                    found = await conn.execute(
                        select(usage_events.c.event_id).where(usage_events.c.event_id.in_(chunk))
                    )
                    known.update(found.scalars())
                new = [r for r in rows if r[0] not in known]
                if not new:
                    return 0
                # In slices: SQLAlchemy prepares the parameters on the event loop's thread, and
                # a whole batch at once held a gateway's requests up for tens of milliseconds.
                for start in range(0, len(new), _SQLITE_SLICE):
                    await conn.execute(
                        insert(usage_events),
                        [
                            dict(zip(COLUMNS, r, strict=True))
                            for r in new[start : start + _SQLITE_SLICE]
                        ],
                    )
                for table, width in ROLLUPS:
                    key = rollup_key(table)
                    upsert = sqlite_insert(table)
                    statement = upsert.on_conflict_do_update(
                        index_elements=["bucket", *key],
                        set_={c: table.c[c] + upsert.excluded[c] for c in MEASURES},
                    )
                    sums = rollup_rows(new, width, key)
                    for start in range(0, len(sums), _SQLITE_SLICE):
                        await conn.execute(statement, sums[start : start + _SQLITE_SLICE])
                return len(new)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers ``SELECT 1``."""
        with translate_errors(self._timeout):
            async with asyncio.timeout(self._timeout), self._engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
