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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from litestar import Litestar

from citadel.accounts.store import AccountStore, ConflictError, NotFoundError
from citadel.errors import (
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    StoreUnavailable,
    Unavailable,
)
from citadel.health import DependencyHealth, store_scheme
from citadel.limits.api import CONTROLLERS, Rules
from citadel.limits.budgets import LedgerTeamSpend, TeamSpend
from citadel.limits.decision import Limiter
from citadel.metering.analytics import Analytics
from citadel.metrics import Registry
from citadel.settings import Settings
from citadel.web import create_service, provide

__all__ = ["RateLimitDeps", "create_app", "default_deps"]

Hook = Callable[[], Awaitable[None]]

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
    # False when the limiter lives in this process only (memory://): the gateway's counters are
    # in the gateway's own process, so usage and reset here would show and clear nothing real.
    limiter_is_shared: bool = True
    # the usage ledger's month-to-date spend per team, counted into a team's budget when it is
    # set (None: no ledger, a budget counts from when it is set)
    ledger: TeamSpend | None = None
    close: tuple[Hook, ...] = ()


def default_deps(settings: Settings) -> RateLimitDeps:
    """Production wiring: the SQL accounts store, connected on first use, and the limiter of
    ``limits.backend``. The embedded SQLite database is created or upgraded at start; a
    PostgreSQL one is upgraded only by ``citadel migrate``."""
    from citadel.accounts.migrate import ACCOUNTS
    from citadel.accounts.sql import open_store_lazily
    from citadel.limits.backend import create_limiter
    from citadel.stores.sql import build_engine

    uri = settings.accounts.database
    limits = settings.limits

    async def upgrade_embedded() -> None:
        await ACCOUNTS.upgrade(uri)

    engine = build_engine(settings.metering.database or uri)
    return RateLimitDeps(
        ledger=LedgerTeamSpend(Analytics(engine), limits.timezone),
        close=(engine.dispose,),
        accounts=open_store_lazily(uri),
        limiter=create_limiter(
            limits.backend,
            timezone=limits.timezone,
            lease_ttl=limits.lease_ttl_seconds,
            timeout=limits.store_timeout_seconds,
        ),
        startup=(upgrade_embedded,) if uri.startswith("sqlite") else (),
        limiter_is_shared=not limits.backend.startswith("memory"),
    )


def _sentence(exc: Exception) -> str:
    text = str(exc)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _unavailable(exc: StoreUnavailable) -> ApiError:
    what = _STORES.get(exc.store, exc.store)
    return Unavailable(f"{what} is unavailable: {exc.detail}. Try again later.")


def create_app(settings: Settings, deps: RateLimitDeps) -> Litestar:
    """The rate-limiting service: its admin API, /docs, /openapi.json, /health and /metrics."""

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

    return create_service(
        "rate-limiting-api",
        title="Citadel rate limiting",
        description="Users, teams, API keys, tiers and quotas; `/v1/check` and `/v1/reconcile` "
        "let another gateway share Citadel's limits. Authenticate with the admin key.",
        settings=settings,
        registry=deps.registry,
        admin=CONTROLLERS,
        dependencies={
            "accounts": provide(deps.accounts),
            "limiter": provide(deps.limiter),
            "rules": provide(
                Rules(
                    settings,
                    deps.registry,
                    deps.clock,
                    shared_limiter=deps.limiter_is_shared,
                    ledger=deps.ledger,
                )
            ),
        },
        health={"accounts": accounts_health, "limiter": limiter_health},
        errors={
            StoreUnavailable: _unavailable,
            NotFoundError: lambda exc: NotFound(_sentence(exc)),
            ConflictError: lambda exc: Conflict(_sentence(exc)),
            # a value the store refused that the bodies' constraints let through
            ValueError: lambda exc: BadRequest(_sentence(exc)),
        },
        on_startup=deps.startup,
        on_shutdown=(*deps.close, deps.accounts.aclose, deps.limiter.aclose),
    )
