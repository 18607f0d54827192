"""The business metrics the custom-metrics service adds to its ``/metrics``.

Spend, tokens and requests by tier, team and model this month; active users by tier; each user's
and team's budget utilisation; each deployment's infrastructure cost and cost per 1000 tokens;
the reference (commercial) cost and the savings per model; and the ledger writer's lag and
errors.

Theory of operation: the rollup figures are computed at most every ``metrics_ttl`` seconds,
into a registry of their own rebuilt at each refresh, so a series whose labels are gone (a team
that spent nothing this month) disappears, and so that with several workers each renders the
same figures rather than a sum of them. The writer's lag (one figure for the whole stream) and
error count are read at every scrape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from citadel.accounts.store import AccountStore, Team, User
from citadel.errors import StoreUnavailable
from citadel.metering.analytics import Analytics, savings_by_model
from citadel.metering.budgets import budget_use
from citadel.metering.ranges import TimeRange, month_range
from citadel.metering.writer_task import LedgerWriterLike, writer_lag
from citadel.metrics import (
    BUSINESS_ACTIVE_USERS,
    BUSINESS_BUDGET_UTILISATION,
    BUSINESS_COST_PER_1K,
    BUSINESS_INFRA_COST,
    BUSINESS_REFERENCE_COST,
    BUSINESS_REQUESTS,
    BUSINESS_SAVINGS,
    BUSINESS_SPEND,
    BUSINESS_TOKENS,
    LEDGER_LAG,
    LEDGER_WRITER_ERRORS,
    Registry,
)
from citadel.settings import Settings

__all__ = ["BusinessDeps", "BusinessMetrics"]

_log = logging.getLogger("citadel.metering")


class BusinessDeps(Protocol):
    """What the business metrics read (``citadel.metering.app.MeteringDeps`` has it)."""

    analytics: Analytics
    accounts: AccountStore
    registry: Registry
    writer: LedgerWriterLike | None
    metrics_ttl: float  # seconds the figures are reused between scrapes

    @property
    def clock(self) -> Callable[[], float]:
        """Unix seconds."""
        ...


class BusinessMetrics:
    """The business metrics, computed from the ledger at most every ``metrics_ttl`` seconds."""

    def __init__(self, settings: Settings, deps: BusinessDeps) -> None:
        self._settings = settings
        self._deps = deps
        # A counter of the service's registry (summed over workers, each running a writer),
        # brought up to the writer's own count at each scrape.
        self._errors = deps.registry.counter(LEDGER_WRITER_ERRORS)
        self._errors_seen = 0
        if deps.writer is not None:
            self._errors.inc((), 0)
        self._cached = b""
        self._expires = -1.0
        self._lock = asyncio.Lock()

    async def render(self) -> bytes:
        async with self._lock:
            now = time.monotonic()
            if now >= self._expires:
                try:
                    self._cached = await self._collect()
                except StoreUnavailable as exc:
                    _log.warning("business metrics unavailable", extra={"detail": exc.detail})
                    self._cached = b""
                self._expires = now + self._deps.metrics_ttl
        return self._cached + await self._writer_metrics()

    async def _writer_metrics(self) -> bytes:
        writer = self._deps.writer
        if writer is None:
            return b""
        failures = writer.stats().failures
        self._errors.inc((), max(0, failures - self._errors_seen))
        self._errors_seen = max(failures, self._errors_seen)
        lag = await writer_lag(writer)
        if lag is None:  # unknown: no sample rather than a wrong one
            return b""
        registry = Registry()
        registry.gauge(LEDGER_LAG).set((), lag)
        return registry.render()

    async def _collect(self) -> bytes:
        settings, analytics = self._settings, self._deps.analytics
        now = datetime.fromtimestamp(self._deps.clock(), UTC)
        span = month_range(now, settings.limits.timezone)
        registry = Registry()
        spend = registry.gauge(BUSINESS_SPEND)
        tokens = registry.gauge(BUSINESS_TOKENS)
        requests = registry.gauge(BUSINESS_REQUESTS)
        team_spend: dict[str, int] = {}
        people = await self._people()
        team_names = {team.id: team.name for team in people[1]} if people else {}
        for row in await analytics.usage(span, group_by=("tier", "team", "model")):
            team = row.keys["team"]
            labels = (row.keys["tier"], team, team_names.get(team, ""), row.keys["model"])
            spend.set(labels, row.cost_micros / 1_000_000)
            tokens.set((*labels, "input"), row.prompt_tokens)
            tokens.set((*labels, "output"), row.completion_tokens)
            requests.set(labels, row.requests)
            team_spend[row.keys["team"]] = team_spend.get(row.keys["team"], 0) + row.cost_micros
        active = registry.gauge(BUSINESS_ACTIVE_USERS)
        for tier, count in (await analytics.active_users(now))[1].items():
            active.set((tier,), count)
        if people:
            await self._budgets(registry, span, team_spend, *people)
        costs = await analytics.deployment_costs(span, now=now, settings=settings)
        infra = registry.gauge(BUSINESS_INFRA_COST)
        per_1k = registry.gauge(BUSINESS_COST_PER_1K)
        for cost in costs:
            infra.set((cost.model, cost.deployment), cost.infra_micros / 1_000_000)
            for kind, value in (
                ("infrastructure", cost.infra_per_1k_micros),
                ("charged", cost.charged_per_1k_micros),
            ):
                if value is not None:
                    per_1k.set((cost.model, cost.deployment, kind), value / 1_000_000)
        reference = registry.gauge(BUSINESS_REFERENCE_COST)
        saved = registry.gauge(BUSINESS_SAVINGS)
        for item in savings_by_model(costs, settings):
            if item.reference_micros is not None and item.savings_micros is not None:
                reference.set((item.model,), item.reference_micros / 1_000_000)
                saved.set((item.model,), item.savings_micros / 1_000_000)
        return registry.render()

    async def _people(self) -> tuple[list[User], list[Team]] | None:
        """Users and teams (names, budgets), or None while the accounts store is unreachable."""
        accounts = self._deps.accounts
        try:
            return await accounts.list_users(), await accounts.list_teams()
        except StoreUnavailable as exc:
            _log.warning("budgets and names unavailable", extra={"detail": exc.detail})
            return None

    async def _budgets(
        self,
        registry: Registry,
        span: TimeRange,
        team_spend: dict[str, int],
        users: list[User],
        teams: list[Team],
    ) -> None:
        names = {
            "user": {user.id: user.name for user in users},
            "team": {team.id: team.name for team in teams},
        }
        user_spend = await self._deps.analytics.spend(span, "user")
        utilisation = registry.gauge(BUSINESS_BUDGET_UTILISATION)
        tiers = self._settings.tiers
        for scope, spent in (("team", team_spend), ("user", user_spend)):
            rows = budget_use(
                "team" if scope == "team" else "user",
                spent=spent,
                users=users,
                teams=teams,
                tiers=tiers,
            )
            for row in rows:
                if row.utilisation is not None:
                    utilisation.set((scope, row.id, names[scope].get(row.id, "")), row.utilisation)
