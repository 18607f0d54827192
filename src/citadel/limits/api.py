"""The rate-limiting API's handlers: one controller per resource, each a thin call into the
accounts store, the limiter and the limits policy (``citadel.limits.policy``).

Injected (``app.py``): ``accounts`` (the ``AccountStore``), ``limiter`` (the ``Limiter``) and
``rules`` (``Rules``: the tiers of the settings, the clock and the decision counter).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar
from zoneinfo import ZoneInfo

import msgspec
from litestar import Controller, Response, delete, get, patch, post, put
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody

from citadel.accounts.auth import key_scope_limits
from citadel.accounts.store import AccountStore, ApiKey, NotFoundError, Team, User
from citadel.errors import BadRequest, Conflict, Forbidden, NotFound
from citadel.limits.bodies import (
    DEFAULT,
    Check,
    DecisionReply,
    KeyReply,
    NewKey,
    NewKeyReply,
    NewTeam,
    NewUser,
    Reconcile,
    RefusalReply,
    TeamBudget,
    TeamBudgetReply,
    TeamChanges,
    TeamReply,
    TierReply,
    UsageReply,
    UserChanges,
    UserReply,
    timestamp,
)
from citadel.limits.budgets import TeamSpend, count_ledger_spend
from citadel.limits.decision import Limiter, Limits, Scope
from citadel.limits.keys import key_terms
from citadel.limits.maths import periods
from citadel.limits.policy import effective_limits, ratelimit_headers, refusal_message
from citadel.limits.policy import usd_to_micros as micros
from citadel.metrics import LIMITER_DECISIONS, Counter, Registry
from citadel.settings import Settings, Tier
from citadel.web import Injected, Listing, errors

__all__ = ["CONTROLLERS", "Rules"]

_log = logging.getLogger("citadel.limits")

T = TypeVar("T")
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


@dataclass(slots=True)
class Rules:
    """What the handlers know beyond the stores: the tiers, the clock, the decision counter."""

    settings: Settings
    registry: Registry
    clock: Callable[[], float] = time.time  # Unix seconds
    shared_limiter: bool = True  # False: the limiter is this process's own (memory://)
    ledger: TeamSpend | None = None  # the month's spend a new team budget starts from
    decisions: Counter = field(init=False)

    def __post_init__(self) -> None:
        self.decisions = self.registry.counter(LIMITER_DECISIONS)

    def require_shared_limiter(self) -> None:
        """Refuse a usage read or reset that could only see this process's own counters."""
        if not self.shared_limiter:
            raise Conflict(
                "The limiter is in-memory (limits.backend: memory://), so each gateway process "
                "keeps its own counters and this service cannot see or reset them; set "
                "limits.backend (REDIS_ENDPOINT) to a Redis URL to share them.",
                code="limiter_not_shared",
            )

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def tier_name(self, tier: str | None, param: str = "tier") -> str | None:
        if tier is not None and self.settings.tier(tier.strip()) is None:
            names = ", ".join(t.name for t in self.settings.tiers)
            raise BadRequest(f"'{param}' must be one of: {names}; got {tier!r}.", param=param)
        return None if tier is None else tier.strip()

    def limits_of(self, user: User) -> tuple[Tier, Limits]:
        tier = self.settings.tier(user.tier)
        if tier is None:
            names = ", ".join(t.name for t in self.settings.tiers)
            raise Conflict(
                f"User {user.id} has tier {user.tier!r}, which is not configured (tiers: {names}); "
                "change the user's tier.",
                param="tier",
            )
        return tier, effective_limits(tier, user.overrides)

    def user_reply(self, user: User) -> UserReply:
        tier = self.settings.tier(user.tier)
        return UserReply.of(user, None if tier is None else effective_limits(tier, user.overrides))


def _strip(value: str | None) -> str | None:
    return None if value is None else value.strip()


async def _stored(op: Awaitable[T], what: Literal["team", "user", "key"], ident: str) -> T:
    """What the accounts store answers to a change of one team, user or key: its
    ``NotFoundError`` as the 404 that names the path parameter (``team_id``, ...)."""
    try:
        return await op
    except NotFoundError as exc:
        raise NotFound(f"No {what} has id {ident!r}.", param=f"{what}_id") from exc


