"""The ledger writer as the custom-metrics service runs it: in-process, as one task.

The service starts the task with itself and stops it first at shut-down, so the writer finishes
its batch before the stores close. A writer that stops on its own is logged and reported by
``/health``; its lag is read within a deadline, since ``/health`` and ``/metrics`` must answer
even when Redis does not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, Protocol

from citadel.errors import StoreUnavailable
from citadel.metering.writer import WriterStats
from citadel.stores.redis import RedisError

__all__ = ["CHECK_TIMEOUT", "LedgerWriterLike", "WriterTask", "writer_lag"]

_log = logging.getLogger("citadel.metering")

CHECK_TIMEOUT: Final = 1.5  # seconds a dependency has to answer; /health gives each check 2


class LedgerWriterLike(Protocol):
    """The ledger writer the service runs (``citadel.metering.writer.LedgerWriter``)."""

    async def run(self, stop: asyncio.Event) -> None: ...

    async def lag(self) -> int:
        """Events waiting to be written."""
        ...

    def stats(self) -> WriterStats: ...


class WriterTask:
    """The ledger writer's task: started with the service, stopped first at shut-down."""

    def __init__(self, writer: LedgerWriterLike) -> None:
        self.writer = writer
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.writer.run(self._stop), name="ledger-writer")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self._stop.is_set():
            _log.error("the ledger writer stopped", exc_info=task.exception())

    def failure(self) -> str | None:
        """Why the writer is not running, if it stopped on its own."""
        task = self._task
        if task is None or not task.done() or self._stop.is_set():
            return None
        error = None if task.cancelled() else task.exception()
        return f"{type(error).__name__}: {error}" if error is not None else "it returned"

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await self._task
            except Exception:
                _log.exception("the ledger writer failed")


async def writer_lag(writer: LedgerWriterLike | None) -> int | None:
    """The events waiting to be written; None without a writer or when it cannot say in time."""
    if writer is None:
        return None
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await writer.lag()
    except (StoreUnavailable, RedisError, TimeoutError):
        return None
