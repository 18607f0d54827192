"""The graph's object types: each wraps a store record (``strawberry.Private``) and resolves its
relations through the request's loaders (``citadel.graphql.context``), never the store directly,
so a relation costs one batched read per request whatever the number of parents."""

from __future__ import annotations

import enum
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import strawberry
from strawberry.scalars import JSON
from strawberry.types import Info

from citadel.accounts import store as accounts
from citadel.errors import Unauthorized
from citadel.graphql.context import Context, limits_of
from citadel.graphql.pagination import Items, connection
from citadel.graphql.replies import FromReply, from_reply
from citadel.limits.bodies import LimitsReply
from citadel.limits.decision import Limits as LimitValues
from citadel.limits.decision import LimitUsage
from citadel.metering.bodies import BudgetRow, CostRow, SavingsRow
from citadel.metering.budgets import BudgetUse
from citadel.metering.pricing import DeploymentCost, Savings
from citadel.metering.ranges import TimeRange
from citadel.metering.rollups import UsageRow
from citadel.settings import Model as ModelSettings
from citadel.settings import Tier as TierSettings

__all__ = [
    "ApiKey",
    "Budget",
    "Deployment",
    "DeploymentCostItem",
    "Limits",
    "Model",
    "NewApiKey",
    "Price",
    "Quota",
    "SavingsItem",
    "Team",
    "Tier",
    "Usage",
    "User",
    "UserStatus",
    "context",
    "default_range",
    "usd",
]

_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)
DEFAULT_DAYS = 30


def context(info: Info) -> Context:
    found: Context | None = info.context.get("citadel")
    if found is None:  # graphql-ws lets a client start before connection_init
        raise Unauthorized(
            "Send the API key in connection_init's payload first: "
            '{"authorization": "Bearer YOUR_KEY"}.',
            code="missing_api_key",
        )
    return found


def usd(micros: int | None) -> float | None:
    return None if micros is None else micros / 1_000_000


@strawberry.input(description="A half-open time range [start, end) of whole UTC hours.")
class TimeRangeInput:
    start: datetime | None = strawberry.field(
        default=None, description="default: 30 days before end"
    )
    end: datetime | None = strawberry.field(
        default=None, description="default: the end of the current hour (day, with daily buckets)"
    )


def default_range(given: TimeRangeInput | None, now: datetime, bucket: str = "none") -> TimeRange:
    """The range asked for, checked (``QueryError`` names the bad bound), by default the 30 days
    up to the end of the current hour (day, with daily buckets), as the custom-metrics API."""
    end = given.end if given is not None else None
    start = given.start if given is not None else None
    if end is None:
        hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        end = hour.replace(hour=0) + _DAY if bucket == "day" else hour + _HOUR
    if start is None:
        start = end - timedelta(days=DEFAULT_DAYS if bucket != "hour" else 1)
    return TimeRange.checked(start, end, bucket)  # type: ignore[arg-type]


@strawberry.enum(description="Whether a user's keys work.")
class UserStatus(enum.Enum):
    ACTIVE = "active"
    DISABLED = "disabled"


# -- limits, quota, usage ---------------------------------------------------------------------


@from_reply(LimitsReply)
class Limits(FromReply):
    """Limits in force (a tier with a user's overrides); null: unlimited."""

    @classmethod
    def of(cls, limits: LimitValues) -> Limits:
        built: Limits = cls.of_reply(LimitsReply.of(limits))
        return built


@strawberry.type(description="The current use of one limit.")
class Quota:
    name: str
    limit: int
    used: int
    remaining: int
    reset_at: datetime

    @classmethod
    def of(cls, use: LimitUsage) -> Quota:
        return cls(
            name=use.name,
            limit=use.limit,
            used=use.used,
            remaining=use.remaining,
            reset_at=datetime.fromtimestamp(use.reset_at, UTC),
        )


@strawberry.type(description="Usage of one group (and one time bucket, when bucketed).")
class Usage:
    bucket: datetime | None
    keys: JSON = strawberry.field(description='grouping -> value, e.g. {"user": "usr_..."}')
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    tokens: int
    cost_usd: float
    mean_latency_ms: float | None
    mean_ttft_ms: float | None

    @classmethod
    def of(cls, row: UsageRow) -> Usage:
        return cls(
            bucket=row.bucket,
            keys=JSON(dict(row.keys)),
            requests=row.requests,
            errors=row.errors,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            tokens=row.tokens,
            cost_usd=row.cost_micros / 1_000_000,
            mean_latency_ms=row.latency_ms_sum / row.requests if row.requests else None,
            mean_ttft_ms=row.ttft_ms_sum / row.ttft_requests if row.ttft_requests else None,
        )

    @classmethod
    def empty(cls, keys: dict[str, str]) -> Usage:
        return cls(
            bucket=None,
            keys=JSON(keys),
            requests=0,
            errors=0,
            prompt_tokens=0,
            completion_tokens=0,
            tokens=0,
            cost_usd=0.0,
            mean_latency_ms=None,
            mean_ttft_ms=None,
        )


