"""The upstream HTTP client against tiny real servers on 127.0.0.1, on asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest
import uvloop

from citadel.http.client import (
    ConnectError,
    ConnectTimeout,
    HttpClient,
    Origin,
    ProtocolError,
    ReadTimeout,
)

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    """Run a test coroutine on a fresh event loop, bounded to 10 seconds."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, 10))

    return runner


@contextlib.asynccontextmanager
async def serve(handler: Handler) -> AsyncIterator[Origin]:
    """A TCP server on an ephemeral port; every connection runs ``handler`` and is then closed."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Origin("http", "127.0.0.1", port)
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (the body framed by content-length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


async def answer_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request on the connection with 200 and ``hello``."""
    while True:
        await read_request(reader)
        writer.write(OK)


async def get(client: HttpClient, origin: Origin, path: str = "/", **timeouts: float) -> Any:
    return await client.request(
        "GET",
        origin,
        path,
        [],
        b"",
        connect_timeout=timeouts.get("connect_timeout", 2.0),
        first_byte_timeout=timeouts.get("first_byte_timeout", 2.0),
    )


def test_origin_parse() -> None:
    """Origins come from URLs with the scheme's default port; anything but http(s) is refused."""
    assert Origin("http", "localhost", 8000) == Origin.parse("http://localhost:8000/v1")
    assert Origin("https", "api.example", 443) == Origin.parse("https://API.example")
    assert Origin("http", "::1", 80) == Origin.parse("http://[::1]")
    with pytest.raises(ValueError, match="ftp://x"):
        Origin.parse("ftp://x")


def test_content_length_body(run: Run[None]) -> None:
    """A POST carries host and content-length; a content-length response body is read whole."""
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n")
        writer.write(b"X-Multi: a\r\nX-Multi: b\r\n\r\nhello")
        await reader.read()

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            headers = [(b"content-type", b"application/json"), (b"Host", b"ignored")]
            resp = await client.request(
                "POST", origin, "/v1/x?y=1", headers, b'{"a":1}', connect_timeout=2,
                first_byte_timeout=2,
            )  # fmt: skip
            assert 201 == resp.status
            assert b"text/plain" == resp.header(b"Content-Type")
            assert [b"a", b"b"] == [v for k, v in resp.headers if k == b"x-multi"]
            assert resp.header(b"x-missing") is None
            assert b"hello" == await resp.read()
            assert b"hello" == await resp.read()
            await client.aclose()
        head, body = seen[0]
        assert head.startswith(b"POST /v1/x?y=1 HTTP/1.1\r\n")
        assert f"host: 127.0.0.1:{origin.port}\r\n".encode() in head
        assert b"content-length: 7\r\n" in head
        assert b"Host: ignored" not in head
        assert b'{"a":1}' == body

    run(main())


def test_chunked_body_streams_chunk_by_chunk(run: Run[None]) -> None:
    """Chunks reach the reader as they arrive, before the server has finished the response."""
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n")
        await go_on.wait()
        writer.write(b"9\r\ndata: 2\n\n\r\n0\r\n\r\n")
        await reader.read()

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            chunks = []
            async with await get(client, origin) as resp:
                async for chunk in resp:
                    chunks.append(chunk)
                    go_on.set()
            assert [b"data: 1\n\n", b"data: 2\n\n"] == chunks
            assert {"open": 1, "idle": 1, "created": 1} == client.stats()
            await client.aclose()
            assert {"open": 0, "idle": 0, "created": 1} == client.stats()

    run(main())


