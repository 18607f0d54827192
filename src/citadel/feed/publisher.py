"""Publishing to the feed from code that must not wait: the callbacks of state changes (a
breaker opening, a health verdict, an alert firing). ``emit`` queues a JSON object and returns;
one task per process publishes the queue in order. A full queue (the feed is down for long)
drops the newest events and counts them, so the caller's path never grows memory or blocks.

    publisher = Publisher(feed, source="gateway@host:1234")
    await publisher.start()
    publisher.emit("deployments", {"kind": "health", "deployment": "a", "healthy": False})
    await publisher.aclose()          # publishes what is queued (within a second), then stops
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Final

import orjson

from citadel.feed.core import Feed, check_topic

__all__ = ["Publisher"]

_log = logging.getLogger("citadel.feed")

_QUEUE: Final = 1000
_CLOSE_SECONDS: Final = 1.0


class Publisher:
    """Events (JSON objects) to feed topics, each stamped with ``source`` and ``time``."""

    def __init__(self, feed: Feed, *, source: str, queue: int = _QUEUE) -> None:
        self.feed = feed
        self.source = source
        self.dropped = 0
        self.failed = 0
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=queue)
        self._task: asyncio.Task[None] | None = None

    def emit(self, topic: str, event: dict[str, Any]) -> None:
        """Queue ``event`` for ``topic``; never blocks (dropped, and counted, when full)."""
        data = orjson.dumps({**event, "source": self.source, "time": time.time()})
        try:
            self._queue.put_nowait((check_topic(topic), data))
        except asyncio.QueueFull:
            self.dropped += 1

    def sink(self, topic: str) -> Callable[[dict[str, Any]], None]:
        """``emit`` bound to one topic (a callback for a router or a scheduler)."""
        return functools.partial(self.emit, topic)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="feed publisher")

    async def _run(self) -> None:
        while True:
            topic, data = await self._queue.get()
            try:
                await self.feed.publish(topic, data)
            except Exception as exc:  # the feed is down: this event is lost, the next is tried
                self.failed += 1
                _log.warning("feed: publishing to %s failed: %s", topic, exc)
            finally:
                self._queue.task_done()

    async def aclose(self) -> None:
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), _CLOSE_SECONDS)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
