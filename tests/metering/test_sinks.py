"""The gateway's usage sinks and spool: a private Redis server that goes down and comes back,
the spool file torn by a crash, and the embedded SQLite ledger."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg import PrivatePostgres, available
from sqlalchemy import func, select

from citadel.metering.events import UsageEvent
from citadel.metering.ledger import decode_event, encode_event
from citadel.metering.migrate import LEDGER
from citadel.metering.schema import usage_events, usage_hourly
from citadel.metering.sinks import RedisStreamSink, SinkStats, SqlLedgerSink
from citadel.metering.spool import Spool
from citadel.metering.writer import LedgerWriter
from citadel.stores.redis import RedisClient
from citadel.stores.sql import build_engine

from support import free_port, usage_event

STREAM = "citadel:{usage}:events"


def event(i: int) -> UsageEvent:
    return usage_event(
        time=1_717_243_200.0 + i,
        request_id=f"req-{i}",
        prompt_tokens=i,
        completion_tokens=i + 1,
        usage_estimated=i % 2 == 0,
        cost_micros=5 * i,
    )


class PrivateRedis:
    """A redis-server of the test's own (no persistence), stopped and started at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _answers(self) -> bool:
        async def ping() -> None:
            client = RedisClient.from_url(self.url, timeout=0.5)
            try:
                await client.ping()
            finally:
                await client.aclose()

        try:
            asyncio.run(ping())
        except Exception:
            return False
        return True


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def stream_events(redis: RedisClient) -> list[UsageEvent]:
    entries = await redis.execute("XRANGE", STREAM, "-", "+")
    return [decode_event(dict(zip(f[::2], f[1::2], strict=True))[b"e"]) for _, f in entries]


# -- the spool --------------------------------------------------------------------------------


def test_the_spool_replays_what_was_appended_and_truncates(tmp_path: Path) -> None:
    """Appended batches come back in order; after truncate, nothing; a missing file is empty."""
    spool = Spool(tmp_path / "usage.spool")
    assert [] == spool.replay()
    events = [event(i) for i in range(5)]
    assert 3 == spool.append(events[:3])
    assert 2 == spool.append(events[3:])
    assert 0 == spool.append([])
    assert events == spool.replay()
    spool.truncate()
    assert ([], 0) == (spool.replay(), spool.size())


def test_a_torn_last_line_is_skipped_and_does_not_swallow_later_events(tmp_path: Path) -> None:
    """A line cut short by a crash is skipped; events appended after it stay readable."""
    path = tmp_path / "usage.spool"
    spool = Spool(path)
    events = [event(i) for i in range(4)]
    spool.append(events[:2])
    with path.open("ab") as file:
        file.write(encode_event(event(99))[:37])  # the crash: half a line, no newline
    assert events[:2] == spool.replay()
    spool.append(events[2:])
    assert events == spool.replay()
    with path.open("ab") as file:
        file.write(b"garbage\n\n")
    assert events == spool.replay()


# -- RedisStreamSink ----------------------------------------------------------------------------


def test_emitted_events_reach_the_stream(redis_server: PrivateRedis, tmp_path: Path) -> None:
    """Events emitted are XADDed in batches and all of them are there after aclose."""
    events = [event(i) for i in range(250)]

    async def body() -> None:
        redis = RedisClient.from_url(redis_server.url, timeout=1)
        sink = RedisStreamSink(
            redis,
            stream=STREAM,
            flush_seconds=0.05,
            batch_size=100,
            spool=Spool(tmp_path / "s"),
        )
        await sink.start()
        for e in events[:200]:
            sink.emit(e)
        await asyncio.sleep(0.2)
        assert 200 == len(await stream_events(redis))
        for e in events[200:]:
            sink.emit(e)
        await sink.aclose()
        assert events == await stream_events(redis)
        assert SinkStats(pending=0, spooled=0, sent=250, failures=0, dropped=0) == sink.stats()
        await redis.aclose()

    asyncio.run(body())


