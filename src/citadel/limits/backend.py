"""Pick the limiter backend by URI: ``memory://`` (one process) or ``redis://host:port/db``."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from citadel.errors import ConfigError
from citadel.limits.decision import Limiter
from citadel.limits.memory import MemoryLimiter
from citadel.limits.redis import RedisLimiter
from citadel.stores.redis import RedisClient

__all__ = ["create_limiter"]


def create_limiter(uri: str, *, timezone: str, lease_ttl: float, timeout: float) -> Limiter:
    """The limiter ``uri`` names; a Redis one connects on its first call."""
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigError("limits.timezone", timezone, "an IANA time zone name") from exc
    if uri == "memory://" or uri == "memory":
        return MemoryLimiter(timezone, lease_ttl)
    if uri.startswith("redis://"):
        return RedisLimiter(RedisClient.from_url(uri, timeout=timeout), timezone, lease_ttl)
    raise ConfigError("limits.backend", uri, "memory:// or redis://host:port/db")
