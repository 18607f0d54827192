"""A small, fast HTTP/1.1 client with a keep-alive pool per origin, for calls to upstream servers.

Theory of operation. Each TCP connection is a ``_Connection`` protocol owning an httptools parser
whose callbacks write into the state of the one response in flight. A reader waits on at most one
future: the head waiter resolves at the end of the headers; ``read()`` waits once, for the end of
the message; streaming is woken per body piece and takes everything buffered. One lazy timer per
connection checks deadlines against the last byte's time and re-arms itself: no timer per request.

Idle connections are kept per origin, newest first. Only a complete response that allows keep-alive
returns its connection; anything else closes it: that is how an abandoned stream stops the upstream.
A reused connection that closes before sending a byte is retried once on a fresh one: nothing was
received, so the upstream cannot have acted on the request.

Errors::

    ConnectError        no TCP connection could be opened (refused, DNS, TLS)
    └── ConnectTimeout  connecting, or waiting for a free pool slot, passed connect_timeout
    ReadTimeout         no response head within first_byte_timeout, or the body stalled that long
    ProtocolError       a malformed response, or the connection closed before the response ended
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from citadel.errors import TransportError

_HIGH_WATER = 1 << 20  # buffered unread streaming bytes before reading from the socket pauses
_SEPARATE_BODY = (
    1 << 16
)  # bodies at least this big are written apart rather than copied into the head
_TIMER_SLACK = 0.001  # event loops may fire a timer this early; do not re-arm for less
_MANAGED = frozenset((b"host", b"content-length", b"transfer-encoding"))
_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))


class ConnectError(TransportError):
    """No TCP connection to the upstream could be opened."""


class ConnectTimeout(ConnectError):
    """Connecting, or waiting for a free pooled connection, took longer than connect_timeout."""


class ReadTimeout(TransportError):
    """The response head did not arrive in time, or reading the body stalled past the deadline."""


class ProtocolError(TransportError):
    """The upstream sent a malformed response or closed the connection before it was complete."""


class _StaleConnection(ProtocolError):
    """The connection closed before any response byte arrived: the request is safe to retry."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @staticmethod
    def parse(url: str) -> Origin:
        """The origin of an ``http://`` or ``https://`` URL; any path is ignored."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid upstream URL {url!r}: expected http[s]://host[:port]")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"invalid upstream URL {url!r}: {exc}") from None
        return Origin(scheme, parts.hostname, port or (443 if scheme == "https" else 80))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


class _Pool:
    __slots__ = ("host_line", "idle", "origin", "slots", "ssl", "waiters")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.ssl = ssl.create_default_context() if origin.scheme == "https" else None
        host = f"[{origin.host}]" if ":" in origin.host else origin.host
        if origin.port != (443 if origin.scheme == "https" else 80):
            host = f"{host}:{origin.port}"
        self.host_line = b"host: " + host.encode("idna") + b"\r\n"
        self.idle: deque[_Connection] = deque()
        self.waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self.slots = 0  # connections open or being opened; never above max_connections_per_origin


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_active", "_buffered", "_client", "_closed", "_counted", "_done", "_error", "_expires",
        "_framed", "_head_deadline", "_head_done", "_headers", "_info", "_is_head", "_keep",
        "_last_rx", "_loop", "_parser", "_parts", "_paused", "_pool", "_received", "_status",
        "_streaming", "_timeout", "_timer", "_timer_at", "_transport", "_waiter",
    )  # fmt: skip

    def __init__(self, client: HttpClient, pool: _Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._pool = pool
        self._loop = loop
        self._transport = cast(asyncio.Transport, None)  # set by connection_made, before any use
        self._parser: Any = httptools.HttpResponseParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._closed = self._paused = self._active = False
        self._counted = True  # holds one of the pool's slots
        self._expires = self._last_rx = self._head_deadline = self._timeout = 0.0
        self._head_done = self._done = self._received = self._streaming = False
        self._framed = self._info = self._is_head = False
        self._keep = True
        self._error: Exception | None = None
        self._status = self._buffered = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._parts: list[bytes] = []

    # -- driving one request ------------------------------------------------------------------

    def _start(
        self, head: bytes, body: bytes, is_head: bool, timeout: float
    ) -> asyncio.Future[None]:
        self._active = self._keep = self._streaming = True  # streaming until read() says otherwise
        self._head_done = self._done = self._received = self._framed = self._info = False
        self._is_head = is_head
        self._timeout = timeout
        self._error = None
        self._status = self._buffered = 0
        self._headers = []
        self._parts = []
        transport = self._transport
        try:
            if self._closed or transport.is_closing():
                raise RuntimeError("transport is closing")
            transport.write(head)
            if body:
                transport.write(body)
        except (OSError, RuntimeError) as exc:
            self._close(abort=True)
            raise _StaleConnection(f"connection to {self._pool.origin} was already closed") from exc
        self._head_deadline = self._loop.time() + timeout
        self._waiter = fut = self._loop.create_future()
        self._arm(self._head_deadline)
        return fut

    def _wait(self) -> asyncio.Future[None]:
        """A future for the reader, resolved by the next event it cares about."""
        self._waiter = fut = self._loop.create_future()
        self._last_rx = now = self._loop.time()
        self._arm(now + self._timeout)
        return fut

    def _arm(self, deadline: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return
            timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None:  # nobody is waiting: a slow reader is not a stalled upstream
            return
        deadline = self._last_rx + self._timeout if self._head_done else self._head_deadline
        if self._loop.time() + _TIMER_SLACK < deadline:
            self._arm(deadline)
        elif self._head_done:
            self._fail(ReadTimeout(f"{self._pool.origin} stalled the body for {self._timeout}s"))
        else:
            self._fail(ReadTimeout(f"{self._pool.origin} sent no response within {self._timeout}s"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(exc)
        self._close(abort=True)

    def _close(self, *, abort: bool = False) -> None:
        self._keep = False
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()
        self._client._drop_slot(self)

    def _resume(self) -> None:
        self._paused = False
        self._buffered = 0
        if not self._closed:
            self._transport.resume_reading()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._client._conns.add(self)
        self._client._created += 1

    def data_received(self, data: bytes) -> None:
        if not self._active:  # bytes nobody asked for: the connection can no longer be trusted
            self._close(abort=True)
            return
        if self._error is not None:
            return
        self._received = True
        self._last_rx = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError(f"{self._pool.origin} tried to switch protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed response from {self._pool.origin}: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._client._lost(self)
        if not self._active or self._done or self._error is not None:
            return
        origin = self._pool.origin
        if not self._received:
            self._fail(_StaleConnection(f"{origin} closed the connection without a response"))
        elif not self._head_done:
            self._fail(ProtocolError(f"{origin} closed the connection inside the response head"))
        elif not self._framed and exc is None:  # no length and not chunked: the body ends at EOF
            self._done = True
            self._wake()
        else:
            self._fail(ProtocolError(f"{origin} closed the connection inside the response body"))

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:
            raise ProtocolError("bytes after the end of the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:  # chunked trailers are not exposed
            return
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self._framed = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status: int = self._parser.get_status_code()
        if status < 200:  # interim (100 Continue, 103 Early Hints): wait for the real one
            self._info = True
            self._headers = []
            self._framed = False
            return
        self._status = status
        self._head_done = True
        if self._is_head:  # no body follows whatever the headers say; the parser cannot be told
            self._done = True
            self._keep = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._parts.append(body)
        if self._streaming:
            self._buffered += len(body)
            if self._buffered > _HIGH_WATER and not self._paused:
                self._paused = True
                self._transport.pause_reading()
            self._wake()

    def on_message_complete(self) -> None:
        if self._info:
            self._info = False
        elif not self._done:
            self._done = True
            if not self._parser.should_keep_alive():
                self._keep = False
            self._wake()


class UpstreamResponse:
    """A response whose head has arrived; the body is read with ``read()`` or ``async for``."""

    __slots__ = ("_body", "_conn", "headers", "status")

    def __init__(self, conn: _Connection) -> None:
        self.status = conn._status
        self.headers = conn._headers  # as received, names lower-cased
        self._conn: _Connection | None = conn
        self._body = b""

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived (``read`` will not wait)."""
        conn = self._conn
        return conn is None or (conn._done and conn._error is None)

    async def read(self) -> bytes:
        """The whole (remaining) body; the connection then goes back to the pool."""
        conn = self._conn
        if conn is None:
            return self._body
        if not conn._done:
            if conn._error is not None:
                self._conn = None
                raise conn._error
            conn._streaming = False
            if conn._paused:
                conn._resume()
            try:
                await conn._wait()
            except BaseException:
                self._conn = None
                conn._close(abort=True)
                raise
        parts = conn._parts
        self._body = body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._conn = None
        conn._client._release(conn)
        return body

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        """Everything received since the last call, waiting for at least one byte."""
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        while True:
            parts = conn._parts
            if parts:
                conn._parts = []
                if conn._paused:
                    conn._resume()
                else:
                    conn._buffered = 0
                return parts[0] if len(parts) == 1 else b"".join(parts)
            if conn._done:
                self._conn = None
                conn._client._release(conn)
                raise StopAsyncIteration
            if conn._error is not None:
                self._conn = None
                raise conn._error
            try:
                await conn._wait()
            except BaseException:
                self._conn = None
                conn._close(abort=True)
                raise

    async def aclose(self) -> None:
        """Abandon the response; an unfinished body closes the connection, stopping the upstream."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            if conn._done and conn._error is None:
                conn._client._release(conn)
            else:
                conn._close()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class HttpClient:
    """HTTP/1.1 requests over keep-alive connections pooled per origin."""

    def __init__(
        self, *, max_connections_per_origin: int = 256, keepalive_expiry: float = 60.0
    ) -> None:
        if max_connections_per_origin < 1:
            raise ValueError(
                f"max_connections_per_origin={max_connections_per_origin}: expected >= 1"
            )
        self._max = max_connections_per_origin
        self._expiry = keepalive_expiry
        self._pools: dict[Origin, _Pool] = {}
        self._conns: set[_Connection] = set()
        self._created = 0

    async def request(
        self,
        method: str,
        origin: Origin,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        connect_timeout: float,
        first_byte_timeout: float,
    ) -> UpstreamResponse:
        """Send a request and return once the response head has arrived, before its body."""
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(origin)
        lines = [f"{method} {path} HTTP/1.1\r\n".encode("latin-1"), pool.host_line]
        if body or method in _BODY_METHODS:
            lines.append(b"content-length: %d\r\n" % len(body))
        for name, value in headers:
            if name.lower() not in _MANAGED:
                lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        if len(body) < _SEPARATE_BODY:
            lines.append(body)
            body = b""
        head = b"".join(lines)
        is_head = method == "HEAD"

        conn = self._pop_idle(pool)
        reused = conn is not None
        if conn is None:
            conn, reused = await self._acquire(pool, connect_timeout)
        while True:
            try:
                await conn._start(head, body, is_head, first_byte_timeout)
            except _StaleConnection:
                if not reused:
                    raise
                reused = False  # one retry, on a fresh connection or one handed over by the pool
                conn, _ = await self._acquire(pool, connect_timeout)
            except BaseException:
                conn._close(abort=True)
                raise
            else:
                return UpstreamResponse(conn)

    async def aclose(self) -> None:
        """Close every connection, idle or busy."""
        for pool in self._pools.values():
            pool.idle.clear()
        for conn in list(self._conns):
            conn._close()
        for _ in range(10):  # let the transports report connection_lost
            if not self._conns:
                break
            await asyncio.sleep(0)

    def stats(self) -> dict[str, int]:
        """Open and idle connections now, and connections created since the start."""
        idle = sum(len(pool.idle) for pool in self._pools.values())
        return {"open": len(self._conns), "idle": idle, "created": self._created}

    # -- pool ---------------------------------------------------------------------------------

    def _pop_idle(self, pool: _Pool) -> _Connection | None:
        idle = pool.idle
        while idle:
            conn = idle.pop()
            expires, conn._expires = conn._expires, 0.0  # zero: not in the idle list
            if conn._transport.is_closing():
                conn._close()
            elif expires <= conn._loop.time():  # so are all older ones
                conn._close()
                while idle:
                    conn = idle.pop()
                    conn._expires = 0.0
                    conn._close()
            else:
                return conn
        return None

    async def _acquire(self, pool: _Pool, limit: float) -> tuple[_Connection, bool]:
        """A connection: handed over by a releasing request (True), else newly opened (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        if pool.slots >= self._max:
            fut: asyncio.Future[_Connection | None] = loop.create_future()
            pool.waiters.append(fut)
            try:
                async with asyncio.timeout_at(deadline):
                    handed = await fut
            except BaseException as exc:
                if fut.done() and not fut.cancelled():  # handed over just as we gave up
                    handed = fut.result()
                    if handed is None:
                        pool.slots -= 1
                        self._free_slot(pool)
                    else:
                        self._release(handed)
                fut.cancel()
                if isinstance(exc, TimeoutError):
                    raise ConnectTimeout(
                        f"no connection to {pool.origin} became free within {limit}s"
                        f" (max_connections_per_origin={self._max})"
                    ) from None
                raise
            if handed is not None:
                return handed, True
        else:
            pool.slots += 1
        conn = _Connection(self, pool, loop)
        origin = pool.origin
        try:
            async with asyncio.timeout_at(deadline):
                await loop.create_connection(lambda: conn, origin.host, origin.port, ssl=pool.ssl)
        except BaseException as exc:
            self._drop_slot(conn)
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"connecting to {origin} took over {limit}s") from None
            if isinstance(exc, OSError):
                raise ConnectError(f"could not connect to {origin}: {exc}") from exc
            raise
        return conn, False

    def _release(self, conn: _Connection) -> None:
        """Take back a connection after a complete response: for a waiter, idle, or closed."""
        conn._active = False
        conn._parts = []
        if not conn._keep or conn._closed or conn._transport.is_closing():
            conn._close()
            return
        if conn._paused:
            conn._resume()
        pool = conn._pool
        waiters = pool.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn._expires = conn._loop.time() + self._expiry
        pool.idle.append(conn)

    def _drop_slot(self, conn: _Connection) -> None:
        if conn._counted:
            conn._counted = False
            conn._pool.slots -= 1
            self._free_slot(conn._pool)

    def _free_slot(self, pool: _Pool) -> None:
        """A slot just freed: hand it to the first live waiter, who will open a connection."""
        waiters = pool.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                pool.slots += 1
                waiter.set_result(None)
                return

    def _lost(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        self._drop_slot(conn)
        if conn._expires:
            conn._expires = 0.0
            with contextlib.suppress(ValueError):  # aclose() may have cleared the list
                conn._pool.idle.remove(conn)
