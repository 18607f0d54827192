"""One contract for the live event feed, run on memory and on the real Redis (two "replicas"
reading one Redis: what one publishes, the other's subscribers see)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from citadel.feed import Entry, Feed, Lagged, MemoryFeed, RedisFeed, parse_position
from citadel.feed.redis import stream_key
from citadel.metering.ledger import decode_event
from citadel.metering.sinks import RedisStreamSink
from citadel.metering.spool import Spool
from citadel.stores.redis import RedisClient

from support import usage_event

REDIS_URL = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/10")

Pair = tuple[Feed, Feed]  # (publisher's feed, reader's feed): one object in memory


@asynccontextmanager
async def memory_pair(maxlen: int) -> AsyncIterator[Pair]:
    feed = MemoryFeed(maxlen=maxlen)
    yield feed, feed
    await feed.aclose()


@asynccontextmanager
async def redis_pair(maxlen: int) -> AsyncIterator[Pair]:
    def tail() -> RedisClient:
        return RedisClient.from_url(REDIS_URL, timeout=5.0)

    clients = [RedisClient.from_url(REDIS_URL, timeout=1.0) for _ in range(2)]
    feeds = [RedisFeed(c, tail, maxlen=maxlen) for c in clients]
    try:
        yield feeds[0], feeds[1]
    finally:
        for feed, client in zip(feeds, clients, strict=True):
            await feed.aclose()
            await client.aclose()


PAIRS = {"memory": memory_pair, "redis": redis_pair}


def run(kind: str, body: Callable[[Feed, Feed, str], Awaitable[Any]], *, maxlen: int = 1000) -> Any:
    topic = f"t{uuid.uuid4().hex[:12]}"

    async def main() -> Any:
        async with PAIRS[kind](maxlen) as (a, b):
            try:
                return await asyncio.wait_for(body(a, b, topic), 10)
            finally:
                if kind == "redis":
                    client = RedisClient.from_url(REDIS_URL, timeout=1.0)
                    await client.execute("DEL", stream_key(topic), stream_key(f"{topic}k"))
                    await client.aclose()

    return asyncio.run(main())


kinds = pytest.mark.parametrize("kind", list(PAIRS))


async def take(sub: AsyncIterator[Entry | Lagged], n: int) -> list[Entry | Lagged]:
    return [await anext(sub) for _ in range(n)]


@kinds
def test_read_returns_entries_after_a_position_in_order(kind: str) -> None:
    async def body(a: Feed, b: Feed, topic: str) -> None:
        positions = [await a.publish(topic, f"e{i}".encode()) for i in range(5)]
        assert positions == sorted(positions, key=parse_position)
        assert len(set(positions)) == 5
        page = await b.read(topic, "0-0")
        assert [e.data for e in page.entries] == [b"e0", b"e1", b"e2", b"e3", b"e4"]
        assert page.recovered
        after = await b.read(topic, positions[2])
        assert [e.data for e in after.entries] == [b"e3", b"e4"]
        assert [e.position for e in after.entries] == positions[3:]
        assert (await b.read(topic, positions[0], count=2)).entries[1].data == b"e2"
        assert await b.last(topic) == positions[-1]
        assert (await b.read(f"{topic}x", "0-0")).entries == []
        assert await b.last(f"{topic}x") == "0-0"

    run(kind, body)


@kinds
def test_an_expired_topic_is_gone_and_a_later_expire_pushes_the_deadline_back(
    kind: str,
) -> None:
    async def body(a: Feed, b: Feed, topic: str) -> None:
        await a.publish(topic, b"one")
        await a.publish(f"{topic}k", b"kept")
        await a.expire(topic, 0.3)
        await a.expire(f"{topic}k", 0.2)
        await a.expire(f"{topic}k", 30)
        assert [e.data for e in (await b.read(topic, "0-0")).entries] == [b"one"]
        await asyncio.sleep(0.5)
        gone = await b.read(topic, "0-0")
        assert (gone.entries, gone.recovered) == ([], True)
        assert await b.last(topic) == "0-0"
        assert [e.data for e in (await b.read(f"{topic}k", "0-0")).entries] == [b"kept"]

    run(kind, body)


@kinds
def test_a_position_older_than_the_retention_is_not_recovered(kind: str) -> None:
    async def body(a: Feed, b: Feed, topic: str) -> None:
        positions = [await a.publish(topic, b"x") for _ in range(400)]
        old = await b.read(topic, "0-0")
        assert not old.recovered
        assert len(old.entries) < 400
        kept = old.entries[0].position
        assert parse_position(kept) > parse_position(positions[0])
        assert (await b.read(topic, kept)).recovered
        assert (await b.read(topic, positions[-2])).recovered

    run(kind, body, maxlen=10)


@kinds
def test_subscribe_replays_then_follows_the_tail_without_gap_or_duplicate(kind: str) -> None:
    async def body(a: Feed, b: Feed, topic: str) -> None:
        first = await a.publish(topic, b"0")
        for i in range(1, 4):
            await a.publish(topic, str(i).encode())
        async with b.subscribe(topic, after=first) as sub:
            assert sub.recovered
            got = await take(sub, 3)
            for i in range(4, 8):
                await a.publish(topic, str(i).encode())
            got += await take(sub, 4)
            assert [g.data for g in got if isinstance(g, Entry)] == [
                str(i).encode() for i in range(1, 8)
            ]
            assert sub.position == got[-1].position  # type: ignore[union-attr]

    run(kind, body)


@kinds
def test_a_live_subscriber_sees_only_new_entries_from_another_replica(kind: str) -> None:
    async def body(a: Feed, b: Feed, topic: str) -> None:
        await a.publish(topic, b"before")
        async with b.subscribe(topic) as sub:
            await a.publish(topic, b"after")
            entry = await anext(sub)
            assert isinstance(entry, Entry)
            assert (entry.topic, entry.data) == (topic, b"after")
            assert b.subscribers() == 1
        assert b.subscribers() == 0

    run(kind, body)


@kinds
def test_a_subscriber_cancelled_while_joining_leaves_and_the_next_one_is_served(
    kind: str,
) -> None:
    """A client gone mid-subscribe (its task cancelled inside ``subscribe``'s entry) must not
    stay in the feed: the next first subscriber starts the tail and gets the entries."""

    async def body(a: Feed, b: Feed, topic: str) -> None:
        for steps in range(4):  # cancel after 0..3 loop iterations of the entry

            async def join() -> None:
                async with b.subscribe(topic):
                    await asyncio.Event().wait()

            task = asyncio.create_task(join())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert b.subscribers() == 0, steps
        async with b.subscribe(topic) as sub:
            await a.publish(topic, b"served")
            entry = await anext(sub)
            assert isinstance(entry, Entry)
            assert entry.data == b"served"

    run(kind, body)


@kinds
def test_a_slow_subscriber_gets_lagged_and_the_others_do_not(kind: str) -> None:
    async def body(a: Feed, b: Feed, topic: str) -> None:
        async with b.subscribe(topic, queue=2) as slow, b.subscribe(topic, queue=100) as fast:
            positions = [await a.publish(topic, str(i).encode()) for i in range(10)]
            fast_got = await take(fast, 10)
            assert [g.data for g in fast_got if isinstance(g, Entry)] == [
                str(i).encode() for i in range(10)
            ]
            got = await take(slow, 3)
            assert [g.data for g in got[:2] if isinstance(g, Entry)] == [b"0", b"1"]
            assert got[2] == Lagged(topic, 8, positions[1])
            # resuming from the lagged position recovers what was dropped
            rest = await b.read(topic, got[2].position)
            assert [e.data for e in rest.entries] == [str(i).encode() for i in range(2, 10)]
            await a.publish(topic, b"10")
            tail = await anext(slow)
            assert isinstance(tail, Entry)
            assert tail.data == b"10"

    run(kind, body)


@kinds
def test_bad_positions_and_topics_are_refused(kind: str) -> None:
    async def body(a: Feed, b: Feed, topic: str) -> None:
        for bad in ("", "abc", "1-2-3", "-1"):
            with pytest.raises(ValueError, match="not a feed position"):
                b.subscribe(topic, after=bad)
        with pytest.raises(ValueError, match="not a topic name"):
            await a.publish("Bad Topic", b"x")
        with pytest.raises(ValueError, match="queue"):
            b.subscribe(topic, queue=0)

    run(kind, body)


def test_usage_events_are_read_from_the_metering_stream_not_published_twice(
    tmp_path: Path,
) -> None:
    """The gateway's usage sink XADDs to the ledger's stream; the feed's usage topic is it."""
    stream = f"citadel:{{usage}}:test:{uuid.uuid4().hex}"

    async def main() -> None:
        redis = RedisClient.from_url(REDIS_URL, timeout=1.0)
        feed = RedisFeed(
            redis,
            lambda: RedisClient.from_url(REDIS_URL, timeout=5.0),
            streams={"usage": stream},
        )
        sink = RedisStreamSink(
            RedisClient.from_url(REDIS_URL, timeout=1.0),
            stream=stream,
            flush_seconds=0.01,
            batch_size=100,
            spool=Spool(tmp_path / "usage.spool"),
            owns_store=True,
        )
        await sink.start()
        try:
            async with feed.subscribe("usage") as sub:
                event = usage_event(user="usr_live")
                sink.emit(event)
                entry = await asyncio.wait_for(anext(sub), 5)
                assert isinstance(entry, Entry)
                assert decode_event(entry.data) == event
            assert await redis.execute("XLEN", stream) == 1
        finally:
            await sink.aclose()
            await feed.aclose()
            await redis.execute("DEL", stream)
            await redis.aclose()

    asyncio.run(main())
