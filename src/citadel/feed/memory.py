"""The feed in memory: one process (the embedded default, and tests)."""

from __future__ import annotations

import bisect
import collections
import heapq
import time

from citadel.feed.core import (
    Entry,
    Feed,
    Page,
    Position,
    check_topic,
    format_position,
    parse_position,
)

__all__ = ["MemoryFeed"]


class _Log:
    __slots__ = ("entries", "keys", "trimmed")

    def __init__(self) -> None:
        self.entries: collections.deque[Entry] = collections.deque()
        self.keys: collections.deque[Position] = collections.deque()
        self.trimmed: Position = (0, 0)  # the newest position dropped by the bound


class MemoryFeed(Feed):
    """Each topic keeps its newest ``maxlen`` entries."""

    def __init__(self, *, maxlen: int = 10_000) -> None:
        super().__init__()
        if maxlen < 1:
            raise ValueError(f"maxlen: expected an integer >= 1, got {maxlen}")
        self._maxlen = maxlen
        self._logs: dict[str, _Log] = collections.defaultdict(_Log)
        self._deadlines: dict[str, float] = {}  # topic -> monotonic time it is dropped
        self._expiring: list[tuple[float, str]] = []  # a heap of (deadline, topic)

    async def publish(self, topic: str, data: bytes) -> str:
        return self.publish_nowait(topic, data)

    def publish_nowait(self, topic: str, data: bytes) -> str:
        """``publish`` without awaiting (memory never waits): for emitters that must not block."""
        if self._expiring:
            self._drop_expired()
        log = self._logs[check_topic(topic)]
        now = int(time.time() * 1000)
        last = log.keys[-1] if log.keys else log.trimmed
        key = (now, 0) if now > last[0] else (last[0], last[1] + 1)
        entry = Entry(topic, format_position(key), bytes(data))
        log.entries.append(entry)
        log.keys.append(key)
        while len(log.entries) > self._maxlen:
            log.entries.popleft()
            log.trimmed = log.keys.popleft()
        self._deliver([entry])
        return entry.position

    async def read(self, topic: str, after: str, count: int = 500) -> Page:
        start = parse_position(after)
        if self._expiring:
            self._drop_expired()
        log = self._logs.get(check_topic(topic))
        if log is None:
            return Page([], True)
        i = bisect.bisect_right(log.keys, start)
        entries = [log.entries[j] for j in range(i, min(i + count, len(log.entries)))]
        return Page(entries, start >= log.trimmed)

    async def last(self, topic: str) -> str:
        if self._expiring:
            self._drop_expired()
        log = self._logs.get(check_topic(topic))
        if log is None:
            return "0-0"
        return format_position(log.keys[-1] if log.keys else log.trimmed)

    async def expire(self, topic: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        self._deadlines[check_topic(topic)] = deadline
        heapq.heappush(self._expiring, (deadline, topic))

    def _drop_expired(self) -> None:
        now = time.monotonic()
        while self._expiring and self._expiring[0][0] <= now:
            deadline, topic = heapq.heappop(self._expiring)
            if self._deadlines.get(topic) == deadline:  # not pushed back since
                del self._deadlines[topic]
                self._logs.pop(topic, None)

    async def _watch(self, topic: str) -> None:
        """Nothing to start: ``publish`` delivers to subscribers itself."""

    async def _unwatch(self, topic: str) -> None:
        """Nothing to stop."""
