"""The live event feed: usage events, deployment changes, alerts and the metrics digest, one
ordered log per topic that every replica reads (a Redis Stream per topic) or, without Redis, a
bounded log in memory. The streaming service, GraphQL subscriptions and the console read it.

    feed = MemoryFeed(maxlen=10_000)        # or RedisFeed(redis, tail_redis, maxlen=10_000)
    position = await feed.publish("alerts", b'{"alert": "..."}')
    page = await feed.read("alerts", after="0-0", count=100)   # page.entries, page.recovered
    async with feed.subscribe("alerts", after=position, queue=1000) as sub:
        async for item in sub:                # Entry, or Lagged when this reader fell behind
            ...

Positions are Redis Stream ids (``<ms>-<seq>``), in both implementations, so a client can keep
one across a restart or a move to another replica. ``read`` returns entries strictly after a
position; ``recovered`` is False when entries after it were already trimmed (the position is
older than the retention), so a resuming client is told instead of silently missing events.

``subscribe`` resumes in the right order: it joins the live tail first (buffering), then replays
from the position, then forwards the live entries past the last replayed one, so nothing falls
in the gap and nothing arrives twice. Each subscriber has a bounded queue: one that falls behind
gets ``Lagged`` (how many entries it missed, and the position to resume from) instead of
growing memory, and the others are unaffected.
"""

from citadel.feed.core import Entry, Feed, Lagged, Page, Subscription, parse_position
from citadel.feed.memory import MemoryFeed
from citadel.feed.redis import RedisFeed

__all__ = [
    "Entry",
    "Feed",
    "Lagged",
    "MemoryFeed",
    "Page",
    "RedisFeed",
    "Subscription",
    "parse_position",
]
