"""Who is calling: the ``Authenticator`` seam and the admin-key implementation.

The gateway asks an ``Authenticator`` for the ``Principal`` behind a bearer token. For now the only
implementation accepts the admin key from settings; per-user keys from the accounts store plug in
here behind the same interface. Keys are compared as SHA-256 digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol

from citadel.errors import Unauthorized


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request."""

    user: str
    key_id: str
    tier: str = "admin"
    team: str = ""


class Authenticator(Protocol):
    async def authenticate(self, authorization: bytes | None) -> Principal:
        """The principal for an ``Authorization`` header value; raises ``Unauthorized``."""
        ...


def bearer_token(authorization: bytes | None) -> bytes:
    """The token of ``Bearer <token>``; raises ``Unauthorized`` when absent or malformed."""
    if not authorization:
        raise Unauthorized(
            "You didn't provide an API key. Send it in the Authorization header as "
            "'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        raise Unauthorized(
            "The Authorization header must be 'Bearer YOUR_KEY'.", code="invalid_authorization"
        )
    return token


def digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class AdminKeyAuthenticator:
    """Accepts exactly one key, the admin key from settings."""

    def __init__(self, admin_key: str) -> None:
        self._digest = digest(admin_key.encode())
        self._principal = Principal(user="admin", key_id="admin")

    async def authenticate(self, authorization: bytes | None) -> Principal:
        token = bearer_token(authorization)
        if not hmac.compare_digest(digest(token), self._digest):
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
        return self._principal
