"""One error hierarchy for Citadel.

    CitadelError
    ├── ConfigError            a bad setting: names the key, the value and what was expected
    ├── StoreUnavailable       Redis or SQL could not be reached or did not answer in time
    ├── IllegalTransition      (routing.breaker) a move the breaker's table does not have
    ├── RedisError             (stores.redis) Redis answered a command with an error reply
    └── ApiError               an error answered to an HTTP client, OpenAI-style
        ├── BadRequest         400 invalid_request_error (bad JSON, wrong types, missing fields)
        ├── Unauthorized       401 authentication_error
        ├── Forbidden          403 permission_error
        ├── NotFound           404 not_found_error (unknown model, unknown path)
        ├── MethodNotAllowed   405 invalid_request_error
        ├── PayloadTooLarge    413 invalid_request_error
        ├── UnsupportedMedia   415 invalid_request_error
        ├── RateLimited        429 requests | tokens (code rate_limit_exceeded)
        ├── UpstreamRefusal    the model server's own 4xx/429, its status, type, code and param kept
        ├── UpstreamError      502 upstream_error (the upstream answered badly or broke)
        ├── Unavailable        503 service_unavailable (no deployment can take the request)
        └── UpstreamTimeout    504 timeout (connect, first byte or total deadline passed)

Foreign exceptions are translated once, at the boundary that caught them, with
``raise ... from exc``.
"""

from __future__ import annotations

import orjson


class CitadelError(Exception):
    """The root of every error Citadel raises on purpose."""


class ConfigError(CitadelError):
    """A setting is missing or invalid; the message names the key, the value and the expectation."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"invalid setting {key}={value!r}: expected {expected}")


class ApiError(CitadelError):
    """An error that becomes an HTTP response with an OpenAI-style body."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers

    def body(self) -> bytes:
        """The OpenAI error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class Conflict(ApiError):
    """409: the request conflicts with what exists (an email or team name taken)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMedia(ApiError):
    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(ApiError):
    """OpenAI's 429: code ``rate_limit_exceeded``, type the kind of limit (requests, tokens)."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        kind: str = "requests",
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.type = kind


class UpstreamRefusal(ApiError):
    """A model server refused the request: its status and error fields, passed through whole."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.status = status
        self.type = kind


class UpstreamError(ApiError):
    status = 502
    type = "upstream_error"
    default_code = "bad_gateway"


class Unavailable(ApiError):
    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class UpstreamTimeout(ApiError):
    status = 504
    type = "timeout"
    default_code = "upstream_timeout"


class TransportError(CitadelError):
    """An HTTP server Citadel calls (a model server, Alertmanager) could not be reached, or
    answered with something that is not a usable reply; the caller decides what it becomes."""


class StoreUnavailable(CitadelError):
    """A store (Redis, PostgreSQL, SQLite) could not be reached or did not answer in time."""

    def __init__(self, store: str, detail: str) -> None:
        self.store = store
        self.detail = detail
        super().__init__(f"{store} is unavailable: {detail}")
