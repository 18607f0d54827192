"""The accounts store interface and its records.

Secrets are never stored: an API key is kept as the SHA-256 digest of its secret plus a short
visible prefix; the secret is returned once, by ``create_key``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from citadel.errors import Conflict, NotFound

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
    deleted_at: datetime | None = None  # set by ``delete_team``; the record is kept


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
    deleted_at: datetime | None = None  # set by ``delete_user``; the record is kept


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyLimits:
    """An API key's own limits, on top of its owner's ("virtual keys"); None: none of its own.

    The limiter charges them with the owner's on every request of the key (``citadel.limits``);
    ``models`` narrows what the owner's tier allows, it never widens it.
    """

    budget_micros: int | None = None  # monthly cost budget, micro-USD
    models: tuple[str, ...] | None = None  # model names or aliases it may use
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


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
    limits: KeyLimits = field(default_factory=KeyLimits)


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyRecord:
    """What authentication needs: the key, its owner and the owner's team (if any)."""

    key: ApiKey
    user: User
    team: Team | None = None


class NotFoundError(NotFound, LookupError):
    """No user, team or key has that id (a 404 in the one hierarchy; still a LookupError)."""


class ConflictError(Conflict, ValueError):
    """A unique value (an email, a team name) is taken (a 409; still a ValueError)."""


class AccountStore(Protocol):
    async def create_team(self, name: str) -> Team: ...
    async def list_teams(self, *, include_deleted: bool = False) -> list[Team]: ...
    async def set_team_budget(self, team_id: str, budget_micros: int | None) -> Team:
        """Set (None: clear) the team's monthly cost budget; NotFoundError if no such team."""
        ...

    async def rename_team(self, team_id: str, name: str) -> Team:
        """Rename a team; ConflictError if the name is taken (or the team deleted)."""
        ...

    async def delete_team(self, team_id: str) -> Team:
        """Mark a team deleted (kept for the ledger's history, hidden from listings);
        ConflictError while it has members who are not deleted."""
        ...

    async def delete_user(self, user_id: str) -> User:
        """Mark a user deleted and disabled and revoke every key of theirs, in one
        transaction (kept for the ledger's history, hidden from listings)."""
        ...

    async def create_user(
        self, *, name: str, email: str, tier: str, team_id: str | None = None
    ) -> User: ...
    async def get_user(self, user_id: str) -> User | None: ...
    async def get_team(self, team_id: str) -> Team | None: ...
    async def list_users(
        self, *, team_id: str | None = None, include_deleted: bool = False
    ) -> list[User]: ...
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
        self,
        user_id: str,
        *,
        name: str,
        expires_at: datetime | None = None,
        limits: KeyLimits | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key (with ``limits`` of its own) and its secret; the secret is not kept and
        cannot be shown again. ValueError for a limit out of range."""
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
