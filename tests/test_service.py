"""The service App in-process and over a real server, and ``serve`` with forked workers."""

from __future__ import annotations

import asyncio
import http.client
import re
import signal
import sys
import textwrap
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from citadel.errors import BadRequest
from citadel.http.server import HttpServer, Request, Response
from citadel.service import App, DependencyHealth, HealthCheck, Status

from support import free_port, process_output, start_process, stop_process

T = TypeVar("T")
HEX_ID = re.compile(r"[0-9a-f]{24}\Z")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test coroutine on a fresh event loop, bounded to 10 seconds."""
    return asyncio.run(asyncio.wait_for(coro, 10))


def request(
    method: str = "GET",
    path: str = "/hello",
    headers: dict[bytes, bytes] | None = None,
    body: bytes = b"",
    body_too_large: bool = False,
) -> Request:
    """A parsed request, as the server would hand it over."""
    return Request(method, path, "", headers or {}, body, "127.0.0.1:1", body_too_large)


async def hello(request: Request) -> Response:
    return Response(200, b'{"hello":"world"}')


def make_app() -> App:
    """An app with a plain route, a prefix route and a route that raises an API error."""
    app = App(name="test", max_body_bytes=100)
    app.route("GET", "/hello", hello)

    async def item(request: Request) -> Response:
        return Response(200, orjson.dumps({"item": request.path.rsplit("/", 1)[-1]}))

    async def bad(request: Request) -> Response:
        raise BadRequest("Field 'x' is required.", param="x", code="missing_field")

    app.route_prefix("GET", "/items/", item)
    app.route_prefix("DELETE", "/items/", item)
    app.route("POST", "/bad", bad)
    return app


async def call(app: App, req: Request) -> tuple[int, dict[bytes, bytes], Any]:
    """Status, headers and the decoded JSON body of the app's (whole) response."""
    response = await app(req)
    assert isinstance(response, Response)
    body = orjson.loads(response.body) if response.body else None
    return response.status, dict(response.headers), body


def header(app: App, req: Request, name: bytes) -> bytes:
    """One header of the app's response to ``req``."""
    return run(call(app, req))[1][name]


def test_request_id_is_echoed_when_given() -> None:
    """A well-formed x-request-id is sent back as it came and set on the request."""
    req = request(headers={b"x-request-id": b"client-id-123"})
    echoed = header(make_app(), req, b"x-request-id")
    assert (b"client-id-123", "client-id-123") == (echoed, req.request_id)


def test_request_id_is_generated_when_absent() -> None:
    """Without x-request-id the app makes one of 24 hex digits, fresh for every request."""
    app = make_app()
    first = header(app, request(), b"x-request-id").decode()
    second = header(app, request(), b"x-request-id").decode()
    assert (True, True, True) == (
        bool(HEX_ID.match(first)),
        bool(HEX_ID.match(second)),
        first != second,
    )


@pytest.mark.parametrize(
    "given",
    [b"x" * 129, b"has space", b"tab\there", b"caf\xc3\xa9", b""],
    ids=["too-long", "space", "control", "non-ascii", "empty"],
)
def test_invalid_request_id_is_replaced(given: bytes) -> None:
    """An x-request-id too long or with characters outside visible ASCII is replaced."""
    echoed = header(make_app(), request(headers={b"x-request-id": given}), b"x-request-id")
    assert HEX_ID.match(echoed.decode()) is not None


def test_unknown_path_is_404_with_an_openai_error_body() -> None:
    """An unknown path gets 404 and the OpenAI error shape."""
    status, _, body = run(call(make_app(), request(path="/nope")))
    expected = {
        "error": {
            "message": "Unknown path /nope.",
            "type": "not_found_error",
            "param": None,
            "code": "unknown_url",
        }
    }
    assert (404, expected) == (status, body)


def test_api_error_from_a_route_keeps_its_status_and_fields() -> None:
    """An ApiError raised by a route becomes its status and OpenAI-style body."""
    status, _, body = run(call(make_app(), request("POST", "/bad")))
    expected = {
        "error": {
            "message": "Field 'x' is required.",
            "type": "invalid_request_error",
            "param": "x",
            "code": "missing_field",
        }
    }
    assert (400, expected) == (status, body)


def test_wrong_method_is_405_naming_the_allowed_ones() -> None:
    """A known path with another method gets 405 and an Allow header."""
    status, headers, body = run(call(make_app(), request("POST", "/hello")))
    assert (405, b"GET", "method_not_allowed") == (
        status,
        headers[b"allow"],
        body["error"]["code"],
    )