async def _user(accounts: AccountStore, user_id: str, param: str = "user_id") -> User:
    user = await accounts.get_user(user_id)
    if user is None:
        raise NotFound(f"No user has id {user_id!r}.", param=param)
    return user


async def _team(accounts: AccountStore, team_id: str) -> Team:
    team = await accounts.get_team(team_id)
    if team is None:
        raise NotFound(f"No team has id {team_id!r}.", param="team_id")
    return team


async def _key(accounts: AccountStore, user: User, key_id: str, param: str) -> ApiKey:
    key = next((k for k in await accounts.list_keys(user_id=user.id) if k.id == key_id), None)
    if key is None:
        raise NotFound(f"User {user.id} has no key with id {key_id!r}.", param=param)
    return key


async def _usable_key(accounts: AccountStore, user: User, key_id: str, rules: Rules) -> ApiKey:
    """The user's key ``key_id`` if a request may use it (neither revoked nor expired)."""
    key = await _key(accounts, user, key_id, "key_id")
    if key.revoked_at is not None:
        raise Forbidden(f"Key {key.id} is revoked.", param="key_id", code="key_revoked")
    if key.expires_at is not None and key.expires_at <= rules.now():
        raise Forbidden(
            f"Key {key.id} expired at {timestamp(key.expires_at)}.",
            param="key_id",
            code="key_expired",
        )
    return key


def _key_scope(key: ApiKey) -> tuple[Scope, ...]:
    """The scope a key's own limits add (as the gateway charges them), when it has any."""
    own = key_scope_limits(key.limits)
    return () if own.unlimited else (Scope("key", key.id, own),)


def _team_scope(team: Team | None) -> tuple[Scope, ...]:
    """The scope a member's request charges: its team's budget, when the team has one."""
    if team is None or team.budget_micros is None:
        return ()
    return (Scope("team", team.id, Limits(cost_per_month_micros=team.budget_micros)),)


async def _team_budget(team: Team, limiter: Limiter, rules: Rules) -> TeamBudgetReply:
    now = rules.clock()
    at = periods(now, ZoneInfo(rules.settings.limits.timezone))
    spent: float | None = None
    remaining: float | None = None
    if team.budget_micros is not None:
        limits = Limits(cost_per_month_micros=team.budget_micros)
        (figure,) = (await limiter.team_usage(team.id, limits, now)).limits
        spent, remaining = figure.used / 1_000_000, figure.remaining / 1_000_000
    return TeamBudgetReply(
        team_id=team.id,
        name=team.name,
        budget_usd=None if team.budget_micros is None else team.budget_micros / 1_000_000,
        spent_usd=spent,
        remaining_usd=remaining,
        month=at.month,
        resets_at=timestamp(at.month_ends_at),
    )


async def _require_team(accounts: AccountStore, team_id: str) -> None:
    if all(team.id != team_id for team in await accounts.list_teams()):
        raise NotFound(f"No team has id {team_id!r}.", param="team_id")


Accounts = Injected[AccountStore]
Limits_ = Injected[Limiter]
Rules_ = Injected[Rules]


