"""Wiring of the rate-limiting service (:9098): ``create_app(settings, deps)``.

An admin API over the accounts store and the limiter: teams, users and API keys; tiers; each
user's usage and remaining quota; and ``/v1/check`` + ``/v1/reconcile``, through which another
gateway admits requests against the same limits (the same limiter, principal and effective limits
as Citadel's own gateway). Every route but /health, /metrics, /docs and /openapi.json takes the
admin key as ``Authorization: Bearer <key>``.

The principal of a user's limits is the user's id. Errors: a bad body 400 (naming the field), a
wrong key 401, a disabled user 403 on check, an unknown id 404, a taken email or team name 409, a
refused check 429, a store that cannot be reached 503.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from citadel.accounts.store import AccountStore, ConflictError, NotFoundError, User, UserStatus
from citadel.errors import BadRequest, Forbidden, NotFound, StoreUnavailable, Unavailable
from citadel.gateway.auth import AdminKeyAuthenticator
from citadel.http.server import Request, Response
from citadel.limits.decision import Limiter, Limits
from citadel.limits.policy import effective_limits, ratelimit_headers, refusal_message
from citadel.limits.policy import usd_to_micros as micros
from citadel.metrics import LIMITER_DECISIONS, Registry
from citadel.openapi import ApiRoutes, Operation, PathHandler
from citadel.ratelimit import schemas
from citadel.ratelimit.wire import (
    DEFAULT,
    MAX_DAYS,
    MAX_TOKENS,
    Conflict,
    Fields,
    decision_json,
    key_json,
    query,
    team_json,
    tier_json,
    usage_json,
    user_json,
)
from citadel.service import App, DependencyHealth, service_app, store_scheme
from citadel.settings import Settings, Tier

__all__ = ["RateLimitDeps", "create_app", "default_deps"]

Hook = Callable[[], Awaitable[None]]

_STATUSES: Mapping[str, UserStatus] = {"active": "active", "disabled": "disabled"}
_ACCOUNTS_CHECK_TIMEOUT = 1.5  # seconds; /health gives each check 2
_STORES = {"sql": "The accounts database", "redis": "The limits store (Redis)"}


@dataclass(slots=True, kw_only=True)
class RateLimitDeps:
    """What the service talks to; built by ``default_deps`` or by a test."""

    accounts: AccountStore
    limiter: Limiter
    registry: Registry = field(default_factory=Registry)
    clock: Callable[[], float] = time.time  # Unix seconds
    startup: tuple[Hook, ...] = ()  # run before the first request (migrations, say)


def default_deps(settings: Settings) -> RateLimitDeps:
    """Production wiring: the SQL accounts store, connected on first use, and the limiter of
    ``limits.backend``. The embedded SQLite database is created or upgraded at start; a
    PostgreSQL one is upgraded only by ``citadel migrate``."""
    from citadel.accounts.migrate import ACCOUNTS
    from citadel.accounts.sql import open_store_lazily
    from citadel.limits.backend import create_limiter

    uri = settings.accounts.database
    limits = settings.limits

    async def upgrade_embedded() -> None:
        await ACCOUNTS.upgrade(uri)

    return RateLimitDeps(
        accounts=open_store_lazily(uri),
        limiter=create_limiter(
            limits.backend,
            timezone=limits.timezone,
            lease_ttl=limits.lease_ttl_seconds,
            timeout=limits.store_timeout_seconds,
        ),
        startup=(upgrade_embedded,) if uri.startswith("sqlite") else (),
    )


def create_app(settings: Settings, deps: RateLimitDeps) -> App:
    """The rate-limiting service: its admin API, /docs, /openapi.json, /health and /metrics."""
    app = service_app("rate-limiting-api", settings, deps.registry)
    api = ApiRoutes(
        app,
        title="Citadel rate limiting",
        description="Users, teams, API keys, tiers and quotas; `/v1/check` and `/v1/reconcile` "
        "let another gateway share Citadel's limits. Authenticate with the admin key.",
    )
    service = _Service(settings, deps)
    for operation, handler in service.routes():
        api.add(operation, _guarded(service.auth, handler))

    async def accounts_health() -> DependencyHealth:
        # Checked here, within a deadline shorter than /health's own, because only a check that
        # answers can say that it is critical.
        try:
            async with asyncio.timeout(_ACCOUNTS_CHECK_TIMEOUT):
                await deps.accounts.ping()
        except StoreUnavailable as exc:
            return DependencyHealth("down", exc.detail, critical=True)
        except TimeoutError:
            detail = f"no answer within {_ACCOUNTS_CHECK_TIMEOUT} s"
            return DependencyHealth("down", detail, critical=True)
        return DependencyHealth("ok", store_scheme(settings.accounts.database))

    async def limiter_health() -> DependencyHealth:
        await deps.limiter.ping()
        return DependencyHealth("ok", store_scheme(settings.limits.backend))

    app.health_check("accounts", accounts_health)
    app.health_check("limiter", limiter_health)
    for hook in deps.startup:
        app.on_startup(hook)
    app.on_shutdown(deps.accounts.aclose)
    app.on_shutdown(deps.limiter.aclose)
    return app


def _guarded(auth: AdminKeyAuthenticator, handler: PathHandler) -> PathHandler:
    """``handler`` behind the admin key, with the stores' errors turned into HTTP ones."""

    async def translated(request: Request, params: Mapping[str, str]) -> Response:
        try:
            return await handler(request, params)
        except StoreUnavailable as exc:
            what = _STORES.get(exc.store, exc.store)
            raise Unavailable(f"{what} is unavailable: {exc.detail}. Try again later.") from exc
        except NotFoundError as exc:
            raise NotFound(_sentence(exc)) from exc
        except ConflictError as exc:
            raise Conflict(_sentence(exc)) from exc
        except ValueError as exc:  # a value the store refused that the checks here let through
            raise BadRequest(_sentence(exc)) from exc

    return auth.guard(translated)


