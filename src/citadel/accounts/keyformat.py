"""The API key format: a prefix, 43 random characters and a CRC32 checksum. Pure: no I/O.

``sk-cit-<43 url-safe random characters><6 base62 characters of CRC32(prefix + random)>``, 56
characters in all, like GitHub's tokens: a server refuses a malformed or random key in
microseconds, with no database lookup, and secret scanners can recognise a Citadel key. The
checksum is no secret (anyone can compute a CRC32): it stops typos, truncations and floods of
random keys, not a forger; the digest lookup (and the negative cache and failed-auth throttle in
front of it) still decides.

Keys made before the checksum (``sk-cit-`` and 43 random characters, 50 in all) are ``LEGACY``:
the gateway still looks them up unless ``accounts.accept_legacy_keys`` is false.
"""

from __future__ import annotations

import secrets
import zlib
from typing import Final, Literal

PREFIX: Final = "sk-cit-"
_RANDOM_CHARS: Final = 43  # secrets.token_urlsafe(32)
_CHECK_CHARS: Final = 6  # 62**6 > 2**32
_ALPHABET: Final = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
LENGTH: Final = len(PREFIX) + _RANDOM_CHARS + _CHECK_CHARS
LEGACY_LENGTH: Final = len(PREFIX) + _RANDOM_CHARS
_PREFIX_BYTES: Final = PREFIX.encode()

KeyShape = Literal["valid", "legacy", "malformed"]


def _checksum(body: bytes) -> bytes:
    value = zlib.crc32(body)
    out = bytearray(_CHECK_CHARS)
    for i in range(_CHECK_CHARS - 1, -1, -1):
        value, digit = divmod(value, 62)
        out[i] = _ALPHABET[digit]
    return bytes(out)


def new_secret() -> str:
    """A fresh key secret in the current format."""
    body = PREFIX + secrets.token_urlsafe(32)
    return body + _checksum(body.encode()).decode()


def shape(token: bytes) -> KeyShape:
    """Whether ``token`` is a well-formed key, a key of the old format, or neither."""
    if not token.startswith(_PREFIX_BYTES):
        return "malformed"
    if len(token) == LENGTH:
        body = token[:-_CHECK_CHARS]
        return "valid" if _checksum(body) == token[-_CHECK_CHARS:] else "malformed"
    return "legacy" if len(token) == LEGACY_LENGTH else "malformed"
