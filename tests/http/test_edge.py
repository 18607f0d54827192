"""Tests for the gateway's edge: CORS preflights and headers, request ids, processing time."""

from __future__ import annotations

import asyncio

from citadel.http.edge import CorsPolicy, OpenAiEdge
from citadel.http.server import Request, Response
from citadel.service import App

ALLOWED = b"https://app.example.com"
PREFLIGHT = {
    b"origin": ALLOWED,
    b"access-control-request-method": b"POST",
    b"access-control-request-headers": b"authorization, content-type",
}


def _request(method: str, headers: dict[bytes, bytes]) -> Request:
    return Request(method, "/v1/chat/completions", "", headers, b"", "127.0.0.1:1", False)


def _app() -> App:
    app = App(name="edge")
    app.edge = OpenAiEdge(CorsPolicy(("https://app.example.com/",)))

    async def chat(request: Request) -> Response:
        return Response(200, b"{}")

    app.route("POST", "/v1/chat/completions", chat)
    return app


def _names(response: object) -> list[bytes]:
    assert isinstance(response, Response)
    return [name for name, _ in response.headers]


def test_preflight_from_an_allowed_origin_is_a_204_with_one_allow_origin() -> None:
    """A preflight is answered before routing and auth, with exactly one allow-origin header."""
    response = asyncio.run(_app()(_request("OPTIONS", PREFLIGHT)))
    assert 204 == response.status
    assert 1 == _names(response).count(b"access-control-allow-origin")
    assert (b"access-control-allow-headers", b"authorization, content-type") in response.headers


def test_preflight_from_another_origin_is_a_403_without_allow_origin() -> None:
    """Another origin's preflight is refused, so the browser blocks the request."""
    headers = {**PREFLIGHT, b"origin": b"https://evil.example.com"}
    response = asyncio.run(_app()(_request("OPTIONS", headers)))
    assert 403 == response.status
    assert b"access-control-allow-origin" not in _names(response)


def test_responses_carry_the_edges_headers() -> None:
    """A reply has the gateway's own request id, the client's kept, the processing time, and
    the CORS headers for an allowed origin."""
    headers = {b"origin": ALLOWED, b"x-request-id": b"mine-1"}
    response = asyncio.run(_app()(_request("POST", headers)))
    assert isinstance(response, Response)
    found = dict(response.headers)
    assert found[b"x-request-id"].startswith(b"req_")
    assert b"mine-1" == found[b"x-client-request-id"]
    assert int(found[b"openai-processing-ms"]) >= 0
    assert ALLOWED == found[b"access-control-allow-origin"]


def test_any_origin_with_a_star() -> None:
    """``*`` allows every origin; an empty list allows none."""
    assert CorsPolicy(("*",)).allows(b"http://localhost:3000")
    assert not CorsPolicy(()).allows(b"http://localhost:3000")
