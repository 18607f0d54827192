"""Where the gateway's usage events go: a Redis Stream (durable), or the SQL ledger directly.

    sink = RedisStreamSink(redis, stream="citadel:{usage}:events", flush_seconds=0.5,
                           batch_size=10_000, spool=Spool("citadel-usage.spool"))
    await sink.start()
    sink.emit(event)          # O(1): appends to a list; never awaits, never raises
    await sink.aclose()       # sends (or spools) what is left

``emit`` only queues. A background task sends the queue every ``flush_seconds``, or as soon as
``batch_size`` events wait, so the request path never waits for a store.

``RedisStreamSink`` XADDs one entry per event (field ``e``: the ledger's wire format), pipelined
on the client's one connection; the ledger writer drains the stream into SQL. When Redis fails,
the events not known to be added go to the spool file (fsynced), and every later batch too,
until Redis answers again (tried every ``retry_seconds``); then the spool is replayed and
truncated. An XADD whose reply was lost may have been applied, and a replay cut short is sent
again: an event may reach the stream twice, never zero times, and the ledger stores it once (by
event id).

``SqlLedgerSink`` is the embedded default (no Redis): batches go straight into the ledger, with
the same code as the ledger writer; a failed batch is kept and tried again.

Given a ``Journal`` (``citadel.metering.journal``), a sink also writes each event to the local
journal as it is emitted, so a process killed before its next flush loses none; the journal's
segments are deleted once their events are delivered (or spooled), and those a dead process left
are replayed at ``start``.

Both hold at most ``max_pending`` events in memory; beyond that (the store and the disk both
failing for a long time) new events are dropped and counted. Given ``owns_store=True`` (as the
gateway's ``usage_sink`` makes them), a sink closes its Redis client or disposes of its engine
in ``aclose``, after the last flush; otherwise the store is the caller's to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from citadel.errors import StoreUnavailable
from citadel.metering.events import UsageEvent
from citadel.metering.journal import Journal
from citadel.metering.ledger import Ledger, encode_event
from citadel.metering.spool import Spool
from citadel.metering.writer import FIELD
from citadel.stores.endpoint import RedisStore

__all__ = ["RedisStreamSink", "SinkStats", "SqlLedgerSink"]

_log = logging.getLogger("citadel.metering.sinks")

DEFAULT_MAX_PENDING = 1_000_000
_XADD_SLICE = 250  # events per pipelined write to the stream
_RETRY_MIN, _RETRY_MAX = 0.5, 10.0  # seconds between attempts of SqlLedgerSink


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkStats:
    """A sink's counters since it started."""

    pending: int  # events in memory, not yet sent
    spooled: int  # events in the spool file, waiting for Redis
    sent: int  # events handed to the store (stream or ledger)
    failures: int  # failed attempts to send a batch
    dropped: int  # events refused because max_pending were waiting