class TeamsController(Controller):
    path = "/v1/teams"
    tags = ["teams"]  # noqa: RUF012 - Litestar's layer attribute

    @post(summary="Create a team", responses=errors(409, 503))
    async def create_team(self, data: JSONBody[NewTeam], accounts: Accounts) -> TeamReply:
        return TeamReply.of(await accounts.create_team(data.name.strip()))

    @get(summary="List teams", responses=errors(503))
    async def list_teams(self, accounts: Accounts) -> Listing[TeamReply]:
        return Listing([TeamReply.of(t) for t in await accounts.list_teams()])

    @get("/{team_id:str}", summary="Get a team (a deleted one too)", responses=errors(404, 503))
    async def get_team(self, team_id: FromPath[Id], accounts: Accounts) -> TeamReply:
        return TeamReply.of(await _team(accounts, team_id))

    @patch(
        "/{team_id:str}",
        summary="Rename a team",
        description="A name another team has (a deleted one included) is a 409.",
        responses=errors(404, 409, 503),
    )
    async def rename_team(
        self, team_id: FromPath[Id], data: JSONBody[TeamChanges], accounts: Accounts
    ) -> TeamReply:
        team = await _stored(accounts.rename_team(team_id, data.name.strip()), "team", team_id)
        return TeamReply.of(team)

    @delete(
        "/{team_id:str}",
        summary="Delete a team that has no members",
        description="The team is kept, marked deleted (`deleted_at`), for the usage ledger's "
        "history: it leaves the listings, its name stays taken. A team with members is a 409: "
        "move or delete them first.",
        status_code=200,
        responses=errors(404, 409, 503),
    )
    async def delete_team(self, team_id: FromPath[Id], accounts: Accounts) -> TeamReply:
        return TeamReply.of(await _stored(accounts.delete_team(team_id), "team", team_id))

    @get(
        "/{team_id:str}/budget",
        summary="A team's own monthly budget and what its members have spent of it",
        tags=["usage"],
        responses=errors(404, 409, 503),
    )
    async def get_budget(
        self, team_id: FromPath[Id], accounts: Accounts, limiter: Limits_, rules: Rules_
    ) -> TeamBudgetReply:
        rules.require_shared_limiter()
        return await _team_budget(await _team(accounts, team_id), limiter, rules)

    @put(
        "/{team_id:str}/budget",
        summary="Set (null: clear) a team's own monthly budget",
        description="Every member's request is charged to it and refused (429) once it would "
        "pass it; gateways see a change within `accounts.key_cache_ttl_seconds`. What the team "
        "spent this month before (the usage ledger's figure) counts against it.",
        tags=["usage"],
        responses=errors(404, 409, 503),
    )
    async def set_budget(
        self,
        team_id: FromPath[Id],
        data: JSONBody[TeamBudget],
        accounts: Accounts,
        limiter: Limits_,
        rules: Rules_,
    ) -> TeamBudgetReply:
        budget = None if data.budget_usd is None else micros(data.budget_usd)
        team = await _stored(accounts.set_team_budget(team_id, budget), "team", team_id)
        if budget is not None:
            await count_ledger_spend(team.id, limiter, rules.ledger, rules.clock())
        return await _team_budget(team, limiter, rules)


