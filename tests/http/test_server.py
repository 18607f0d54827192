"""The HTTP/1.1 server in-process, on asyncio's loop and uvloop, spoken to in literal bytes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import orjson
import pytest
import uvloop

from citadel.http.server import (
    AbortConnection,
    HttpServer,
    Request,
    Response,
    StreamResponse,
)

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
Handler = Callable[[Request], Awaitable[Response | StreamResponse]]

GET = b"GET /%s HTTP/1.1\r\nhost: test\r\n\r\n"
HEAD_END = b"\r\n\r\n"


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run[Any]:
    """Run a test coroutine on a fresh event loop, bounded to 10 seconds."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else None

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, 10))

    return runner


@contextlib.asynccontextmanager
async def serving(handler: Handler, **options: Any) -> AsyncIterator[HttpServer]:
    """An HttpServer on an ephemeral port of 127.0.0.1, shut down on exit."""
    server = HttpServer(handler, **options)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.shutdown(1.0)


@contextlib.asynccontextmanager
async def connect(
    server: HttpServer,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw client connection to ``server``, closed on exit."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def echo(request: Request) -> Response:
    """Answer with the method, path, body and body_too_large flag of the request."""
    body = orjson.dumps(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "body": request.body.decode(),
            "too_large": request.body_too_large,
        }
    )
    return Response(200, body)


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    """The status and the (lower-cased) headers of one response head."""
    head = await reader.readuntil(HEAD_END)
    lines = head[: -len(HEAD_END)].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body (b"" for the terminating chunk, trailers not expected)."""
    size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
    data = await reader.readexactly(size + 2)
    assert b"\r\n" == data[-2:]
    return data[:-2]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """One whole response, its body framed by content-length or chunked encoding."""
    status, headers = await read_head(reader)
    if headers.get(b"transfer-encoding") == b"chunked":
        chunks = []
        while chunk := await read_chunk(reader):
            chunks.append(chunk)
        return status, headers, b"".join(chunks)
    return status, headers, await reader.readexactly(int(headers[b"content-length"]))


async def read_json(reader: asyncio.StreamReader) -> Any:
    """The JSON body of one 200 response."""
    status, _, body = await read_response(reader)
    assert 200 == status
    return orjson.loads(body)


async def at_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded to 2 seconds)."""
    return await asyncio.wait_for(reader.read(), 2)


def test_keep_alive_serves_two_requests_on_one_connection(run: Run[None]) -> None:
    """Two requests one after the other on one connection are both answered."""

    async def main() -> None:
        async with serving(echo) as server, connect(server) as (reader, writer):
            writer.write(GET % b"one")
            first = await read_json(reader)
            writer.write(GET % b"two?x=1")
            second = await read_json(reader)
        assert ("/one", "/two", "x=1") == (first["path"], second["path"], second["query"])

    run(main())


def test_pipelined_requests_are_answered_in_order(run: Run[None]) -> None:
    """Requests sent together are answered in the order sent, even when the first is slow."""

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            await asyncio.sleep(0.05)
        return Response(200, request.path.encode(), content_type=b"text/plain")

    async def main() -> None:
        async with serving(handler) as server, connect(server) as (reader, writer):
            writer.write(b"".join(GET % name for name in (b"slow", b"a", b"b", b"c")))
            bodies = [(await read_response(reader))[2] for _ in range(4)]
        assert [b"/slow", b"/a", b"/b", b"/c"] == bodies

    run(main())


def test_stream_arrives_chunk_by_chunk(run: Run[None]) -> None:
    """A stream's first chunk reaches the client before the handler produces the second."""
    second_allowed = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: one\n\n"
        await second_allowed.wait()
        yield b"data: two\n\n"

    async def handler(request: Request) -> StreamResponse:
        return StreamResponse(chunks())

    async def main() -> None:
        async with serving(handler) as server, connect(server) as (reader, writer):
            writer.write(GET % b"stream")
            status, headers = await read_head(reader)
            first = await read_chunk(reader)
            second_allowed.set()
            rest = [await read_chunk(reader), await read_chunk(reader)]
        assert (200, b"chunked", b"text/event-stream") == (
            status,
            headers[b"transfer-encoding"],
            headers[b"content-type"],
        )
        assert [b"data: one\n\n", b"data: two\n\n", b""] == [first, *rest]

    run(main())


def test_content_length_body_is_read(run: Run[None]) -> None:
    """A body framed by content-length reaches the handler whole."""

    async def main() -> None:
        async with serving(echo) as server, connect(server) as (reader, writer):
            writer.write(b"POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: 11\r\n\r\nhello")
            await asyncio.sleep(0)
            writer.write(b" world")
            seen = await read_json(reader)
        assert ("POST", "hello world", False) == (seen["method"], seen["body"], seen["too_large"])

    run(main())


