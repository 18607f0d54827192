"""CORS on a citadel.web service by the gateway's policy: preflights, actual responses and
WebSocket handshakes from allowed and other origins."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar, WebSocket, get, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.testing import TestClient

from citadel.web.cors import cors_middleware

OK = "https://ok.example"


@get("/thing")
async def thing() -> dict[str, int]:
    return {"n": 1}


@websocket("/ws")
async def ws(socket: WebSocket[Any, Any, Any]) -> None:
    await socket.accept()
    await socket.send_text("hi")
    await socket.close()


def client() -> TestClient[Litestar]:
    return TestClient(Litestar([thing, ws], middleware=[cors_middleware((OK,))]))


def test_a_preflight_from_an_allowed_origin_is_204_and_another_is_403() -> None:
    with client() as c:
        asked = {"Origin": OK, "Access-Control-Request-Method": "GET"}
        ok = c.options("/thing", headers={**asked, "Access-Control-Request-Headers": "x-a"})
        assert ok.status_code == 204
        assert ok.headers["access-control-allow-origin"] == OK
        assert ok.headers["access-control-allow-headers"] == "x-a"
        refused = c.options("/thing", headers={**asked, "Origin": "https://evil.example"})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "cors_origin_not_allowed"
        assert "access-control-allow-origin" not in refused.headers


def test_actual_responses_carry_the_cors_headers_for_allowed_origins_only() -> None:
    with client() as c:
        ok = c.get("/thing", headers={"Origin": OK})
        assert ok.json() == {"n": 1}
        assert ok.headers["access-control-allow-origin"] == OK
        assert "x-request-id" in ok.headers["access-control-expose-headers"]
        other = c.get("/thing", headers={"Origin": "https://evil.example"})
        assert other.status_code == 200
        assert "access-control-allow-origin" not in other.headers
        assert "access-control-allow-origin" not in c.get("/thing").headers


def test_a_websocket_from_another_origin_is_refused() -> None:
    with client() as c:
        with c.websocket_connect("/ws", headers={"Origin": OK}) as socket:
            assert socket.receive_text() == "hi"
        evil = {"Origin": "https://evil.example"}
        with pytest.raises(WebSocketDisconnect), c.websocket_connect("/ws", headers=evil) as s:
            s.receive_text()
