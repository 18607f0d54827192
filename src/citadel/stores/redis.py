"""A thin asyncio Redis client: one pipelined connection, RESP2, replies parsed by hiredis.

Why not redis-py: its asyncio client costs ~110 µs per call here, whatever the command; this one
costs about half (see PERFORMANCE.md). It does only what the limiter needs:

- One TCP connection, opened on the first call. Commands are held until the event loop's
  current turn ends and then written together (one socket write for every command of that turn:
  concurrent callers pipeline); Redis answers in order, so replies are matched to a FIFO of
  futures.
- A reply slower than ``timeout`` fails every pending call with ``StoreUnavailable`` and drops
  the connection (the replies behind a late one are late too, and matching them later would be
  guesswork). A lost connection does the same. The next call connects again, so the client
  recovers by itself when Redis returns; there is no background task.
- An error reply raises ``RedisError`` with the server's message; ``evalsha`` answers NOSCRIPT
  (a restarted or flushed server) with one SCRIPT LOAD and a retry.

    client = RedisClient.from_url("redis://:secret@127.0.0.1:6379/0", timeout=0.25)
    await client.execute("SET", "key", 1)
    await client.evalsha(script, keys=["key"], args=[2])
    await client.pipeline([("XADD", "s", "*", "f", "v1"), ("XADD", "s", "*", "f", "v2")])
    await client.aclose()

``tls`` (an ``ssl.SSLContext``) speaks TLS; ``citadel.stores.endpoint.connect_redis`` builds it
from a ``rediss://`` URL, and picks redis-py for Sentinel and Cluster endpoints.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Final, cast
from urllib.parse import unquote, urlsplit

import hiredis

from citadel.errors import CitadelError, ConfigError, StoreUnavailable

__all__ = ["RedisClient", "RedisError", "Script", "encode_command"]

Arg = bytes | str | int | float

_STORE: Final = "redis"
# (hiredis types its argument as a one-item tuple; it takes any number of items)
_pack_command = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)


class RedisError(CitadelError):
    """Redis answered a command with an error reply; the message is the server's."""


