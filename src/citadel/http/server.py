"""A small, fast HTTP/1.1 server on asyncio.Protocol and httptools.

Theory of operation. One ``HttpProtocol`` per TCP connection feeds received bytes to an httptools
parser. When a whole request has arrived it becomes a ``Request`` and is handed to the handler in a
task of its own; requests pipelined behind it wait in a queue and run strictly one after another, so
responses leave in request order. The handler answers with a ``Response`` (a whole body, sent with
``content-length``) or a ``StreamResponse`` (an async iterator of chunks, sent with chunked
transfer-encoding as each chunk is produced, honouring the transport's write flow control).

A client that goes away cancels the task serving it: the handler sees ``CancelledError`` where it
was waiting, which is how an upstream generation is abandoned when nobody is left to read it.

A body over ``max_body_bytes`` is not kept: it is read and discarded (the handler gets the
request with ``body_too_large`` set and answers 413) unless the client keeps sending past a hard
cap, when the connection is closed. Idle keep-alive connections close after
``keepalive_timeout`` seconds.

What faces the internet is bounded, so one client cannot stall the loop or hold a connection
forever: the URL (``max_url_bytes``, 414), the head (``max_head_bytes``, counted as bytes arrive,
before httptools has joined a long header, 431) and the header count (``max_headers``, 431); a
head must arrive within ``head_timeout`` seconds and a body must keep moving (``body_timeout``
between chunks), or the client gets 408 and the connection closes. Framing the server cannot be
sure of is refused, then the connection closes, so nothing after it can be read as a smuggled
request: duplicate ``host``, ``authorization`` or ``content-length`` and a missing ``host``
(400), a transfer coding other than ``chunked`` (501), and ``expect: 100-continue`` with a body
over the limit (413, without inviting the body). Past ``max_connections`` a worker answers new
connections with 503 and closes them, rather than running out of file descriptors.

Graceful shutdown (``HttpServer.shutdown``) stops accepting, closes idle connections, lets busy ones
finish the response in hand (then closes them), and after the grace period cancels what is left.

Why not a framework: measured on this machine (shared/PERFORMANCE.md), an asyncio.Protocol
server with httptools costs a fraction of what an ASGI server plus framework costs per request,
and the gateway's hot path is nothing but this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import resource
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import Any, cast

import httptools

from citadel.errors import BadRequest

__all__ = [
    "AbortConnection",
    "HttpProtocol",
    "HttpServer",
    "Request",
    "Response",
    "StreamResponse",
]

_log = logging.getLogger("citadel.http")

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in http.HTTPStatus}
# Discarding an oversized body costs little, but not forever: past this multiple of the limit the
# client is not worth waiting for and the connection is closed.
_DISCARD_FACTOR = 16
# Headers whose repetition makes the request ambiguous (RFC 9112 3.2, 6.3; RFC 9110 11.6.2).
_SINGLE = frozenset((b"host", b"authorization", b"content-length"))


def error_body(message: str, code: str | None = None) -> bytes:
    """An OpenAI-style error body (``invalid_request_error``) for a refusal at the HTTP level."""
    return BadRequest(message, code=code).body()


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing: answer ``status`` and close."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


class AbortConnection(Exception):
    """Raised by a handler or a stream body: close the connection now, without (more of) a response.

    A stream cut this way ends without the terminating chunk, so the client sees a broken body.
    """


class Request:
    """One parsed HTTP request. Header names are lower-case bytes."""

    __slots__ = (
        "body",
        "body_too_large",
        "client",
        "headers",
        "method",
        "path",
        "query",
        "request_id",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[bytes, bytes],
        body: bytes,
        client: str = "",
        body_too_large: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.client = client
        self.body_too_large = body_too_large
        self.request_id = ""

    def header(self, name: bytes) -> str | None:
        """The value of header ``name`` (lower-case) decoded as latin-1, or None."""
        value = self.headers.get(name)
        return None if value is None else value.decode("latin-1")


class Response:
    """A whole response: status, headers and body."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes = b"application/json",
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        if content_type:
            self.headers.append((b"content-type", content_type))


