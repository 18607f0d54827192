"""The metrics digest: once a second, requests/s, errors/s, tokens/s and p95 latency per model,
published to the feed's ``metrics`` topic.

It is computed from the ``usage`` topic (one event per finished request, from every gateway and
streaming replica), so the gateways pay nothing for it and the digest covers them all. Every
streaming replica reads usage, but only the one holding the feed's ``metrics`` lease publishes
(``Feed.lead``; another takes over within three intervals when it stops).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Final

import orjson

from citadel.feed import Feed, Lagged
from citadel.feed.open import USAGE
from citadel.metering.events import UsageEvent
from citadel.metering.ledger import decode_event

__all__ = ["METRICS", "MetricsDigest", "digest"]

_log = logging.getLogger("citadel.streaming")

METRICS: Final = "metrics"
_QUEUE: Final = 100_000


def _p95(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]


def digest(events: Sequence[UsageEvent], seconds: float, missed: int = 0) -> dict[str, Any]:
    """The digest of the usage ``events`` that finished in the last ``seconds``; errors are
    status 5xx (the service's failures, not the callers')."""
    by_model: dict[str, list[UsageEvent]] = collections.defaultdict(list)
    for event in events:
        by_model[event.model or "(none)"].append(event)

    def rates(group: Sequence[UsageEvent]) -> dict[str, Any]:
        return {
            "requests_per_second": round(len(group) / seconds, 3),
            "errors_per_second": round(sum(e.status >= 500 for e in group) / seconds, 3),
            "tokens_per_second": round(
                sum(e.prompt_tokens + e.completion_tokens for e in group) / seconds, 3
            ),
            "p95_latency_seconds": round(_p95([e.latency_seconds for e in group]), 6)
            if group
            else None,
        }

    return {
        "interval_seconds": round(seconds, 3),
        **rates(events),
        "models": {model: rates(group) for model, group in sorted(by_model.items())},
        "missed_events": missed,
    }


class MetricsDigest:
    """Reads usage from ``feed`` and, while it holds the lease, publishes a digest each
    ``interval`` seconds."""

    def __init__(self, feed: Feed, *, owner: str, interval: float = 1.0) -> None:
        self.feed = feed
        self.owner = owner
        self.interval = interval
        self.published = 0
        self._window: list[UsageEvent] = []
        self._missed = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read(), name="digest reader"),
            asyncio.create_task(self._tick(), name="digest ticker"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _read(self) -> None:
        while True:
            try:
                async with self.feed.subscribe(USAGE, queue=_QUEUE) as sub:
                    async for item in sub:
                        if isinstance(item, Lagged):
                            self._missed += item.missed
                            continue
                        with contextlib.suppress(Exception):
                            self._window.append(decode_event(item.data))
            except Exception as exc:  # the feed is down: read again from now on
                _log.warning("metrics digest: reading usage failed: %s", exc)
            await asyncio.sleep(self.interval)

    async def _tick(self) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            window, self._window = self._window, []
            missed, self._missed = self._missed, 0
            seconds, started = now - started, now
            try:
                if not await self.feed.lead(METRICS, self.owner, 3 * self.interval):
                    continue
                body = {**digest(window, seconds, missed), "source": self.owner}
                await self.feed.publish(METRICS, orjson.dumps({**body, "time": time.time()}))
                self.published += 1
            except Exception as exc:
                _log.warning("metrics digest: publishing failed: %s", exc)
