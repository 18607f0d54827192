"""The feed a service's settings call for: Redis Streams when Redis is configured, else memory."""

from __future__ import annotations

from citadel.feed.core import Feed
from citadel.feed.memory import MemoryFeed
from citadel.feed.redis import RedisFeed
from citadel.settings import Settings
from citadel.stores.endpoint import connect_redis, shared_redis_url

__all__ = ["USAGE", "open_feed", "shared_feed"]

USAGE = "usage"  # the topic of usage events: the metering stream itself
_TAIL_TIMEOUT = 5.0  # seconds: above the tail's XREAD BLOCK (1 s)


def open_feed(settings: Settings, *, maxlen: int = 10_000) -> Feed:
    """``endpoints.redis`` (or a redis:// limiter backend), else a MemoryFeed of ``maxlen``."""
    url = shared_redis_url(settings.endpoints.redis, settings.limits.backend)
    if url is None:
        return MemoryFeed(maxlen=maxlen)
    return RedisFeed(
        connect_redis(url, timeout=settings.limits.store_timeout_seconds * 4),
        lambda: connect_redis(url, timeout=_TAIL_TIMEOUT),
        maxlen=maxlen,
        streams={USAGE: settings.metering.stream},
        owns_client=True,
    )


def shared_feed(settings: Settings) -> Feed | None:
    """The feed other processes read (Redis), or None: a process that only publishes (the
    gateway, predictive-alerting) has no reader without Redis, unless embedded mode hands it
    the one in-process feed."""
    feed = open_feed(settings, maxlen=10_000)
    return None if isinstance(feed, MemoryFeed) else feed