class StreamResponse:
    """A response whose body is produced as it is sent (Server-Sent Events, typically)."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        body: AsyncIterator[bytes],
        status: int = 200,
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: bytes = b"text/event-stream",
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        if content_type:
            self.headers.append((b"content-type", content_type))
            self.headers.append((b"cache-control", b"no-cache"))


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


class _Clock:
    """The ``date`` header, formatted at most once a second."""

    __slots__ = ("_header", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._header = b""

    def date_header(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._header = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._header


def _head(
    status: int,
    headers: list[tuple[bytes, bytes]],
    framing: bytes,
    keep_alive: bool,
    date: bytes,
) -> bytes:
    parts = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")), date]
    for name, value in headers:
        parts.append(name + b": " + value + b"\r\n")
    parts.append(framing)
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


async def _close_body(body: AsyncIterator[bytes]) -> None:
    """Close a stream body (an async generator or anything with ``aclose``), whatever happens."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


_TIMER_SLACK = 0.001  # event loops may fire a timer this early; do not re-arm for less


class _Deadline:
    """A timeout that is moved and cleared without touching the loop's timers each time.

    A connection arms and clears its read and idle timeouts on every request; creating and
    cancelling a loop timer for each costs several microseconds on uvloop (bench/README.md). So
    ``arm`` and ``clear`` only write the deadline; one timer stays scheduled at the earliest
    deadline armed, and when it fires it calls ``callback`` if the deadline is due, else
    re-arms itself for the deadline, or ends when the deadline was cleared. ``callback`` runs at
    the deadline as before, never earlier; ``cancel`` really cancels (the connection is done).
    """

    __slots__ = ("_at", "_callback", "_deadline", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
        self._loop = loop
        self._callback = callback
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0  # when the handle fires

    def arm(self, seconds: float) -> None:
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        handle = self._handle
        if handle is not None:
            if self._at <= deadline:
                return
            handle.cancel()
        self._at = deadline
        self._handle = self._loop.call_at(deadline, self._fire)

    def clear(self) -> None:
        self._deadline = None

    def cancel(self) -> None:
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() + _TIMER_SLACK < deadline:
            self._at = deadline
            self._handle = self._loop.call_at(deadline, self._fire)
            return
        self._deadline = None
        self._callback()


class HttpProtocol(asyncio.Protocol):
    """One client connection: parse requests, run the handler, write responses in order."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._loop = server.loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self._pending: deque[tuple[Request, bool]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._idle_timer = _Deadline(self._loop, self._close)
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._client = ""
        self._rejection: tuple[int, bytes] | None = None
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._head_size = 0
        self._read_timer = _Deadline(self._loop, self._read_timed_out)
        self._read_part = "head"
        self._refused = False
        self.closing = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self._client = f"{peer[0]}:{peer[1]}"
        if len(self._server.connections) >= self._server.max_connections:
            self._refuse_connection()
            return
        self._server.connections.add(self)
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.forget(self)
        self._idle_timer.cancel()
        self._read_timer.cancel()
        self.closing = True
        self._pending.clear()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client disconnected"))
            self._drain.exception()  # mark retrieved: nobody may be waiting

    def data_received(self, data: bytes) -> None:
        if self._refused or self._rejection is not None or (self.closing and self._task is None):
            return  # refused already: nothing more of this connection is read
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            refused = exc.__context__
            if isinstance(refused, _Refused):
                self._reject(refused.status, refused.body)
            else:
                raise
        except httptools.HttpParserUpgrade:
            self._reject(
                400,
                b'{"error":{"message":"protocol upgrade is not supported",'
                b'"type":"invalid_request_error","param":null,"code":null}}',
            )
        except httptools.HttpParserError as exc:
            message = f"malformed HTTP request: {exc}".replace('"', "'").encode()
            self._reject(
                400,
                b'{"error":{"message":"'
                + message
                + b'","type":"invalid_request_error","param":null,"code":"bad_http"}}',
            )
        else:
            # Counted per chunk as it arrives: httptools joins a long header itself, so a cap
            # checked in on_header would come only after the whole (say 64 MB) header.
            if self._in_head and self._head_bytes > self._server.max_head_bytes:
                self._reject(431, self._too_big_head())

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def eof_received(self) -> bool | None:
        # The client closed its side. A full close looks just like a half-close, and a client that
        # half-closes and still waits for an answer is rare, so EOF means the client went away:
        # the transport closes and the handler is cancelled now, even one still waiting for an
        # upstream with nothing written yet (a write would have found out only much later).
        return None

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._cancel_idle_timer()
        self._arm_read_timer(self._server.head_timeout, "head")
        self._in_head = True
        self._header_count = 0
        self._head_size = 0
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._server.max_url_bytes:
            limit = self._server.max_url_bytes
            raise _Refused(
                414,
                error_body(f"The URL is longer than the limit of {limit} bytes.", "uri_too_long"),
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._header_count += 1
        self._head_size += len(name) + len(value) + 4
        if self._head_size + len(self._url) > self._server.max_head_bytes:
            raise _Refused(431, self._too_big_head())
        if self._header_count > self._server.max_headers:
            limit = self._server.max_headers
            message = f"The request has more than {limit} header fields."
            raise _Refused(431, error_body(message, "header_fields_too_large"))
        if name in _SINGLE and name in self._headers:
            message = f"The request has more than one {name.decode()} header."
            raise _Refused(400, error_body(message, "bad_http"))
        self._headers[name] = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm_read_timer(self._server.body_timeout, "body")
        headers = self._headers
        if b"host" not in headers and self._parser.get_http_version() == "1.1":
            raise _Refused(
                400, error_body("An HTTP/1.1 request must carry a host header.", "bad_http")
            )
        coding = headers.get(b"transfer-encoding")
        if coding is not None and coding.strip().lower() != b"chunked":
            shown = coding[:40].decode("latin-1")
            message = f"Transfer-Encoding {shown!r} is not supported; only chunked is."
            raise _Refused(501, error_body(message, "unsupported_transfer_encoding"))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self._server.max_body_bytes:
            self._too_large = True
        expect = headers.get(b"expect", b"").lower() == b"100-continue"
        if expect and self._too_large:
            # Not invited, so the client need not send the body: refuse now, before it does.
            limit = self._server.max_body_bytes
            message = f"The request body is larger than the limit of {limit} bytes."
            raise _Refused(413, error_body(message, "body_too_large"))
        # Not while an earlier response is under way: the interim response would land inside it.
        # A client not invited sends its body after a short wait of its own (RFC 9110, 10.1.1).
        if expect and self._task is None and self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._arm_read_timer(self._server.body_timeout, "body")
        self._body_size += len(body)
        if self._body_size > self._server.max_body_bytes:
            self._too_large = True
            self._body = []
            if self._body_size > self._server.max_body_bytes * _DISCARD_FACTOR:
                self._close()
            return
        if not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._cancel_read_timer()
        self._in_head = True
        self._head_bytes = 0
        url = self._url
        qpos = url.find(b"?")
        if qpos >= 0:
            path, query = url[:qpos].decode("latin-1"), url[qpos + 1 :].decode("latin-1")
        else:
            path, query = url.decode("latin-1"), ""
        body = b"".join(self._body) if not self._too_large else b""
        request = Request(
            self._parser.get_method().decode("ascii", "replace"),
            path,
            query,
            self._headers,
            body,
            self._client,
            self._too_large,
        )
        keep_alive = bool(self._parser.should_keep_alive())
        if self._task is None:
            self._task = self._loop.create_task(self._serve(request, keep_alive))
        else:
            self._pending.append((request, keep_alive))
            if len(self._pending) > 32 and self._transport is not None:
                self._transport.pause_reading()

    # -- serving -----------------------------------------------------------------------------

    async def _serve(self, request: Request, keep_alive: bool) -> None:
        while True:
            keep_alive = await self._serve_one(request, keep_alive)
            if not keep_alive or self.closing:
                self._close()
                self._task = None
                return
            if not self._pending:
                break
            request, keep_alive = self._pending.popleft()
            if self._transport is not None and len(self._pending) <= 8:
                self._transport.resume_reading()
        self._task = None
        if self._rejection is not None:
            self._reject(*self._rejection)
        elif self._server.closing:
            self._close()
        else:
            self._arm_idle_timer()

    async def _serve_one(self, request: Request, keep_alive: bool) -> bool:
        try:
            response = await self._server.handler(request)
        except asyncio.CancelledError:
            raise
        except AbortConnection:
            return False
        except Exception:
            _log.exception("unhandled error in handler", extra={"path": request.path})
            response = Response(
                500,
                b'{"error":{"message":"internal server error","type":"server_error",'
                b'"param":null,"code":null}}',
            )
        keep_alive = keep_alive and not self._server.closing
        transport = self._transport
        if transport is None or transport.is_closing():
            if isinstance(response, StreamResponse):
                await _close_body(response.body)
            return False
        date = self._server.clock.date_header()
        if isinstance(response, Response):
            framing = b"content-length: %d\r\n" % len(response.body)
            transport.write(
                _head(response.status, response.headers, framing, keep_alive, date) + response.body
            )
            return keep_alive
        return await self._stream(response, keep_alive, date)

    async def _stream(self, response: StreamResponse, keep_alive: bool, date: bytes) -> bool:
        transport = self._transport
        assert transport is not None
        head = _head(
            response.status, response.headers, b"transfer-encoding: chunked\r\n", keep_alive, date
        )
        transport.write(head)
        body = response.body
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if transport.is_closing():
                    return False
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if self._paused:
                    self._drain = self._loop.create_future()
                    await self._drain
        except asyncio.CancelledError:
            raise
        except (ConnectionResetError, AbortConnection):
            return False
        except Exception:
            # The status line is gone already: the only honest signal left is a broken stream.
            _log.exception("stream failed after the response started")
            return False
        finally:
            await _close_body(body)
        if transport.is_closing():
            return False
        transport.write(b"0\r\n\r\n")
        return keep_alive

    # -- connection management ----------------------------------------------------------------

    def _reject(self, status: int, body: bytes) -> None:
        if self._task is not None:
            # Requests before the bad one are answered first, in order; then this, then close.
            self._rejection = (status, body)
            return
        if self._transport is not None and not self._transport.is_closing():
            framing = b"content-length: %d\r\ncontent-type: application/json\r\n" % len(body)
            date = self._server.clock.date_header()
            self._transport.write(_head(status, [], framing, False, date) + body)
            if self._transport.can_write_eof():
                # A lingering close: closing with the client's bytes unread would send a reset,
                # which can destroy the refusal before the client reads it. So half-close, drop
                # what still arrives, and close when the client does or a second has passed.
                self._refused = True
                self._cancel_idle_timer()
                self._cancel_read_timer()
                self._transport.write_eof()
                self._idle_timer.arm(1.0)
                return
        self._close()

    def _too_big_head(self) -> bytes:
        limit = self._server.max_head_bytes
        return error_body(
            f"The request head is larger than the limit of {limit} bytes.",
            "header_fields_too_large",
        )

    def _refuse_connection(self) -> None:
        transport = self._transport
        assert transport is not None
        body = error_body("The server has too many open connections; try again.", "overloaded")
        framing = b"content-length: %d\r\ncontent-type: application/json\r\n" % len(body)
        date = self._server.clock.date_header()
        transport.write(_head(503, [(b"retry-after", b"1")], framing, False, date) + body)
        self.closing = True
        transport.close()

    def _arm_read_timer(self, seconds: float, part: str) -> None:
        self._read_part = part
        self._read_timer.arm(seconds)

    def _cancel_read_timer(self) -> None:
        self._read_timer.clear()

    def _read_timed_out(self) -> None:
        message = f"The request {self._read_part} did not arrive in time."
        self._reject(408, error_body(message, "request_timeout"))

    def _close(self) -> None:
        self.closing = True
        self._idle_timer.cancel()
        self._read_timer.cancel()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _arm_idle_timer(self) -> None:
        self._idle_timer.arm(self._server.keepalive_timeout)

    def _cancel_idle_timer(self) -> None:
        self._idle_timer.clear()

    @property
    def busy(self) -> bool:
        return self._task is not None

    def shutdown(self) -> None:
        """Close now if idle; otherwise close after the response in hand."""
        self.closing = True
        if self._task is None:
            self._close()

    def abort(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()


def _connection_cap() -> int:
    """Leave room under the process's descriptor limit for upstream, store and log descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(16, min(10_000, soft * 3 // 4))


class HttpServer:
    """Listens on one address and serves every connection with ``handler``."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int = 1_048_576,
        keepalive_timeout: float = 75.0,
        max_url_bytes: int = 8192,
        max_head_bytes: int = 16384,
        max_headers: int = 100,
        head_timeout: float = 10.0,
        body_timeout: float = 30.0,
        max_connections: int | None = None,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout = keepalive_timeout
        self.max_url_bytes = max_url_bytes
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.max_connections = _connection_cap() if max_connections is None else max_connections
        self.connections: set[HttpProtocol] = set()
        self.clock = _Clock()
        self.closing = False
        self._drained: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop  # bound in start(); protocols exist only after it

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """Bind and start accepting connections."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: HttpProtocol(self),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=2048,
        )

    @property
    def port(self) -> int:
        """The bound port (useful after binding port 0)."""
        assert self._server is not None
        assert self._server.sockets
        sock: Any = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def forget(self, conn: HttpProtocol) -> None:
        """A connection has closed."""
        self.connections.discard(conn)
        if not self.connections and self._drained is not None:
            self._drained.set()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; let in-flight requests and streams finish within ``grace`` seconds."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
