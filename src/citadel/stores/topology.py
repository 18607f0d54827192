"""Redis Cluster and Sentinel clients: redis-py's asyncio clients behind the ``RedisStore`` methods.

Why redis-py here and the thin client for one server: a Cluster client must keep the slot map,
follow ``MOVED``/``ASK`` and refresh the map after a failover; a Sentinel client must ask the
Sentinels for the master again after one. redis-py does both and is well kept; its cost per call
(docs/decisions.md, "Redis topologies") is paid only by the installs that need a topology.

The adapter keeps the thin client's contract, so the limiter, the routing state, the usage
stream and the ledger writer run unchanged on every topology:

- Replies are raw RESP values (bytes, int, list, None): redis-py's reply callbacks are removed.
- An error reply raises ``citadel.stores.redis.RedisError`` with the server's message; a lost
  node, a refused connection or a call slower than ``timeout`` raises ``StoreUnavailable``.
- Replies that mean the command did not run — ``CLUSTERDOWN``, ``TRYAGAIN``, ``MOVED``/``ASK``
  left over from redis-py's own redirections, ``READONLY`` from a demoted master, an uncovered
  slot, no master known to the Sentinels — are retried, with a short pause, until ``timeout``
  runs out. A connection lost mid-call is not retried here (redis-py's cluster client retries it
  itself): the command may have run, and the caller's failure mode decides.
- ``evalsha`` answers ``NOSCRIPT`` with ``EVAL`` (which the node then caches), so a script
  reaches every master it is needed on. In a Cluster every script's keys must share one slot:
  redis-py refuses a call whose keys do not, before sending it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel

from citadel.errors import StoreUnavailable
from citadel.stores.endpoint import Endpoint
from citadel.stores.redis import Arg, RedisError, Script

__all__ = ["ClusterClient", "SentinelClient"]

_STORE: Final = "redis"
_PAUSE: Final = 0.05  # seconds between retries of a command that did not run
# error replies that say the command did not run: retried until the deadline
_NOT_RUN: Final = (
    rex.ClusterError,  # CLUSTERDOWN, and redirections beyond redis-py's "TTL"
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MovedError,
    rex.AskError,
    rex.ReadOnlyError,
    rex.SlotNotCoveredError,
    MasterNotFoundError,
    rex.MasterDownError,
)
_UNAVAILABLE: Final = (rex.ConnectionError, rex.TimeoutError, rex.RedisClusterException, OSError)


def _unsent(exc: AttributeError) -> bool:
    """Whether ``exc`` was raised writing a command to a connection already closed (so the
    command never left): redis-py's ``_send_packed_command`` on a writer set to None."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_send_packed_command"


def _tls_kwargs(endpoint: Endpoint) -> dict[str, Any]:
    if endpoint.tls is None:
        return {}
    options = endpoint.options
    return {
        "ssl": True,
        "ssl_ca_certs": options.get("ssl_ca_certs"),
        "ssl_certfile": options.get("ssl_certfile"),
        "ssl_keyfile": options.get("ssl_keyfile"),
        "ssl_cert_reqs": options.get("ssl_cert_reqs", "required"),
        "ssl_check_hostname": options.get("ssl_cert_reqs", "required") != "none",
    }


def _translate(reply: Any) -> Any:
    if isinstance(reply, rex.ResponseError):
        return RedisError(str(reply))
    if isinstance(reply, BaseException):
        raise StoreUnavailable(_STORE, f"pipeline failed: {reply}") from reply
    return reply


