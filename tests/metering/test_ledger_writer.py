"""The ledger and its writer against real stores: Redis (DB 10, a stream per test), the shared
PostgreSQL (a database per module), a private PostgreSQL that is stopped and restarted, and
SQLite."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from pg import PrivatePostgres, available
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from citadel.errors import ConfigError, StoreUnavailable
from citadel.metering.events import UsageEvent
from citadel.metering.ledger import (
    Ledger,
    decode_event,
    decode_row,
    encode_event,
    event_row,
    rebuild_rollups,
)
from citadel.metering.migrate import LEDGER
from citadel.metering.schema import ROLLUPS, usage_daily, usage_events, usage_hourly
from citadel.metering.writer import LedgerWriter, redis_url
from citadel.stores.redis import RedisClient
from citadel.stores.sql import build_engine

from support import postgres_execute, scratch_postgres

REDIS = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/10")
T0 = 1_717_243_200.0  # 2024-06-01 12:00:00 UTC


def event(i: int, *, t: float = T0, status: int = 200, user: str = "usr_a") -> UsageEvent:
    """The i-th event of a test: i prompt tokens, 2i completion tokens, 3i micro-USD."""
    return UsageEvent(
        event_id=os.urandom(16).hex(),
        time=t + i,
        request_id=f"req-{i}",
        user=user,
        team="team_x",
        key_id="key_1",
        tier="pro",
        endpoint="chat",
        model="sim-chat",
        deployment="sim-a",
        prompt_tokens=i,
        completion_tokens=2 * i,
        latency_seconds=0.25,
        ttft_seconds=0.05 if i % 2 else None,
        status=status,
        streamed=bool(i % 2),
        cancelled=False,
        usage_estimated=False,
        cost_micros=3 * i,
    )


# -- stores -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_postgres() -> Iterator[str]:
    """A fresh, migrated database on the shared PostgreSQL, dropped afterwards."""
    with scratch_postgres(prepare=LEDGER.upgrade) as uri:
        yield uri


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this module's own, migrated, which tests may stop and start."""
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    with PrivatePostgres() as server:
        asyncio.run(LEDGER.upgrade(server.url))
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URI of an empty, migrated ledger database of each kind."""
    if request.param == "sqlite":
        uri = f"sqlite:///{tmp_path / 'ledger.db'}"
        asyncio.run(LEDGER.upgrade(uri))
        return uri
    uri = str(request.getfixturevalue("shared_postgres"))
    asyncio.run(_truncate(uri))
    return uri


async def _truncate(uri: str) -> None:
    tables = ", ".join(["usage_events", *(t.name for t, _ in ROLLUPS)])
    await postgres_execute(uri, f"TRUNCATE {tables}")


@pytest.fixture
def stream() -> Iterator[str]:
    """A stream name of this test's own on Redis DB 10, deleted afterwards."""
    name = f"citadel:{{usage-test-{uuid.uuid4().hex[:10]}}}:events"

    async def ping() -> None:
        redis = RedisClient.from_url(REDIS, timeout=2)
        try:
            await redis.ping()
        finally:
            await redis.aclose()

    try:
        asyncio.run(ping())
    except StoreUnavailable as exc:
        pytest.skip(f"Redis is not reachable at {REDIS}: {exc}")
    yield name

    async def delete() -> None:
        redis = RedisClient.from_url(REDIS, timeout=2)
        try:
            await redis.execute("DEL", name, f"{name}:dead")
        finally:
            await redis.aclose()

    asyncio.run(delete())


Body = Callable[[RedisClient, AsyncEngine], Awaitable[None]]


@asynccontextmanager
async def stores(uri: str) -> AsyncIterator[tuple[RedisClient, AsyncEngine]]:
    redis = RedisClient.from_url(REDIS, timeout=5)
    engine = build_engine(uri, operation_timeout=5)
    try:
        yield redis, engine
    finally:
        await redis.aclose()
        await engine.dispose()


def writer(redis: RedisClient, engine: AsyncEngine, stream: str, **kw: Any) -> LedgerWriter:
    options: dict[str, Any] = {"consumer": "w1", "batch_size": 50, "block_ms": 10, **kw}
    return LedgerWriter(redis, engine, stream=stream, group="ledger", **options)


