"""Business analytics over the usage ledger: usage and cost by any grouping, top users and teams,
budget use, the real cost of each deployment, and savings against a commercial API.

Theory of operation. Every query reads the rollups, never the ledger's raw events, so its cost
grows with the range's hours (or days) times the distinct keys in them, not with requests: the
range is split into whole UTC days and the hours around them (``ranges``), and each part reads
the narrowest rollup with every column the question needs (``rollups``). Inputs come validated:
``TimeRange.checked`` and ``check_group_by`` raise ``QueryError`` naming the bad parameter, which
the HTTP adapter answers with a 400; an answer of more than ``MAX_ROWS`` rows is one too.

Budgets are those the limiter enforces (``budgets``), over the calendar month in
``limits.timezone``, from its first hour.

Infrastructure costs (``deployment_costs``, ``savings``, and the business metrics built on them)
charge a deployment's GPU-hours from the UTC hour of its first event in the ledger on
(``first_traffic``), never for the part of a window before it: see ``citadel.metering.pricing``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Final, Literal

from sqlalchemy import Select, Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from citadel.accounts.store import Team, User
from citadel.errors import StoreUnavailable
from citadel.metering.budgets import BudgetUse, budget_use
from citadel.metering.pricing import DeploymentCost, Savings, Totals, deployment_cost, savings
from citadel.metering.ranges import (
    HOURLY,
    Bucket,
    Dimension,
    Metric,
    QueryError,
    TimeRange,
    ceil_hour,
    floor_hour,
    month_range,
)
from citadel.metering.rollups import UsageRow, rollup, usage_row, usage_select
from citadel.metering.schema import ROLLUPS, usage_hourly
from citadel.settings import Settings

__all__ = ["DEFAULT_TIMEOUT", "MAX_ROWS", "Analytics", "savings_by_model"]

MAX_ROWS: Final = 100_000  # the most rows one answer may have
DEFAULT_TIMEOUT: Final = 10.0  # seconds for one analytics query

_HOUR = timedelta(hours=1)


def savings_by_model(costs: Iterable[DeploymentCost], settings: Settings) -> list[Savings]:
    """Deployment costs summed per model and set against the model's reference price."""
    by_model: dict[str, tuple[Totals, int]] = {}
    for cost in costs:
        totals, infra = by_model.get(cost.model, (Totals(), 0))
        by_model[cost.model] = (totals + cost.totals, infra + cost.infra_micros)
    result = []
    for name, (totals, infra) in by_model.items():
        model = settings.model(name)
        reference = None if model is None else model.reference_price
        result.append(savings(model=name, totals=totals, infra_micros=infra, reference=reference))
    return result


