"""CORS for a ``citadel.web`` service, by the gateway's own policy (``citadel.http.edge``): the
same origins (``gateway.cors_origins``), the same preflight answers (204, or 403 with an
OpenAI-style body for an origin not allowed) and the same headers on actual responses.

Browsers do not preflight a WebSocket handshake; a WebSocket from an origin that is not allowed
is refused (403 before the upgrade), so a page elsewhere cannot borrow a key the browser holds.
"""

from __future__ import annotations

from typing import Any, cast

from litestar.types import ASGIApp

from citadel.errors import ApiError
from citadel.http.edge import CorsPolicy
from citadel.http.server import Request

__all__ = ["cors_middleware"]


def _request(scope: Any) -> Request:
    headers = {bytes(k).lower(): bytes(v) for k, v in scope.get("headers", ())}
    return Request(scope.get("method", "GET"), scope.get("path", "/"), "", headers, b"")


def cors_middleware(origins: tuple[str, ...]) -> Any:
    """A Litestar middleware applying ``CorsPolicy(origins)``."""
    policy = CorsPolicy(origins)

    def middleware(app: ASGIApp) -> ASGIApp:
        async def cors(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] not in ("http", "websocket"):
                await app(scope, receive, send)
                return
            request = _request(scope)
            origin = request.headers.get(b"origin")
            if scope["type"] == "websocket":
                if origin is not None and not policy.allows(origin):
                    await send({"type": "websocket.close", "code": 1008, "reason": "origin"})
                    return
                await app(scope, receive, send)
                return
            if policy.is_preflight(request):
                try:
                    answer = policy.preflight(request)
                    status, body, headers = answer.status, b"", list(answer.headers)
                except ApiError as exc:
                    status, body = exc.status, exc.body()
                    headers = [(b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            extra = policy.headers(request)
            if not extra:
                await app(scope, receive, send)
                return

            async def send_with_cors(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", ()), *extra]}
                await send(message)

            await app(scope, receive, send_with_cors)

        return cast("ASGIApp", cors)

    return middleware