async def xadd(redis: RedisClient, stream: str, events: list[UsageEvent]) -> None:
    for e in events:
        await redis.execute("XADD", stream, "*", "e", encode_event(e))


async def drain(w: LedgerWriter, *, attempts: int = 200) -> None:
    """Step until the group has acknowledged every entry (retrying a store that is down)."""
    for _ in range(attempts):
        try:
            await w.step()
        except StoreUnavailable:
            await asyncio.sleep(0.05)
            continue
        if await w.lag() == 0:
            return
    raise AssertionError(f"the writer did not drain: lag {await w.lag()}")


async def ledger_totals(engine: AsyncEngine) -> dict[str, Any]:
    """Counts and sums of the ledger and of each rollup."""
    async with engine.connect() as conn:
        events = (
            await conn.execute(
                select(
                    func.count(),
                    func.count(func.distinct(usage_events.c.event_id)),
                    func.coalesce(func.sum(usage_events.c.prompt_tokens), 0),
                    func.coalesce(func.sum(usage_events.c.completion_tokens), 0),
                    func.coalesce(func.sum(usage_events.c.cost_micros), 0),
                )
            )
        ).one()
        totals: dict[str, Any] = {"events": tuple(int(v) for v in events)}
        for table, _ in ROLLUPS:
            row = (
                await conn.execute(
                    select(
                        func.coalesce(func.sum(table.c.requests), 0),
                        func.coalesce(func.sum(table.c.errors), 0),
                        func.coalesce(func.sum(table.c.prompt_tokens), 0),
                        func.coalesce(func.sum(table.c.completion_tokens), 0),
                        func.coalesce(func.sum(table.c.cost_micros), 0),
                    )
                )
            ).one()
            totals[table.name] = tuple(int(v) for v in row)
    return totals


def expected_totals(events: list[UsageEvent]) -> dict[str, Any]:
    n = len(events)
    prompt = sum(e.prompt_tokens for e in events)
    completion = sum(e.completion_tokens for e in events)
    cost = sum(e.cost_micros for e in events)
    errors = sum(e.status >= 400 for e in events)
    rollup = (n, errors, prompt, completion, cost)
    return {"events": (n, n, prompt, completion, cost)} | {t.name: rollup for t, _ in ROLLUPS}


# -- the wire format and the ledger ------------------------------------------------------------


def test_wire_format_round_trips_and_refuses_other_data() -> None:
    """An encoded event decodes to an equal one; anything else is a ValueError."""
    original = event(3)
    assert original == decode_event(encode_event(original))
    for bad in (b"", b"{", b"[2]", b'{"event_id": "x"}', encode_event(original)[:-5]):
        with pytest.raises(ValueError, match="usage event"):
            decode_event(bad)


def test_decode_row_refuses_what_the_database_would() -> None:
    """A row decoded from the wire equals the event's; a NUL, a wrong type or a number out of
    its column's range is a ValueError (one bad entry must not make a whole batch fail)."""
    original = event(5)
    assert event_row(original) == decode_row(encode_event(original))
    good = orjson.loads(encode_event(original))
    for index, value in [
        (1, "a\x00b"),  # NUL in text
        (1, 7),  # an id that is not a string
        (11, -1),  # negative tokens
        (11, 2**31),  # beyond INTEGER
        (15, 70_000),  # beyond SMALLINT
        (16, 1),  # a number for a bool
        (2, 1e300),  # an impossible time
        (13, "0.1"),  # a string for a number
    ]:
        bad = list(good)
        bad[index] = value
        with pytest.raises(ValueError, match="usage event"):
            decode_row(orjson.dumps(bad))


def test_the_writer_finds_redis_where_the_gateway_does() -> None:
    """endpoints.redis first (host:port accepted), else a redis:// limits backend, else none."""
    assert "redis://r:6379/2" == redis_url("redis://r:6379/2", "redis://other")
    assert "redis://r:6380" == redis_url("r:6380", "memory://")
    assert "redis://l:6379/1" == redis_url(None, "redis://l:6379/1")
    with pytest.raises(ConfigError, match=r"endpoints\.redis"):
        redis_url(None, "memory://")


