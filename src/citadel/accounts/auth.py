"""Who is calling: the ``Authenticator`` seam, the admin key and per-user API keys.

The gateway asks an ``Authenticator`` for the ``Principal`` behind a bearer token. Keys are looked
up by the SHA-256 digest of the secret, never by the secret, and compared in constant time.

``KeyAuthenticator`` first checks the key's shape (``citadel.accounts.keyformat``: prefix, length,
CRC32 checksum): a malformed or random key is refused in microseconds, with no lookup. A
well-formed key goes through a short-TTL cache in front of the accounts store: a key is looked up
at most once per TTL (unknown digests too, so a flood of bad keys cannot hammer the database), so
a revocation takes effect within the TTL. The cache is two bounded LRU maps (``keycache``), one
for known keys and one for unknown digests, so no flood of unknown keys evicts a known one and
nothing is ever dropped wholesale. When the store is unreachable, a key seen before keeps working
from the cache (stale entries are kept for that) and an unseen key gets a 503. Every refusal says
the same thing whatever the reason (malformed, unknown, revoked, disabled owner), so a caller
cannot probe which keys exist; the one exception is an expired key, whose 401 says when it
expired: only the holder of its secret can be told, so it reveals nothing to a guesser.

A key's own limits (``KeyLimits``: budget, requests and tokens per minute) and its team's budget
become the principal's ``scopes``, which the limiter charges with the user's limits; its model
list narrows what the tier allows (``may_use``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from citadel.accounts import keyformat
from citadel.accounts.store import AccountStore, KeyLimits, KeyRecord
from citadel.adminkey import AdminKey, bearer_token, digest, incorrect_key
from citadel.errors import StoreUnavailable, Unauthorized, Unavailable
from citadel.limits.decision import Limits, Scope
from citadel.limits.policy import effective_limits
from citadel.lru import LruCache
from citadel.metrics import AUTH_FAILURES, Registry
from citadel.settings import Tier

_log = logging.getLogger("citadel.accounts.auth")

_UNKNOWN_CACHE_LIMIT = 100_000  # unknown digests remembered (each is a refused lookup)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request. ``limits`` None means no limits apply (the admin key)."""

    user: str
    key_id: str
    tier: str = "admin"
    team: str = ""
    limits: Limits | None = None
    models: tuple[str, ...] = ("*",)
    # The key's own model list (None: whatever the tier allows) and the limits charged with the
    # user's: the key's own and the team's budget.
    key_models: tuple[str, ...] | None = None
    scopes: tuple[Scope, ...] = ()

    def tier_may_use(self, *names: str) -> bool:
        """Whether the tier allows a model known by any of ``names`` (its name and aliases)."""
        return "*" in self.models or any(name in self.models for name in names)

    def key_may_use(self, *names: str) -> bool:
        """Whether the key's own model list (if it has one) allows a model of these names."""
        return self.key_models is None or any(name in self.key_models for name in names)

    def may_use(self, *names: str) -> bool:
        """Whether both the tier and the key allow a model known by any of ``names``."""
        return self.tier_may_use(*names) and self.key_may_use(*names)

    def scope_limits(self, kind: str) -> Limits | None:
        """The limits of the key's or team's scope, if the principal has one."""
        return next((scope.limits for scope in self.scopes if scope.kind == kind), None)


ADMIN = Principal(user="admin", key_id="admin")


class Authenticator(Protocol):
    async def authenticate(self, authorization: bytes | None) -> Principal:
        """The principal for an ``Authorization`` header value; raises ``Unauthorized``."""
        ...


class AdminKeyAuthenticator:
    """The gateway's ``Authenticator`` for the admin key alone (``citadel.adminkey``)."""

    def __init__(self, admin_key: str) -> None:
        self._key = AdminKey(admin_key)

    def is_admin(self, token_digest: bytes) -> bool:
        return self._key.is_admin(token_digest)

    async def authenticate(self, authorization: bytes | None) -> Principal:
        self._key.verify(authorization)
        return ADMIN


def key_scope_limits(limits: KeyLimits) -> Limits:
    """A key's own limits as the limiter's ``Limits`` (unlimited when it has none)."""
    return Limits(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        cost_per_month_micros=limits.budget_micros,
    )