class _RedisPyStore:
    """The shared half: deadlines, retries, error translation, scripts, pipelines."""

    def __init__(self, client: Any, address: str, timeout: float) -> None:
        self._client = client
        self._address = address
        self._timeout = timeout
        # Raw replies, as the thin client gives. The callbacks of redis-py's own calls stay:
        # COMMAND and the two-word ones ("CLUSTER SLOTS"), which our calls never match since
        # they pass each word as its own argument.
        callbacks = client.response_callbacks
        for name in [n for n in callbacks if " " not in n and n.upper() != "COMMAND"]:
            del callbacks[name]

    @property
    def address(self) -> str:
        return self._address

    async def _call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    return await call()
            except _NOT_RUN as exc:
                if loop.time() + _PAUSE >= deadline:
                    raise StoreUnavailable(_STORE, f"{self._address}: {exc}") from exc
                await asyncio.sleep(_PAUSE)
            except AttributeError as exc:
                # redis-py's RedisCluster resets every connection (aclose) when one call meets a
                # connection error; a call sharing a connection mid-handshake then finds its
                # writer gone. Sent nothing: retried like a redirection; else an outage.
                if not _unsent(exc) or loop.time() + _PAUSE >= deadline:
                    detail = f"{self._address}: the connection was reset under this call"
                    raise StoreUnavailable(_STORE, detail) from exc
                await asyncio.sleep(_PAUSE)
            except rex.NoScriptError as exc:  # redis-py drops the code: put it back
                raise RedisError(f"NOSCRIPT {exc}") from exc
            except rex.ResponseError as exc:
                raise RedisError(str(exc)) from exc
            except TimeoutError as exc:
                detail = f"no reply from {self._address} within {self._timeout} s"
                raise StoreUnavailable(_STORE, detail) from exc
            except _UNAVAILABLE as exc:
                raise StoreUnavailable(_STORE, f"{self._address}: {exc}") from exc

    async def execute(self, *args: Arg) -> Any:
        return await self._call(lambda: self._client.execute_command(*args))

    async def pipeline(self, commands: Sequence[tuple[Arg, ...]]) -> list[Any]:
        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

        return [_translate(reply) for reply in await self._call(run)]

    async def evalsha(
        self, script: Script, keys: Sequence[Arg], args: Sequence[Arg], *, deferred: float = 0.0
    ) -> Any:
        # ``deferred`` is a hint redis-py's clients cannot take: they send at once.
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def ping(self) -> None:
        await self.execute("PING")

    async def aclose(self) -> None:
        await self._client.aclose()


class ClusterClient(_RedisPyStore):
    """A Redis Cluster, found from any of its nodes (``redis+cluster://h1:7000,h2:7001``)."""

    sharded = True  # the keys of one call must share a slot (citadel.limits.redis reads this)

    def __init__(self, endpoint: Endpoint, *, timeout: float) -> None:
        client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in endpoint.nodes],
            username=endpoint.username,
            password=endpoint.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            require_full_coverage=False,  # start, and serve the covered slots, mid-failover
            **_tls_kwargs(endpoint),
        )
        address = ",".join(f"{host}:{port}" for host, port in endpoint.nodes)
        super().__init__(client, f"cluster {address}", timeout)
        self._cluster = client
        # redis-py drops a node from its map (a failover, a slot move, a new CLUSTER SLOTS reply)
        # and closes only its idle connections, in a task nobody waits for; a connection busy at
        # that moment stays open until it is garbage, which warns (and, after the loop closed,
        # cannot close it). So every connection that opens a socket is held here (strongly: a
        # weak reference is cleared by the collector before the warning), dropped once closed,
        # and aclose closes what is still open.
        opened: set[Connection] = set()
        base: type[Connection] = client.connection_kwargs["connection_class"]

        async def open_and_remember(connection: Connection) -> None:
            await base._connect(connection)  # type: ignore[no-untyped-call]  # opens the socket
            opened.difference_update([c for c in opened if not c.is_connected])
            opened.add(connection)

        tracked = type(f"Tracked{base.__name__}", (base,), {"_connect": open_and_remember})
        client.connection_kwargs["connection_class"] = tracked  # the nodes it discovers
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = tracked
        self._opened = opened

    async def aclose(self) -> None:
        await super().aclose()
        await asyncio.gather(
            *(connection.disconnect(nowait=True) for connection in list(self._opened)),
            return_exceptions=True,
        )
        self._opened.clear()


class SentinelClient(_RedisPyStore):
    """The master a Sentinel group names (``redis+sentinel://h1,h2/mymaster/0``), asked again
    on every new connection, so a failover is followed."""

    def __init__(self, endpoint: Endpoint, *, timeout: float) -> None:
        tls = _tls_kwargs(endpoint)
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            **tls,
        }
        if "sentinel_password" in endpoint.options:
            sentinel_kwargs["password"] = endpoint.options["sentinel_password"]
        # redis-py leaves Sentinel.__init__ unannotated
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(endpoint.nodes), sentinel_kwargs=sentinel_kwargs
        )
        client = self._sentinel.master_for(
            endpoint.service,
            db=endpoint.db,
            username=endpoint.username,
            password=endpoint.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            **tls,
        )
        address = ",".join(f"{host}:{port}" for host, port in endpoint.nodes)
        super().__init__(client, f"sentinel {address}/{endpoint.service}", timeout)

    async def aclose(self) -> None:
        await super().aclose()
        for sentinel in self._sentinel.sentinels:
            await sentinel.aclose()
