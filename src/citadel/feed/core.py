"""What both feeds share: positions, entries, the in-process fan-out and the subscription."""

from __future__ import annotations

import abc
import asyncio
import collections
import re
from dataclasses import dataclass
from types import TracebackType
from typing import Final

__all__ = ["Entry", "Feed", "Lagged", "Page", "Subscription", "parse_position"]

Position = tuple[int, int]

_POSITION: Final = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")
_TOPIC: Final = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_REPLAY_PAGE: Final = 500


def parse_position(text: str) -> Position:
    """``<ms>-<seq>`` (or ``<ms>``) as a tuple; anything else is a ValueError naming it."""
    match = _POSITION.match(text.strip())
    if match is None:
        raise ValueError(f"not a feed position: {text[:40]!r} (expected <ms>-<seq>, e.g. 0-0)")
    return int(match[1]), int(match[2] or 0)


def format_position(position: Position) -> str:
    return f"{position[0]}-{position[1]}"


def check_topic(topic: str) -> str:
    if not _TOPIC.match(topic):
        raise ValueError(f"not a topic name: {topic[:40]!r} (lower-case letters, digits, _ . -)")
    return topic


@dataclass(frozen=True, slots=True)
class Entry:
    """One event: its position in its topic and its payload (JSON, or the ledger's format)."""

    topic: str
    position: str
    data: bytes

    @property
    def key(self) -> Position:
        return parse_position(self.position)


@dataclass(frozen=True, slots=True)
class Lagged:
    """The subscriber fell behind: ``missed`` entries were dropped after ``position``."""

    topic: str
    missed: int
    position: str


@dataclass(frozen=True, slots=True)
class Page:
    """Entries after a position; ``recovered`` is False when some of them were already trimmed."""

    entries: list[Entry]
    recovered: bool


class Feed(abc.ABC):
    """A log per topic: publish, read from a position, subscribe to the tail."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = collections.defaultdict(set)

    @abc.abstractmethod
    async def publish(self, topic: str, data: bytes) -> str:
        """Append one entry; return its position."""

    @abc.abstractmethod
    async def read(self, topic: str, after: str, count: int = _REPLAY_PAGE) -> Page:
        """Up to ``count`` entries strictly after ``after``, oldest first."""

    @abc.abstractmethod
    async def last(self, topic: str) -> str:
        """The position of the newest entry (``0-0`` for an empty topic)."""

    @abc.abstractmethod
    async def expire(self, topic: str, seconds: float) -> None:
        """Drop the whole topic ``seconds`` from now (a short-lived log, e.g. one generation's
        chunks); publishing to it does not extend the deadline, calling this again does."""

    async def lead(self, name: str, owner: str, seconds: float) -> bool:
        """Whether ``owner`` holds (or now takes) the lease ``name`` for ``seconds`` more: one
        publisher among replicas (e.g. of the metrics digest). In memory there is one process,
        so it always does."""
        return True

    async def aclose(self) -> None:
        """Stop reading (subscriptions end)."""
        for subs in list(self._subscribers.values()):
            for sub in list(subs):
                sub.close()

    def subscribe(self, topic: str, *, after: str | None = None, queue: int = 1000) -> Subscription:
        """Entries after ``after`` (None: from now on), then the live tail; see the package."""
        if after is not None:
            parse_position(after)
        if queue < 1:
            raise ValueError(f"queue: expected an integer >= 1, got {queue}")
        return Subscription(self, check_topic(topic), after, queue)

    def subscribers(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    # fan-out, used by the implementations

    @abc.abstractmethod
    async def _watch(self, topic: str) -> None:
        """Called before a subscriber of ``topic`` replays: live entries must flow from here on."""

    @abc.abstractmethod
    async def _unwatch(self, topic: str) -> None:
        """Called when the last subscriber of ``topic`` leaves."""

    def _deliver(self, entries: list[Entry]) -> None:
        for entry in entries:
            for sub in self._subscribers.get(entry.topic, ()):
                sub.offer(entry)


class Subscription:
    """One reader of one topic: replay, then the live tail, through a bounded queue."""

    def __init__(self, feed: Feed, topic: str, after: str | None, queue: int) -> None:
        self.topic = topic
        self._feed = feed
        self._after = after
        self._limit = queue
        self._queue: collections.deque[Entry] = collections.deque()
        self._wake = asyncio.Event()
        self._dropped = 0
        self._closed = False
        self._last: Position = (0, 0)
        self._replay: collections.deque[Entry] = collections.deque()
        self._replaying = False
        self.recovered = True  # False once a replay found its start trimmed

    async def __aenter__(self) -> Subscription:
        subs = self._feed._subscribers[self.topic]
        first = not subs
        subs.add(self)  # join the tail first: live entries buffer while the replay runs
        try:
            if first:
                await self._feed._watch(self.topic)
            start = self._after if self._after is not None else await self._feed.last(self.topic)
            self._last = parse_position(start)
            self._replaying = self._after is not None
            if self._replaying:
                await self._next_page()  # now: ``recovered`` is known before the first entry
        except BaseException:
            # Cancelled or failed while entering (a client gone mid-subscribe): leave, or this
            # subscriber would stay in the set and the next first one would never start a tail.
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
        subs = self._feed._subscribers.get(self.topic)
        if subs is not None and not subs:
            del self._feed._subscribers[self.topic]
            await self._feed._unwatch(self.topic)

    @property
    def position(self) -> str:
        """The position of the last entry handed out (where a client resumes)."""
        return format_position(self._last)

    def close(self) -> None:
        self._closed = True
        self._feed._subscribers.get(self.topic, set()).discard(self)
        self._wake.set()

    def offer(self, entry: Entry) -> None:
        """A live entry: queued, or dropped and counted when the queue is full."""
        if self._dropped or len(self._queue) >= self._limit:
            self._dropped += 1
        else:
            self._queue.append(entry)
        self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Entry | Lagged:
        while True:
            if self._replaying:
                entry = await self._next_replayed()
                if entry is not None:
                    return entry
                continue
            if self._queue:
                entry = self._queue.popleft()
                key = entry.key
                if key <= self._last:
                    continue  # already replayed
                self._last = key
                return entry
            if self._dropped:
                missed, self._dropped = self._dropped, 0
                return Lagged(self.topic, missed, self.position)
            if self._closed:
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()

    async def _next_replayed(self) -> Entry | None:
        if self._replay:
            entry = self._replay.popleft()
            self._last = entry.key
            return entry
        await self._next_page()
        return None

    async def _next_page(self) -> None:
        page = await self._feed.read(self.topic, self.position, _REPLAY_PAGE)
        if not page.recovered:
            self.recovered = False
        fresh = [e for e in page.entries if e.key > self._last]
        self._replay.extend(fresh)
        if len(page.entries) < _REPLAY_PAGE and not self._replay:
            if self._dropped:
                # The queue overflowed during the replay: the log still has those entries.
                self._dropped = 0
                self._queue.clear()
            else:
                self._replaying = False
