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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final

from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.crc import key_slot

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


class _Unsent(Exception):
    """A command met a connection closed under it before a byte of it was written."""


def _guarded(base: type[Connection], opened: set[Connection]) -> type[Connection]:
    """``base`` with two duties redis-py's connections lack, for the Cluster client.

    - Every connection that opens a socket is held in ``opened`` (strongly: a weak reference is
      cleared by the collector before the warning), dropped once closed: redis-py drops a node
      from its map (a failover, a slot move) and closes only its idle connections, in a task
      nobody waits for, so a connection busy at that moment would stay open until it is garbage
      (which warns, and after the loop closed cannot close it). ``aclose`` closes what is left.
    - A write on a connection closed under it raises ``_Unsent``: RedisCluster closes every
      connection (``aclose``) when one call meets a connection error, and a call then between
      its connection check and its write would fail on a writer set to None (AttributeError)
      although nothing was sent. Said where it happens, the caller can retry it safely.
    """

    async def connect(connection: Connection) -> None:
        await base._connect(connection)  # type: ignore[no-untyped-call]  # opens the socket
        opened.difference_update([c for c in opened if not c.is_connected])
        opened.add(connection)

    async def send(connection: Connection, command: Iterable[bytes]) -> None:
        if connection._writer is None:
            raise _Unsent(f"{connection.host}:{connection.port} was closed before the write")
        await base._send_packed_command(connection, command)

    methods = {"_connect": connect, "_send_packed_command": send}
    return type(f"Guarded{base.__name__}", (base,), methods)


def _key_bytes(key: Arg) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


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
            except _Unsent as exc:  # nothing was sent: retried like a redirection
                if loop.time() + _PAUSE >= deadline:
                    raise StoreUnavailable(_STORE, f"{self._address}: {exc}") from exc
                await asyncio.sleep(_PAUSE)
            except AttributeError as exc:
                # The same reset after the command was written (redis-py reading from a reader
                # set to None): it may have run, so it is an outage, never a retry.
                detail = f"{self._address}: the connection was reset under this call"
                raise StoreUnavailable(_STORE, detail) from exc
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
        opened: set[Connection] = set()
        tracked = _guarded(client.connection_kwargs["connection_class"], opened)
        client.connection_kwargs["connection_class"] = tracked  # the nodes it discovers
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_class = tracked
        self._opened = opened
        self._queued: list[tuple[tuple[Arg, ...], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._busy = 0  # calls and batches on their way

    async def execute(self, *args: Arg) -> Any:
        if self._busy:
            return await self._call(lambda: self._batched(args))
        return await self._call(lambda: self._alone(args))

    async def _alone(self, args: tuple[Arg, ...]) -> Any:
        """A call while none is on its way: sent at once (no wait for company, no task)."""
        self._busy += 1
        try:
            return await self._client.execute_command(*args)
        finally:
            self._busy -= 1

    async def evalsha(
        self, script: Script, keys: Sequence[Arg], args: Sequence[Arg], *, deferred: float = 0.0
    ) -> Any:
        # Refused here, as the server would (redis-py refuses it only once it knows the slot
        # map, as an error that reads like an outage).
        if len({key_slot(_key_bytes(key)) for key in keys}) > 1:
            raise RedisError("CROSSSLOT Keys in request don't hash to the same slot")
        return await super().evalsha(script, keys, args)

    def _batched(self, args: tuple[Arg, ...]) -> asyncio.Future[Any]:
        """``args``'s reply, sent with every other command called in this turn of the loop
        while others are on their way (a lone call goes at once: ``_alone``).

        redis-py gives each concurrent command a connection of its own, so under load every
        command is a write and a read of its own on the node (what made a Cluster cost Redis
        about 1.3x the CPU per request of one server, bench/README.md "Scale-out"). The thin
        client shares one connection and the server reads many commands at once; here the
        commands of one turn go as one redis-py pipeline: one write per node. Each command
        keeps its own reply or error (``raise_on_error=False``), and ``_call`` retries or
        translates it exactly as a lone call's.
        """
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        self._queued.append((args, reply))
        if len(self._queued) == 1:
            loop.call_soon(self._flush)
        return reply

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        batch = [(args, reply) for args, reply in batch if not reply.done()]  # not given up
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[tuple[Arg, ...], asyncio.Future[Any]]]) -> None:
        replies: list[Any]
        self._busy += 1
        try:
            if len(batch) == 1:
                replies = [await self._client.execute_command(*batch[0][0])]
            else:
                pipe = self._client.pipeline(transaction=False)
                for args, _ in batch:
                    pipe.execute_command(*args)
                replies = await pipe.execute(raise_on_error=False)
        except rex.RedisClusterException:
            # Refused before sending (a command's keys in two slots, no node for a slot): each
            # command alone, so only the one at fault gets the error.
            replies = await asyncio.gather(
                *(self._client.execute_command(*args) for args, _ in batch),
                return_exceptions=True,
            )
        except BaseException as exc:  # the batch failed as a whole: each caller sees it
            replies = [exc] * len(batch)
        finally:
            self._busy -= 1
        for (_, reply), result in zip(batch, replies, strict=True):
            if reply.done():
                continue
            if isinstance(result, asyncio.CancelledError):  # the client is closing
                reply.cancel()
            elif isinstance(result, BaseException):
                reply.set_exception(result)
            else:
                reply.set_result(result)

    async def aclose(self) -> None:
        for task in list(self._sending):
            task.cancel()
        await asyncio.gather(*self._sending, return_exceptions=True)
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