class UsersController(Controller):
    path = "/v1/users"
    tags = ["users"]  # noqa: RUF012 - Litestar's layer attribute

    @post(summary="Create a user", responses=errors(404, 409, 503))
    async def create_user(
        self, data: JSONBody[NewUser], accounts: Accounts, rules: Rules_
    ) -> UserReply:
        tier = rules.tier_name(data.tier) or rules.settings.accounts.default_tier
        team_id = _strip(data.team_id)
        if team_id is not None:
            await _require_team(accounts, team_id)
        user = await accounts.create_user(
            name=data.name.strip(), email=data.email.strip(), tier=tier, team_id=team_id
        )
        return rules.user_reply(user)

    @get(summary="List users", responses=errors(404, 503))
    async def list_users(
        self,
        accounts: Accounts,
        rules: Rules_,
        team_id: Annotated[FromQuery[Id | None], msgspec.Meta(description="only its members")] = (
            None
        ),
    ) -> Listing[UserReply]:
        if team_id is not None:
            await _require_team(accounts, team_id)
        users = await accounts.list_users(team_id=team_id)
        return Listing([rules.user_reply(u) for u in users])

    @get("/{user_id:str}", summary="Get a user", responses=errors(404, 503))
    async def get_user(self, user_id: FromPath[Id], accounts: Accounts, rules: Rules_) -> UserReply:
        return rules.user_reply(await _user(accounts, user_id))

    @patch("/{user_id:str}", summary="Change a user", responses=errors(404, 409, 503))
    async def update_user(
        self,
        user_id: FromPath[Id],
        accounts: Accounts,
        rules: Rules_,
        data: JSONBody[UserChanges | None] = None,
    ) -> UserReply:
        changes = data or UserChanges()
        tier = rules.tier_name(changes.tier)
        team_id = _strip(changes.team_id)
        if team_id is not None:
            await _require_team(accounts, team_id)
        overrides: dict[str, float | None] | None = None
        if changes.overrides is not None:
            overrides = dict((await _user(accounts, user_id)).overrides)
            for limit, value in changes.overrides.changes().items():
                if value == DEFAULT:
                    overrides.pop(limit, None)
                else:
                    overrides[limit] = None if value is None else float(value)
        user = await accounts.update_user(
            user_id,
            name=_strip(changes.name),
            email=_strip(changes.email),
            tier=tier,
            team_id=team_id,
            status=changes.status,
            overrides=overrides,
        )
        return rules.user_reply(user)

    @post(
        "/{user_id:str}/disable",
        summary="Disable a user: their keys stop working",
        status_code=200,
        responses=errors(404, 503),
    )
    async def disable_user(
        self, user_id: FromPath[Id], accounts: Accounts, rules: Rules_
    ) -> UserReply:
        user = await _stored(accounts.update_user(user_id, status="disabled"), "user", user_id)
        return rules.user_reply(user)

    @delete(
        "/{user_id:str}",
        summary="Delete a user: their keys are revoked, their usage history kept",
        description="The user is kept, marked deleted (`deleted_at`) and disabled, for the "
        "usage ledger's history: they leave the listings, their email stays taken, and every "
        "key of theirs is revoked (gateways see it within `accounts.key_cache_ttl_seconds`).",
        status_code=200,
        responses=errors(404, 503),
    )
    async def delete_user(
        self, user_id: FromPath[Id], accounts: Accounts, rules: Rules_
    ) -> UserReply:
        return rules.user_reply(await _stored(accounts.delete_user(user_id), "user", user_id))

    @get(
        "/{user_id:str}/usage",
        summary="A user's usage and remaining quota",
        tags=["usage"],
        responses=errors(404, 409, 503),
    )
    async def usage(
        self, user_id: FromPath[Id], accounts: Accounts, limiter: Limits_, rules: Rules_
    ) -> UsageReply:
        rules.require_shared_limiter()
        user = await _user(accounts, user_id)
        _, limits = rules.limits_of(user)
        now = rules.clock()
        return UsageReply.of(user, await limiter.usage(user.id, limits, now), now)

    @post(
        "/{user_id:str}/usage/reset",
        summary="Forget a user's counters",
        tags=["usage"],
        status_code=200,
        responses=errors(404, 409, 503),
    )
    async def reset_usage(
        self, user_id: FromPath[Id], accounts: Accounts, limiter: Limits_, rules: Rules_
    ) -> UsageReply:
        rules.require_shared_limiter()
        user = await _user(accounts, user_id)
        _, limits = rules.limits_of(user)
        await limiter.reset(user.id)
        now = rules.clock()
        return UsageReply.of(user, await limiter.usage(user.id, limits, now), now)


class KeysController(Controller):
    path = "/v1/keys"
    tags = ["keys"]  # noqa: RUF012 - Litestar's layer attribute

    @post(
        summary="Create an API key; its secret is shown once",
        description="A deleted user gets none (409).",
        responses=errors(404, 409, 503),
    )
    async def create_key(
        self, data: JSONBody[NewKey], accounts: Accounts, rules: Rules_
    ) -> NewKeyReply:
        now = rules.now()
        expires, limits = key_terms(data, now=now, settings=rules.settings)
        name = _strip(data.name) or "default"
        key, secret = await accounts.create_key(
            data.user_id, name=name, expires_at=expires, limits=limits
        )
        reply = KeyReply.of(key, now)
        return NewKeyReply(**msgspec.structs.asdict(reply), secret=secret)

    @get(summary="List API keys (never their secrets)", responses=errors(404, 503))
    async def list_keys(
        self,
        accounts: Accounts,
        rules: Rules_,
        user_id: Annotated[FromQuery[Id | None], msgspec.Meta(description="only this user's")] = (
            None
        ),
    ) -> Listing[KeyReply]:
        if user_id is not None:
            await _user(accounts, user_id)
        now = rules.now()
        return Listing([KeyReply.of(k, now) for k in await accounts.list_keys(user_id=user_id)])

    @post(
        "/{key_id:str}/revoke",
        summary="Revoke an API key",
        status_code=200,
        responses=errors(404, 503),
    )
    async def revoke_key(self, key_id: FromPath[Id], accounts: Accounts, rules: Rules_) -> KeyReply:
        return KeyReply.of(await _stored(accounts.revoke_key(key_id), "key", key_id), rules.now())