def test_chunked_request_body_is_read(run: Run[None]) -> None:
    """A body sent with chunked transfer-encoding reaches the handler joined."""

    async def main() -> None:
        async with serving(echo) as server, connect(server) as (reader, writer):
            writer.write(
                b"POST /p HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            )
            seen = await read_json(reader)
        assert "hello world" == seen["body"]

    run(main())


def test_body_over_the_limit_is_flagged_and_the_connection_kept(run: Run[None]) -> None:
    """A body over the limit is dropped and flagged body_too_large; the next request works."""

    async def main() -> None:
        async with (
            serving(echo, max_body_bytes=10) as server,
            connect(server) as (reader, writer),
        ):
            writer.write(b"POST /big HTTP/1.1\r\nhost: t\r\ncontent-length: 20\r\n\r\n" + b"x" * 20)
            by_length = await read_json(reader)
            writer.write(
                b"POST /big HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                b"8\r\nxxxxxxxx\r\n8\r\nxxxxxxxx\r\n0\r\n\r\n"
            )
            by_chunks = await read_json(reader)
            writer.write(b"POST /small HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nok")
            small = await read_json(reader)
        assert (True, "") == (by_length["too_large"], by_length["body"])
        assert (True, "") == (by_chunks["too_large"], by_chunks["body"])
        assert (False, "ok") == (small["too_large"], small["body"])

    run(main())


def test_body_far_over_the_limit_closes_the_connection(run: Run[None]) -> None:
    """A client that keeps sending far past the limit is disconnected rather than read forever."""

    async def main() -> None:
        async with (
            serving(echo, max_body_bytes=10) as server,
            connect(server) as (reader, writer),
        ):
            writer.write(b"POST /big HTTP/1.1\r\nhost: t\r\ncontent-length: 100000\r\n\r\n")
            writer.write(b"x" * 1000)
            assert b"" == await at_eof(reader)

    run(main())


def test_expect_100_continue_gets_the_interim_response(run: Run[None]) -> None:
    """A request with Expect: 100-continue gets 100 Continue before it sends its body."""

    async def main() -> None:
        async with serving(echo) as server, connect(server) as (reader, writer):
            writer.write(
                b"POST /p HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n"
            )
            interim = await asyncio.wait_for(reader.readuntil(HEAD_END), 2)
            writer.write(b"hello")
            seen = await read_json(reader)
        assert b"HTTP/1.1 100 Continue\r\n\r\n" == interim
        assert "hello" == seen["body"]

    run(main())


def test_expect_100_continue_behind_a_response_in_progress_is_not_interleaved(
    run: Run[None],
) -> None:
    """A pipelined Expect: 100-continue gets no interim response inside the response before it."""
    second_allowed = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"one"
        await second_allowed.wait()
        yield b"two"

    async def handler(request: Request) -> Response | StreamResponse:
        if request.path == "/stream":
            return StreamResponse(chunks())
        return await echo(request)

    async def main() -> None:
        async with serving(handler) as server, connect(server) as (reader, writer):
            writer.write(
                GET % b"stream" + b"POST /p HTTP/1.1\r\nhost: t\r\nexpect: 100-continue\r\n"
                b"content-length: 2\r\n\r\n"
            )
            status, _ = await read_head(reader)
            first = await read_chunk(reader)
            second_allowed.set()
            rest = [await read_chunk(reader), await read_chunk(reader)]
            writer.write(b"ok")
            seen = await read_json(reader)
        assert (200, [b"one", b"two", b""]) == (status, [first, *rest])
        assert "ok" == seen["body"]

    run(main())


def test_malformed_request_line_gets_400_and_the_connection_closes(run: Run[None]) -> None:
    """A request line that is not HTTP is answered 400 with a JSON error, then the server closes."""

    async def main() -> None:
        async with serving(echo) as server, connect(server) as (reader, writer):
            writer.write(b"NOT AN HTTP REQUEST\r\n\r\n")
            status, headers, body = await read_response(reader)
            rest = await at_eof(reader)
        assert (400, b"close", b"") == (status, headers[b"connection"], rest)
        assert "bad_http" == orjson.loads(body)["error"]["code"]

    run(main())


def test_malformed_request_behind_good_ones_is_answered_after_them(run: Run[None]) -> None:
    """Pipelined good requests before a malformed one are answered first, in order, then 400."""

    async def handler(request: Request) -> Response:
        if request.path == "/slow":
            await asyncio.sleep(0.05)
        return Response(200, request.path.encode(), content_type=b"text/plain")

    async def main() -> None:
        async with serving(handler) as server, connect(server) as (reader, writer):
            writer.write(GET % b"slow" + GET % b"next" + b"NOT AN HTTP REQUEST\r\n\r\n")
            answers = [await read_response(reader) for _ in range(3)]
            rest = await at_eof(reader)
        assert [(200, b"/slow"), (200, b"/next"), (400, b"close")] == [
            (status, body if status == 200 else headers[b"connection"])
            for status, headers, body in answers
        ]
        assert b"" == rest

    run(main())


def test_connection_close_is_honoured(run: Run[None]) -> None:
    """A request with Connection: close is answered saying so, then the server closes."""

    async def main() -> None:
        async with serving(echo) as server, connect(server) as (reader, writer):
            writer.write(b"GET /x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            status, headers, _ = await read_response(reader)
            rest = await at_eof(reader)
        assert (200, b"close", b"") == (status, headers[b"connection"], rest)

    run(main())


def test_http_1_0_without_keep_alive_closes(run: Run[None]) -> None:
    """An HTTP/1.0 request without keep-alive is answered, then the server closes."""

    async def main() -> None:
        async with serving(echo) as server, connect(server) as (reader, writer):
            writer.write(b"GET /old HTTP/1.0\r\n\r\n")
            seen = await read_json(reader)
            rest = await at_eof(reader)
        assert ("/old", b"") == (seen["path"], rest)

    run(main())


def test_client_closing_before_the_answer_cancels_the_handler(run: Run[None]) -> None:
    """A client that closes while the handler still waits (nothing written yet) cancels it."""
    seen: list[str] = []
    started = asyncio.Event()
    ended = asyncio.Event()

    async def handler(request: Request) -> Response:
        started.set()
        try:
            await asyncio.Event().wait()  # an upstream that never answers
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            ended.set()
        return Response(200)  # pragma: no cover - never reached

    async def main() -> None:
        async with serving(handler) as server:
            async with connect(server) as (_, writer):
                writer.write(GET % b"x")
                await asyncio.wait_for(started.wait(), 2)
            await asyncio.wait_for(ended.wait(), 2)
        assert ["cancelled"] == seen

    run(main())


def test_client_disconnect_mid_stream_cancels_the_handler(run: Run[None]) -> None:
    """When the client goes away mid-stream, the stream body is interrupted where it waits."""
    seen: list[str] = []
    ended = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        try:
            yield b"first"
            await asyncio.Event().wait()  # never set: only a cancellation gets us out
            yield b"never"
        except (asyncio.CancelledError, GeneratorExit) as exc:
            seen.append(type(exc).__name__)
            raise
        finally:
            ended.set()

    async def handler(request: Request) -> StreamResponse:
        return StreamResponse(chunks())

    async def main() -> None:
        async with serving(handler) as server:
            async with connect(server) as (reader, writer):
                writer.write(GET % b"stream")
                await read_head(reader)
                assert b"first" == await read_chunk(reader)
            await asyncio.wait_for(ended.wait(), 2)
        assert ["CancelledError"] == seen

    run(main())


def test_abort_connection_mid_stream_cuts_the_body(run: Run[None]) -> None:
    """AbortConnection raised by a stream closes the connection without the terminating chunk."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        raise AbortConnection

    async def handler(request: Request) -> StreamResponse:
        return StreamResponse(chunks())

    async def main() -> None:
        async with serving(handler) as server, connect(server) as (reader, writer):
            writer.write(GET % b"stream")
            await read_head(reader)
            rest = await at_eof(reader)
        assert b"5\r\nfirst\r\n" == rest

    run(main())


def test_stream_failing_mid_way_is_cut_and_the_server_goes_on(run: Run[None]) -> None:
    """A stream body that raises after the head is sent ends the connection without a 0-chunk."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        raise RuntimeError("upstream broke")

    async def handler(request: Request) -> Response | StreamResponse:
        if request.path == "/stream":
            return StreamResponse(chunks())
        return await echo(request)

    async def main() -> None:
        async with serving(handler) as server:
            async with connect(server) as (reader, writer):
                writer.write(GET % b"stream")
                await read_head(reader)
                cut = await at_eof(reader)
            async with connect(server) as (reader, writer):
                writer.write(GET % b"after")
                after = await read_json(reader)
        assert (b"5\r\nfirst\r\n", "/after") == (cut, after["path"])

    run(main())


def test_abort_connection_from_a_handler_closes_without_a_response(run: Run[None]) -> None:
    """AbortConnection raised by a handler closes the connection with no response at all."""

    async def handler(request: Request) -> Response:
        raise AbortConnection

    async def main() -> None:
        async with serving(handler) as server, connect(server) as (reader, writer):
            writer.write(GET % b"x")
            assert b"" == await at_eof(reader)

    run(main())


def test_idle_keep_alive_connection_is_closed(run: Run[None]) -> None:
    """A keep-alive connection idle for keepalive_timeout is closed, one never used too."""

    async def main() -> None:
        async with serving(echo, keepalive_timeout=0.2) as server:
            async with connect(server) as (reader, writer):
                writer.write(GET % b"x")
                await read_json(reader)
                started = time.monotonic()
                assert b"" == await at_eof(reader)
                idle = time.monotonic() - started
            async with connect(server) as (reader, _):
                assert b"" == await at_eof(reader)
        assert 0.1 < idle < 1.5

    run(main())


def test_graceful_shutdown_finishes_the_stream_in_flight(run: Run[None]) -> None:
    """Shutdown refuses new connections, lets a stream in flight finish whole, then returns."""
    second_allowed = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"one"
        await second_allowed.wait()
        yield b"two"

    async def handler(request: Request) -> StreamResponse:
        return StreamResponse(chunks())

    async def main() -> None:
        server = HttpServer(handler)
        await server.start("127.0.0.1", 0)
        port = server.port
        async with connect(server) as (reader, writer):
            writer.write(GET % b"stream")
            await read_head(reader)
            first = await read_chunk(reader)
            stopping = asyncio.create_task(server.shutdown(5.0))
            await asyncio.sleep(0)  # the shutdown task's first step stops listening
            assert server.closing
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
            assert not stopping.done()
            second_allowed.set()
            rest = [await read_chunk(reader), await read_chunk(reader)]
            after = await at_eof(reader)
            await asyncio.wait_for(stopping, 2)
        assert [b"one", b"two", b"", b""] == [first, *rest, after]

    run(main())


def test_shutdown_grace_aborts_a_never_ending_stream(run: Run[None]) -> None:
    """A stream still running when the grace period ends is cancelled and cut off."""
    seen: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"tick"
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def handler(request: Request) -> StreamResponse:
        return StreamResponse(chunks())

    async def main() -> None:
        server = HttpServer(handler)
        await server.start("127.0.0.1", 0)
        async with connect(server) as (reader, writer):
            writer.write(GET % b"stream")
            await read_head(reader)
            await read_chunk(reader)
            started = time.monotonic()
            await asyncio.wait_for(server.shutdown(0.2), 2)
            took = time.monotonic() - started
            rest = await at_eof(reader)
        assert 0.15 < took < 1.5
        assert not rest.endswith(b"0\r\n\r\n")
        assert ["cancelled"] == seen

    run(main())


def test_unexpected_handler_error_is_a_500_and_the_server_goes_on(run: Run[None]) -> None:
    """A handler that raises gets a 500 with a JSON error body; the connection and server go on."""

    async def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("boom")
        return await echo(request)

    async def main() -> None:
        async with serving(handler) as server:
            async with connect(server) as (reader, writer):
                writer.write(GET % b"boom")
                status, headers, body = await read_response(reader)
                writer.write(GET % b"after")
                same_connection = await read_json(reader)
            async with connect(server) as (reader, writer):
                writer.write(GET % b"again")
                new_connection = await read_json(reader)
        assert (500, b"application/json") == (status, headers[b"content-type"])
        assert "server_error" == orjson.loads(body)["error"]["type"]
        assert ("/after", "/again") == (same_connection["path"], new_connection["path"])

    run(main())


def test_a_moved_deadline_fires_once_at_its_latest_time_and_a_cleared_one_never() -> None:
    """The connection timeouts' ``_Deadline``: re-armed later it fires at the later time, not
    at the first; cleared it does not fire; re-armed earlier it fires at the earlier time."""
    from citadel.http.server import _Deadline

    async def body() -> tuple[list[float], list[float], list[float]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        moved: list[float] = []
        moving = _Deadline(loop, lambda: moved.append(loop.time() - start))
        moving.arm(0.05)
        for _ in range(5):  # a request's worth of re-arming, each pushing it later
            await asyncio.sleep(0.02)
            moving.arm(0.1)
        cleared: list[float] = []
        clearing = _Deadline(loop, lambda: cleared.append(loop.time() - start))
        clearing.arm(0.03)
        clearing.clear()
        earlier: list[float] = []
        sooner = _Deadline(loop, lambda: earlier.append(loop.time() - start))
        sooner.arm(5.0)
        sooner.arm(0.02)
        await asyncio.sleep(0.35)
        return moved, cleared, earlier

    moved, cleared, earlier = uvloop.run(body())
    assert len(moved) == 1
    assert moved[0] >= 0.2 - 0.005  # not at the first deadline (0.05 s), nor early
    assert cleared == []
    assert len(earlier) == 1
    assert earlier[0] < 1.0  # not at the first, later deadline (5 s)