def test_body_until_close(run: Run[None]) -> None:
    """A body with neither length nor chunking ends at EOF, and its connection is not pooled."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            assert b"part one, part two" == await (await get(client, origin)).read()
            assert 0 == client.stats()["idle"]
            await client.aclose()

    run(main())


def test_keepalive_reuses_one_connection(run: Run[None]) -> None:
    """Sequential requests to one origin share one keep-alive connection."""

    async def main() -> None:
        async with serve(answer_forever) as origin:
            client = HttpClient()
            for _ in range(5):
                assert b"hello" == await (await get(client, origin)).read()
            assert {"open": 1, "idle": 1, "created": 1} == client.stats()
            await client.aclose()

    run(main())


def test_connection_close_and_expiry_are_not_reused(run: Run[None]) -> None:
    """A ``connection: close`` response, or an idle connection past its expiry, is not reused."""

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await reader.read()

    async def main() -> None:
        async with serve(closing) as origin:
            client = HttpClient()
            for _ in range(2):
                assert b"ok" == await (await get(client, origin)).read()
            assert 2 == client.stats()["created"]
            await client.aclose()
        async with serve(answer_forever) as origin:
            client = HttpClient(keepalive_expiry=0.0)
            for _ in range(2):
                assert b"hello" == await (await get(client, origin)).read()
            assert 2 == client.stats()["created"]
            await client.aclose()

    run(main())


def test_pool_limit_waits_for_a_free_connection(run: Run[None]) -> None:
    """At the per-origin limit a request waits for a connection, or fails after connect_timeout."""
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
            await gate.wait()
            writer.write(b"hello")

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient(max_connections_per_origin=1)
            first = await get(client, origin)
            with pytest.raises(ConnectTimeout, match="max_connections_per_origin=1"):
                await get(client, origin, connect_timeout=0.05)
            second = asyncio.create_task(get(client, origin))
            done, _ = await asyncio.wait({second}, timeout=0.05)
            assert not done
            gate.set()
            assert b"hello" == await first.read()
            assert b"hello" == await (await second).read()
            assert 1 == client.stats()["created"]
            await client.aclose()

    run(main())


def test_connect_refused(run: Run[None]) -> None:
    """A refused connection raises ConnectError naming the origin."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        client = HttpClient()
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}") as info:
            await get(client, Origin("http", "127.0.0.1", port))
        assert not isinstance(info.value, ConnectTimeout)
        assert {"open": 0, "idle": 0, "created": 0} == client.stats()

    run(main())


def test_silent_server_times_out(run: Run[None]) -> None:
    """No response head within first_byte_timeout raises ReadTimeout on time."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            start = time.monotonic()
            with pytest.raises(ReadTimeout, match=r"no response within 0\.2s"):
                await get(client, origin, first_byte_timeout=0.2)
            assert 0.19 <= time.monotonic() - start < 1.0
            await client.aclose()
            assert 0 == client.stats()["open"]

    run(main())


def test_stalled_body_times_out(run: Run[None]) -> None:
    """A body that stops arriving for first_byte_timeout raises ReadTimeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhel")
        await reader.read()

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            resp = await get(client, origin, first_byte_timeout=0.2)
            with pytest.raises(ReadTimeout, match="stalled"):
                await resp.read()
            await client.aclose()

    run(main())


def test_close_mid_body_is_a_protocol_error(run: Run[None]) -> None:
    """A connection closed before the announced body ends raises ProtocolError, read or streamed."""

    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")

    async def main() -> None:
        client = HttpClient()
        async with serve(short) as origin:
            with pytest.raises(ProtocolError, match="inside the response body"):
                await (await get(client, origin)).read()
        async with serve(chunked) as origin:
            resp = await get(client, origin)
            assert b"abc" == await resp.__anext__()
            with pytest.raises(ProtocolError, match="inside the response body"):
                await resp.__anext__()
        await client.aclose()

    run(main())


def test_malformed_response_is_a_protocol_error(run: Run[None]) -> None:
    """Bytes that are not an HTTP response raise ProtocolError."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTXP/9.9 two hundred\r\n\r\n")
        await reader.read()

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            with pytest.raises(ProtocolError, match="malformed response"):
                await get(client, origin)
            await client.aclose()

    run(main())


def test_aclose_mid_stream_closes_the_socket(run: Run[None]) -> None:
    """Abandoning a half-read stream closes the TCP connection, so the upstream sees EOF."""
    eof: list[asyncio.Future[bool]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        try:
            data = await reader.read()
        except ConnectionResetError:
            data = b""
        eof[0].set_result(data == b"")

    async def main() -> None:
        eof.append(asyncio.get_running_loop().create_future())
        async with serve(handler) as origin:
            client = HttpClient()
            resp = await get(client, origin)
            assert b"first" == await resp.__anext__()
            await resp.aclose()
            await resp.aclose()
            assert await eof[0]
            assert {"open": 0, "idle": 0, "created": 1} == client.stats()
            await client.aclose()

    run(main())


def test_cancelled_read_closes_the_connection(run: Run[None]) -> None:
    """A read cancelled by the caller's own deadline closes the connection; nothing is pooled."""
    eof: list[asyncio.Future[None]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhel")
        with contextlib.suppress(ConnectionResetError):
            await reader.read()
        eof[0].set_result(None)

    async def main() -> None:
        eof.append(asyncio.get_running_loop().create_future())
        async with serve(handler) as origin:
            client = HttpClient()
            resp = await get(client, origin)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await resp.read()
            await eof[0]
            await resp.aclose()
            assert {"open": 0, "idle": 0, "created": 1} == client.stats()
            await client.aclose()

    run(main())


def test_large_request_body(run: Run[None]) -> None:
    """A request body too big to copy into the head arrives intact."""
    body = bytes(range(256)) * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, received = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(received), received))
        await reader.read()

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            resp = await client.request(
                "PUT", origin, "/", [], body, connect_timeout=2, first_byte_timeout=2
            )
            assert body == await resp.read()
            await client.aclose()

    run(main())