def principal_scopes(record: KeyRecord) -> tuple[Scope, ...]:
    """What a request of this key is charged to besides its owner's limits: the key's own
    limits and the team's own budget, each when set."""
    scopes: list[Scope] = []
    own = key_scope_limits(record.key.limits)
    if not own.unlimited:
        scopes.append(Scope("key", record.key.id, own))
    team = record.team
    if team is not None and team.budget_micros is not None:
        scopes.append(Scope("team", team.id, Limits(cost_per_month_micros=team.budget_micros)))
    return tuple(scopes)


@dataclass(frozen=True, slots=True)
class _Entry:
    fetched_at: float  # monotonic
    principal: Principal | None  # None: no usable key with this digest
    expires_at: float | None  # Unix seconds


class KeyAuthenticator:
    """The admin key, and users' API keys from the accounts store behind a short-TTL cache."""

    def __init__(
        self,
        store: AccountStore,
        *,
        admin_key: str,
        tiers: Mapping[str, Tier],
        default_tier: str,
        ttl: float,
        registry: Registry,
        cache_size: int = 100_000,
        accept_legacy: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._admin = AdminKeyAuthenticator(admin_key)
        self._tiers = tiers
        self._default_tier = tiers[default_tier]
        self._ttl = ttl
        self._clock = clock
        self._wall = wall
        self._known: LruCache[bytes, _Entry] = LruCache(cache_size)
        self._unknown: LruCache[bytes, _Entry] = LruCache(_UNKNOWN_CACHE_LIMIT)
        self._accept_legacy = accept_legacy
        self._last_used: dict[str, datetime] = {}
        self._failures = registry.counter(AUTH_FAILURES)

    async def authenticate(self, authorization: bytes | None) -> Principal:
        try:
            token = bearer_token(authorization)
        except Unauthorized:
            self._failures.inc(("missing",))
            raise
        token_digest = digest(token)
        if self._admin.is_admin(token_digest):
            return ADMIN
        shape = keyformat.shape(token)
        if shape == "malformed" or (shape == "legacy" and not self._accept_legacy):
            self._failures.inc(("malformed",))
            raise incorrect_key()
        now = self._clock()
        entry = self._known.get(token_digest) or self._unknown.get(token_digest)
        if entry is None or now - entry.fetched_at >= self._ttl:
            entry = await self._lookup(token_digest, entry, now)
        principal = entry.principal
        if principal is None:
            self._failures.inc(("invalid",))
            raise incorrect_key()
        if entry.expires_at is not None and self._wall() >= entry.expires_at:
            self._failures.inc(("expired",))
            when = datetime.fromtimestamp(entry.expires_at, UTC).isoformat(timespec="seconds")
            raise Unauthorized(
                f"This API key ({principal.key_id}) expired at {when}; create a new key or ask "
                "an administrator for one.",
                code="api_key_expired",
            )
        self._last_used[principal.key_id] = datetime.now(UTC)
        return principal

    async def _lookup(self, token_digest: bytes, stale: _Entry | None, now: float) -> _Entry:
        try:
            record = await self._store.find_key(token_digest)
        except StoreUnavailable as exc:
            if stale is not None:
                return stale  # keep serving a key we know while the store is away
            self._failures.inc(("store_unavailable",))
            raise Unavailable(
                "API keys cannot be checked right now (the accounts store is unavailable); "
                "retry shortly.",
                code="accounts_unavailable",
            ) from exc
        entry = self._entry(record, now)
        if entry.principal is None:
            self._known.pop(token_digest)  # revoked or disabled since: no longer served stale
            self._unknown.put(token_digest, entry)
        else:
            self._unknown.pop(token_digest)
            self._known.put(token_digest, entry)
        return entry

    def _entry(self, record: KeyRecord | None, now: float) -> _Entry:
        if record is None or record.key.revoked_at is not None or record.user.status != "active":
            return _Entry(now, None, None)
        user = record.user
        tier = self._tiers.get(user.tier, self._default_tier)
        principal = Principal(
            user=user.id,
            key_id=record.key.id,
            tier=tier.name,
            team=user.team_id or "",
            limits=effective_limits(tier, user.overrides),
            models=tier.models,
            key_models=record.key.limits.models,
            scopes=principal_scopes(record),
        )
        expires = record.key.expires_at.timestamp() if record.key.expires_at else None
        return _Entry(now, principal, expires)

    async def flush_last_used(self) -> None:
        """Write the keys' last-used times gathered since the previous flush (best effort)."""
        if not self._last_used:
            return
        batch, self._last_used = self._last_used, {}
        try:
            await self._store.touch_keys(batch)
        except StoreUnavailable:
            _log.warning("could not record keys' last use", extra={"keys": len(batch)})
