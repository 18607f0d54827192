"""The rate-limiting API's bodies and replies, as ``msgspec.Struct``s: one definition gives the
validation (a bad field is a 400 naming it, dotted: ``overrides.tokens_per_day``), the OpenAPI
schema and the encoding. Times are RFC 3339 UTC strings (``2026-11-24T08:00:00Z``), money US
dollars. Every number has an upper bound, so nothing the API stores can break what reads it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from citadel.accounts.store import ApiKey, Team, User, UserStatus
from citadel.limits.decision import LimitDecision, Limits, Reservation, Scope, UsageSnapshot
from citadel.limits.maths import MAX_RATE
from citadel.settings import Tier
from citadel.web import Struct

MAX_TOKENS = 1_000_000_000  # per request: far beyond any context window, well inside exact maths
MAX_QUOTA = 1_000_000_000_000  # a daily or monthly token quota, a concurrency limit
MAX_USD = 1_000_000_000.0  # a cost, in US dollars (micro-dollars stay under 2**53)
MAX_DAYS = 36_500
DEFAULT = "default"  # an override value: back to the tier's own limit

Text = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"\S")]
Email = Annotated[
    str, Meta(max_length=256, pattern=r"^[^\s@]+@[^\s@]+$", description="name@example.com")
]
Tokens = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
Dollars = Annotated[float, Meta(ge=0, le=MAX_USD)]
Rate = Annotated[int, Meta(ge=0, le=MAX_RATE)]
Quota = Annotated[int, Meta(ge=0, le=MAX_QUOTA)]
Time = Annotated[str, Meta(description="RFC 3339, UTC")]
Default = Literal["default"]


# -- bodies -----------------------------------------------------------------------------------


class NewTeam(Struct):
    name: Text


class TeamChanges(Struct):
    name: Text


class NewUser(Struct):
    name: Text
    email: Email
    tier: Annotated[Text | None, Meta(description="default: accounts.default_tier")] = None
    team_id: Text | None = None


class Overrides(Struct):
    """Merged into the user's overrides: a number, null (no limit) or "default" (remove the
    override: the tier's limit again). Every limit but the cost counts whole things."""

    requests_per_minute: Rate | Default | UnsetType | None = UNSET
    tokens_per_minute: Rate | Default | UnsetType | None = UNSET
    concurrent_requests: Quota | Default | UnsetType | None = UNSET
    tokens_per_day: Quota | Default | UnsetType | None = UNSET
    tokens_per_month: Quota | Default | UnsetType | None = UNSET
    cost_per_month_usd: Dollars | Default | UnsetType | None = UNSET

    def changes(self) -> dict[str, float | Default | None]:
        """The limits given, by name."""
        return {
            name: value
            for name in self.__struct_fields__
            if (value := getattr(self, name)) is not UNSET
        }


class UserChanges(Struct):
    name: Text | None = None
    email: Email | None = None
    tier: Text | None = None
    team_id: Text | None = None
    status: UserStatus | None = None
    overrides: Overrides | None = None


class NewKey(Struct):
    """A new key; its own limits (``budget_usd``, ``models``, the per-minute ones) apply on top
    of its owner's: a request must pass both."""

    user_id: Text
    name: Annotated[Text, Meta(description='a label; default "default"')] | None = None
    expires_in_days: Annotated[int, Meta(ge=1, le=MAX_DAYS)] | None = None
    expires_at: (
        Annotated[datetime, Meta(description="RFC 3339 with an offset; or expires_in_days")] | None
    ) = None
    budget_usd: Annotated[Dollars, Meta(description="the key's own monthly budget")] | None = None
    models: (
        Annotated[
            list[Text],
            Meta(min_length=1, max_length=256, description="the models it may use; null: any"),
        ]
        | None
    ) = None
    requests_per_minute: Rate | None = None
    tokens_per_minute: Rate | None = None


class TeamBudget(Struct):
    budget_usd: Annotated[
        Dollars | None, Meta(description="the team's monthly cost budget; null: none of its own")
    ]


class Check(Struct):
    user_id: Text
    tokens: Annotated[Tokens, Meta(description="to reserve: the prompt's estimate + max_tokens")]
    cost_usd: Annotated[Dollars, Meta(description="cost to reserve; default 0")] | None = None
    lease_id: (
        Annotated[str, Meta(min_length=1, max_length=128, description="default: a new one")] | None
    ) = None
    key_id: (
        Annotated[Text, Meta(description="the user's API key: its own limits are charged too")]
        | None
    ) = None