# -- accounts ---------------------------------------------------------------------------------


@strawberry.type(description="An API key: its prefix and dates, never its secret.")
class ApiKey:
    id: strawberry.ID
    user_id: strawberry.ID
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None
    # its own limits, on top of its owner's (null: none of its own)
    budget_usd: float | None = None
    models: list[str] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @strawberry.field
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @classmethod
    def of(cls, key: accounts.ApiKey) -> ApiKey:
        own = key.limits
        return cls(
            id=strawberry.ID(key.id),
            user_id=strawberry.ID(key.user_id),
            name=key.name,
            prefix=key.prefix,
            created_at=key.created_at,
            last_used_at=key.last_used_at,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
            budget_usd=None if own.budget_micros is None else own.budget_micros / 1_000_000,
            models=None if own.models is None else list(own.models),
            requests_per_minute=own.requests_per_minute,
            tokens_per_minute=own.tokens_per_minute,
        )


@strawberry.type(description="A new API key; `secret` is shown this once and never again.")
class NewApiKey:
    key: ApiKey
    secret: str


@strawberry.type
class User:
    id: strawberry.ID
    name: str
    email: str
    tier: str
    status: UserStatus
    team_id: strawberry.ID | None
    created_at: datetime
    record: strawberry.Private[accounts.User]

    @classmethod
    def of(cls, user: accounts.User) -> User:
        return cls(
            id=strawberry.ID(user.id),
            name=user.name,
            email=user.email,
            tier=user.tier,
            status=UserStatus(user.status),
            team_id=None if user.team_id is None else strawberry.ID(user.team_id),
            created_at=user.created_at,
            record=user,
        )

    @strawberry.field(description="The user's team, if any.")
    async def team(self, info: Info) -> Team | None:
        if self.record.team_id is None:
            return None
        team = await context(info).loaders.team.load(self.record.team_id)
        return None if team is None else Team.of(team)

    @strawberry.field(description="The user's own limit overrides (null values: unlimited).")
    def overrides(self) -> JSON:
        return JSON(dict(self.record.overrides))

    @strawberry.field(description="The limits in force: the tier's with the overrides.")
    def limits(self, info: Info) -> Limits | None:
        limits = limits_of(context(info).services.settings, self.record)
        return None if limits is None else Limits.of(limits)

    @strawberry.field(
        description="The current use of each limit that is set; null when the limiter is "
        "in-memory (its counters are in the gateway's own process)."
    )
    async def quota(self, info: Info) -> list[Quota] | None:
        snapshot = await context(info).loaders.quota.load(self.record.id)
        return None if snapshot is None else [Quota.of(u) for u in snapshot.limits]

    @connection("The user's API keys, oldest first (never their secrets).")
    async def keys(
        self,
        info: Info,
    ) -> list[ApiKey]:
        keys = await context(info).loaders.keys.load(self.record.id)
        return [ApiKey.of(k) for k in keys]

    @strawberry.field(
        description="The user's usage over a range (default: the last 30 days).",
        graphql_type=Usage,
    )
    def usage(self, info: Info, range: TimeRangeInput | None = None) -> Usage | Awaitable[Usage]:
        return usage_of(info, range, "user", self.record.id)


@strawberry.type
class Team:
    id: strawberry.ID
    name: str
    created_at: datetime
    budget_usd: float | None = strawberry.field(
        description="the team's own monthly budget (null: its members' budgets summed)"
    )

    @classmethod
    def of(cls, team: accounts.Team) -> Team:
        return cls(
            id=strawberry.ID(team.id),
            name=team.name,
            created_at=team.created_at,
            budget_usd=usd(team.budget_micros),
        )

    @connection("The team's members (a user key: only itself).")
    def users(self, info: Info) -> Items[User]:
        loaders = context(info).loaders
        members = loaders.members_now(str(self.id))  # read already (Query.teams prefetches)
        if members is not None:
            return [User.of(u) for u in members]
        return _users(loaders.members.load(str(self.id)))

    @strawberry.field(
        description="The team's usage over a range (default: the last 30 days).",
        graphql_type=Usage,
    )
    def usage(self, info: Info, range: TimeRangeInput | None = None) -> Usage | Awaitable[Usage]:
        return usage_of(info, range, "team", str(self.id))


async def _users(members: Awaitable[list[accounts.User]]) -> list[User]:
    return [User.of(u) for u in await members]


def usage_of(
    info: Info, given: TimeRangeInput | None, by: str, ident: str
) -> Usage | Awaitable[Usage]:
    """The usage of a user or team: at once when the request's table for the range is read
    already (a list above prefetched it), else once it is."""
    ctx = context(info)
    now = ctx.services.now()
    span = (
        ctx.loaders.default_span(now, lambda at: default_range(None, at))
        if given is None
        else default_range(given, now)
    )
    table = ctx.loaders.usage_now(span, by)
    if table is not None:
        return _usage_row(table, by, ident)
    return _usage_later(ctx, span, by, ident)


