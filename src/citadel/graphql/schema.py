"""The schema: queries, mutations and subscriptions over the stores (``build_schema``).

Every read goes through the request's loaders or the pure modules the REST services use:
the accounts store (teams, users, keys), the limiter (quota use), the ledger analytics of
``citadel.metering.analytics`` (usage, top users, budgets, costs, savings), the router's live
state and the routing dry run (``citadel.routing.dryrun``), and the live event feed
(``citadel.feed``) for subscriptions. No HTTP call to another service.

Mutations need the admin key, except that a user may create and revoke keys of its own.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncGenerator, Awaitable, Sequence
from datetime import datetime
from typing import Any

import msgspec
import orjson
import strawberry
from graphql import GraphQLError
from strawberry.extensions import MaxAliasesLimiter, MaxTokensLimiter, QueryDepthLimiter
from strawberry.scalars import JSON
from strawberry.schema.config import StrawberryConfig
from strawberry.types import ExecutionContext, Info
from strawberry.types.nodes import SelectedField, Selection

from citadel.accounts.store import OVERRIDABLE
from citadel.alerting.definitions import Kind
from citadel.errors import ApiError, BadRequest, Forbidden, NotFound, Unavailable
from citadel.feed.open import USAGE
from citadel.graphql.alerting import Alert, AlertingView, Evaluation
from citadel.graphql.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionInput,
    complete,
    stream,
)
from citadel.graphql.fanout import SharedEventExecutor
from citadel.graphql.live import (
    ALERTS,
    DEPLOYMENTS,
    AlertEvent,
    DeploymentStateEvent,
    UsageEvent,
    UsageEventFilter,
    alert_event,
    deployment_event,
    follow,
    usage_event,
    usage_filter,
    visible_models,
)
from citadel.graphql.observe import GraphQLMetrics, OperationMetrics
from citadel.graphql.pagination import connection
from citadel.graphql.persisted import MemoryQueryStore, PersistedQueries, QueryStore
from citadel.graphql.protect import CostBudget, CostLimiter, Translate
from citadel.graphql.types import (
    ApiKey,
    Budget,
    Deployment,
    DeploymentCostItem,
    Model,
    NewApiKey,
    SavingsItem,
    Team,
    Tier,
    TimeRangeInput,
    Usage,
    User,
    UserStatus,
    context,
    default_range,
)
from citadel.limits.bodies import NewKey
from citadel.limits.budgets import LedgerTeamSpend, count_ledger_spend
from citadel.limits.keys import key_terms
from citadel.limits.policy import usd_to_micros
from citadel.metering.analytics import savings_by_model
from citadel.metering.pricing import DeploymentCost
from citadel.metering.ranges import Dimension, check_group_by
from citadel.metrics import Registry

__all__ = ["build_schema"]


@strawberry.enum(description="What usage can be grouped or filtered by.")
class UsageDimension(enum.Enum):
    USER = "user"
    TEAM = "team"
    MODEL = "model"
    DEPLOYMENT = "deployment"
    TIER = "tier"


@strawberry.enum(description="Time buckets of usage.")
class UsageBucket(enum.Enum):
    HOUR = "hour"
    DAY = "day"
    NONE = "none"


@strawberry.enum(description="What the largest are ranked by.")
class UsageMetric(enum.Enum):
    COST = "cost"
    TOKENS = "tokens"
    REQUESTS = "requests"
    ERRORS = "errors"


@strawberry.input(description="Only the usage of these (each optional).")
class UsageFilter:
    user: str | None = None
    team: str | None = None
    model: str | None = None
    deployment: str | None = None
    tier: str | None = None


@strawberry.type(description="Who the caller is.")
class Viewer:
    admin: bool
    user_id: strawberry.ID | None
    team_id: strawberry.ID | None


@strawberry.type(description="The routing dry run: which deployment a request would get, and why.")
class RouteExplanation:
    requested_model: str
    model: str | None
    virtual: bool
    endpoint: str
    task: str
    prompt_tokens: int
    needed_tokens: int
    deployment: str | None
    deployment_model: str | None
    reason: str
    evaluations: JSON


def _filters(given: UsageFilter | None, info: Info) -> dict[Dimension, str]:
    viewer = context(info).viewer
    filters: dict[Dimension, str] = {}
    if given is not None:
        for name in ("user", "team", "model", "deployment", "tier"):
            value = getattr(given, name)
            if value is not None:
                filters[name] = value
    if not viewer.admin:
        asked = filters.get("user")
        if asked is not None and asked != viewer.principal.user:
            raise Forbidden("A user's key sees only its own usage.", param="filter.user")
        filters["user"] = viewer.principal.user  # scoped in the query itself
    return filters


def _now(info: Info) -> datetime:
    return context(info).services.now()


async def _deployment_costs(
    info: Info, span: TimeRangeInput | None, field: str
) -> list[DeploymentCost]:
    ctx = context(info)
    ctx.viewer.require_admin(field)
    now = _now(info)
    return await ctx.services.analytics.deployment_costs(
        default_range(span, now), now=now, settings=ctx.services.settings
    )


def _named(selections: Sequence[Selection], name: str) -> list[SelectedField]:
    """The fields called ``name`` among ``selections`` (through fragments)."""
    found: list[SelectedField] = []
    for selection in selections:
        if isinstance(selection, SelectedField):
            if selection.name == name:
                found.append(selection)
        else:
            found.extend(_named(selection.selections, name))
    return found


def _items_of(connections: Sequence[SelectedField]) -> list[Selection]:
    """What is selected of the items of connection fields (``nodes``, ``edges { node }``)."""
    items: list[Selection] = []
    for field in connections:
        for nodes in _named(field.selections, "nodes"):
            items.extend(nodes.selections)
        for edges in _named(field.selections, "edges"):
            for node in _named(edges.selections, "node"):
                items.extend(node.selections)
    return items


def _prefetch(info: Info, kind: str) -> list[Awaitable[object]]:
    """The reads a list of teams or users will make for its items' fields, started with the
    list's own: the members of teams, and the usage (over the default range) of teams and
    users. The nested fields then find them read (``Loaders.members_now``, ``usage_now``) and
    resolve without awaiting; the SQL statements are the same as without (one per relation)."""
    ctx = context(info)
    loaders = ctx.loaders
    span = default_range(None, ctx.services.now())
    items = _items_of([f for f in info.selected_fields if isinstance(f, SelectedField)])
    reads: list[Awaitable[object]] = []
    if kind == "team":
        if any(not u.arguments for u in _named(items, "usage")):
            reads.append(loaders.usage_table(span, "team"))
        members = _named(items, "users")
        if not members:
            return reads
        reads.append(loaders.all_users())
        items = _items_of(members)
    if any(not u.arguments for u in _named(items, "usage")):
        reads.append(loaders.usage_table(span, "user"))
    return reads


@strawberry.type
class Query:
    @strawberry.field(description="Who the caller is (the admin key, or a user's key).")
    def viewer(self, info: Info) -> Viewer:
        v = context(info).viewer
        return Viewer(
            admin=v.admin,
            user_id=None if v.user_id is None else strawberry.ID(v.user_id),
            team_id=None if v.team_id is None else strawberry.ID(v.team_id),
        )

    @connection("The configured models, their prices and deployments.")
    def models(
        self,
        info: Info,
    ) -> list[Model]:
        return [Model.of(m) for m in context(info).services.settings.models]

    @strawberry.field(description="One model by name or alias.")
    def model(self, info: Info, name: str) -> Model | None:
        found = context(info).services.settings.model(name)
        return None if found is None else Model.of(found)

    @connection("The tiers and their limits.")
    def tiers(
        self,
        info: Info,
    ) -> list[Tier]:
        settings = context(info).services.settings
        default = settings.accounts.default_tier
        return [Tier.of(t, default=t.name == default) for t in settings.tiers]

    @strawberry.field(
        description="The routing dry run of a request to `model` (a model, alias or `auto`): "
        "nothing is sent, no breaker probed, no balancer advanced."
    )
    def route_explain(
        self,
        info: Info,
        model: str,
        task: str | None = None,
        prompt: str | None = None,
        max_tokens: int | None = None,
    ) -> RouteExplanation:
        from citadel.routing.dryrun import dry_run

        services = context(info).services
        body: dict[str, Any] = {"model": model}
        if prompt is not None:
            body["messages"] = [{"role": "user", "content": prompt}]
        if task is not None:
            body["task"] = task
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        result = dry_run(
            services.settings, services.router, orjson.dumps(body), None, services.monotonic
        )
        return RouteExplanation(
            requested_model=result.requested_model,
            model=result.model if result.model is not None else model,
            virtual=result.virtual,
            endpoint=result.endpoint,
            task=result.task,
            prompt_tokens=result.prompt_tokens,
            needed_tokens=result.needed_tokens,
            deployment=result.deployment,
            deployment_model=result.deployment_model,
            reason=result.reason,
            evaluations=msgspec.to_builtins(result.evaluations),
        )

    @connection("Teams (a user key: its own).")
    async def teams(self, info: Info) -> list[Team]:
        loaders = context(info).loaders
        prefetched = asyncio.gather(*_prefetch(info, "team"))  # running beside the teams' read
        teams = await loaders.all_teams()
        await prefetched
        return [Team.of(t) for t in teams]

    @strawberry.field(description="One team (null: none, or not the caller's).")
    async def team(self, info: Info, id: strawberry.ID) -> Team | None:
        found = await context(info).loaders.team.load(str(id))
        return None if found is None else Team.of(found)

    @connection("Users, optionally of one team (a user key: itself).")
    async def users(
        self,
        info: Info,
        team_id: strawberry.ID | None = None,
    ) -> list[User]:
        loaders = context(info).loaders
        prefetched = asyncio.gather(*_prefetch(info, "user"))
        users = (
            await loaders.all_users()
            if team_id is None
            else await loaders.members.load(str(team_id))
        )
        await prefetched
        return [User.of(u) for u in users]

    @strawberry.field(description="One user (null: none, or not the caller).")
    async def user(self, info: Info, id: strawberry.ID) -> User | None:
        found = await context(info).loaders.user.load(str(id))
        return None if found is None else User.of(found)

    @connection("Usage from the ledger, grouped and bucketed (a user key: its own).")
    async def usage(
        self,
        info: Info,
        group_by: list[UsageDimension] | None = None,
        filter: UsageFilter | None = None,
        range: TimeRangeInput | None = None,
        bucket: UsageBucket = UsageBucket.NONE,
    ) -> list[Usage]:
        dims = check_group_by(d.value for d in group_by or ())
        span = default_range(range, _now(info), bucket.value)
        rows = await context(info).services.analytics.usage(
            span,
            group_by=dims,
            bucket=bucket.value,
            filters=_filters(filter, info),
        )
        return [Usage.of(r) for r in rows]

    @connection("The largest users (teams, models...) by a metric (admin).")
    async def top_users(
        self,
        info: Info,
        by: UsageDimension = UsageDimension.USER,
        metric: UsageMetric = UsageMetric.COST,
        range: TimeRangeInput | None = None,
    ) -> list[Usage]:
        context(info).viewer.require_admin("topUsers")
        span = default_range(range, _now(info))
        rows = await context(info).services.analytics.top(
            span,
            by=by.value,
            metric=metric.value,
            limit=100,
        )
        return [Usage.of(r) for r in rows]

    @connection("Each deployment's charged and infrastructure cost (admin).")
    async def costs(
        self,
        info: Info,
        range: TimeRangeInput | None = None,
    ) -> list[DeploymentCostItem]:
        costs = await _deployment_costs(info, range, "costs")
        return [DeploymentCostItem.of(c) for c in costs]

    @connection("Savings against each model's reference price (admin).")
    async def savings(
        self,
        info: Info,
        range: TimeRangeInput | None = None,
    ) -> list[SavingsItem]:
        costs = await _deployment_costs(info, range, "savings")
        settings = context(info).services.settings
        return [SavingsItem.of(s) for s in savings_by_model(costs, settings)]

    @connection("This month's spend against budget, of users or teams.")
    async def budgets(
        self,
        info: Info,
        scope: UsageDimension = UsageDimension.TEAM,
    ) -> list[Budget]:
        if scope not in (UsageDimension.USER, UsageDimension.TEAM):
            raise BadRequest("'scope' must be USER or TEAM.", param="scope")
        ctx = context(info)
        users = await ctx.loaders.all_users()
        teams = await ctx.loaders.all_teams()
        _, rows = await ctx.services.analytics.budgets(
            scope.value,
            now=_now(info),
            settings=ctx.services.settings,
            users=users,
            teams=teams,
        )
        visible = [
            r
            for r in rows
            if (
                ctx.viewer.may_see_user(r.id)
                if r.scope == "user"
                else ctx.viewer.may_see_team(r.id)
            )
        ]
        return [Budget.of(r) for r in visible]

    @connection(
        "The latest forecast of each forecast rule (a user key: its team's spend "
        "forecasts), evaluated by the predictive-alerting modules at most once per interval."
    )
    async def forecasts(
        self,
        info: Info,
    ) -> list[Evaluation]:
        return await _evaluations(info, "forecast")

    @connection("The latest anomaly score of each anomaly rule (a user key: its team's).")
    async def anomalies(
        self,
        info: Info,
    ) -> list[Evaluation]:
        return await _evaluations(info, "anomaly")

    @connection("The alerts firing now (a user key: its team's).")
    async def alerts(
        self,
        info: Info,
    ) -> list[Alert]:
        ctx = context(info)
        view = _alerting(info)
        firing = await view.firing(team=None if ctx.viewer.admin else ctx.viewer.team_id or "")
        return [Alert.of(rule, alert) for rule, alert in firing]


def _alerting(info: Info) -> AlertingView:
    view = context(info).services.alerting
    if view is None:
        raise Unavailable("The predictive-alerting state is not configured in this service.")
    return view


async def _evaluations(info: Info, kind: Kind) -> list[Evaluation]:
    viewer = context(info).viewer
    team = None if viewer.admin else viewer.team_id or ""
    return [Evaluation.of(e) for e in await _alerting(info).latest(kind, team=team)]


# -- mutations --------------------------------------------------------------------------------


@strawberry.input(description="Limit overrides (null: unlimited); a limit left out is unchanged.")
class OverridesInput:
    requests_per_minute: float | None = strawberry.UNSET
    tokens_per_minute: float | None = strawberry.UNSET
    concurrent_requests: float | None = strawberry.UNSET
    tokens_per_day: float | None = strawberry.UNSET
    tokens_per_month: float | None = strawberry.UNSET
    cost_per_month_usd: float | None = strawberry.UNSET


@strawberry.input
class CreateUserInput:
    name: str
    email: str
    tier: str | None = None
    team_id: strawberry.ID | None = None


@strawberry.input(description="The fields to change; a field left out is unchanged.")
class UpdateUserInput:
    name: str | None = None
    email: str | None = None
    tier: str | None = None
    team_id: strawberry.ID | None = None
    status: UserStatus | None = None
    overrides: OverridesInput | None = None


def _tier(info: Info, tier: str | None) -> str | None:
    settings = context(info).services.settings
    if tier is not None and settings.tier(tier.strip()) is None:
        names = ", ".join(t.name for t in settings.tiers)
        raise BadRequest(f"'tier' must be one of: {names}; got {tier!r}.", param="tier")
    return None if tier is None else tier.strip()


async def _require_team(info: Info, team_id: str, *, param: str = "teamId") -> None:
    teams = await context(info).services.accounts.list_teams()
    if all(t.id != team_id for t in teams):
        raise NotFound(f"No team has id {team_id!r}.", param=param)


@strawberry.input(description="The fields to change; a field left out is unchanged.")
class UpdateTeamInput:
    name: str | None = None
    budget_usd: float | None = strawberry.field(
        default=strawberry.UNSET,
        description="the team's own monthly budget; null: its members' budgets summed",
    )


async def _drain(info: Info, name: str, *, drained: bool, field: str) -> Deployment:
    ctx = context(info)
    ctx.viewer.require_admin(field)
    routing = ctx.services.routing
    if routing is None:
        raise Unavailable(f"{field} is not configured in this service.")
    changed = await routing.drain(name, drained=drained)
    return Deployment.of(msgspec.structs.asdict(changed.deployment))


async def _own_user(info: Info, user_id: str) -> None:
    """A user's key may act on its own user only; the admin on any that exists."""
    ctx = context(info)
    if not ctx.viewer.may_see_user(user_id):
        raise Forbidden("A user's key may change only its own keys.", param="userId")
    if await ctx.services.accounts.get_user(user_id) is None:
        raise NotFound(f"No user has id {user_id!r}.", param="userId")


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Create a team (admin).")
    async def create_team(self, info: Info, name: str) -> Team:
        ctx = context(info)
        ctx.viewer.require_admin("createTeam")
        if not name.strip():
            raise BadRequest("'name' must not be empty.", param="name")
        return Team.of(await ctx.services.accounts.create_team(name.strip()))

    @strawberry.mutation(description="Create a user (admin).")
    async def create_user(self, info: Info, input: CreateUserInput) -> User:
        ctx = context(info)
        ctx.viewer.require_admin("createUser")
        tier = _tier(info, input.tier) or ctx.services.settings.accounts.default_tier
        team_id = None if input.team_id is None else str(input.team_id).strip()
        if team_id is not None:
            await _require_team(info, team_id)
        user = await ctx.services.accounts.create_user(
            name=input.name.strip(), email=input.email.strip(), tier=tier, team_id=team_id
        )
        return User.of(user)

    @strawberry.mutation(
        description="Change a user: name, email, tier, team, status, overrides (admin)."
    )
    async def update_user(
        self,
        info: Info,
        id: strawberry.ID,
        input: UpdateUserInput,
    ) -> User:
        ctx = context(info)
        ctx.viewer.require_admin("updateUser")
        accounts = ctx.services.accounts
        team_id = None if input.team_id is None else str(input.team_id).strip()
        if team_id is not None:
            await _require_team(info, team_id)
        overrides: dict[str, float | None] | None = None
        if input.overrides is not None:
            current = await accounts.get_user(str(id))
            if current is None:
                raise NotFound(f"No user has id {str(id)!r}.", param="id")
            overrides = dict(current.overrides)
            for limit in OVERRIDABLE:
                value = getattr(input.overrides, limit)
                if value is not strawberry.UNSET:
                    overrides[limit] = value
        user = await accounts.update_user(
            str(id),
            name=None if input.name is None else input.name.strip(),
            email=None if input.email is None else input.email.strip(),
            tier=_tier(info, input.tier),
            team_id=team_id,
            status=None if input.status is None else input.status.value,
            overrides=overrides,
        )
        return User.of(user)

    @strawberry.mutation(description="Disable a user: their keys stop working (admin).")
    async def disable_user(self, info: Info, id: strawberry.ID) -> User:
        ctx = context(info)
        ctx.viewer.require_admin("disableUser")
        return User.of(await ctx.services.accounts.update_user(str(id), status="disabled"))

    @strawberry.mutation(description="Rename a team or set its monthly budget (admin).")
    async def update_team(self, info: Info, id: strawberry.ID, input: UpdateTeamInput) -> Team:
        ctx = context(info)
        ctx.viewer.require_admin("updateTeam")
        accounts = ctx.services.accounts
        team_id = str(id)
        await _require_team(info, team_id, param="id")
        if input.name is not None:
            if not input.name.strip():
                raise BadRequest("'name' must not be empty.", param="input.name")
            await accounts.rename_team(team_id, input.name.strip())
        if input.budget_usd is not strawberry.UNSET:
            budget = input.budget_usd
            if budget is not None and not (0 <= budget < 9e12):
                raise BadRequest(
                    f"'budgetUsd' must be a sum of dollars >= 0, or null; got {budget}.",
                    param="input.budgetUsd",
                )
            await accounts.set_team_budget(
                team_id, None if budget is None else usd_to_micros(budget)
            )
            services = ctx.services
            if budget is not None and services.limiter_is_shared:  # as the REST budget PUT
                spend = LedgerTeamSpend(services.analytics, services.settings.limits.timezone)
                await count_ledger_spend(team_id, services.limiter, spend, services.clock())
        found = next(t for t in await accounts.list_teams() if t.id == team_id)
        return Team.of(found)

    @strawberry.mutation(
        description="Disable a team: every member is disabled, so their keys stop working "
        "(admin). A member is enabled again with updateUser(status: ACTIVE)."
    )
    async def disable_team(self, info: Info, id: strawberry.ID) -> Team:
        ctx = context(info)
        ctx.viewer.require_admin("disableTeam")
        accounts = ctx.services.accounts
        team_id = str(id)
        await _require_team(info, team_id, param="id")
        for user in await accounts.list_users(team_id=team_id):
            if user.status != "disabled":
                await accounts.update_user(user.id, status="disabled")
        found = next(t for t in await accounts.list_teams() if t.id == team_id)
        ctx.fresh()  # the members read after this see their new status
        return Team.of(found)

    @strawberry.mutation(
        description="Drain a deployment: no new request is routed to it (admin). As the routing "
        "service's drain: set in the shared state (Redis) every gateway replica applies."
    )
    async def drain_deployment(self, info: Info, name: str) -> Deployment:
        return await _drain(info, name, drained=True, field="drainDeployment")

    @strawberry.mutation(description="Put a drained deployment back (admin).")
    async def restore_deployment(self, info: Info, name: str) -> Deployment:
        return await _drain(info, name, drained=False, field="restoreDeployment")

    @strawberry.mutation(
        description="One chat completion through the gateway's own path, in this process: the "
        "caller's key, its limits, the router, the ledger. The OpenAI-shaped answer."
    )
    async def chat_completion(self, info: Info, input: ChatCompletionInput) -> ChatCompletion:
        ctx = context(info)
        gateway = ctx.services.gateway
        if gateway is None:
            raise Unavailable("chatCompletion is not configured in this service.")
        return await complete(gateway, ctx.authorization, input)

    @strawberry.mutation(
        description="Create an API key; its secret is in the answer, once. Its own limits "
        "(budgetUsd, models, requestsPerMinute, tokensPerMinute) and expiry (expiresAt or "
        "expiresInDays) are as POST /v1/keys takes them, with the same checks."
    )
    async def create_key(
        self,
        info: Info,
        user_id: strawberry.ID,
        name: str = "default",
        expires_in_days: int | None = None,
        expires_at: datetime | None = None,
        budget_usd: float | None = None,
        models: list[str] | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> NewApiKey:
        await _own_user(info, str(user_id))
        ctx = context(info)
        fields = {
            "user_id": str(user_id),
            "expires_in_days": expires_in_days,
            "expires_at": expires_at,
            "budget_usd": budget_usd,
            "models": models,
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
        }
        try:
            data = msgspec.convert(fields, NewKey, strict=False)
        except msgspec.ValidationError as exc:
            where = str(exc).rpartition("$.")[2].split("[")[0].rstrip("`")
            raise BadRequest(f"{_camel(where)}: {exc}", param=_camel(where)) from exc
        expires, limits = key_terms(
            data, now=ctx.services.now(), settings=ctx.services.settings, param=_camel
        )
        key, secret = await ctx.services.accounts.create_key(
            str(user_id), name=name.strip() or "default", expires_at=expires, limits=limits
        )
        return NewApiKey(key=ApiKey.of(key), secret=secret)

    @strawberry.mutation(description="Revoke an API key (a user key: one of its own).")
    async def revoke_key(self, info: Info, id: strawberry.ID) -> ApiKey:
        ctx = context(info)
        keys = await ctx.services.accounts.list_keys(user_id=ctx.viewer.user_id)
        if all(k.id != str(id) for k in keys):
            raise NotFound(f"No key has id {str(id)!r}.", param="id")
        return ApiKey.of(await ctx.services.accounts.revoke_key(str(id)))


def _camel(name: str) -> str:
    """A REST body's field name as the GraphQL argument's (``expires_at``: ``expiresAt``)."""
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# -- subscriptions ----------------------------------------------------------------------------


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="Usage events as requests finish (a user key: its own), from the live feed "
        "every replica reads; `after` resumes from a position."
    )
    async def usage_events(
        self,
        info: Info,
        filter: UsageEventFilter | None = None,
        after: str | None = None,
    ) -> AsyncGenerator[UsageEvent, None]:
        async for event in follow(info, USAGE, after, usage_event, usage_filter(filter, info)):
            yield event

    @strawberry.subscription(
        description="Changes of the deployments' state (breaker, health, drain, load) of "
        "`model` (a name or alias; default: every model the key may use), from the routers of "
        "every gateway, streaming and GraphQL process; `after` resumes from a position."
    )
    async def deployment_state(
        self,
        info: Info,
        model: str | None = None,
        after: str | None = None,
    ) -> AsyncGenerator[DeploymentStateEvent, None]:
        models = visible_models(info, model)
        async for event in follow(
            info, DEPLOYMENTS, after, deployment_event, lambda e: e.model in models
        ):
            yield event

    @strawberry.subscription(
        description="Alerts as the predictive-alerting service raises and resolves them (a user "
        "key: its team's ledger rules'); `after` resumes from a position."
    )
    async def alerts(
        self, info: Info, after: str | None = None
    ) -> AsyncGenerator[AlertEvent, None]:
        ctx = context(info)
        viewer = ctx.viewer
        view = ctx.services.alerting
        team = None if viewer.admin else viewer.team_id or ""

        def keep(event: AlertEvent) -> bool:
            if team is None:
                return True
            return view is not None and view.rule_visible(event.rule, team=team)

        async for event in follow(info, ALERTS, after, alert_event, keep):
            yield event

    @strawberry.subscription(
        description="One chat completion through the gateway's own path (as chatCompletion), "
        "streamed: each chunk of tokens as the deployment sends it, the last with the usage."
    )
    async def chat_completion_stream(
        self, info: Info, input: ChatCompletionInput
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        ctx = context(info)
        gateway = ctx.services.gateway
        if gateway is None:
            raise Unavailable("chatCompletionStream is not configured in this service.")
        chunks = await stream(gateway, ctx.authorization, input)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()


class _Schema(strawberry.Schema):
    """Strawberry's schema, logging only the errors that are Citadel's fault: a client's bad
    query, unknown id or refused value (ApiError, ValueError) is answered with its clear error,
    not logged with a traceback: Strawberry logs every error so, burying real failures in noise."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        unexpected = [
            error
            for error in errors
            if error.original_error is not None
            and not isinstance(error.original_error, ApiError | GraphQLError | ValueError)
        ]
        if unexpected:
            super().process_errors(unexpected, execution_context)


def build_schema(
    *,
    introspection: bool = True,
    max_depth: int = 10,
    max_cost: int = 50_000,
    budget: CostBudget | None = None,
    persisted: QueryStore | None = None,
    metrics: GraphQLMetrics | None = None,
) -> strawberry.Schema:
    """The schema with its protections: depth, aliases, tokens, cost; errors translated."""
    from strawberry.extensions import DisableIntrospection

    # Factories, not instances: each operation gets extensions of its own (CostLimiter keeps
    # the operation's cost).
    store = persisted if persisted is not None else MemoryQueryStore()
    counted = metrics if metrics is not None else GraphQLMetrics(Registry())
    extensions: list[Any] = [
        lambda: OperationMetrics(metrics=counted),
        lambda: PersistedQueries(store=store),
        Translate,
        lambda: QueryDepthLimiter(max_depth=max_depth),
        lambda: MaxAliasesLimiter(max_alias_count=30),
        lambda: MaxTokensLimiter(max_token_count=5_000),
        lambda: CostLimiter(max_cost=max_cost, budget=budget, metrics=counted),
    ]
    if not introspection:
        extensions.append(DisableIntrospection)
    return _Schema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=extensions,
        config=StrawberryConfig(),
        execution_context_class=SharedEventExecutor,
    )
