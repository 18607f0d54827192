"""What every resolver reads: the caller, the stores, and the request's DataLoaders.

Tenant scoping lives here, in the data access, not in the schema: each loader answers only what
the caller may see. The admin key sees everything; a user's API key sees its own user, its own
team (with itself as the only member), its own keys and usage. A resolver that asks for anything
else gets nothing (``None``, an empty list), so no field can leak another tenant's rows.

The loaders batch every relation of one request: all the teams' members are one ``list_users``,
all the users' keys one ``list_keys``, all the users' usage one grouped analytics query per
range, so the SQL statements of a query are bounded by its depth, not by its rows. A
subscription makes new loaders for every event (``Context.fresh``): a long subscription never
serves rows cached at its start.

What a loader has already read is answered without awaiting (``members_now``, ``usage_now``),
and a list field that knows what its items' fields will read starts those reads with its own
(``Query.teams`` asks for the users and their usage at once when the query selects them): the
nested levels then resolve synchronously, which in graphql-core costs a fraction of an awaited
field (bench/graphql_api.py (b): 1,000 users' usage no longer make 1,000 awaitables).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

from strawberry.dataloader import DataLoader

from citadel.accounts.auth import ADMIN, Principal
from citadel.accounts.store import AccountStore, ApiKey, Team, User
from citadel.errors import Forbidden
from citadel.feed import Feed
from citadel.limits.decision import Limiter, Limits, UsageSnapshot
from citadel.limits.policy import effective_limits
from citadel.metering.analytics import Analytics
from citadel.metering.ranges import Dimension, TimeRange
from citadel.metering.rollups import UsageRow
from citadel.routing.router import Router
from citadel.routing.shared import SharedRoutingState
from citadel.settings import Settings

if TYPE_CHECKING:
    from citadel.gateway.proxy import Gateway
    from citadel.graphql.alerting import AlertingView
    from citadel.routing.api import Routing

__all__ = ["Context", "Loaders", "Services", "Viewer"]

T = TypeVar("T")


@dataclass(slots=True, kw_only=True)
class Services:
    """The stores and state the schema reads (one set per process)."""

    settings: Settings
    accounts: AccountStore
    analytics: Analytics
    limiter: Limiter
    router: Router
    feed: Feed
    shared: SharedRoutingState | None = None
    limiter_is_shared: bool = True
    clock: Callable[[], float] = time.time  # Unix seconds
    monotonic: Callable[[], float] = time.monotonic  # the router's clock
    statements: Callable[[], int] | None = None  # SQL statements so far (tests, metrics)
    alerting: AlertingView | None = None  # forecasts, anomalies, alerts (``graphql.alerting``)
    gateway: Gateway | None = None  # chatCompletion: the gateway's own path, in process
    routing: Routing | None = None  # drainDeployment: the routing service's own drain

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)


@dataclass(frozen=True, slots=True)
class Viewer:
    """The caller: the admin key, or one user's API key."""

    principal: Principal

    @property
    def admin(self) -> bool:
        return self.principal is ADMIN

    @property
    def user_id(self) -> str | None:
        return None if self.admin else self.principal.user

    @property
    def team_id(self) -> str | None:
        return None if self.admin else (self.principal.team or None)

    def may_see_user(self, user_id: str) -> bool:
        return self.admin or user_id == self.principal.user

    def may_see_team(self, team_id: str) -> bool:
        return self.admin or team_id == self.principal.team

    def require_admin(self, what: str) -> None:
        if not self.admin:
            raise Forbidden(f"{what} needs the admin key.", code="admin_only")