class Analytics:
    """The analytics queries over one ledger database (the engine is the caller's to close)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        rollups: Sequence[tuple[Table, int]] = ROLLUPS,
    ) -> None:
        self._engine = engine
        self._rollups = tuple(rollups)
        postgres = engine.dialect.name == "postgresql"
        self._reader = (
            engine.execution_options(isolation_level="AUTOCOMMIT") if postgres else engine
        )
        self._timeout = timeout

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the ledger's tables answer."""
        await self._rows(
            select(func.count()).select_from(select(usage_hourly.c.bucket).limit(1).subquery())
        )

    async def usage(
        self,
        span: TimeRange,
        *,
        group_by: Sequence[Dimension] = (),
        bucket: Bucket = "none",
        filters: Mapping[Dimension, str] | None = None,
        order: Metric | None = None,
        limit: int | None = None,
    ) -> list[UsageRow]:
        """Usage in ``span`` grouped by ``group_by`` (and by ``bucket``), only the rows matching
        ``filters``; ordered by time and keys, or by ``order`` (largest first) up to ``limit``
        rows. More than ``MAX_ROWS`` rows is a QueryError: the caller should narrow the query."""
        bucketed = bucket != "none"
        statement = usage_select(
            span,
            group_by=group_by,
            bucket=bucket,
            filters=filters or {},
            order=order,
            limit=min(limit, MAX_ROWS) if limit is not None else MAX_ROWS + 1,
            rollups=self._rollups,
        )
        rows = await self._rows(statement)
        if len(rows) > MAX_ROWS:
            raise QueryError(
                "group_by",
                f"The answer would have more than {MAX_ROWS} rows; narrow the range, use a "
                "coarser bucket, group by fewer fields or add a filter.",
            )
        return [usage_row(row, bucketed, group_by) for row in rows]

    async def top(
        self, span: TimeRange, *, by: Dimension, metric: Metric = "cost", limit: int = 10
    ) -> list[UsageRow]:
        """The ``limit`` largest ``by`` (users or teams, say) in ``span`` by ``metric``."""
        return await self.usage(span, group_by=(by,), order=metric, limit=limit)

    async def spend(self, span: TimeRange, by: Dimension) -> dict[str, int]:
        """Cost in micro-USD per ``by`` value over ``span``."""
        rows = await self.usage(span, group_by=(by,))
        return {row.keys[by]: row.cost_micros for row in rows}

    async def budgets(
        self,
        scope: Literal["user", "team"],
        *,
        now: datetime,
        settings: Settings,
        users: Sequence[User],
        teams: Sequence[Team],
    ) -> tuple[TimeRange, list[BudgetUse]]:
        """This month's spend of every user (or team) against its monthly budget."""
        span = month_range(now, settings.limits.timezone)
        spent = await self.spend(span, scope)
        return span, budget_use(scope, spent=spent, users=users, teams=teams, tiers=settings.tiers)

    async def active_users(self, now: datetime, hours: int = 24) -> tuple[int, dict[str, int]]:
        """Users with at least one request in the last ``hours`` hours (the current one
        included): in all, and by tier (a user who changed tiers counts in both)."""
        end = ceil_hour(now)
        if end == floor_hour(now):
            end += _HOUR
        start = end - hours * _HOUR
        table = rollup(HOURLY, {"user_id", "tier"}, self._rollups)
        where = (table.c.bucket >= start, table.c.bucket < end)
        users = func.count(func.distinct(table.c.user_id))
        total = await self._rows(select(users).where(*where))
        by_tier = await self._rows(
            select(table.c.tier, users).where(*where).group_by(table.c.tier).order_by(table.c.tier)
        )
        return int(total[0][0] or 0), {str(r[0]): int(r[1]) for r in by_tier}

    async def first_traffic(self) -> dict[str, datetime]:
        """The start of the UTC hour each deployment first served in (any status), from the
        hourly rollup by deployment: one row per deployment and hour, read once."""
        table = rollup(HOURLY, {"deployment"}, self._rollups)
        rows = await self._rows(
            select(table.c.deployment, func.min(table.c.bucket))
            .where(table.c.deployment != "")
            .group_by(table.c.deployment)
        )
        return {str(r[0]): r[1] for r in rows}

    async def deployment_costs(
        self, span: TimeRange, *, now: datetime, settings: Settings
    ) -> list[DeploymentCost]:
        """Every configured deployment (and any other the ledger names) over ``span``: what it
        served and was charged, and its infrastructure cost over the part of ``span`` passed
        since its first traffic (``first_traffic``; nothing for one that never served)."""
        rows = await self.usage(span, group_by=("deployment", "model"))
        first = await self.first_traffic()
        served: dict[str, Totals] = {}
        seen_model: dict[str, str] = {}
        for row in rows:
            name = row.keys["deployment"]
            if not name:  # answered by no deployment (refused, or none could take it)
                continue
            served[name] = served.get(name, Totals()) + row.totals
            seen_model.setdefault(name, row.keys["model"])
        costs: list[DeploymentCost] = []
        configured: set[str] = set()
        for model in settings.models:
            for deployment in model.deployments:
                configured.add(deployment.name)
                costs.append(
                    deployment_cost(
                        name=deployment.name,
                        model=model.name,
                        deployment=deployment,
                        totals=served.get(deployment.name, Totals()),
                        seconds=span.seconds_since(first.get(deployment.name), now),
                        reference=model.reference_price,
                        costed_from=first.get(deployment.name),
                    )
                )
        for name in sorted(set(served) - configured):
            model_settings = settings.model(seen_model[name])
            costs.append(
                deployment_cost(
                    name=name,
                    model=seen_model[name],
                    deployment=None,
                    totals=served[name],
                    seconds=span.seconds_since(first.get(name), now),
                    reference=None if model_settings is None else model_settings.reference_price,
                    costed_from=first.get(name),
                )
            )
        return costs

    async def savings(self, span: TimeRange, *, now: datetime, settings: Settings) -> list[Savings]:
        """Per model: its tokens priced at its reference price against the infrastructure cost
        of its deployments over ``span`` (models without traffic or a reference price too)."""
        return savings_by_model(
            await self.deployment_costs(span, now=now, settings=settings), settings
        )

    # -- plumbing ---------------------------------------------------------------------------

    async def _rows(self, statement: Select[Any]) -> Sequence[Sequence[Any]]:
        async with self._guard(), self._reader.connect() as conn:
            rows: Sequence[Sequence[Any]] = (await conn.execute(statement)).all()
            return rows

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        from citadel.stores.sql import translate_errors

        try:
            with translate_errors(self._timeout):
                async with asyncio.timeout(self._timeout):
                    yield
        except StoreUnavailable as exc:
            detail = exc.detail.replace("the accounts tables", "the usage ledger's tables")
            raise StoreUnavailable("sql", detail) from exc.__cause__