class LimitsController(Controller):
    tags = ["limits"]  # noqa: RUF012 - Litestar's layer attribute

    @get("/v1/tiers", summary="List tiers and their limits", tags=["tiers"])
    async def list_tiers(self, rules: Rules_) -> Listing[TierReply]:
        default = rules.settings.accounts.default_tier
        return Listing(
            [
                TierReply.of(t, effective_limits(t, {}), default=t.name == default)
                for t in rules.settings.tiers
            ]
        )

    @post(
        "/v1/check",
        summary="Admit a request against a user's limits, reserving them",
        description="200 and a reservation when admitted; 429, `retry-after` and a message "
        "naming the limit when refused. `x-ratelimit-*` headers either way. With `key_id` the "
        "key's own limits (budget, requests and tokens per minute) are charged too, as the "
        "gateway charges them; a revoked or expired key is a 403.",
        status_code=200,
        responses={
            **errors(403, 404, 409, 503),
            429: ResponseSpec(DecisionReply, description="refused: `error` names the limit"),
        },
    )
    async def check(
        self, data: JSONBody[Check], accounts: Accounts, limiter: Limits_, rules: Rules_
    ) -> Response[DecisionReply]:
        user = await _user(accounts, data.user_id.strip())
        if user.status != "active":
            raise Forbidden(f"User {user.id} is disabled.", param="user_id", code="user_disabled")
        tier, limits = rules.limits_of(user)
        key = None if data.key_id is None else await _usable_key(accounts, user, data.key_id, rules)
        own = () if key is None else _key_scope(key)
        scopes = own + _team_scope(
            None if user.team_id is None else await accounts.get_team(user.team_id)
        )
        decision = await limiter.admit(
            user.id,
            limits,
            lease_id=data.lease_id or uuid.uuid4().hex,
            tokens=data.tokens,
            cost_micros=micros(data.cost_usd or 0.0),
            now=rules.clock(),
            scopes=scopes,
        )
        rules.decisions.inc((tier.name, decision.refused_by or "allowed"))
        body = DecisionReply.of(decision)
        headers = {k.decode(): v.decode() for k, v in ratelimit_headers(decision)}
        if decision.allowed:
            return Response(body, headers=headers)
        refused = next((s.limits for s in scopes if s.kind == decision.refused_scope), limits)
        body.error = RefusalReply(
            message=refusal_message(decision, limits=refused),
            type="rate_limit_exceeded",
            param=None,
            code=decision.refused_by,
        )
        return Response(body, status_code=429, headers=headers)

    @post(
        "/v1/reconcile",
        summary="Settle a reservation to the actual usage",
        status_code=204,
        responses=errors(404, 409, 503),
    )
    async def reconcile(
        self, data: JSONBody[Reconcile], accounts: Accounts, limiter: Limits_, rules: Rules_
    ) -> None:
        principal, key_id = data.reservation.principal, data.reservation.key_id
        user = await _user(accounts, principal, param="reservation.principal")
        key = None if key_id is None else await _key(accounts, user, key_id, "reservation.key_id")
        reservation = data.reservation.reservation(
            None if key is None else key_scope_limits(key.limits)
        )
        cost = reservation.cost_micros if data.cost_usd is None else micros(data.cost_usd)
        _, limits = rules.limits_of(user)
        await limiter.reconcile(
            reservation, limits, tokens=data.tokens, cost_micros=cost, now=rules.clock()
        )


CONTROLLERS = (TeamsController, UsersController, KeysController, LimitsController)
