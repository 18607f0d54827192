"""Hostile framings over a raw socket: each gets its exact refusal, and nothing after it on the same
connection is read as a second (smuggled) request."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import orjson
import pytest

from citadel.http.server import HttpServer, Request, Response

# What a smuggled request would look like if the server read past a refusal: a GET to /smuggled.
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nhost: t\r\n\r\n"


async def seen(request: Request) -> Response:
    """Answer with the path served, so a smuggled request would show in the reply."""
    return Response(200, orjson.dumps({"path": request.path, "body": request.body.decode()}))


async def exchange(server: HttpServer, data: bytes, wait: float = 3.0) -> bytes:
    """Send ``data`` then read until the server closes (or ``wait`` seconds pass)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        received = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            received += chunk
        return received
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def statuses(received: bytes) -> list[int]:
    """The status code of every response head in ``received``."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


def serve(data: bytes, **options: object) -> bytes:
    """Run one exchange against a fresh server with ``options``."""

    async def main() -> bytes:
        server = HttpServer(seen, **options)  # type: ignore[arg-type]
        await server.start("127.0.0.1", 0)
        try:
            return await exchange(server, data)
        finally:
            await server.shutdown(1.0)

    return asyncio.run(asyncio.wait_for(main(), 20))


def post(headers: bytes, body: bytes = b"") -> bytes:
    return b"POST /x HTTP/1.1\r\n" + headers + b"\r\n" + body


CASES = {
    "duplicate content-length": (
        post(b"host: t\r\ncontent-length: 3\r\ncontent-length: 3\r\n", b"abc"),
        400,
    ),
    "duplicate differing content-length": (
        post(b"host: t\r\ncontent-length: 3\r\ncontent-length: 5\r\n", b"abc"),
        400,
    ),
    "CL then TE": (
        post(b"host: t\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n", b"0\r\n\r\n"),
        400,
    ),
    "TE then CL": (
        post(b"host: t\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n", b"0\r\n\r\n"),
        400,
    ),
    "chunked, identity": (
        post(b"host: t\r\ntransfer-encoding: chunked, identity\r\n", b"0\r\n\r\n"),
        400,
    ),
    "identity, chunked": (
        post(b"host: t\r\ntransfer-encoding: identity, chunked\r\n", b"0\r\n\r\n"),
        501,
    ),
    "gzip coding": (post(b"host: t\r\ntransfer-encoding: gzip, chunked\r\n", b"0\r\n\r\n"), 501),
    "obs-fold": (post(b"host: t\r\nx-a: 1\r\n folded\r\ncontent-length: 0\r\n"), 400),
    "bare LF": (b"POST /x HTTP/1.1\nhost: t\ncontent-length: 0\n\n", 400),
    "space before colon": (post(b"host: t\r\ncontent-length : 0\r\n"), 400),
    "duplicate host": (b"GET /x HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400),
    "missing host": (b"GET /x HTTP/1.1\r\n\r\n", 400),
    "duplicate authorization": (
        b"GET /x HTTP/1.1\r\nhost: t\r\nauthorization: Bearer a\r\nauthorization: Bearer b\r\n\r\n",
        400,
    ),
    "URL over 8 KiB": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nhost: t\r\n\r\n", 414),
    "head over 16 KiB": (
        b"GET /x HTTP/1.1\r\nhost: t\r\nx-big: " + b"b" * 17000 + b"\r\n\r\n",
        431,
    ),
    "over 100 headers": (
        b"GET /x HTTP/1.1\r\nhost: t\r\n"
        + b"".join(b"x-%d: 1\r\n" % i for i in range(101))
        + b"\r\n",
        431,
    ),
    "100-continue over the limit": (
        post(b"host: t\r\ncontent-length: 2000000\r\nexpect: 100-continue\r\n"),
        413,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusal_is_exact_and_nothing_is_smuggled(case: str) -> None:
    """A hostile request gets exactly one refusal with its status; the GET behind is not served."""
    data, status = CASES[case]
    received = serve(data + SMUGGLED)
    assert [status] == statuses(received), received[:300]
    assert b"/smuggled" not in received
    assert len(received) < 1024  # the refusal never echoes the client's input


def test_100_continue_over_the_limit_is_not_invited() -> None:
    """A body over the limit announced with expect: 100-continue is refused without 100 Continue."""
    received = serve(post(b"host: t\r\ncontent-length: 2000000\r\nexpect: 100-continue\r\n"))
    assert b"100 Continue" not in received


def test_a_64_mb_header_is_refused_after_the_cap_and_quickly() -> None:
    """The head cap counts bytes as they arrive, so a huge header costs the loop almost nothing."""

    async def main() -> tuple[list[int], float]:
        server = HttpServer(seen)
        await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            started = time.monotonic()
            writer.write(b"GET /x HTTP/1.1\r\nhost: t\r\nx-big: ")
            with contextlib.suppress(ConnectionError):
                for _ in range(1024):  # up to 64 MB, stopping when the server closes
                    writer.write(b"b" * 65536)
                    await writer.drain()
            received = await asyncio.wait_for(reader.read(), 5)
            elapsed = time.monotonic() - started
            writer.close()
            return statuses(received), elapsed
        finally:
            await server.shutdown(1.0)

    codes, elapsed = asyncio.run(asyncio.wait_for(main(), 30))
    assert [431] == codes
    assert elapsed < 5.0


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("half a head", b"GET /x HTTP/1.1\r\nhost: t\r\n"),
        ("a body shorter than content-length", post(b"host: t\r\ncontent-length: 10\r\n", b"abc")),
        (
            "a chunked body without its last chunk",
            post(b"host: t\r\ntransfer-encoding: chunked\r\n", b"3\r\nabc\r\n"),
        ),
    ],
)
def test_a_slow_client_gets_408_and_is_closed(name: str, data: bytes) -> None:
    """A head or body that stops arriving ends in 408 and a closed connection in time."""
    started = time.monotonic()
    received = serve(data, head_timeout=0.3, body_timeout=0.3)
    assert ([408], True) == (statuses(received), time.monotonic() - started < 2.5), name


def test_a_well_formed_request_behind_a_good_one_is_still_served() -> None:
    """The caps do not touch an ordinary pipelined pair: both are answered, in order."""
    good = (
        b"GET /a HTTP/1.1\r\nhost: t\r\n\r\nGET /b HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    )
    received = serve(good)
    assert [200, 200] == statuses(received)
    assert received.index(b'"/a"') < received.index(b'"/b"')


def test_past_the_connection_cap_a_new_connection_gets_503() -> None:
    """A worker at its connection cap answers 503 and closes, while held connections stay open."""

    async def main() -> list[int]:
        server = HttpServer(seen, max_connections=2)
        await server.start("127.0.0.1", 0)
        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        try:
            await asyncio.sleep(0.05)  # let the server accept both before the third
            return statuses(await exchange(server, b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n", wait=2))
        finally:
            for _, writer in held:
                writer.close()
            await server.shutdown(1.0)

    assert [503] == asyncio.run(asyncio.wait_for(main(), 20))
