"""What the limiter is asked and what it answers: plain frozen data, and the backend interface.

Every limit of a principal (a user) is checked and reserved by one ``admit`` call: when one limit
says no, nothing is reserved. An admission may name further ``Scope``s charged with the user: the
API key's own limits and the team's monthly budget. Every scope is checked, and all are charged
or none. ``reconcile`` settles a reservation once the actual usage is known
(tokens and cost), and releases its concurrency lease. Times are Unix seconds, passed in.
Costs are integers in micro-USD so that sums stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

LimitName = Literal[
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_requests",
    "tokens_per_day",
    "tokens_per_month",
    "cost_per_month",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """The effective limits of one principal (its tier with its overrides); None = unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    cost_per_month_micros: int | None = None

    @property
    def unlimited(self) -> bool:
        return all(
            v is None
            for v in (
                self.requests_per_minute,
                self.tokens_per_minute,
                self.concurrent_requests,
                self.tokens_per_day,
                self.tokens_per_month,
                self.cost_per_month_micros,
            )
        )


ScopeKind = Literal["user", "key", "team"]


@dataclass(frozen=True, slots=True)
class Scope:
    """A further set of limits an admission is checked and charged against besides its
    principal's own: the API key's (``kind`` "key", ``id`` the key's id, counted with its owner)
    or the team's (``kind`` "team", ``id`` the team's id, shared by every member)."""

    kind: Literal["key", "team"]
    id: str
    limits: Limits


@dataclass(frozen=True, kw_only=True, slots=True)
class Reservation:
    """What one admitted request holds until it is reconciled."""

    principal: str
    lease_id: str
    tokens: int
    cost_micros: int
    admitted_at: float
    day: str  # the calendar day (in the limiter's time zone) the quota was charged to, 2026-11-24
    month: str  # the calendar month, 2026-11
    scopes: tuple[Scope, ...] = ()  # the key's and team's limits charged with the principal's


@dataclass(frozen=True, kw_only=True, slots=True)
class LimitDecision:
    """The answer to one admission. The request/token figures feed the x-ratelimit-* headers."""

    allowed: bool
    refused_by: LimitName | None = None
    refused_scope: ScopeKind | None = None  # whose limit refused: the user's, key's or team's
    retry_after: float = 0.0  # seconds until the refusing limit could admit this request
    requests_limit: int | None = None
    requests_remaining: int | None = None
    requests_reset: float | None = None  # seconds until the request budget is full again
    tokens_limit: int | None = None
    tokens_remaining: int | None = None
    tokens_reset: float | None = None
    reservation: Reservation | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class LimitUsage:
    """Use of one limit now: ``used`` counts reservations not yet reconciled."""

    name: LimitName
    limit: int
    used: int
    remaining: int
    reset_at: float  # Unix seconds when it is fully available again


@dataclass(frozen=True, kw_only=True, slots=True)
class UsageSnapshot:
    principal: str
    limits: tuple[LimitUsage, ...]


class Limiter(Protocol):
    """A limiter backend: memory (one process) or Redis (shared by every gateway replica)."""

    async def admit(
        self,
        principal: str,
        limits: Limits,
        *,
        lease_id: str,
        tokens: int,
        cost_micros: int,
        now: float,
        scopes: Sequence[Scope] = (),
    ) -> LimitDecision:
        """Check every limit of the principal and of ``scopes`` and reserve them all, or
        nothing. Raises StoreUnavailable."""
        ...

    async def reconcile(
        self,
        reservation: Reservation,
        limits: Limits,
        *,
        tokens: int,
        cost_micros: int,
        now: float,
    ) -> None:
        """Settle a reservation (its scopes too) to the actual tokens and cost, and release its
        lease."""
        ...

    async def usage(self, principal: str, limits: Limits, now: float) -> UsageSnapshot:
        """Current use and remaining budget of every limit that is set."""
        ...

    async def team_usage(self, team_id: str, limits: Limits, now: float) -> UsageSnapshot:
        """A team's use of its own limits (its monthly budget), which its members' requests
        charge."""
        ...

    async def count_team_spend(self, team_id: str, micros: int, now: float) -> None:
        """Raise the team's cost counter for ``now``'s month to at least ``micros`` (never
        lower it): the month's spend the ledger holds, counted when its budget is set."""
        ...

    async def reset(self, principal: str) -> None:
        """Forget every counter and lease of ``principal`` (admin action)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the backend answers."""
        ...

    async def aclose(self) -> None: ...