class _BatchingSink:
    """The queue and the background task; subclasses say how a batch is delivered."""

    def __init__(
        self,
        *,
        flush_seconds: float,
        batch_size: int,
        max_pending: int,
        owns_store: bool,
        journal: Journal | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r}: expected an integer >= 1")
        self._flush_seconds = flush_seconds
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._queue: list[UsageEvent] = []
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._owns_store = owns_store
        self._sent = 0
        self._failures = 0
        self._dropped = 0
        self._spooled = 0  # events in the spool file (only a sink with a spool has any)
        self._journal = journal
        self._journaled = 0  # events queued since start, in order (the journal's positions)

    def emit(self, event: UsageEvent) -> None:
        """Queue one event; never blocks (see the module docstring)."""
        queue = self._queue
        if len(queue) >= self._max_pending:
            self._dropped += 1
            return
        journal = self._journal
        if journal is not None:
            try:
                journal.append(event)
            except OSError:
                _log.exception("usage journal: cannot write an event")
        self._journaled += 1
        queue.append(event)
        if len(queue) >= self._batch_size:
            self._wake.set()

    def stats(self) -> SinkStats:
        return SinkStats(
            pending=len(self._queue) + self._in_flight,
            spooled=self._spooled,
            sent=self._sent,
            failures=self._failures,
            dropped=self._dropped,
        )

    async def start(self) -> None:
        """Open the journal (queueing what a dead process left in it), start the background task
        (in the running loop)."""
        if self._journal is not None:
            left = await asyncio.to_thread(self._journal.open)
            self._queue[:0] = left
            self._journaled += len(left)
            self._journal.rotate(len(left))  # those segments go once their events are out
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Stop the task after a last flush of everything queued; then close the store, if the
        sink owns it."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        try:
            if task is not None:
                await task
            else:
                await self._flush_journaled()
            if self._queue:  # the store (and the spool) refused them to the end
                _log.error("usage sink closed with %d events undelivered", len(self._queue))
            self._close_journal()
        finally:
            if self._owns_store:
                self._owns_store = False  # closed once, however often aclose is called
                await self._close_store()

    async def _close_store(self) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_seconds)
            self._wake.clear()
            try:
                await self._flush_journaled()
            except Exception:  # the task must outlive any surprise, or metering stops
                _log.exception("usage sink flush failed")
            if self._closing:
                return

    async def _flush_journaled(self) -> None:
        """Flush, and delete the journal segments whose events are all out of memory now."""
        journal = self._journal
        if journal is None:
            await self._flush()
            return
        if self._queue:
            journal.rotate(self._journaled)
        await self._flush()
        # Events leave the queue oldest first (a failed batch goes back to its front), so those
        # delivered are the first `journaled - pending` of them.
        journal.release(self._journaled - len(self._queue) - self._in_flight)

    def _close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close(delivered_all=not self._queue)

    async def _flush(self) -> None:
        raise NotImplementedError

    def _take(self) -> list[UsageEvent]:
        batch, self._queue = self._queue, []
        return batch


class RedisStreamSink(_BatchingSink):
    """Usage events to a Redis Stream, through a spool file while Redis is down."""

    def __init__(
        self,
        redis: RedisStore,
        *,
        stream: str,
        flush_seconds: float,
        batch_size: int,
        spool: Spool,
        retry_seconds: float = 1.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        owns_store: bool = False,
        journal: Journal | None = None,
    ) -> None:
        super().__init__(
            flush_seconds=flush_seconds,
            batch_size=batch_size,
            max_pending=max_pending,
            owns_store=owns_store,
            journal=journal,
        )
        self._redis = redis
        self._stream = stream
        self._spool = spool
        self._retry_seconds = retry_seconds
        self._spool_dirty = False  # the file may hold events: replay before sending directly
        self._next_try = 0.0  # monotonic time of the next attempt at Redis while it is down

    async def start(self) -> None:
        """Start sending; a spool left by an earlier run is replayed first."""
        if await asyncio.to_thread(self._spool.size):
            self._spool_dirty = True
        await super().start()

    async def _flush(self) -> None:
        # Closing: one more try whatever the retry timer says, so a gateway stopped after Redis
        # came back leaves nothing behind in its spool.
        if self._spool_dirty and (self._closing or time.monotonic() >= self._next_try):
            await self._replay()
        batch = self._take()
        if not batch:
            return
        self._in_flight = len(batch)
        try:
            if self._spool_dirty:  # Redis is down (or the spool not yet replayed): to the file
                await self._to_spool(batch)
                return
            try:
                failed = await self._send(batch)
            except Exception:  # a surprise: keep the events, in the spool
                _log.exception("usage sink: sending %d events failed", len(batch))
                failed = batch
            if failed:
                self._failures += 1
                self._next_try = time.monotonic() + self._retry_seconds
                await self._to_spool(failed)
        finally:
            self._in_flight = 0

    async def _close_store(self) -> None:
        await self._redis.aclose()

    async def _send(self, events: list[UsageEvent]) -> list[UsageEvent]:
        """XADD the events, pipelined; return those not known to be added."""
        for start in range(0, len(events), _XADD_SLICE):
            # In slices: encoding is done on the event loop, and a whole batch at once held a
            # gateway's requests up for tens of milliseconds.
            chunk = events[start : start + _XADD_SLICE]
            command = ("XADD", self._stream, "*", FIELD)
            try:
                replies = await self._redis.pipeline([(*command, encode_event(e)) for e in chunk])
            except StoreUnavailable:
                return events[start:]  # Redis is down: the rest of the batch goes to the spool
            failed = [e for e, r in zip(chunk, replies, strict=True) if isinstance(r, Exception)]
            self._sent += len(chunk) - len(failed)
            if failed:
                return failed + events[start + len(chunk) :]
        return []

    async def _to_spool(self, events: list[UsageEvent]) -> None:
        try:
            await asyncio.to_thread(self._spool.append, events)
        except OSError:
            # Neither Redis nor the disk takes them: keep them queued (bounded by max_pending).
            _log.exception("usage spool %s: cannot write %d events", self._spool.path, len(events))
            self._queue[:0] = events
            return
        if not self._spool_dirty:
            _log.warning("Redis is unavailable: spooling usage events to %s", self._spool.path)
        self._spool_dirty = True
        self._spooled += len(events)

    async def _replay(self) -> None:
        """Send the spool's events to Redis, then truncate it, holding its lock throughout."""
        lock = self._spool.locked()
        await asyncio.to_thread(lock.__enter__)
        try:
            events = await asyncio.to_thread(self._spool.replay)
            failed = await self._send(events) if events else []
            if failed:
                self._failures += 1
                self._next_try = time.monotonic() + self._retry_seconds
                return
            await asyncio.to_thread(self._spool.truncate)
        except OSError:
            _log.exception("usage spool %s: cannot replay", self._spool.path)
            self._next_try = time.monotonic() + self._retry_seconds
            return
        finally:
            await asyncio.to_thread(lock.__exit__, None, None, None)
        if events:
            _log.info("replayed %d spooled usage events to Redis", len(events))
        self._spooled = 0
        self._spool_dirty = False