class ReservationBody(Struct):
    """A reservation as ``/v1/check`` gave it: send it back to ``/v1/reconcile``."""

    principal: Annotated[Text, Meta(description="the user id")]
    lease_id: Annotated[str, Meta(min_length=1, max_length=128)]
    tokens: Tokens
    cost_micros: Annotated[int, Meta(ge=0, le=2**53)]
    admitted_at: Annotated[float, Meta(ge=0, le=1e11, description="Unix seconds")]
    day: Annotated[str, Meta(min_length=1, max_length=10)]
    month: Annotated[str, Meta(min_length=1, max_length=7)]
    team_id: Annotated[Text, Meta(description="the team whose budget it charged")] | None = None
    key_id: Annotated[Text, Meta(description="the key whose own limits it charged")] | None = None

    @classmethod
    def of(cls, reservation: Reservation) -> ReservationBody:
        return cls(
            principal=reservation.principal,
            lease_id=reservation.lease_id,
            tokens=reservation.tokens,
            cost_micros=reservation.cost_micros,
            admitted_at=reservation.admitted_at,
            day=reservation.day,
            month=reservation.month,
            team_id=next((s.id for s in reservation.scopes if s.kind == "team"), None),
            key_id=next((s.id for s in reservation.scopes if s.kind == "key"), None),
        )

    def reservation(self, key_limits: Limits | None = None) -> Reservation:
        """The reservation to settle; ``key_limits``: its key's own (which counters it keeps)."""
        # settling reads only which of a scope's counters are kept: a team's, its budget's
        scopes: list[Scope] = []
        if self.key_id is not None and key_limits is not None:
            scopes.append(Scope("key", self.key_id, key_limits))
        if self.team_id is not None:
            scopes.append(Scope("team", self.team_id, Limits(cost_per_month_micros=0)))
        return Reservation(
            principal=self.principal,
            lease_id=self.lease_id,
            tokens=self.tokens,
            cost_micros=self.cost_micros,
            admitted_at=self.admitted_at,
            day=self.day,
            month=self.month,
            scopes=tuple(scopes),
        )


class Reconcile(Struct):
    reservation: ReservationBody
    tokens: Annotated[Tokens, Meta(description="tokens actually used")]
    cost_usd: Annotated[Dollars, Meta(description="actual cost; default: as reserved")] | None = (
        None
    )


# -- replies ----------------------------------------------------------------------------------


def timestamp(value: datetime | float) -> str:
    """RFC 3339 in UTC, to the millisecond: ``2026-11-24T08:00:00.250Z``."""
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(value, UTC)
    text = value.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z").replace(".000Z", "Z")


def _maybe(value: datetime | None) -> str | None:
    return None if value is None else timestamp(value)


def _usd(micros: int | None) -> float | None:
    return None if micros is None else micros / 1_000_000


class TeamReply(msgspec.Struct):
    id: str
    name: str
    created_at: Time
    budget_usd: Annotated[
        float | None, Meta(description="its own monthly budget; null: its members' summed")
    ] = None
    deleted_at: Annotated[Time | None, Meta(description="null: not deleted")] = None
    object: Literal["team"] = "team"

    @classmethod
    def of(cls, team: Team) -> TeamReply:
        return cls(
            id=team.id,
            name=team.name,
            created_at=timestamp(team.created_at),
            budget_usd=_usd(team.budget_micros),
            deleted_at=None if team.deleted_at is None else timestamp(team.deleted_at),
        )


class TeamBudgetReply(msgspec.Struct):
    """A team's own monthly budget and what its members' requests have charged to it."""

    team_id: str
    name: str
    budget_usd: Annotated[float | None, Meta(description="null: no budget of its own")]
    spent_usd: Annotated[
        float | None,
        Meta(
            description="this month, reservations not yet settled included, as the limiter "
            "counts it from when the budget was set; null when there is no budget"
        ),
    ]
    remaining_usd: float | None
    month: Annotated[str, Meta(description="the calendar month, in limits.timezone")]
    resets_at: Time
    object: Literal["team_budget"] = "team_budget"


class LimitsReply(msgspec.Struct):
    """null: no limit."""

    requests_per_minute: int | None
    tokens_per_minute: int | None
    concurrent_requests: int | None
    tokens_per_day: int | None
    tokens_per_month: int | None
    cost_per_month_usd: float | None

    @classmethod
    def of(cls, limits: Limits) -> LimitsReply:
        cost = limits.cost_per_month_micros
        return cls(
            requests_per_minute=limits.requests_per_minute,
            tokens_per_minute=limits.tokens_per_minute,
            concurrent_requests=limits.concurrent_requests,
            tokens_per_day=limits.tokens_per_day,
            tokens_per_month=limits.tokens_per_month,
            cost_per_month_usd=None if cost is None else cost / 1_000_000,
        )


class UserReply(msgspec.Struct):
    id: str
    name: str
    email: str
    team_id: str | None
    tier: str
    status: UserStatus
    overrides: Annotated[
        dict[str, float | None], Meta(description="limits set for this user alone")
    ]
    limits: Annotated[
        LimitsReply | None, Meta(description="effective; null when the tier is not configured")
    ]
    created_at: Time
    deleted_at: Annotated[Time | None, Meta(description="null: not deleted")] = None
    object: Literal["user"] = "user"

    @classmethod
    def of(cls, user: User, limits: Limits | None) -> UserReply:
        return cls(
            id=user.id,
            name=user.name,
            email=user.email,
            team_id=user.team_id,
            tier=user.tier,
            status=user.status,
            overrides=dict(user.overrides),
            limits=None if limits is None else LimitsReply.of(limits),
            created_at=timestamp(user.created_at),
            deleted_at=None if user.deleted_at is None else timestamp(user.deleted_at),
        )