def _usage_row(table: dict[str, UsageRow], by: str, ident: str) -> Usage:
    row = table.get(ident)
    return Usage.empty({by: ident}) if row is None else Usage.of(row)


async def _usage_later(ctx: Context, span: TimeRange, by: str, ident: str) -> Usage:
    return _usage_row(await ctx.loaders.usage_table(span, by), by, ident)


# -- models and deployments --------------------------------------------------------------------


@strawberry.type(description="USD per 1000 tokens.")
class Price:
    input_per_1k: float
    output_per_1k: float


@strawberry.type(description="A tier: its limits and the models it allows.")
class Tier:
    name: str
    limits: Limits
    models: list[str]
    default: bool

    @classmethod
    def of(cls, tier: TierSettings, *, default: bool) -> Tier:
        from citadel.limits.policy import effective_limits

        return cls(
            name=tier.name,
            limits=Limits.of(effective_limits(tier, {})),
            models=list(tier.models),
            default=default,
        )


@strawberry.type(description="A deployment's live state in this service's router.")
class Deployment:
    name: str
    model: str
    url: str
    breaker: str = strawberry.field(description="closed, open or half_open")
    breaker_trips: int
    breaker_open_seconds: float | None
    breaker_held_open: bool
    window_failure_rate: float
    healthy: bool
    health_detail: str | None
    drained: bool
    in_flight: int
    latency_ewma_seconds: float | None
    error_rate_ewma: float | None
    requests: int
    failures: int
    last_error: str | None

    @strawberry.field(description="healthy, unhealthy, drained or open (the breaker)")
    def state(self) -> str:
        if self.drained:
            return "drained"
        if self.breaker != "closed":
            return self.breaker
        return "healthy" if self.healthy else "unhealthy"

    @classmethod
    def of(cls, row: dict[str, Any]) -> Deployment:
        return cls(
            name=row["deployment"],
            model=row["model"],
            url=row["url"],
            breaker=row["breaker"],
            breaker_trips=row["breaker_trips"],
            breaker_open_seconds=row["breaker_open_seconds"],
            breaker_held_open=row["breaker_held_open"],
            window_failure_rate=row["window_failure_rate"],
            healthy=row["healthy"],
            health_detail=row["health_detail"],
            drained=row["drained"],
            in_flight=row["in_flight"],
            latency_ewma_seconds=row["latency_ewma_seconds"],
            error_rate_ewma=row["error_rate_ewma"],
            requests=row["requests"],
            failures=row["failures"],
            last_error=row["last_error"],
        )


@strawberry.type
class Model:
    name: str
    kind: str
    aliases: list[str]
    specialties: list[str]
    context_window: int
    fallbacks: list[str]
    price: Price
    reference_price: Price | None
    settings: strawberry.Private[ModelSettings]

    @classmethod
    def of(cls, model: ModelSettings) -> Model:
        ref = model.reference_price
        return cls(
            name=model.name,
            kind=model.kind,
            aliases=list(model.aliases),
            specialties=list(model.specialties),
            context_window=model.context_window,
            fallbacks=list(model.fallbacks),
            price=Price(
                input_per_1k=model.price.input_per_1k, output_per_1k=model.price.output_per_1k
            ),
            reference_price=None
            if ref is None
            else Price(input_per_1k=ref.input_per_1k, output_per_1k=ref.output_per_1k),
            settings=model,
        )

    @strawberry.field(description="The tiers whose keys may use this model.")
    def tiers_allowed(self, info: Info) -> list[str]:
        names = (self.name, *self.settings.aliases)
        tiers = context(info).services.settings.tiers
        return [t.name for t in tiers if any(t.allows(n) for n in names)]

    @connection("The model's deployments and their live state.")
    def deployments(
        self,
        info: Info,
    ) -> list[Deployment]:
        from citadel.routing.shared import deployment_rows

        services = context(info).services
        rows = [
            r
            for r in deployment_rows(services.router, services.monotonic())
            if r["model"] == self.name
        ]
        return [Deployment.of(r) for r in rows]


# -- analytics --------------------------------------------------------------------------------


@from_reply(CostRow)
class DeploymentCostItem(FromReply):
    """One deployment over a range: what it served and what it cost (the ledger API's row)."""

    @classmethod
    def of(cls, cost: DeploymentCost) -> DeploymentCostItem:
        built: DeploymentCostItem = cls.of_reply(CostRow.of(cost))
        return built


@from_reply(SavingsRow)
class SavingsItem(FromReply):
    """What serving a model ourselves saved against its reference price (the ledger API's row)."""

    @classmethod
    def of(cls, item: Savings) -> SavingsItem:
        built: SavingsItem = cls.of_reply(SavingsRow.of(item))
        return built


@from_reply(BudgetRow)
class Budget(FromReply):
    """This month's spend of a user or team against its budget (the ledger API's row)."""

    @classmethod
    def of(cls, row: BudgetUse) -> Budget:
        built: Budget = cls.of_reply(BudgetRow.of(row))
        return built