class Script:
    """A Lua script and its SHA1, the name EVALSHA calls it by."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    def __repr__(self) -> str:
        return f"Script(sha={self.sha!r})"


def encode_command(args: tuple[Arg, ...] | list[Arg]) -> bytes:
    """One command as a RESP array of bulk strings (UTF-8 text, decimal numbers)."""
    # hiredis packs str, int, float and bytes in C, about twice as fast as formatting them here
    # (bench/README.md); anything else (a bytearray; a bool, refused) takes the Python path.
    try:
        return _pack_command(args if type(args) is tuple else tuple(args))
    except TypeError:
        return _encode_bytes(args)


def _encode_bytes(args: tuple[Arg, ...] | list[Arg]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = _arg_bytes(arg)
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(out)


def _arg_bytes(arg: object) -> bytes:
    if isinstance(arg, bool):
        raise TypeError(f"a Redis argument cannot be a bool ({arg!r}): pass 0 or 1")
    if isinstance(arg, float):
        return repr(arg).encode()
    if isinstance(arg, bytes | bytearray | memoryview):
        return bytes(arg)
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, int):
        return b"%d" % arg
    raise TypeError(f"a Redis argument must be bytes, str, int or float, not {arg!r}")


class _Connection(asyncio.Protocol):
    """One socket: writes commands, matches replies to waiting futures in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, where: str) -> None:
        self.loop = loop
        self.closed = False
        self._timeout = timeout
        self._where = where
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=RedisError)
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        # Commands written this turn of the loop, sent together by ``_flush`` (see ``_queue``);
        # ``_soon`` is set while a flush at the end of the turn is due; ``_later`` is the timer
        # that sends deferred commands (it may outlive them: see ``_queue``).
        self._outbox: list[bytes] = []
        self._soon = False
        self._later: asyncio.TimerHandle | None = None
        self._later_at = 0.0

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        try:
            reader.feed(data)
            reply = reader.gets()
            while reply is not False:
                future = self._pending.popleft()[0]
                if not future.done():
                    if isinstance(reply, RedisError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
                reply = reader.gets()
        except (hiredis.ProtocolError, IndexError) as exc:
            self.fail(f"unreadable reply from {self._where}: {exc!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection to {self._where} lost" + (f": {exc}" if exc else ""))

    # used by RedisClient

    def send(self, data: bytes, *, deferred: float = 0.0) -> asyncio.Future[Any]:
        """Write one encoded command; the future gets its reply. ``deferred`` > 0: the command
        may wait up to that many seconds for the next command that cannot (see ``_queue``)."""
        if self.closed or self._transport is None:
            raise StoreUnavailable(_STORE, f"connection to {self._where} is closed")
        future = self.loop.create_future()
        deadline = self.loop.time() + self._timeout
        self._pending.append((future, deadline))
        self._queue(data, deferred)
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._check_deadline)
        return future

    def _queue(self, data: bytes, deferred: float = 0.0) -> None:
        """Hold a command until the loop's current turn ends: the commands of every request
        served in one turn (admissions, the settlements of finished ones, XADDs) leave in one
        socket write, and Redis answers them in one read, instead of a write and a read each
        (each write wakes Redis: tens of microseconds on this VM, bench/README.md). A deferred
        command waits longer, for the next command that is not (or its own delay): a request's
        settlement then travels with the next request's admission. Order is kept: replies still
        match the FIFO of futures."""
        self._outbox.append(data)
        if self._soon:
            return
        if not deferred:
            self._soon = True
            self.loop.call_soon(self._flush)
        else:
            # The timer is left scheduled by the flushes before it fires (creating and
            # cancelling a loop timer per command costs several microseconds on uvloop): when
            # it fires it sends what waits. A new one only if this command is due sooner.
            due = self.loop.time() + deferred
            later = self._later
            if later is None or self._later_at > due:
                if later is not None:
                    later.cancel()
                self._later_at = due
                self._later = self.loop.call_at(due, self._flush_later)

    def _flush_later(self) -> None:
        self._later = None
        if not self._soon:
            self._flush()

    def _flush(self) -> None:
        self._soon = False
        outbox, self._outbox = self._outbox, []
        if outbox and not self.closed and self._transport is not None:
            self._transport.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))

    def send_many(self, data: Sequence[bytes]) -> list[asyncio.Future[Any]]:
        """Write encoded commands in one go; a future per command gets its reply."""
        if self.closed or self._transport is None:
            raise StoreUnavailable(_STORE, f"connection to {self._where} is closed")
        deadline = self.loop.time() + self._timeout
        futures = [self.loop.create_future() for _ in data]
        self._pending.extend((future, deadline) for future in futures)
        self._queue(b"".join(data))
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._check_deadline)
        return futures

    def _check_deadline(self) -> None:
        # One timer watches the oldest pending reply: the ones behind it cannot be earlier.
        self._timer = None
        if not self._pending or self.closed:
            return
        deadline = self._pending[0][1]
        if self.loop.time() >= deadline:
            self.fail(f"no reply from {self._where} within {self._timeout} s")
        else:
            self._timer = self.loop.call_at(deadline, self._check_deadline)

    def fail(self, detail: str) -> None:
        """Fail every pending call and drop the connection."""
        self.closed = True
        self._outbox = []
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            future = self._pending.popleft()[0]
            if not future.done():
                future.set_exception(StoreUnavailable(_STORE, detail))
        if self._transport is not None and not self.loop.is_closed():
            self._transport.abort()