class KeyReply(msgspec.Struct):
    id: str
    user_id: str
    name: str
    prefix: Annotated[str, Meta(description="the secret's first characters")]
    status: Literal["active", "revoked", "expired"]
    created_at: Time
    last_used_at: Time | None
    expires_at: Time | None
    revoked_at: Time | None
    budget_usd: Annotated[float | None, Meta(description="its own monthly budget")] = None
    models: Annotated[list[str] | None, Meta(description="the models it may use; null: any")] = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    object: Literal["api_key"] = "api_key"

    @classmethod
    def of(cls, key: ApiKey, now: datetime) -> KeyReply:
        status: Literal["active", "revoked", "expired"] = "active"
        if key.revoked_at is not None:
            status = "revoked"
        elif key.expires_at is not None and key.expires_at <= now:
            status = "expired"
        return cls(
            id=key.id,
            user_id=key.user_id,
            name=key.name,
            prefix=key.prefix,
            status=status,
            created_at=timestamp(key.created_at),
            last_used_at=_maybe(key.last_used_at),
            expires_at=_maybe(key.expires_at),
            revoked_at=_maybe(key.revoked_at),
            budget_usd=_usd(key.limits.budget_micros),
            models=None if key.limits.models is None else list(key.limits.models),
            requests_per_minute=key.limits.requests_per_minute,
            tokens_per_minute=key.limits.tokens_per_minute,
        )


class NewKeyReply(KeyReply, kw_only=True):
    secret: Annotated[str, Meta(description="shown this once; it cannot be shown again")]
    warning: str = "This is the only time the secret is shown; it cannot be shown again."


class TierReply(msgspec.Struct):
    name: str
    default: Annotated[bool, Meta(description="the tier of users created without one")]
    limits: LimitsReply
    models: Annotated[list[str], Meta(description='"*": all')]
    object: Literal["tier"] = "tier"

    @classmethod
    def of(cls, tier: Tier, limits: Limits, *, default: bool) -> TierReply:
        return cls(
            name=tier.name,
            default=default,
            limits=LimitsReply.of(limits),
            models=list(tier.models),
        )


class LimitUsageReply(msgspec.Struct):
    name: str
    unit: Literal["requests", "tokens", "usd"]
    limit: float
    used: float
    remaining: float
    reset_at: Time
    resets_in: Annotated[float, Meta(description="seconds")]


class UsageReply(msgspec.Struct):
    user_id: str
    tier: str
    limits: Annotated[
        list[LimitUsageReply],
        Meta(description="one per limit that is set; used counts reservations not reconciled"),
    ]
    object: Literal["usage"] = "usage"

    @classmethod
    def of(cls, user: User, snapshot: UsageSnapshot, now: float) -> UsageReply:
        limits = []
        for usage in snapshot.limits:
            cost = usage.name == "cost_per_month"

            def figure(value: int, cost: bool = cost) -> float:
                return value / 1_000_000 if cost else value

            limits.append(
                LimitUsageReply(
                    name=usage.name,
                    unit="usd" if cost else "tokens" if "tokens" in usage.name else "requests",
                    limit=figure(usage.limit),
                    used=figure(usage.used),
                    remaining=figure(usage.remaining),
                    reset_at=timestamp(usage.reset_at),
                    resets_in=round(max(0.0, usage.reset_at - now), 3),
                )
            )
        return cls(user_id=user.id, tier=user.tier, limits=limits)


class RateReply(msgspec.Struct):
    limit: int
    remaining: int | None
    reset_seconds: float | None


class RefusalReply(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class DecisionReply(msgspec.Struct):
    allowed: bool
    refused_by: str | None
    refused_scope: Annotated[
        Literal["user", "key", "team"] | None, Meta(description="whose limit refused")
    ]
    retry_after: Annotated[float, Meta(description="seconds")]
    requests: RateReply | None
    tokens: RateReply | None
    reservation: Annotated[
        ReservationBody | None, Meta(description="send it to /v1/reconcile when done")
    ]
    error: Annotated[RefusalReply, Meta(description="when refused: which limit, when to retry")] | (
        UnsetType
    ) = UNSET
    object: Literal["limit_decision"] = "limit_decision"

    @classmethod
    def of(cls, decision: LimitDecision) -> DecisionReply:
        def rate(limit: int | None, remaining: int | None, reset: float | None) -> RateReply | None:
            return None if limit is None else RateReply(limit, remaining, reset)

        reservation = decision.reservation
        return cls(
            allowed=decision.allowed,
            refused_by=decision.refused_by,
            refused_scope=decision.refused_scope,
            retry_after=decision.retry_after,
            requests=rate(
                decision.requests_limit, decision.requests_remaining, decision.requests_reset
            ),
            tokens=rate(decision.tokens_limit, decision.tokens_remaining, decision.tokens_reset),
            reservation=None if reservation is None else ReservationBody.of(reservation),
        )
