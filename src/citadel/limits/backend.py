"""Pick the limiter backend by URI: ``memory://`` (one process) or a Redis URL of any topology
(``citadel.stores.endpoint``: ``redis://``, ``rediss://``, ``redis+sentinel://``, ``redis+cluster://``)."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from citadel.errors import ConfigError
from citadel.limits.decision import Limiter
from citadel.limits.memory import MemoryLimiter
from citadel.limits.redis import RedisLimiter
from citadel.stores.endpoint import connect_redis, is_redis_url

__all__ = ["create_limiter"]


def create_limiter(uri: str, *, timezone: str, lease_ttl: float, timeout: float) -> Limiter:
    """The limiter ``uri`` names; a Redis one connects on its first call."""
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError("limits.timezone", timezone, "an IANA time zone name") from exc
    if uri == "memory://" or uri == "memory":
        return MemoryLimiter(timezone, lease_ttl)
    if is_redis_url(uri):
        return RedisLimiter(connect_redis(uri, timeout=timeout), timezone, lease_ttl)
    raise ConfigError(
        "limits.backend",
        uri,
        "memory://, redis://host:port/db, redis+sentinel:// or redis+cluster://",
    )