def test_stale_idle_connection_is_retried_once(run: Run[None]) -> None:
    """A reused connection the server closed before answering is replaced, transparently."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(OK)
        if connections == 1:  # the second request finds the keep-alive connection gone
            await read_request(reader)
            return
        await answer_forever(reader, writer)

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            for _ in range(3):
                resp = await client.request(
                    "POST", origin, "/", [], b"{}", connect_timeout=2, first_byte_timeout=2
                )
                assert b"hello" == await resp.read()
            assert 2 == client.stats()["created"]
            await client.aclose()

    run(main())


def test_fresh_connection_closed_without_answer_is_not_retried(run: Run[None]) -> None:
    """A new connection closed before any response raises ProtocolError instead of retrying."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            with pytest.raises(ProtocolError, match="without a response"):
                await get(client, origin)
            assert 1 == connections
            await client.aclose()

    run(main())


def test_streaming_applies_back_pressure(run: Run[None]) -> None:
    """An unread stream stops reading from the socket, so a big body waits on the server's side."""
    size = 32 << 20
    drained = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()
        drained.set()
        await reader.read()

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            resp = await get(client, origin)
            total = len(await resp.__anext__())
            done, _ = await asyncio.wait({asyncio.create_task(drained.wait())}, timeout=0.2)
            assert not done
            async for chunk in resp:
                total += len(chunk)
            assert size == total
            assert drained.is_set()
            await client.aclose()

    run(main())


def test_concurrent_requests(run: Run[None]) -> None:
    """Fifty concurrent requests each get their own answer."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            path = head.split(b" ")[1]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(path), path))

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()

            async def one(i: int) -> bytes:
                async with await get(client, origin, f"/{i}") as resp:
                    return await resp.read()  # type: ignore[no-any-return]

            bodies = await asyncio.gather(*(one(i) for i in range(50)))
            assert [f"/{i}".encode() for i in range(50)] == bodies
            stats = client.stats()
            assert stats["created"] <= 50
            assert stats["open"] == stats["idle"]
            await client.aclose()

    run(main())


def test_head_and_no_content_responses(run: Run[None]) -> None:
    """HEAD and 204 responses have no body; a 100 Continue before the answer is skipped."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n")
            elif head.startswith(b"GET /204"):
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
            else:
                writer.write(OK)

    async def main() -> None:
        async with serve(handler) as origin:
            client = HttpClient()
            head = await client.request(
                "HEAD", origin, "/", [], b"", connect_timeout=2, first_byte_timeout=2
            )
            assert (200, b"42") == (head.status, head.header(b"content-length"))
            assert b"" == await head.read()
            assert 0 == client.stats()["idle"]  # a HEAD response's connection is not reused
            no_content = await get(client, origin, "/204")
            assert (204, b"") == (no_content.status, await no_content.read())
            assert b"hello" == await (await get(client, origin)).read()
            assert {"open": 1, "idle": 1, "created": 2} == client.stats()
            await client.aclose()

    run(main())


def test_connections_use_tcp_nodelay(run: Run[None]) -> None:
    """Upstream sockets have Nagle's algorithm off."""

    async def main() -> None:
        async with serve(answer_forever) as origin:
            client = HttpClient()
            await (await get(client, origin)).read()
            (conn,) = client._conns
            sock = conn._transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await client.aclose()

    run(main())