class SqlLedgerSink(_BatchingSink):
    """Usage events straight into the SQL ledger (the embedded default: SQLite, no Redis)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        flush_seconds: float,
        batch_size: int,
        migrate: bool = False,
        max_pending: int = DEFAULT_MAX_PENDING,
        owns_store: bool = False,
        journal: Journal | None = None,
    ) -> None:
        super().__init__(
            flush_seconds=flush_seconds,
            batch_size=batch_size,
            max_pending=max_pending,
            owns_store=owns_store,
            journal=journal,
        )
        self._ledger = Ledger(engine)
        self._migrate = migrate
        self._retry = _RETRY_MIN
        self._next_try = 0.0

    async def start(self) -> None:
        """Upgrade the ledger's tables first if ``migrate`` (the embedded default), then start."""
        if self._migrate:
            from citadel.metering.migrate import LEDGER
            from citadel.stores.sql import translate_errors

            with translate_errors():
                await LEDGER.upgrade_engine(self._ledger.engine)
        await super().start()

    @property
    def engine(self) -> AsyncEngine:
        return self._ledger.engine

    async def _close_store(self) -> None:
        await self._ledger.engine.dispose()

    async def _flush(self) -> None:
        if not self._queue or (time.monotonic() < self._next_try and not self._closing):
            return
        batch = self._take()
        self._in_flight = len(batch)
        try:
            for start in range(0, len(batch), self._batch_size):
                chunk = batch[start : start + self._batch_size]
                try:
                    await self._ledger.write(chunk)
                except Exception as exc:  # the database is down (or a surprise): keep them
                    if not isinstance(exc, StoreUnavailable):
                        _log.exception("usage ledger: writing %d events failed", len(chunk))
                    self._failures += 1
                    self._queue[:0] = batch[start:]  # kept, in order, for the next attempt
                    self._next_try = time.monotonic() + self._retry
                    self._retry = min(self._retry * 2, _RETRY_MAX)
                    _log.warning("usage ledger: %s; %d events kept", exc, len(batch) - start)
                    return
                self._sent += len(chunk)
            self._retry = _RETRY_MIN
        finally:
            self._in_flight = 0