class RedisClient:
    """A Redis client on one pipelined connection; see the module docstring."""

    __slots__ = (
        "_conn",
        "_connecting",
        "_db",
        "_host",
        "_password",
        "_port",
        "_timeout",
        "_tls",
        "_user",
    )

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 0.25,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._host = host
        self._tls = tls
        self._port = port
        self._db = db
        self._user = username
        self._password = password
        self._timeout = timeout
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None

    @classmethod
    def from_url(cls, url: str, *, timeout: float) -> RedisClient:
        """``redis://[[user]:password@]host[:port][/db]``; nothing connects until the first call."""
        parts = urlsplit(url)
        expected = "redis://[[user]:password@]host[:port][/db]"
        if parts.scheme != "redis" or not parts.hostname:
            raise ConfigError("redis url", url, expected)
        path = parts.path.strip("/")
        try:
            port = parts.port or 6379
            db = int(path) if path else 0
        except ValueError as exc:
            raise ConfigError("redis url", url, expected) from exc
        return cls(
            parts.hostname,
            port,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            timeout=timeout,
        )

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    async def execute(self, *args: Arg, deferred: float = 0.0) -> Any:
        """Send one command and return its reply (bytes, int, list or None). ``deferred``: the
        command may wait up to that many seconds to travel with the next one (for what nobody
        waits on, such as a settlement after the response)."""
        conn = self._usable() or await self._connect()
        return await conn.send(encode_command(args), deferred=deferred)

    async def pipeline(self, commands: Sequence[tuple[Arg, ...]]) -> list[Any]:
        """Send ``commands`` in one write and return their replies in order; an error reply is
        returned as a ``RedisError``, not raised. A lost connection or a late reply raises
        StoreUnavailable, as for ``execute``. No task per command: cheap for thousands."""
        conn = self._usable() or await self._connect()
        futures = conn.send_many([encode_command(c) for c in commands])
        replies = await asyncio.gather(*futures, return_exceptions=True)
        for reply in replies:
            if isinstance(reply, StoreUnavailable):
                raise reply
            if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                raise reply  # cancelled
        return replies

    async def evalsha(
        self, script: Script, keys: Sequence[Arg], args: Sequence[Arg], *, deferred: float = 0.0
    ) -> Any:
        """Run ``script`` by its SHA1, loading it once if the server does not know it
        (``deferred`` as for ``execute``)."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self.execute(*command, deferred=deferred)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.execute("SCRIPT", "LOAD", script.source)
        return await self.execute(*command)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers PING."""
        await self.execute("PING")

    async def aclose(self) -> None:
        """Close the connection; a later call would open a new one."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            conn.fail("the client was closed")

    def _usable(self) -> _Connection | None:
        """The open connection of the running loop, if there is one (no await: the hot path)."""
        conn = self._conn
        if conn is None or conn.closed or conn.loop is not asyncio.get_running_loop():
            return None
        return conn

    async def _connect(self) -> _Connection:
        # Callers that arrive while a connection is being opened wait for the same one.
        loop = asyncio.get_running_loop()
        opening = self._connecting
        if opening is None or opening.get_loop() is not loop:
            opening = self._connecting = loop.create_task(self._open(loop))
            opening.add_done_callback(self._opened)
        return await asyncio.shield(opening)

    def _opened(self, opening: asyncio.Future[_Connection]) -> None:
        if self._connecting is opening:
            self._connecting = None
        if not opening.cancelled():
            opening.exception()  # retrieved: the waiting callers re-raise it

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        old, self._conn = self._conn, None
        if old is not None and not old.closed:
            old.fail("replaced by a new connection")
        where = self.address
        try:
            async with asyncio.timeout(self._timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self._timeout, where),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            detail = str(exc) or type(exc).__name__
            raise StoreUnavailable(_STORE, f"cannot connect to {where}: {detail}") from exc
        setup: list[asyncio.Future[Any]] = []
        if self._password is not None:
            auth = (
                ("AUTH", self._password)
                if self._user is None
                else ("AUTH", self._user, self._password)
            )
            setup.append(conn.send(encode_command(auth)))
        if self._db:
            setup.append(conn.send(encode_command(("SELECT", self._db))))
        try:
            for reply in setup:
                await reply
        except (RedisError, StoreUnavailable) as exc:
            conn.fail("setup failed")
            for reply in setup:  # failed together: retrieve them all
                if not reply.cancelled():
                    reply.exception()
            if isinstance(exc, StoreUnavailable):
                raise
            raise StoreUnavailable(_STORE, f"{where} refused the connection setup: {exc}") from exc
        self._conn = conn
        return conn
