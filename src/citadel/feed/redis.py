"""The feed on Redis Streams: every replica publishes to and reads the same streams.

One stream per topic (``citadel:{feed:<topic>}``, bounded with ``XADD MAXLEN ~``), except the
usage topic: it is the metering stream the gateways already XADD usage events to for the ledger
(``citadel:{usage}:events``, field ``e``), read here with plain XREAD beside the ledger writer's
consumer group, so usage is published once. Its retention is the ledger writer's: it trims what
the group has stored and acknowledged once it is older than ``metering.stream_keep_seconds``
(600 s by default), so a usage position from the last ten minutes resumes without loss.

Reads go through the shared client; each watched topic has one tail task per process, blocking
in XREAD on a connection of its own (a blocked read would hold up the shared client's pipeline)
and handing entries to the local subscribers.

Whether a position is still covered comes from ``XINFO STREAM``: nothing was ever trimmed
(``entries-added`` equals ``length``), or the position is at or past the first entry kept. A
stream does not remember the last id it trimmed, so a position that was exactly the newest trimmed
entry reads as not recovered: the client is told it may have missed events, never the reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from citadel.errors import StoreUnavailable
from citadel.feed.core import Entry, Feed, Page, check_topic, parse_position
from citadel.stores.endpoint import RedisStore
from citadel.stores.redis import RedisError, Script

__all__ = ["RedisFeed", "stream_key"]

_log = logging.getLogger("citadel.feed")

FIELD: Final = b"e"  # the same field as the usage stream's entries
_BLOCK_MS: Final = 1000
_TAIL_COUNT: Final = 1000
_RETRY_SECONDS: Final = 0.5


_LEAD: Final = Script("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
""")


def stream_key(topic: str) -> str:
    return f"citadel:{{feed:{topic}}}"


class RedisFeed(Feed):
    """``redis`` serves publish and read; ``tail_client()`` opens a connection for each tail."""

    def __init__(
        self,
        redis: RedisStore,
        tail_client: Callable[[], RedisStore],
        *,
        maxlen: int = 10_000,
        streams: Mapping[str, str] | None = None,
        owns_client: bool = False,
    ) -> None:
        super().__init__()
        if maxlen < 1:
            raise ValueError(f"maxlen: expected an integer >= 1, got {maxlen}")
        self._redis = redis
        self._tail_client = tail_client
        self._maxlen = maxlen
        self._streams = dict(streams or {})
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._owns_client = owns_client

    def key(self, topic: str) -> str:
        return self._streams.get(topic) or stream_key(check_topic(topic))

    async def publish(self, topic: str, data: bytes) -> str:
        reply = await self._redis.execute(
            "XADD", self.key(topic), "MAXLEN", "~", self._maxlen, "*", FIELD, data
        )
        return _text(reply)

    async def read(self, topic: str, after: str, count: int = 500) -> Page:
        start = parse_position(after)
        key = self.key(topic)
        info, rows = await self._redis.pipeline(
            [
                ("XINFO", "STREAM", key),
                ("XRANGE", key, f"({start[0]}-{start[1]}", "+", "COUNT", count),
            ]
        )
        if isinstance(info, RedisError):
            if "no such key" in str(info):
                return Page([], True)
            raise info
        if isinstance(rows, Exception):
            raise rows
        return Page(_entries(topic, rows), _recovered(info, start))

    async def last(self, topic: str) -> str:
        rows = await self._redis.execute("XREVRANGE", self.key(topic), "+", "-", "COUNT", 1)
        return _text(rows[0][0]) if rows else "0-0"

    async def expire(self, topic: str, seconds: float) -> None:
        await self._redis.execute("PEXPIRE", self.key(topic), max(int(seconds * 1000), 1))

    async def lead(self, name: str, owner: str, seconds: float) -> bool:
        """``SET NX PX`` the lease, or extend it when ``owner`` holds it already."""
        key, ttl = f"{stream_key(check_topic(name))}:lead", max(int(seconds * 1000), 1)
        reply = await self._redis.evalsha(_LEAD, [key], [owner, ttl])
        return bool(reply)

    async def _watch(self, topic: str) -> None:
        if topic in self._tails:
            return
        start = await self.last(topic)  # before any replay reads: nothing falls in between
        self._tails[topic] = asyncio.create_task(self._tail(topic, start), name=f"feed:{topic}")

    async def _unwatch(self, topic: str) -> None:
        task = self._tails.pop(topic, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def aclose(self) -> None:
        await super().aclose()
        for topic in list(self._tails):
            await self._unwatch(topic)
        if self._owns_client:
            await self._redis.aclose()

    async def _tail(self, topic: str, start: str) -> None:
        key = self.key(topic)
        client = self._tail_client()
        try:
            while True:
                try:
                    reply = await client.execute(
                        "XREAD", "COUNT", _TAIL_COUNT, "BLOCK", _BLOCK_MS, "STREAMS", key, start
                    )
                except (StoreUnavailable, RedisError) as exc:
                    _log.warning("feed %s: reading %s failed: %s", topic, key, exc)
                    await asyncio.sleep(_RETRY_SECONDS)
                    continue
                if not reply:
                    continue
                entries = _entries(topic, reply[0][1])
                if entries:
                    start = entries[-1].position
                    self._deliver(entries)
        finally:
            await client.aclose()


def _recovered(info: list[Any], start: tuple[int, int]) -> bool:
    fields = dict(zip(info[::2], info[1::2], strict=True))
    if fields.get(b"entries-added", 0) == fields.get(b"length", 0):
        return True
    first = fields.get(b"first-entry")
    if not first:  # everything was trimmed: covered only from the newest id on
        return start >= parse_position(_text(fields[b"last-generated-id"]))
    return start >= parse_position(_text(first[0]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(topic: str, rows: list[Any]) -> list[Entry]:
    out = []
    for raw_id, flat in rows:
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        data = fields.get(FIELD)
        if data is not None:
            out.append(Entry(topic, _text(raw_id), data))
    return out
