"""What an OpenAI-compatible API adds at its edge: CORS, its own request ids, processing time.

``OpenAiEdge`` is the gateway's: every response carries the gateway's own ``x-request-id`` (a
client's is kept as ``x-client-request-id``, as OpenAI does, and logged) and
``openai-processing-ms``, and browsers are let in by ``CorsPolicy``.

Cross-origin resource sharing: which browser origins may call.

A browser sends a preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``)
before a cross-origin request that carries ``Authorization`` or a JSON body; it is answered here,
without authentication (browsers never send credentials on it). An allowed origin gets a 204 with
the methods and headers it may use; another gets a 403 without ``Access-Control-Allow-Origin``,
which the browser reports as a CORS failure. Actual responses to an allowed origin carry
``Access-Control-Allow-Origin`` and expose the headers clients read (request id, rate limits,
processing time). The API authenticates by header, never by cookie, so credentials mode is off.
"""

from __future__ import annotations

import os
import time

from citadel.errors import Forbidden
from citadel.http.server import Request, Response, StreamResponse

__all__ = ["CorsPolicy", "OpenAiEdge"]

_MAX_CLIENT_ID = 512

_METHODS = b"GET, POST, DELETE, OPTIONS"
_EXPOSED = (
    b"x-request-id, x-client-request-id, openai-processing-ms, retry-after, "
    b"x-ratelimit-limit-requests, x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
    b"x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens, "
    b"x-citadel-model, x-citadel-deployment"
)
_DEFAULT_HEADERS = b"authorization, content-type, openai-organization, openai-project"
_MAX_AGE = b"600"


class CorsPolicy:
    """The allowed origins (``*`` for any); ``headers`` and ``preflight`` apply them."""

    __slots__ = ("_any", "_origins")

    def __init__(self, origins: tuple[str, ...]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(o.rstrip("/").encode() for o in origins if o != "*")

    def allows(self, origin: bytes) -> bool:
        return self._any or origin in self._origins

    @staticmethod
    def is_preflight(request: Request) -> bool:
        return (
            request.method == "OPTIONS"
            and b"origin" in request.headers
            and b"access-control-request-method" in request.headers
        )

    def preflight(self, request: Request) -> Response:
        """The answer to a preflight: 204 for an allowed origin, else 403 (raised)."""
        origin = request.headers.get(b"origin", b"")
        if not self.allows(origin):
            raise Forbidden(
                f"The origin {origin.decode('latin-1')!r} may not call this API from a browser.",
                code="cors_origin_not_allowed",
            )
        asked = request.headers.get(b"access-control-request-headers")
        headers = [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", _METHODS),
            (b"access-control-allow-headers", asked or _DEFAULT_HEADERS),
            (b"access-control-max-age", _MAX_AGE),
            (b"vary", b"origin"),
        ]
        return Response(204, b"", headers, content_type=b"")

    def headers(self, request: Request) -> list[tuple[bytes, bytes]]:
        """The CORS headers of an actual response (none when the origin is not allowed)."""
        origin = request.headers.get(b"origin")
        if origin is None or not self.allows(origin):
            return []
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", _EXPOSED),
            (b"vary", b"origin"),
        ]


class OpenAiEdge:
    """The gateway's edge: preflights, request ids, ``openai-processing-ms``, CORS headers."""

    __slots__ = ("_cors",)

    def __init__(self, cors: CorsPolicy) -> None:
        self._cors = cors

    def preflight(self, request: Request) -> Response | None:
        """The answer to a CORS preflight, or None for any other request."""
        return self._cors.preflight(request) if self._cors.is_preflight(request) else None

    @staticmethod
    def request_id(request: Request) -> bytes:
        return b"req_" + os.urandom(16).hex().encode()

    def finish(self, request: Request, response: Response | StreamResponse, started: float) -> None:
        """Add the edge's headers to a response about to be sent."""
        headers = response.headers
        elapsed = round((time.perf_counter() - started) * 1000)
        headers.append((b"openai-processing-ms", str(elapsed).encode()))
        client_id = request.headers.get(b"x-request-id")
        if client_id and len(client_id) <= _MAX_CLIENT_ID:
            headers.append((b"x-client-request-id", client_id))
        if not self._cors.is_preflight(request):  # a preflight's answer has its own
            headers += self._cors.headers(request)
