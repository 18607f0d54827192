"""The accounts store interface and its records.

Secrets are never stored: an API key is kept as the SHA-256 digest of its secret plus a short
visible prefix; the secret is returned once, by ``create_key``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

UserStatus = Literal["active", "disabled"]

# Limit overrides a user may carry (a subset of a tier's fields); None removes the limit.
OVERRIDABLE = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_requests",
    "tokens_per_day",
    "tokens_per_month",
    "cost_per_month_usd",
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Team:
    id: str
    name: str
    created_at: datetime
    # The team's own monthly cost budget, in micro-USD, set at run time (``set_team_budget``);
    # None: the sum of its members' budgets (``citadel.metering.budgets``).
    budget_micros: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class User:
    id: str
    name: str
    email: str
    team_id: str | None
    tier: str
    status: UserStatus
    created_at: datetime
    overrides: dict[str, float | None] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, slots=True)
class ApiKey:
    id: str
    user_id: str
    name: str
    prefix: str  # the first characters of the secret, shown in listings
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyRecord:
    """What authentication needs: the key and its owner."""

    key: ApiKey
    user: User


class NotFoundError(LookupError):
    """No user, team or key has that id."""


class ConflictError(ValueError):
    """A unique value (an email, a team name) is taken."""


class AccountStore(Protocol):
    async def create_team(self, name: str) -> Team: ...
    async def list_teams(self) -> list[Team]: ...
    async def rename_team(self, team_id: str, name: str) -> Team:
        """Rename a team; NotFoundError if no such team, ConflictError if the name is taken."""
        ...

    async def set_team_budget(self, team_id: str, budget_micros: int | None) -> Team:
        """Set (None: clear) the team's monthly cost budget; NotFoundError if no such team."""
        ...

    async def create_user(
        self, *, name: str, email: str, tier: str, team_id: str | None = None
    ) -> User: ...
    async def get_user(self, user_id: str) -> User | None: ...
    async def list_users(self, *, team_id: str | None = None) -> list[User]: ...
    async def update_user(
        self,
        user_id: str,
        *,
        name: str | None = None,
        email: str | None = None,
        tier: str | None = None,
        team_id: str | None = None,
        status: UserStatus | None = None,
        overrides: dict[str, float | None] | None = None,
    ) -> User: ...
    async def create_key(
        self, user_id: str, *, name: str, expires_at: datetime | None = None
    ) -> tuple[ApiKey, str]:
        """A new key and its secret; the secret is not kept and cannot be shown again."""
        ...

    async def list_keys(self, *, user_id: str | None = None) -> list[ApiKey]: ...
    async def revoke_key(self, key_id: str) -> ApiKey: ...
    async def find_key(self, digest: bytes) -> KeyRecord | None:
        """The key whose secret has this SHA-256 digest, with its owner; revoked ones included."""
        ...

    async def touch_keys(self, last_used: dict[str, datetime]) -> None:
        """Record when keys were last used (batched by the caller)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        ...

    async def aclose(self) -> None: ...
