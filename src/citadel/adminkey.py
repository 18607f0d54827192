"""The admin key: the one bearer token every admin API and the gateway accept as the operator.

Shared by the gateway (which also accepts users' keys, ``gateway.auth``) and every service built
on ``citadel.web`` (as a Litestar guard). Keys are compared by their SHA-256 digest in constant
time; every refusal says the same thing, so a caller cannot tell a wrong key from a revoked one.
"""

from __future__ import annotations

import hashlib
import hmac

from citadel.errors import Unauthorized

__all__ = ["AdminKey", "bearer_token", "digest", "incorrect_key"]


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


def incorrect_key() -> Unauthorized:
    return Unauthorized("Incorrect API key provided.", code="invalid_api_key")


class AdminKey:
    """Accepts the admin key from settings (and, for read-only routes, ``also``: the read-only
    key, ``gateway.readonly_key``; None is skipped)."""

    def __init__(self, admin_key: str, *also: str | None) -> None:
        self._digest = digest(admin_key.encode())
        self._others = tuple(digest(k.encode()) for k in also if k)

    def is_admin(self, token_digest: bytes) -> bool:
        # Every digest is compared (no early exit): the time does not say which key matched.
        found = hmac.compare_digest(token_digest, self._digest)
        for other in self._others:
            found |= hmac.compare_digest(token_digest, other)
        return found

    def verify(self, authorization: bytes | None) -> None:
        """Return if ``authorization`` carries the admin key; raise ``Unauthorized`` otherwise."""
        if not self.is_admin(digest(bearer_token(authorization))):
            raise incorrect_key()