def test_redis_down_spools_and_redis_back_replays(
    redis_server: PrivateRedis, tmp_path: Path
) -> None:
    """While Redis is down events go to the spool file; when it is back they are replayed to
    the stream (each at least once) and the spool is emptied."""
    events = [event(i) for i in range(300)]
    spool = Spool(tmp_path / "usage.spool")

    async def body() -> None:
        redis = RedisClient.from_url(redis_server.url, timeout=0.5)
        sink = RedisStreamSink(
            redis, stream=STREAM, flush_seconds=0.02, batch_size=50, spool=spool, retry_seconds=0.1
        )
        await sink.start()
        for e in events[:100]:
            sink.emit(e)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(redis_server.stop)
        for e in events[100:250]:
            sink.emit(e)
        await asyncio.sleep(0.3)
        stats = sink.stats()
        assert (150, 100) == (stats.spooled, stats.sent)
        assert stats.failures >= 1
        assert events[100:250] == spool.replay()

        await asyncio.to_thread(redis_server.start)  # empty: what was sent before is gone
        for e in events[250:]:
            sink.emit(e)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if sink.stats().spooled == 0 and sink.stats().pending == 0:
                break
        await sink.aclose()
        sent = await stream_events(redis)
        assert {e.event_id for e in events[100:]} == {e.event_id for e in sent}
        await redis.aclose()

    asyncio.run(body())
    assert 0 == spool.size()


def test_a_spool_left_by_an_earlier_run_is_replayed_at_start(
    redis_server: PrivateRedis, tmp_path: Path
) -> None:
    """A gateway that died with events spooled (the last line torn) sends them when it starts."""
    spool = Spool(tmp_path / "usage.spool")
    events = [event(i) for i in range(20)]
    spool.append(events)
    with spool.path.open("ab") as file:
        file.write(b'[1, "torn')

    async def body() -> None:
        redis = RedisClient.from_url(redis_server.url, timeout=1)
        sink = RedisStreamSink(redis, stream=STREAM, flush_seconds=0.02, batch_size=8, spool=spool)
        await sink.start()
        await sink.aclose()
        assert events == await stream_events(redis)
        assert 20 == sink.stats().sent
        await redis.aclose()

    asyncio.run(body())
    assert 0 == spool.size()


def test_aclose_with_redis_down_spools_the_rest(tmp_path: Path) -> None:
    """Events still queued at shutdown while Redis is unreachable end up in the spool."""
    spool = Spool(tmp_path / "usage.spool")
    events = [event(i) for i in range(10)]

    async def body() -> None:
        redis = RedisClient.from_url(f"redis://127.0.0.1:{free_port()}", timeout=0.2)
        sink = RedisStreamSink(redis, stream=STREAM, flush_seconds=60, batch_size=1000, spool=spool)
        await sink.start()
        for e in events:
            sink.emit(e)
        await sink.aclose()
        assert (0, 10) == (sink.stats().pending, sink.stats().spooled)

    asyncio.run(body())
    assert events == spool.replay()


def test_emit_never_waits_and_drops_beyond_the_bound(tmp_path: Path) -> None:
    """emit is a plain call; past max_pending events are refused and counted, not queued."""

    async def body() -> None:
        redis = RedisClient.from_url(f"redis://127.0.0.1:{free_port()}", timeout=0.2)
        sink = RedisStreamSink(
            redis,
            stream=STREAM,
            flush_seconds=60,
            batch_size=1000,
            spool=Spool(tmp_path / "s"),
            max_pending=5,
        )
        for i in range(8):
            assert sink.emit(event(i)) is None
        assert (5, 3) == (sink.stats().pending, sink.stats().dropped)

    asyncio.run(body())


