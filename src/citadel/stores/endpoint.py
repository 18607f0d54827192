"""Pick the Redis client by the endpoint's scheme; every client has the ``RedisStore`` methods.

=================================================  =============================================
``redis://[[user]:password@]host[:port][/db]``     one server: the thin client (stores.redis)
``rediss://...?ssl_ca_certs=/ca.pem``              the same over TLS (see ``tls_context``)
``redis+sentinel://[:pw@]h1:26379,h2/mymaster/0``  the master a Sentinel group names (redis-py)
``redis+cluster://[:pw@]h1:7000,h2:7001``          a Redis Cluster (redis-py's RedisCluster)
=================================================  =============================================

``rediss+sentinel://`` and ``rediss+cluster://`` speak TLS to every node. TLS options are query
parameters, named as redis-py names them: ``ssl_ca_certs`` (a PEM file; default: the system's
CAs), ``ssl_certfile`` and ``ssl_keyfile`` (a client certificate), ``ssl_cert_reqs=none`` (no
verification: tests only). The Sentinel password in the URL authenticates to the master; the
Sentinels themselves are asked without one unless ``sentinel_password`` is given.

Nothing connects until the first call, for every kind.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from citadel.errors import ConfigError
from citadel.stores.redis import Arg, RedisClient, Script

__all__ = [
    "SCHEMES",
    "RedisStore",
    "connect_redis",
    "is_redis_url",
    "parse_nodes",
    "shared_redis_url",
    "tls_context",
]

SCHEMES: Final = (
    "redis",
    "rediss",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)
_EXPECTED: Final = (
    "redis://host:port/db, rediss://..., redis+sentinel://host1,host2/service/db "
    "or redis+cluster://host1,host2"
)


class RedisStore(Protocol):
    """What the limiter, the shared routing state, the usage stream and the writer need."""

    @property
    def address(self) -> str: ...

    async def execute(self, *args: Arg) -> Any: ...

    async def pipeline(self, commands: Sequence[tuple[Arg, ...]]) -> list[Any]: ...

    async def evalsha(
        self, script: Script, keys: Sequence[Arg], args: Sequence[Arg], *, deferred: float = 0.0
    ) -> Any:
        """``deferred`` > 0: the call may wait up to that many seconds to travel with the next
        one (``RedisClient``; the redis-py clients send at once)."""
        ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


def is_redis_url(url: str) -> bool:
    """Whether ``url`` has one of the Redis schemes (it may still be malformed)."""
    return url.split("://", 1)[0] in SCHEMES and "://" in url


def shared_redis_url(endpoint: str | None, limits_backend: str) -> str | None:
    """The one Redis every service shares (usage stream, routing state, live feed): the
    ``endpoints.redis`` setting (``host:port`` becomes ``redis://``; ``memory://`` means none),
    else the limiter's backend when it is a Redis URL; None when there is no Redis. Every part
    resolves it here, so no two parts can disagree on where Redis is."""
    if endpoint:
        if endpoint.startswith("memory://"):
            return None
        url = endpoint if "://" in endpoint else f"redis://{endpoint}"
        if not is_redis_url(url):
            raise ConfigError("endpoints.redis", endpoint, f"{_EXPECTED} or memory://")
        return url
    return limits_backend if is_redis_url(limits_backend) else None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed Redis URL."""

    kind: str  # "server", "sentinel" or "cluster"
    tls: ssl.SSLContext | None
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int
    service: str  # the Sentinel's master name
    options: dict[str, str]


def parse_nodes(netloc: str, default_port: int, url: str) -> tuple[tuple[str, int], ...]:
    """``h1:p1,h2,[::1]:p3`` as (host, port) pairs."""
    nodes = []
    for part in netloc.split(","):
        host, sep, port = part.rpartition(":") if not part.endswith("]") else (part, "", "")
        if not sep:
            host, port = part, ""
        host = host.strip("[]")
        if not host:
            raise ConfigError("redis url", url, _EXPECTED)
        try:
            nodes.append((host, int(port) if port else default_port))
        except ValueError as exc:
            raise ConfigError("redis url", url, _EXPECTED) from exc
    return tuple(nodes)


def tls_context(options: dict[str, str], url: str) -> ssl.SSLContext:
    """The client TLS context the query parameters describe (see the module docstring)."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if "ssl_certfile" in options:
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    reqs = options.get("ssl_cert_reqs", "required")
    if reqs == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif reqs != "required":
        raise ConfigError("redis url ssl_cert_reqs", reqs, "required or none")
    return context


def parse(url: str) -> Endpoint:
    """Parse a Redis URL of any of the ``SCHEMES``; a ConfigError names what was expected."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise ConfigError("redis url", url, _EXPECTED)
    base = parts.scheme.split("+")[0]
    kind = parts.scheme.partition("+")[2] or "server"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    try:
        context = tls_context(options, url) if base == "rediss" else None
    except OSError as exc:
        raise ConfigError("redis url", url, f"readable TLS files ({exc})") from exc
    default_port = 26379 if kind == "sentinel" else 6379
    nodes = parse_nodes(hosts, default_port, url)
    path = [p for p in parts.path.split("/") if p]
    service, db_text = "", ""
    if kind == "sentinel":
        if not path or len(path) > 2:
            raise ConfigError("redis url", url, "redis+sentinel://host1,host2/service[/db]")
        service = unquote(path[0])
        db_text = path[1] if len(path) == 2 else ""
    elif kind == "cluster":
        if path:
            raise ConfigError("redis url", url, "redis+cluster://host1,host2 (a cluster has no db)")
    else:
        if len(nodes) != 1 or len(path) > 1:
            raise ConfigError("redis url", url, "redis://[[user]:password@]host[:port][/db]")
        db_text = path[0] if path else ""
    try:
        db = int(db_text) if db_text else 0
    except ValueError as exc:
        raise ConfigError("redis url", url, _EXPECTED) from exc
    return Endpoint(
        kind=kind,
        tls=context,
        nodes=nodes,
        username=unquote(user) if user else None,
        password=unquote(password) if colon else None,
        db=db,
        service=service,
        options=options,
    )


def connect_redis(url: str, *, timeout: float) -> RedisStore:
    """The client ``url`` names; ``timeout`` bounds every call (retries included)."""
    endpoint = parse(url)
    if endpoint.kind == "server":
        host, port = endpoint.nodes[0]
        return RedisClient(
            host,
            port,
            db=endpoint.db,
            username=endpoint.username,
            password=endpoint.password,
            timeout=timeout,
            tls=endpoint.tls,
        )
    from citadel.stores.topology import ClusterClient, SentinelClient

    if endpoint.kind == "cluster":
        return ClusterClient(endpoint, timeout=timeout)
    return SentinelClient(endpoint, timeout=timeout)