def test_body_too_large_is_413() -> None:
    """A request the server flagged body_too_large gets 413 before reaching the route."""
    status, _, body = run(call(make_app(), request(body_too_large=True)))
    assert (413, "request_too_large") == (status, body["error"]["code"])


def test_unexpected_error_is_a_500_with_the_request_id() -> None:
    """A route that raises a non-API error gets an OpenAI-style 500 carrying the request id."""
    app = make_app()

    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    app.route("GET", "/broken", broken)
    status, headers, body = run(
        call(app, request(path="/broken", headers={b"x-request-id": b"r-1"}))
    )
    assert (500, b"r-1", "server_error") == (
        status,
        headers[b"x-request-id"],
        body["error"]["type"],
    )


def test_route_prefix_matches_paths_under_it() -> None:
    """A prefix route serves every path under the prefix, by method."""
    app = make_app()
    got = run(call(app, request(path="/items/abc")))
    deleted = run(call(app, request("DELETE", "/items/xyz")))
    wrong = run(call(app, request("POST", "/items/abc")))
    outside = run(call(app, request(path="/itemsabc")))
    assert (200, {"item": "abc"}) == (got[0], got[2])
    assert (200, {"item": "xyz"}) == (deleted[0], deleted[2])
    assert (405, 404) == (wrong[0], outside[0])


def check(status: Status, critical: bool = False) -> HealthCheck:
    """A health check that reports ``status``."""

    async def report() -> DependencyHealth:
        return DependencyHealth(status, "detail", critical)

    return report


def health(app: App) -> tuple[int, Any]:
    """Status and body of GET /health."""
    status, _, body = run(call(app, request(path="/health")))
    return status, body


def test_health_all_ok() -> None:
    """Every dependency ok: status ok, 200, with each dependency listed."""
    app = make_app()
    app.health_check("db", check("ok", critical=True))
    app.health_check("cache", check("ok"))
    status, body = health(app)
    assert (200, "ok", "test") == (status, body["status"], body["service"])
    assert {
        "db": {"status": "ok", "detail": "detail"},
        "cache": {"status": "ok", "detail": "detail"},
    } == body["dependencies"]


def test_health_non_critical_down_is_degraded() -> None:
    """A non-critical dependency down makes the service degraded, still 200."""
    app = make_app()
    app.health_check("db", check("ok", critical=True))
    app.health_check("cache", check("down"))
    status, body = health(app)
    assert (200, "degraded") == (status, body["status"])


def test_health_critical_down_is_503() -> None:
    """A critical dependency down makes the service down, 503, whatever the order of checks."""
    app = make_app()
    app.health_check("cache", check("degraded"))
    app.health_check("db", check("down", critical=True))
    app.health_check("queue", check("down"))
    status, body = health(app)
    assert (503, "down") == (status, body["status"])


def test_health_check_that_raises_is_down() -> None:
    """A check that raises is reported down with the exception named."""
    app = make_app()

    async def broken() -> DependencyHealth:
        raise ConnectionRefusedError("no route")

    app.health_check("db", broken)
    status, body = health(app)
    assert (200, "degraded", {"status": "down", "detail": "ConnectionRefusedError: no route"}) == (
        status,
        body["status"],
        body["dependencies"]["db"],
    )


def test_health_check_that_hangs_is_down_after_the_timeout() -> None:
    """A check that never answers is reported down after the 2 s bound, not waited for."""
    app = make_app()

    async def hangs() -> DependencyHealth:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app.health_check("db", hangs)
    started = time.monotonic()
    status, body = health(app)
    took = time.monotonic() - started
    assert (200, "down") == (status, body["dependencies"]["db"]["status"])
    assert 1.5 < took < 4.0


def requests_total(metrics: str, route: str) -> dict[str, float]:
    """citadel_http_requests_total for ``route``, by status."""
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("citadel_http_requests_total{") and f'route="{route}"' in line:
            status = re.search(r'status="(\d+)"', line)
            assert status is not None
            found[status.group(1)] = found.get(status.group(1), 0.0) + float(line.split()[-1])
    return found