def test_the_ledger_stores_each_event_once(database: str) -> None:
    """The same events written twice, and repeated inside a batch, are stored and rolled up once."""
    events = [event(i, status=500 if i % 4 == 0 else 200) for i in range(1, 41)]

    async def body() -> None:
        engine = build_engine(database)
        ledger = Ledger(engine)
        try:
            assert 40 == await ledger.write(events + events[:5])
            assert 0 == await ledger.write(events)
            late = event(99)
            assert 1 == await ledger.write([*events[10:20], late])
            assert expected_totals([*events, late]) == await ledger_totals(engine)
        finally:
            await engine.dispose()

    asyncio.run(body())


def test_rollups_bucket_by_utc_hour_and_day(database: str) -> None:
    """Events an hour apart fall in two hourly rows, and in one daily row per UTC day."""
    events = [event(1), event(2, t=T0 + 3600), event(3, t=T0 + 86400)]

    async def body() -> None:
        engine = build_engine(database)
        try:
            await Ledger(engine).write(events)
            async with engine.connect() as conn:
                hours = (
                    await conn.execute(
                        select(usage_hourly.c.bucket, usage_hourly.c.requests).order_by(
                            usage_hourly.c.bucket
                        )
                    )
                ).all()
                days = (
                    await conn.execute(
                        select(usage_daily.c.bucket, usage_daily.c.requests).order_by(
                            usage_daily.c.bucket
                        )
                    )
                ).all()
        finally:
            await engine.dispose()
        assert ["2024-06-01T12:00:00+00:00", "2024-06-01T13:00:00+00:00"] == [
            h[0].isoformat() for h in hours[:2]
        ]
        assert [1, 1, 1] == [h[1] for h in hours]
        assert [("2024-06-01T00:00:00+00:00", 2), ("2024-06-02T00:00:00+00:00", 1)] == [
            (d[0].isoformat(), d[1]) for d in days
        ]

    asyncio.run(body())