def test_sink_stream_writer_ledger_end_to_end(redis_server: PrivateRedis, tmp_path: Path) -> None:
    """Events emitted by the sink, through a Redis outage, land in the ledger exactly once."""
    events = [event(i) for i in range(1, 401)]
    uri = f"sqlite:///{tmp_path / 'ledger.db'}"
    asyncio.run(LEDGER.upgrade(uri))

    async def body() -> None:
        redis = RedisClient.from_url(redis_server.url, timeout=0.5)
        sink = RedisStreamSink(
            redis,
            stream=STREAM,
            flush_seconds=0.02,
            batch_size=64,
            spool=Spool(tmp_path / "usage.spool"),
            retry_seconds=0.05,
        )
        await sink.start()
        for e in events[:150]:
            sink.emit(e)
        await asyncio.sleep(0.1)
        await asyncio.to_thread(redis_server.stop)
        for e in events[150:300]:
            sink.emit(e)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(redis_server.start)  # the first 150 are lost with Redis' memory
        for e in events[300:]:
            sink.emit(e)
        await sink.aclose()
        await redis.aclose()

        engine = build_engine(uri)
        reader = RedisClient.from_url(redis_server.url, timeout=2)
        writer = LedgerWriter(
            reader, engine, stream=STREAM, group="ledger", consumer="w", batch_size=100, block_ms=5
        )
        while await writer.step():
            pass
        async with engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(usage_events))).scalar()
            requests = (await conn.execute(select(func.sum(usage_hourly.c.requests)))).scalar()
        await reader.aclose()
        await engine.dispose()
        assert (250, 250) == (count, requests)

    asyncio.run(body())


# -- SqlLedgerSink ------------------------------------------------------------------------------


def test_the_embedded_sink_writes_the_sqlite_ledger(tmp_path: Path) -> None:
    """SqlLedgerSink migrates its SQLite database and stores every event emitted, once."""
    events = [event(i) for i in range(1, 501)]

    async def body() -> None:
        engine = build_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
        sink = SqlLedgerSink(engine, flush_seconds=0.02, batch_size=128, migrate=True)
        await sink.start()
        for e in events:
            sink.emit(e)
        await sink.aclose()
        async with engine.connect() as conn:
            count, cost = (
                await conn.execute(select(func.count(), func.sum(usage_events.c.cost_micros)))
            ).one()
        await engine.dispose()
        assert (500, sum(e.cost_micros for e in events)) == (count, cost)
        assert SinkStats(pending=0, spooled=0, sent=500, failures=0, dropped=0) == sink.stats()

    asyncio.run(body())


def test_the_sql_sink_keeps_events_while_the_database_is_down(tmp_path: Path) -> None:
    """With PostgreSQL stopped the batch stays queued (counted as a failure); once the server is
    back the sink delivers it, once."""
    reason = available()
    if reason is not None:
        pytest.skip(reason)
    events = [event(i) for i in range(1, 51)]

    async def body(server: PrivatePostgres) -> None:
        await LEDGER.upgrade(server.url)
        engine = build_engine(server.url, operation_timeout=2)
        sink = SqlLedgerSink(engine, flush_seconds=0.02, batch_size=20)
        await sink.start()
        sink.emit(events[0])
        for _ in range(200):
            await asyncio.sleep(0.02)
            if sink.stats().sent:
                break
        await asyncio.to_thread(server.stop)
        for e in events[1:]:
            sink.emit(e)
        for _ in range(200):
            await asyncio.sleep(0.02)
            if sink.stats().failures:
                break
        assert (49, 1) == (sink.stats().pending, sink.stats().sent)
        await asyncio.to_thread(server.start)
        for _ in range(400):
            await asyncio.sleep(0.05)
            if sink.stats().sent == 50:
                break
        await sink.aclose()
        async with engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(usage_events))).scalar()
        await engine.dispose()
        assert 50 == count
        assert sink.stats().failures >= 1

    with PrivatePostgres() as server:
        asyncio.run(body(server))