def test_metrics_count_requests_by_route_and_status() -> None:
    """/metrics shows citadel_http_requests_total by route and status; unknown paths share one."""
    app = make_app()

    async def main() -> str:
        for path in ("/hello", "/hello", "/items/1", "/random-1", "/random-2"):
            await app(request(path=path))
        await app(request("POST", "/hello"))
        response = await app(request(path="/metrics"))
        assert isinstance(response, Response)
        assert (b"content-type", b"text/plain; version=0.0.4") in response.headers
        return response.body.decode()

    metrics = run(main())
    assert {"200": 2.0, "405": 1.0} == requests_total(metrics, "/hello")
    assert {"200": 1.0} == requests_total(metrics, "/items/*")
    assert {"404": 2.0} == requests_total(metrics, "unmatched")
    assert "random" not in metrics
    assert 'citadel_service_info{service="test",version=' in metrics


def test_app_over_a_real_server() -> None:
    """Served by HttpServer, the app answers on the wire with its request id."""

    async def main() -> tuple[bytes, bytes]:
        app = make_app()
        server = HttpServer(app, max_body_bytes=app.max_body_bytes)
        await server.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"GET /hello HTTP/1.1\r\nhost: t\r\nx-request-id: wire-1\r\n"
                b"connection: close\r\n\r\n"
            )
            reply = await asyncio.wait_for(reader.read(), 2)
            writer.close()
            await writer.wait_closed()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                b"POST /bad HTTP/1.1\r\nhost: t\r\ncontent-length: 200\r\nconnection: close\r\n\r\n"
                + b"x" * 200
            )
            too_large = await asyncio.wait_for(reader.read(), 2)
            writer.close()
            await writer.wait_closed()
        finally:
            await server.shutdown(1.0)
        return reply, too_large

    reply, too_large = run(main())
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nx-request-id: wire-1\r\n" in reply
    assert reply.endswith(b'\r\n\r\n{"hello":"world"}')
    assert too_large.startswith(b"HTTP/1.1 413 ")


WORKERS_SCRIPT = """
import os
import sys

from citadel.http.server import Response
from citadel.service import App, serve


def factory():
    app = App(name="multi")

    async def hello(request):
        return Response(200, b"hello")

    async def pid(request):
        return Response(200, str(os.getpid()).encode())

    app.route("GET", "/hello", hello)
    app.route("GET", "/pid", pid)
    return app


sys.exit(serve(factory, host="127.0.0.1", port=int(sys.argv[1]), workers=2, grace=5.0))
"""


def fetch(port: int, path: str) -> tuple[int, bytes]:
    """GET ``path`` on a fresh connection, so that the kernel picks a worker each time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_serve_with_two_workers_shares_the_port_and_the_metrics(tmp_path: Path) -> None:
    """Two forked workers both serve the port, /metrics sums them, SIGTERM stops all with 0."""
    script = tmp_path / "multi.py"
    script.write_text(textwrap.dedent(WORKERS_SCRIPT))
    port = free_port()
    proc = start_process([sys.executable, str(script), str(port)], port)
    try:
        pids: set[bytes] = set()
        deadline = time.monotonic() + 10
        while len(pids) < 2 and time.monotonic() < deadline:
            pids.add(fetch(port, "/pid")[1])
        statuses = [fetch(port, "/hello")[0] for _ in range(40)]
        counted: dict[str, float] = {}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            counted = requests_total(fetch(port, "/metrics")[1].decode(), "/hello")
            if counted == {"200": 40.0}:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        output = process_output(proc)
    finally:
        stop_process(proc)
    assert 2 == len(pids)
    assert [200] * 40 == statuses
    assert {"200": 40.0} == counted
    assert (0, "") == (code, output if "Traceback" in output else "")


def test_metrics_need_the_bearer_token_when_one_is_set() -> None:
    """With a metrics token, /metrics is a 401 without it or with another, and 200 with it."""
    app = App(name="test", metrics_token="scrape-me")
    missing = run(app(request("GET", "/metrics")))
    wrong = run(app(request("GET", "/metrics", {b"authorization": b"Bearer nope"})))
    right = run(app(request("GET", "/metrics", {b"authorization": b"Bearer scrape-me"})))
    assert (401, 401, 200) == (missing.status, wrong.status, right.status)
    assert (b"www-authenticate", b'Bearer realm="metrics"') in missing.headers
    assert b"citadel_service_info" in right.body
    assert 200 == run(app(request("GET", "/health"))).status  # health stays open


def test_metrics_are_open_without_a_token() -> None:
    """Without a token (development), /metrics answers anyone."""
    assert 200 == run(App(name="test")(request("GET", "/metrics"))).status