async def rollup_contents(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every rollup, in key order; float sums rounded (REAL latencies are summed
    in a different order by each path)."""
    contents: dict[str, list[tuple[Any, ...]]] = {}
    async with engine.connect() as conn:
        for table, _ in ROLLUPS:
            rows = (await conn.execute(select(table).order_by(*table.primary_key.columns))).all()
            contents[table.name] = [
                tuple(round(v, 2) if isinstance(v, float) else v for v in row) for row in rows
            ]
    return contents


def varied_events(count: int, seed: int = 3) -> list[UsageEvent]:
    """Events of a few users, teams, models, deployments and tiers over three days."""
    rng = random.Random(seed)
    events = []
    for i in range(1, count + 1):
        user = rng.randrange(6)
        model = rng.randrange(3)
        events.append(
            dataclasses.replace(
                event(i, t=T0 + rng.uniform(-86400, 2 * 86400), status=rng.choice((200, 502))),
                user=f"usr_{user}",
                team=("team_a", "team_b", "")[user % 3],
                tier=("free", "pro")[user % 2],
                model=f"m{model}",
                deployment=f"m{model}-{rng.randrange(2)}",
            )
        )
    return events


def test_every_rollup_counts_each_new_event_once(database: str) -> None:
    """Batches that mix new events with ones stored already add only the new ones to every
    rollup, full and narrow: the rollups equal a rebuild from the stored events."""
    events = varied_events(300)

    async def body() -> None:
        engine = build_engine(database)
        ledger = Ledger(engine)
        try:
            assert 150 == await ledger.write(events[:150])
            assert 100 == await ledger.write(events[100:250])  # 50 stored already
            assert 50 == await ledger.write(events[:50] + events[250:] + events[250:260])
            assert 0 == await ledger.write(events[::7])
            assert expected_totals(events) == await ledger_totals(engine)
            written = await rollup_contents(engine)
            await rebuild_rollups(engine)
            assert written == await rollup_contents(engine)
            assert all(written.values())
        finally:
            await engine.dispose()

    asyncio.run(body())


def test_rebuild_recomputes_the_rollups_from_the_events(database: str) -> None:
    """Rollups emptied (or wrong) are recomputed from usage_events, the same as the writer's."""
    events = varied_events(200, seed=5)

    async def body() -> None:
        engine = build_engine(database)
        try:
            for start in range(0, 200, 40):
                await Ledger(engine).write(events[start : start + 40])
            written = await rollup_contents(engine)
            async with engine.begin() as conn:
                for table, _ in ROLLUPS[2:]:
                    await conn.execute(table.delete())
                await conn.execute(usage_hourly.delete().where(usage_hourly.c.user_id == "usr_1"))
                await conn.execute(usage_daily.update().values(requests=usage_daily.c.requests + 1))
            await rebuild_rollups(engine)
            assert written == await rollup_contents(engine)
            assert expected_totals(events) == await ledger_totals(engine)
        finally:
            await engine.dispose()

    asyncio.run(body())


# -- the writer ---------------------------------------------------------------------------------


def test_the_writer_drains_the_stream_into_the_ledger(database: str, stream: str) -> None:
    """Entries XADDed before the group existed and after are stored, acknowledged and trimmed."""
    events = [event(i) for i in range(1, 121)]

    async def body() -> None:
        async with stores(database) as (redis, engine):
            await xadd(redis, stream, events[:60])  # before any writer: the group starts at 0
            w = writer(redis, engine, stream)
            await w.ensure_group()
            await w.ensure_group()  # BUSYGROUP is not an error
            await xadd(redis, stream, [*events[60:], events[0]])  # and one replayed twice
            assert 121 == await w.lag()
            await drain(w)
            assert expected_totals(events) == await ledger_totals(engine)
            stats = w.stats()
            assert (120, 1, 0) == (stats.stored, stats.duplicates, stats.dead)
            await w.trim()
            assert 0 == await redis.execute("XLEN", stream)

    asyncio.run(body())


def test_a_crashed_writers_batch_is_claimed_and_stored_once(database: str, stream: str) -> None:
    """A writer that read a batch and died (half of it committed, none of it acknowledged)
    leaves it pending; another writer claims it and the ledger holds each event once."""
    events = [event(i) for i in range(1, 81)]

    async def body() -> None:
        async with stores(database) as (redis, engine):
            first = writer(redis, engine, stream, consumer="doomed", batch_size=100)
            await first.ensure_group()
            await xadd(redis, stream, events)
            # The doomed writer reads everything, commits half, and dies before XACK.
            reply = await redis.execute(
                "XREADGROUP", "GROUP", "ledger", "doomed", "COUNT", 100, "STREAMS", stream, ">"
            )
            assert 80 == len(reply[0][1])
            await Ledger(engine).write(events[:40])
            assert 80 == await first.lag()

            second = writer(redis, engine, stream, consumer="heir", claim_idle_seconds=0)
            assert 0 == await second.step()  # new entries only: the doomed ones are not its own
            assert 80 == await second.claim()
            await drain(second)
            assert expected_totals(events) == await ledger_totals(engine)
            assert (40, 40) == (second.stats().stored, second.stats().duplicates)
            pending = await redis.execute("XPENDING", stream, "ledger")
            assert 0 == pending[0]

    asyncio.run(body())


def test_an_entry_that_is_not_an_event_goes_to_the_dead_letter_stream(stream: str) -> None:
    """A malformed entry is moved aside and acknowledged; the events around it are stored."""

    async def body(uri: str) -> None:
        async with stores(uri) as (redis, engine):
            w = writer(redis, engine, stream)
            await w.ensure_group()
            await xadd(redis, stream, [event(1)])
            await redis.execute("XADD", stream, "*", "e", b"not json")
            await redis.execute("XADD", stream, "*", "other", b"field")
            await xadd(redis, stream, [event(2)])
            await drain(w)
            assert 2 == (await ledger_totals(engine))["events"][0]
            assert 2 == w.stats().dead
            assert 2 == await redis.execute("XLEN", f"{stream}:dead")

    with_sqlite(body)


def with_sqlite(body: Callable[[str], Awaitable[None]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        uri = f"sqlite:///{directory}/ledger.db"
        asyncio.run(LEDGER.upgrade(uri))
        asyncio.run(body(uri))


def test_trim_keeps_what_is_pending(stream: str) -> None:
    """Trimming removes acknowledged entries only: a batch read but not acknowledged stays."""

    async def body(uri: str) -> None:
        async with stores(uri) as (redis, engine):
            w = writer(redis, engine, stream, batch_size=10)
            await w.ensure_group()
            await xadd(redis, stream, [event(i) for i in range(1, 31)])
            assert 10 == await w.step()
            await redis.execute(
                "XREADGROUP", "GROUP", "ledger", "other", "COUNT", 10, "STREAMS", stream, ">"
            )
            await w.trim()
            assert 20 == await redis.execute("XLEN", stream)
            assert 20 == await w.lag()

    with_sqlite(body)


def test_trim_keeps_stored_entries_younger_than_keep_seconds(stream: str) -> None:
    """The event feed resumes usage from this stream: stored entries inside ``keep_seconds``
    stay, older stored ones go."""

    async def body(uri: str) -> None:
        async with stores(uri) as (redis, engine):
            w = writer(redis, engine, stream, keep_seconds=600)
            await w.ensure_group()
            seconds, _ = await redis.execute("TIME")
            old = (int(seconds) - 3600) * 1000
            for i in range(5):  # an hour old
                await redis.execute("XADD", stream, f"{old}-{i}", "e", encode_event(event(i + 1)))
            await xadd(redis, stream, [event(i) for i in range(6, 16)])
            await drain(w)
            assert 0 == await w.lag()
            await w.trim()
            assert 10 == await redis.execute("XLEN", stream)
            await writer(redis, engine, stream).trim()  # keep_seconds 0: only the backlog
            assert 0 == await redis.execute("XLEN", stream)

    with_sqlite(body)


def test_postgres_down_nothing_is_acknowledged_and_the_backlog_drains_later(
    private_postgres: PrivatePostgres, stream: str
) -> None:
    """With PostgreSQL stopped, step fails without acknowledging and the lag grows; once it is
    back, the writer drains the stream and the ledger holds exactly the events sent."""
    events = [event(i) for i in range(1, 201)]

    async def body() -> None:
        await _truncate(private_postgres.url)
        async with stores(private_postgres.url) as (redis, engine):
            w = writer(redis, engine, stream, batch_size=40)
            await w.ensure_group()
            await xadd(redis, stream, events[:50])
            assert 40 == await w.step()  # a pooled connection exists when the server stops
            private_postgres.stop()
            try:
                await xadd(redis, stream, events[50:120])
                for _ in range(3):
                    with pytest.raises(StoreUnavailable):
                        await w.step()
                assert 80 == await w.lag()
                await xadd(redis, stream, events[120:])
                assert 160 == await w.lag()
            finally:
                private_postgres.start()
            await drain(w)
            assert expected_totals(events) == await ledger_totals(engine)
            assert w.stats().failures >= 3

    asyncio.run(body())


def test_run_backs_off_while_the_database_is_down_and_stops_when_told(
    private_postgres: PrivatePostgres, stream: str
) -> None:
    """``run`` keeps going across an outage and returns once ``stop`` is set."""
    events = [event(i) for i in range(1, 101)]

    async def body() -> None:
        await _truncate(private_postgres.url)
        async with stores(private_postgres.url) as (redis, engine):
            w = writer(redis, engine, stream, batch_size=25)
            stop = asyncio.Event()
            task = asyncio.create_task(w.run(stop))
            await xadd(redis, stream, events[:30])
            await asyncio.to_thread(private_postgres.stop)
            try:
                await xadd(redis, stream, events[30:])
                await asyncio.sleep(0.5)
                assert await w.lag() > 0
            finally:
                await asyncio.to_thread(private_postgres.start)
            for _ in range(200):
                if await w.lag() == 0:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.wait_for(task, 10)
            assert expected_totals(events) == await ledger_totals(engine)

    asyncio.run(body())