def _sentence(exc: Exception) -> str:
    text = str(exc)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _json(
    body: object, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
) -> Response:
    return Response(status, orjson.dumps(body), headers)


def _listing(items: list[dict[str, object]]) -> Response:
    return _json({"object": "list", "data": items})


class _Service:
    """The handlers, over one settings object and one set of dependencies."""

    def __init__(self, settings: Settings, deps: RateLimitDeps) -> None:
        self.settings = settings
        self.accounts = deps.accounts
        self.limiter = deps.limiter
        self.clock = deps.clock
        self.auth = AdminKeyAuthenticator(settings.gateway.admin_key)
        self.decisions = deps.registry.counter(LIMITER_DECISIONS)

    def routes(self) -> list[tuple[Operation, PathHandler]]:
        def op(method: str, path: str, summary: str, tag: str, **details: Any) -> Operation:
            return Operation(method=method, path=path, summary=summary, tags=(tag,), **details)

        user_id = ("user_id", "only the keys of this user")
        return [
            (op("POST", "/v1/teams", "Create a team", "teams", request=schemas.CREATE_TEAM,
                response=schemas.TEAM, status=201, errors=(400, 409, 503)), self.create_team),
            (op("GET", "/v1/teams", "List teams", "teams",
                response=schemas.list_of(schemas.TEAM), errors=(503,)), self.list_teams),
            (op("POST", "/v1/users", "Create a user", "users", request=schemas.CREATE_USER,
                response=schemas.USER, status=201, errors=(400, 404, 409, 503)), self.create_user),
            (op("GET", "/v1/users", "List users", "users",
                query=(("team_id", "only the members of this team"),),
                response=schemas.list_of(schemas.USER), errors=(400, 404, 503)), self.list_users),
            (op("GET", "/v1/users/{user_id}", "Get a user", "users", response=schemas.USER,
                errors=(404, 503)), self.get_user),
            (op("PATCH", "/v1/users/{user_id}", "Change a user", "users",
                request=schemas.UPDATE_USER, response=schemas.USER,
                errors=(400, 404, 409, 503)), self.update_user),
            (op("POST", "/v1/users/{user_id}/disable", "Disable a user: their keys stop working",
                "users", response=schemas.USER, errors=(404, 503)), self.disable_user),
            (op("GET", "/v1/users/{user_id}/usage", "A user's usage and remaining quota",
                "usage", response=schemas.USAGE, errors=(404, 409, 503)), self.usage),
            (op("POST", "/v1/users/{user_id}/usage/reset", "Forget a user's counters", "usage",
                response=schemas.USAGE, errors=(404, 409, 503)), self.reset_usage),
            (op("POST", "/v1/keys", "Create an API key; its secret is shown once", "keys",
                request=schemas.CREATE_KEY, response=schemas.NEW_KEY, status=201,
                errors=(400, 404, 503)), self.create_key),
            (op("GET", "/v1/keys", "List API keys (never their secrets)", "keys",
                query=(user_id,), response=schemas.list_of(schemas.KEY),
                errors=(400, 404, 503)), self.list_keys),
            (op("POST", "/v1/keys/{key_id}/revoke", "Revoke an API key", "keys",
                response=schemas.KEY, errors=(404, 503)), self.revoke_key),
            (op("GET", "/v1/tiers", "List tiers and their limits", "tiers",
                response=schemas.list_of(schemas.TIER)), self.list_tiers),
            (op("POST", "/v1/check", "Admit a request against a user's limits, reserving them",
                "limits", request=schemas.CHECK, response=schemas.DECISION,
                description="200 and a reservation when admitted; 429, `retry-after` and a "
                "message naming the limit when refused. `x-ratelimit-*` headers either way.",
                errors=(400, 403, 404, 409, 429, 503)), self.check),
            (op("POST", "/v1/reconcile", "Settle a reservation to the actual usage", "limits",
                request=schemas.RECONCILE, status=204, errors=(400, 404, 409, 503)),
             self.reconcile),
        ]  # fmt: skip

    # -- helpers ----------------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def _tier_name(self, fields: Fields, name: str) -> str | None:
        tier = fields.text(name)
        if tier is not None and self.settings.tier(tier) is None:
            names = ", ".join(t.name for t in self.settings.tiers)
            raise BadRequest(f"'{name}' must be one of: {names}; got {tier!r}.", param=name)
        return tier

    def _limits_of(self, user: User) -> tuple[Tier, Limits]:
        tier = self.settings.tier(user.tier)
        if tier is None:
            names = ", ".join(t.name for t in self.settings.tiers)
            raise Conflict(
                f"User {user.id} has tier {user.tier!r}, which is not configured (tiers: {names}); "
                "change the user's tier.",
                param="tier",
            )
        return tier, effective_limits(tier, user.overrides)

    def _user_json(self, user: User) -> dict[str, object]:
        tier = self.settings.tier(user.tier)
        return user_json(user, None if tier is None else effective_limits(tier, user.overrides))

    async def _user(self, user_id: str) -> User:
        user = await self.accounts.get_user(user_id)
        if user is None:
            raise NotFound(f"No user has id {user_id!r}.", param="user_id")
        return user

    async def _require_team(self, team_id: str) -> None:
        if all(team.id != team_id for team in await self.accounts.list_teams()):
            raise NotFound(f"No team has id {team_id!r}.", param="team_id")

    # -- teams ------------------------------------------------------------------------------

    async def create_team(self, request: Request, params: Mapping[str, str]) -> Response:
        fields = Fields.body(request, ("name",))
        team = await self.accounts.create_team(fields.required_text("name"))
        return _json(team_json(team), 201)

    async def list_teams(self, request: Request, params: Mapping[str, str]) -> Response:
        query(request, ())
        return _listing([team_json(t) for t in await self.accounts.list_teams()])

    # -- users ------------------------------------------------------------------------------

    async def create_user(self, request: Request, params: Mapping[str, str]) -> Response:
        fields = Fields.body(request, ("name", "email", "tier", "team_id"))
        name = fields.required_text("name")
        email = fields.required_email("email")
        tier = self._tier_name(fields, "tier") or self.settings.accounts.default_tier
        team_id = fields.text("team_id")
        if team_id is not None:
            await self._require_team(team_id)
        user = await self.accounts.create_user(name=name, email=email, tier=tier, team_id=team_id)
        return _json(self._user_json(user), 201)

    async def list_users(self, request: Request, params: Mapping[str, str]) -> Response:
        team_id = query(request, ("team_id",)).get("team_id")
        if team_id is not None:
            await self._require_team(team_id)
        users = await self.accounts.list_users(team_id=team_id)
        return _listing([self._user_json(u) for u in users])

    async def get_user(self, request: Request, params: Mapping[str, str]) -> Response:
        return _json(self._user_json(await self._user(params["user_id"])))

    async def update_user(self, request: Request, params: Mapping[str, str]) -> Response:
        fields = Fields.body(
            request, ("name", "email", "tier", "team_id", "status", "overrides"), optional=True
        )
        name, email = fields.text("name"), fields.email("email")
        tier = self._tier_name(fields, "tier")
        team_id = fields.text("team_id")
        status = fields.choice("status", tuple(_STATUSES))
        changes = fields.overrides("overrides")
        if team_id is not None:
            await self._require_team(team_id)
        overrides: dict[str, float | None] | None = None
        if changes is not None:
            overrides = dict((await self._user(params["user_id"])).overrides)
            for limit, value in changes.items():
                if value == DEFAULT:
                    overrides.pop(limit, None)
                else:
                    overrides[limit] = None if value is None else float(value)
        user = await self.accounts.update_user(
            params["user_id"],
            name=name,
            email=email,
            tier=tier,
            team_id=team_id,
            status=_STATUSES.get(status or ""),
            overrides=overrides,
        )
        return _json(self._user_json(user))

    async def disable_user(self, request: Request, params: Mapping[str, str]) -> Response:
        Fields.body(request, (), optional=True)
        user = await self.accounts.update_user(params["user_id"], status="disabled")
        return _json(self._user_json(user))

    # -- keys -------------------------------------------------------------------------------

    async def create_key(self, request: Request, params: Mapping[str, str]) -> Response:
        fields = Fields.body(request, ("user_id", "name", "expires_in_days"))
        user_id = fields.required_text("user_id")
        name = fields.text("name") or "default"
        days = fields.whole("expires_in_days", minimum=1, maximum=MAX_DAYS)
        now = self._now()
        expires = None if days is None else now + timedelta(days=days)
        key, secret = await self.accounts.create_key(user_id, name=name, expires_at=expires)
        body = key_json(key, now) | {
            "secret": secret,
            "warning": "This is the only time the secret is shown; it cannot be shown again.",
        }
        return _json(body, 201)

    async def list_keys(self, request: Request, params: Mapping[str, str]) -> Response:
        user_id = query(request, ("user_id",)).get("user_id")
        if user_id is not None:
            await self._user(user_id)
        now = self._now()
        return _listing([key_json(k, now) for k in await self.accounts.list_keys(user_id=user_id)])

    async def revoke_key(self, request: Request, params: Mapping[str, str]) -> Response:
        Fields.body(request, (), optional=True)
        return _json(key_json(await self.accounts.revoke_key(params["key_id"]), self._now()))

    # -- tiers and usage ----------------------------------------------------------------------

    async def list_tiers(self, request: Request, params: Mapping[str, str]) -> Response:
        query(request, ())
        default = self.settings.accounts.default_tier
        return _listing(
            [
                tier_json(t, effective_limits(t, {}), default=t.name == default)
                for t in self.settings.tiers
            ]
        )

    async def usage(self, request: Request, params: Mapping[str, str]) -> Response:
        user = await self._user(params["user_id"])
        _, limits = self._limits_of(user)
        now = self.clock()
        snapshot = await self.limiter.usage(user.id, limits, now)
        return _json(usage_json(user, snapshot, now))

    async def reset_usage(self, request: Request, params: Mapping[str, str]) -> Response:
        Fields.body(request, (), optional=True)
        user = await self._user(params["user_id"])
        _, limits = self._limits_of(user)
        await self.limiter.reset(user.id)
        now = self.clock()
        return _json(usage_json(user, await self.limiter.usage(user.id, limits, now), now))

    # -- check and reconcile ------------------------------------------------------------------

    async def check(self, request: Request, params: Mapping[str, str]) -> Response:
        fields = Fields.body(request, ("user_id", "tokens", "cost_usd", "lease_id"))
        user_id = fields.required_text("user_id")
        tokens = fields.required_whole("tokens", minimum=0, maximum=MAX_TOKENS)
        cost = micros(fields.amount("cost_usd") or 0.0)
        lease_id = fields.text("lease_id", limit=128) or uuid.uuid4().hex
        user = await self._user(user_id)
        if user.status != "active":
            raise Forbidden(f"User {user.id} is disabled.", param="user_id", code="user_disabled")
        tier, limits = self._limits_of(user)
        decision = await self.limiter.admit(
            user.id, limits, lease_id=lease_id, tokens=tokens, cost_micros=cost, now=self.clock()
        )
        self.decisions.inc((tier.name, decision.refused_by or "allowed"))
        body = decision_json(decision)
        headers = ratelimit_headers(decision)
        if decision.allowed:
            return _json(body, 200, headers)
        body["error"] = {
            "message": refusal_message(decision, limits=limits),
            "type": "rate_limit_exceeded",
            "param": None,
            "code": decision.refused_by,
        }
        return _json(body, 429, headers)

    async def reconcile(self, request: Request, params: Mapping[str, str]) -> Response:
        fields = Fields.body(request, ("reservation", "tokens", "cost_usd"))
        reservation = fields.reservation("reservation")
        tokens = fields.required_whole("tokens", minimum=0, maximum=MAX_TOKENS)
        cost_usd = fields.amount("cost_usd")
        cost = reservation.cost_micros if cost_usd is None else micros(cost_usd)
        user = await self.accounts.get_user(reservation.principal)
        if user is None:
            raise NotFound(
                f"No user has id {reservation.principal!r}.", param="reservation.principal"
            )
        _, limits = self._limits_of(user)
        await self.limiter.reconcile(
            reservation, limits, tokens=tokens, cost_micros=cost, now=self.clock()
        )
        return Response(204, b"", content_type=b"")
