"""The ledger writer: drains the usage stream (Redis) into the SQL ledger, losing nothing.

    writer = LedgerWriter(redis, engine, stream="citadel:{usage}:events", group="ledger",
                          consumer="host-1234", batch_size=10_000)
    await writer.run(stop)          # until stop is set

    citadel --config citadel.yaml ledger-writer      # the same, as a process (run_writer)

Theory of operation. Gateways XADD one entry per event (field ``e``: the wire format of
``citadel.metering.ledger``). Writers read the stream through one consumer group, so each entry
goes to one writer, and stays in that writer's pending list until it is acknowledged. A writer
acknowledges a batch only after the transaction storing it has committed. So:

- PostgreSQL down: the write fails, nothing is acknowledged; the writer backs off and retries the
  same entries (it reads its own pending list, ID ``0``, before asking for new ones with ``>``);
  new events wait in the stream (``lag`` grows) and drain when the database is back.
- A writer dies mid-batch: its entries stay pending under its name. Every writer, at start and
  periodically, takes over (XAUTOCLAIM) entries pending longer than ``claim_idle_seconds`` and
  stores them; the ledger skips ids it holds already, so a batch that was committed but not
  acknowledged is stored once.
- A writer dies after the commit, before XACK: the same; redelivered and skipped.

Throughput: each batch is one transaction (see ``citadel.metering.ledger``); ``run`` keeps up
to ``concurrency`` of them in flight on separate connections while it reads and decodes the
next, so the database's cores and this process work side by side (``bench/ledger.py``).

The group is created at the stream's start (``0``, not ``$``): events XADDed before any writer
ran are drained too. Entries every writer is done with are trimmed (XTRIM MINID below the oldest
entry still pending or undelivered), so the stream holds only the backlog; the stream therefore
belongs to the ledger group alone. Stored entries younger than ``keep_seconds``
(``metering.stream_keep_seconds``, default 600) are kept all the same: the event feed reads this
stream as its ``usage`` topic (``citadel.feed``), and a client resuming ``/v1/events`` from a
position inside that window gets every event since. An entry that cannot be decoded is copied to
``<stream>:dead`` and acknowledged, so one bad entry cannot stop the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine

from citadel.errors import CitadelError, ConfigError, StoreUnavailable
from citadel.metering.ledger import Ledger, Row, decode_row
from citadel.stores.endpoint import RedisStore, connect_redis, shared_redis_url
from citadel.stores.redis import RedisError

if TYPE_CHECKING:
    from citadel.settings import Settings

__all__ = ["LedgerWriter", "WriterStats", "redis_url", "run_writer"]

_log = logging.getLogger("citadel.metering.writer")

FIELD = b"e"  # the entry field holding the event
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0  # seconds between retries while a store is down
_TRIM_SECONDS = 10.0
_FORGET_CONSUMER_MS = 3_600_000  # a consumer idle this long with nothing pending is removed


@dataclass(frozen=True, slots=True, kw_only=True)
class WriterStats:
    """What a writer has done since it started."""

    batches: int  # batches committed
    stored: int  # events the ledger did not hold yet
    duplicates: int  # events it held already (redelivered, replayed)
    dead: int  # entries that were not events, moved to <stream>:dead
    claimed: int  # entries taken over from consumers idle too long
    failures: int  # batches whose write or acknowledgement failed


class LedgerWriter:
    """One consumer of the usage stream's group, storing what it reads in the ledger."""

    def __init__(
        self,
        redis: RedisStore,
        engine: AsyncEngine,
        *,
        stream: str,
        group: str,
        consumer: str,
        batch_size: int,
        block_ms: int = 200,
        claim_idle_seconds: float = 30.0,
        concurrency: int = 2,
        trim: bool = True,
        keep_seconds: float = 0.0,
    ) -> None:
        if batch_size < 1:
            raise ConfigError("metering.batch_size", batch_size, "an integer >= 1")
        if concurrency < 1:
            raise ConfigError("ledger writer concurrency", concurrency, "an integer >= 1")
        self._redis = redis
        self._ledger = Ledger(engine)
        self._stream = stream
        self._group = group
        self._consumer = consumer
        self._batch = batch_size
        self._block_ms = block_ms
        self._claim_idle_ms = int(claim_idle_seconds * 1000)
        self._concurrency = concurrency
        self._trim = trim
        self._keep_ms = int(keep_seconds * 1000)
        self._group_ready = False
        # True while this consumer may have entries pending under its own name (at start, after
        # a claim or a failure): those are read (ID 0) before new ones (ID >).
        self._backlog = True
        self._counts = {f.name: 0 for f in dataclasses.fields(WriterStats)}

    @property
    def consumer(self) -> str:
        return self._consumer

    def stats(self) -> WriterStats:
        return WriterStats(**self._counts)

    async def ensure_group(self) -> None:
        """Create the stream and its group if missing (a group that exists is left alone)."""
        try:
            await self._redis.execute(
                "XGROUP", "CREATE", self._stream, self._group, "0", "MKSTREAM"
            )
        except RedisError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise
        self._group_ready = True

    async def step(self) -> int:
        """Read up to ``batch_size`` entries, store them in one transaction, acknowledge them;
        return how many entries were acknowledged (0 when none came within ``block_ms``).

        StoreUnavailable when Redis or the database failed: nothing uncommitted was acknowledged,
        and the same entries are read again by the next step."""
        return await self._commit(await self._next_batch())

    async def _next_batch(self) -> _Batch:
        """The next entries (this consumer's own pending ones first), decoded."""
        if not self._group_ready:
            await self.ensure_group()
        batch = _Batch()
        for entry_id, fields in await self._read():
            batch.ids.append(entry_id)
            if fields is None:  # trimmed or deleted while pending: nothing left to store
                continue
            payload = _field(fields)
            try:
                batch.rows.append(decode_row(payload if payload is not None else b""))
            except ValueError as exc:
                _log.error("usage entry %s is not an event: %s", entry_id.decode(), exc)
                batch.dead.append((entry_id, payload or b""))
        return batch

    async def _commit(self, batch: _Batch) -> int:
        """Store a batch, then acknowledge it; return how many entries were acknowledged."""
        if not batch.ids:
            return 0
        try:
            stored = await self._ledger.write_rows(batch.rows)
            for entry_id, payload in batch.dead:
                await self._redis.execute(
                    "XADD", f"{self._stream}:dead", "*", "id", entry_id, "e", payload
                )
            await self._redis.execute("XACK", self._stream, self._group, *batch.ids)
        except (StoreUnavailable, RedisError):
            self._backlog = True
            self._counts["failures"] += 1
            raise
        counts = self._counts
        counts["batches"] += 1
        counts["stored"] += stored
        counts["duplicates"] += len(batch.rows) - stored
        counts["dead"] += len(batch.dead)
        return len(batch.ids)

    async def _read(self) -> list[tuple[bytes, list[bytes] | None]]:
        if self._backlog:
            entries = await self._xreadgroup("0", block=False)
            if entries:
                return entries
            self._backlog = False
        return await self._xreadgroup(">", block=True)

    async def _xreadgroup(
        self, start: str, *, block: bool
    ) -> list[tuple[bytes, list[bytes] | None]]:
        args: list[str | int] = ["GROUP", self._group, self._consumer, "COUNT", self._batch]
        if block:
            args += ["BLOCK", self._block_ms]
        try:
            reply = await self._redis.execute("XREADGROUP", *args, "STREAMS", self._stream, start)
        except RedisError as exc:
            if str(exc).startswith("NOGROUP"):  # the stream was deleted, or Redis flushed
                self._group_ready = False
            raise
        if not reply:
            return []
        return [(entry[0], entry[1]) for entry in reply[0][1]]

    async def claim(self) -> int:
        """Take over entries pending longer than ``claim_idle_seconds`` (their consumer died
        or is stuck); the next steps store them. Return how many were taken."""
        if not self._group_ready:
            await self.ensure_group()
        claimed = 0
        cursor: bytes | str = "0-0"
        while True:
            reply = await self._redis.execute(
                "XAUTOCLAIM",
                self._stream,
                self._group,
                self._consumer,
                self._claim_idle_ms,
                cursor,
                "COUNT",
                self._batch,
                "JUSTID",
            )
            claimed += len(reply[1])
            cursor = reply[0]
            if cursor in (b"0-0", "0-0"):
                break
        if claimed:
            self._backlog = True
            self._counts["claimed"] += claimed
            _log.info("took over %d usage entries pending too long", claimed)
        return claimed

    async def lag(self) -> int:
        """Entries of the stream the group has not acknowledged: never delivered, or pending."""
        group = await self._group_info()
        if group is None:
            return int(await self._redis.execute("XLEN", self._stream))
        pending = int(group[b"pending"])
        lag = group.get(b"lag")
        if lag is None:  # Redis cannot tell (entries deleted): count what follows the cursor
            lag = await self._count_after(group[b"last-delivered-id"])
        return pending + int(lag)

    async def _group_info(self) -> dict[bytes, Any] | None:
        try:
            groups = await self._redis.execute("XINFO", "GROUPS", self._stream)
        except RedisError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise
        for flat in groups:
            info = dict(zip(flat[::2], flat[1::2], strict=True))
            if info[b"name"] == self._group.encode():
                return info
        return None

    async def _count_after(self, last_id: bytes) -> int:
        count, start = 0, b"(" + last_id
        while True:
            chunk = await self._redis.execute("XRANGE", self._stream, start, "+", "COUNT", 10_000)
            count += len(chunk)
            if len(chunk) < 10_000:
                return count
            start = b"(" + chunk[-1][0]

    async def trim(self) -> None:
        """Drop the entries the group is done with (delivered and acknowledged) and older than
        ``keep_seconds`` by the Redis server's clock (the clock of the entry ids)."""
        group = await self._group_info()  # first: entries delivered after it are above its id
        if group is None:
            return
        keep = _next_id(group[b"last-delivered-id"])
        summary = await self._redis.execute("XPENDING", self._stream, self._group)
        if summary[0]:
            keep = min(keep, _parse_id(summary[1]))
        if self._keep_ms:
            seconds, micros = await self._redis.execute("TIME")
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            keep = min(keep, (now_ms - self._keep_ms, 0))
        if keep > (0, 1):
            await self._redis.execute("XTRIM", self._stream, "MINID", f"{keep[0]}-{keep[1]}")

    async def forget_idle_consumers(self) -> None:
        """Remove consumers (dead writers' names) idle for an hour with nothing pending."""
        consumers = await self._redis.execute("XINFO", "CONSUMERS", self._stream, self._group)
        for flat in consumers:
            info = dict(zip(flat[::2], flat[1::2], strict=True))
            name = info[b"name"]
            if (
                name != self._consumer.encode()
                and int(info[b"pending"]) == 0
                and int(info[b"idle"]) > _FORGET_CONSUMER_MS
            ):
                await self._redis.execute("XGROUP", "DELCONSUMER", self._stream, self._group, name)

    async def run(self, stop: asyncio.Event) -> None:
        """Store batches until ``stop`` is set, backing off while Redis or the database is down;
        take over stale entries at start and every ``claim_idle_seconds / 2``; trim now and then.

        Up to ``concurrency`` batches are written at once, each in its own transaction on its
        own connection, while the next one is read and decoded: the database's cores and this
        process work side by side. Only new entries (ID ``>``) are handled so; this consumer's
        pending ones (after a failure or a claim) are read again (ID ``0``) and written one
        batch at a time, once every write in flight has ended, so no entry is in two batches
        being written."""
        delay = _BACKOFF_MIN
        claim_every = max(self._claim_idle_ms / 2000, 1.0)
        next_claim = next_trim = 0.0
        writing: set[asyncio.Task[int]] = set()
        while not stop.is_set():
            try:
                now = time.monotonic()
                if now >= next_claim:
                    await self.claim()
                    next_claim = now + claim_every
                if self._trim and now >= next_trim:
                    await self.trim()
                    await self.forget_idle_consumers()
                    next_trim = now + _TRIM_SECONDS
                if self._backlog:
                    await _finish(writing)
                    await self.step()
                    continue
                batch = await self._next_batch()
                if batch.ids:
                    while len(writing) >= self._concurrency:
                        await asyncio.wait(writing, return_when=asyncio.FIRST_COMPLETED)
                        _reap(writing)
                    writing.add(asyncio.get_running_loop().create_task(self._commit(batch)))
                _reap(writing)
            except Exception as exc:  # a store down, or a surprise: the writer must go on
                # What was read and not committed stays pending, and is read again from ID 0.
                self._backlog = True
                await _finish(writing, quiet=True)
                if isinstance(exc, StoreUnavailable | RedisError):
                    _log.warning("usage ledger: %s; retrying in %.1f s", exc, delay)
                else:
                    _log.exception("usage ledger: unexpected error; retrying in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, _BACKOFF_MAX)
            else:
                delay = _BACKOFF_MIN
        await _finish(writing, quiet=True)


def _reap(writing: set[asyncio.Task[int]]) -> None:
    """Forget the writes that ended; raise the first one's error, if any failed."""
    for task in [t for t in writing if t.done()]:
        writing.discard(task)
        task.result()


async def _finish(writing: set[asyncio.Task[int]], *, quiet: bool = False) -> None:
    """Wait for every write in flight; raise the first error unless ``quiet``."""
    if not writing:
        return
    results = await asyncio.gather(*writing, return_exceptions=True)
    writing.clear()
    for result in results:
        if isinstance(result, BaseException) and not quiet:
            raise result


@dataclass(slots=True)
class _Batch:
    ids: list[bytes] = field(default_factory=list)  # every entry read, acknowledged together
    rows: list[Row] = field(default_factory=list)
    dead: list[tuple[bytes, bytes]] = field(default_factory=list)  # (entry id, payload)


def _field(fields: Sequence[bytes]) -> bytes | None:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == FIELD:
            return fields[i + 1]
    return None


def _parse_id(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: bytes) -> tuple[int, int]:
    ms, seq = _parse_id(entry_id)
    return ms, seq + 1


# -- the process ------------------------------------------------------------------------------


def redis_url(endpoint: str | None, limits_backend: str) -> str:
    """Where the usage stream is: ``endpoints.redis`` (``host:port`` becomes ``redis://``), else
    the limiter's Redis (``stores.endpoint.shared_redis_url``), required here."""
    url = shared_redis_url(endpoint, limits_backend)
    if url is not None:
        return url
    raise ConfigError(
        "endpoints.redis",
        endpoint,
        "a Redis URL (redis://, rediss://, redis+sentinel://, redis+cluster://): the ledger "
        "writer drains a Redis Stream",
    )


def run_writer(
    settings: Settings,
    *,
    consumer: str | None = None,
    claim_idle_seconds: float = 30.0,
    concurrency: int = 2,
) -> int:
    """Run one ledger writer until SIGTERM or SIGINT (``citadel ledger-writer``); the caller
    read the settings. 1 if a store failed for good."""
    url = redis_url(settings.endpoints.redis, settings.limits.backend)
    metering = settings.metering
    database = metering.database or settings.accounts.database
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"

    async def serve() -> None:
        from citadel.stores.sql import build_engine

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if database.startswith("sqlite"):  # the embedded default migrates itself
            from citadel.metering.migrate import LEDGER

            await LEDGER.upgrade(database)
        redis = connect_redis(url, timeout=5.0)
        engine = build_engine(database)
        writer = LedgerWriter(
            redis,
            engine,
            stream=metering.stream,
            group=metering.group,
            consumer=name,
            batch_size=metering.batch_size,
            claim_idle_seconds=claim_idle_seconds,
            concurrency=concurrency,
            keep_seconds=metering.stream_keep_seconds,
        )
        _log.info("ledger writer %s: %s -> %s", name, metering.stream, engine.url)
        try:
            await writer.run(stop)
        finally:
            await redis.aclose()
            await engine.dispose()
        _log.info("ledger writer %s stopped: %s", name, writer.stats())

    try:
        asyncio.run(serve())
    except CitadelError as exc:
        print(f"citadel: {exc}", file=sys.stderr)
        return 1
    return 0