class Loaders:
    """The DataLoaders of one request (or one subscription event), scoped to its viewer."""

    def __init__(self, services: Services, viewer: Viewer) -> None:
        self._services = services
        self._viewer = viewer
        self._memo: dict[object, asyncio.Future[object]] = {}
        self._spans: dict[datetime, TimeRange] = {}
        self.user = DataLoader[str, User | None](self._load_users)
        self.team = DataLoader[str, Team | None](self._load_teams)
        self.members = DataLoader[str, list[User]](self._load_members)
        self.keys = DataLoader[str, list[ApiKey]](self._load_keys)
        self.quota = DataLoader[str, UsageSnapshot | None](self._load_quota)
        self._by_team: dict[str, list[User]] | None = None

    # the whole lists, read once per request and filtered to what the viewer may see

    async def _once(self, name: object, load: Callable[[], Awaitable[T]]) -> T:
        future = self._memo.get(name)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._memo[name] = future
            try:
                future.set_result(await load())
            except BaseException as exc:
                future.set_exception(exc)
                del self._memo[name]
                raise
        result: T = await future  # type: ignore[assignment]
        return result

    async def all_users(self) -> list[User]:
        viewer = self._viewer

        async def load() -> list[User]:
            if viewer.admin:
                return await self._services.accounts.list_users()
            user = await self._services.accounts.get_user(viewer.principal.user)
            return [] if user is None else [user]

        return await self._once("users", load)

    async def all_teams(self) -> list[Team]:
        viewer = self._viewer

        async def load() -> list[Team]:
            teams = await self._services.accounts.list_teams()
            return [t for t in teams if viewer.may_see_team(t.id)]

        return await self._once("teams", load)

    async def all_keys(self) -> list[ApiKey]:
        viewer = self._viewer

        async def load() -> list[ApiKey]:
            return await self._services.accounts.list_keys(user_id=viewer.user_id)

        return await self._once("keys", load)

    def _ready(self, name: object) -> Any:
        """The memoised result of ``name`` if it is in, else ``_PENDING``."""
        future = self._memo.get(name)
        if future is None or not future.done() or future.exception() is not None:
            return _PENDING
        return future.result()

    # the relations

    async def _load_users(self, ids: Sequence[str]) -> list[User | None]:
        by_id = {u.id: u for u in await self.all_users()}
        return [by_id.get(i) for i in ids]

    async def _load_teams(self, ids: Sequence[str]) -> list[Team | None]:
        by_id = {t.id: t for t in await self.all_teams()}
        return [by_id.get(i) for i in ids]

    def _members_index(self, users: list[User]) -> dict[str, list[User]]:
        if self._by_team is None:
            by_team: dict[str, list[User]] = defaultdict(list)
            for user in users:
                if user.team_id is not None:
                    by_team[user.team_id].append(user)
            self._by_team = by_team
        return self._by_team

    async def _load_members(self, team_ids: Sequence[str]) -> list[list[User]]:
        by_team = self._members_index(await self.all_users())
        return [by_team.get(t, []) for t in team_ids]

    def members_now(self, team_id: str) -> list[User] | None:
        """A team's members (scoped) if the users are read already, else None."""
        users = self._ready("users")
        if users is _PENDING:
            return None
        return self._members_index(users).get(team_id, [])

    async def _load_keys(self, user_ids: Sequence[str]) -> list[list[ApiKey]]:
        by_user: dict[str, list[ApiKey]] = defaultdict(list)
        for key in await self.all_keys():
            by_user[key.user_id].append(key)
        return [by_user.get(u, []) for u in user_ids]

    async def _load_quota(self, user_ids: Sequence[str]) -> list[UsageSnapshot | None]:
        services = self._services
        if not services.limiter_is_shared:
            return [None for _ in user_ids]  # the gateway's counters are in its own process
        users = await self._load_users(user_ids)
        now = services.clock()

        async def one(user: User | None) -> UsageSnapshot | None:
            if user is None:
                return None
            limits = limits_of(services.settings, user)
            return None if limits is None else await services.limiter.usage(user.id, limits, now)

        return list(await asyncio.gather(*(one(u) for u in users)))

    async def usage_table(self, span: TimeRange, by: str) -> dict[str, UsageRow]:
        """The usage over ``span`` of every user (``by="user"``) or team the viewer may see,
        by id: one grouped query per span and dimension, whatever the number of ids."""
        viewer = self._viewer
        dimension: Dimension = "user" if by == "user" else "team"
        allowed = viewer.may_see_user if by == "user" else viewer.may_see_team

        async def load() -> dict[str, UsageRow]:
            rows = await self._services.analytics.usage(span, group_by=(dimension,))
            return {row.keys[dimension]: row for row in rows if allowed(row.keys[dimension])}

        return await self._once(("usage", by, span), load)

    def default_span(self, now: datetime, make: Callable[[datetime], TimeRange]) -> TimeRange:
        """``make(now)`` (the default range), computed once per hour of this request."""
        hour = now.replace(minute=0, second=0, microsecond=0)
        span = self._spans.get(hour)
        if span is None:
            span = self._spans[hour] = make(now)
        return span

    def usage_now(self, span: TimeRange, by: str) -> dict[str, UsageRow] | None:
        """``usage_table`` if it is read already, else None."""
        table = self._ready(("usage", by, span))
        return None if table is _PENDING else table


_PENDING: Final = object()


def limits_of(settings: Settings, user: User) -> Limits | None:
    """A user's effective limits; None when its tier is not configured."""
    tier = settings.tier(user.tier)
    return None if tier is None else effective_limits(tier, user.overrides)


@dataclass(slots=True)
class Context:
    """``info.context["citadel"]``: the caller and what it reads through."""

    services: Services
    viewer: Viewer
    authorization: bytes | None = None  # the caller's header, as the gateway takes it
    _loaders: Loaders | None = field(default=None, init=False)

    @property
    def loaders(self) -> Loaders:
        """This request's (or subscription event's) loaders, made on first use."""
        if self._loaders is None:
            self._loaders = Loaders(self.services, self.viewer)
        return self._loaders

    def fresh(self) -> None:
        """New loaders (each subscription event reads the stores anew)."""
        self._loaders = None
