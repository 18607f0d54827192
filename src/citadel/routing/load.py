"""The router's load on the event feed: every ``interval`` seconds, a ``load`` event (in flight,
requests, latency and error-rate EWMAs) for each deployment whose counters moved since the last
(``Router.report_load``). Breaker, health and drain changes are published as they happen; load
changes with every request, so it is sampled: at most one event per deployment and interval
from each process, and none from an idle one.

    reporter = LoadReporter(router, interval=2.0)
    await reporter.start()
    ...
    await reporter.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from citadel.routing.router import Router

__all__ = ["LOAD_INTERVAL", "LoadReporter"]

LOAD_INTERVAL = 2.0  # seconds


class LoadReporter:
    def __init__(
        self,
        router: Router,
        *,
        interval: float = LOAD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval: expected seconds > 0, got {interval}")
        self.router = router
        self.interval = interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="routing load reporter")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.router.report_load(self._clock())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
