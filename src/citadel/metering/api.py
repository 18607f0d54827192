"""The analytics API of the custom-metrics service: its routes, their handlers, and the JSON and
CSV they answer.

- ``GET /v1/usage``: usage and cost grouped by any of user, team, model, deployment and tier, per
  hour, per day or over the whole range, optionally filtered on any of them;
- ``GET /v1/top``: the largest users (or teams, models, ...) by cost, tokens, requests or errors;
- ``GET /v1/budgets``: this month's spend of every user or team against its monthly budget;
- ``GET /v1/deployments/costs``: each deployment's real cost per 1000 tokens (its GPU-hours over
  the tokens it served) beside the price charged;
- ``GET /v1/savings``: per model and in all, the reference (commercial) cost of the tokens served,
  the infrastructure cost, the savings and the return on investment.

Each is behind the admin key and answers JSON, or CSV with a header row given ``?format=csv``. A
bad parameter is a 400 naming it (``app.py`` translates ``QueryError``); the ledger unreachable a
503. Injected (``app.py``, through ``provide_reader``): ``reader`` (``Reader``: the settings,
the ledger's analytics, the accounts and the clock).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import Provide
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema

from citadel.accounts.store import AccountStore, Team, User
from citadel.errors import BadRequest, StoreUnavailable, Unavailable
from citadel.metering.analytics import Analytics
from citadel.metering.bodies import (
    MEASURE_COLUMNS,
    BucketParam,
    BudgetRow,
    BudgetsReply,
    By,
    CostRow,
    CostsReply,
    DeploymentFilter,
    End,
    Format,
    GroupBy,
    Limit,
    Measures,
    MetricParam,
    ModelFilter,
    SavingsReply,
    SavingsRow,
    Scope,
    Start,
    TeamFilter,
    TierFilter,
    TopReply,
    TopRow,
    UsageReply,
    UsageRowReply,
    UserFilter,
    iso,
    measures,
    parse_range,
)
from citadel.metering.pricing import sum_savings
from citadel.metering.ranges import DIMENSIONS, Dimension, check_group_by
from citadel.metering.rollups import UsageRow
from citadel.metering.schema import MEASURES
from citadel.settings import Settings
from citadel.web import Injected, errors

__all__ = ["CONTROLLERS", "Reader", "provide_reader"]

_log = logging.getLogger("citadel.metering")

_CSV = "text/csv"  # Litestar adds "; charset=utf-8"


@dataclass(slots=True)
class Reader:
    """What the handlers read: the settings, the ledger, the accounts, the clock."""

    settings: Settings
    analytics: Analytics
    accounts: AccountStore
    clock: Callable[[], float]  # Unix seconds

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    async def names(self, by: Dimension) -> dict[str, str]:
        """Users' and teams' names, deleted ones' too (their history keeps them), best effort:
        the ledger answered, the accounts may not."""
        try:
            if by == "user":
                users = await self.accounts.list_users(include_deleted=True)
                return {u.id: u.name for u in users}
            if by == "team":
                teams = await self.accounts.list_teams(include_deleted=True)
                return {t.id: t.name for t in teams}
        except StoreUnavailable as exc:
            _log.warning("names unavailable", extra={"detail": exc.detail})
        return {}

    async def users_and_teams(self) -> tuple[list[User], list[Team]]:
        try:
            return await self.accounts.list_users(), await self.accounts.list_teams()
        except StoreUnavailable as exc:
            raise Unavailable(
                f"The accounts database is unavailable: {exc.detail}. Try again later."
            ) from exc


def _plain_query(request: Request[Any, Any, Any]) -> None:
    """Each query parameter given once and not empty; a 400 naming it otherwise."""
    seen: set[str] = set()
    for name, value in request.query_params.multi_items():
        if name in seen:
            raise BadRequest(f"Query parameter '{name}' is given twice.", param=name)
        if not value.strip():
            raise BadRequest(f"Query parameter '{name}' is empty.", param=name)
        seen.add(name)


def provide_reader(reader: Reader) -> Provide:
    """The handlers' ``reader``, given once the query string passed ``_plain_query`` (one
    dependency: Litestar resolves several in a task group, ~0.5 ms a request here)."""

    def checked(request: Request[Any, Any, Any]) -> Reader:
        _plain_query(request)
        return reader

    return Provide(checked, sync_to_thread=False)


Reader_ = Injected[Reader]


@dataclass
class JsonOrCsv(Operation):
    """An operation whose 200 is JSON or, given ``?format=csv``, CSV."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse) and ok.content is not None:
            ok.content["text/csv"] = OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description="a header row naming the JSON fields, then a line per row",
                )
            )


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _csv(rows: Sequence[msgspec.Struct], columns: Sequence[str]) -> Response[Any]:
    """A header row of ``columns``, then a line per row (an absent or null field empty)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in msgspec.to_builtins(rows):
        writer.writerow([_csv_value(row.get(c)) for c in columns])
    return Response(out.getvalue().encode(), media_type=_CSV)


_BUDGET_COLUMNS: Final = tuple(BudgetRow.__struct_fields__)
_COST_COLUMNS: Final = tuple(CostRow.__struct_fields__)
_SAVINGS_COLUMNS: Final = tuple(SavingsRow.__struct_fields__)
_TOP_COLUMNS: Final = ("rank", "id", "name", *MEASURE_COLUMNS)


def _ops(*statuses: int) -> dict[str, Any]:
    return {"responses": errors(*statuses), "operation_class": JsonOrCsv}


class AnalyticsController(Controller):
    path = "/v1"
    tags = ["analytics"]  # noqa: RUF012 - Litestar's layer attribute

    @get("/usage", summary="Usage and cost, grouped and bucketed", **_ops(503))
    async def usage(
        self,
        reader: Reader_,
        group_by: GroupBy = None,
        bucket: BucketParam = "none",
        user: UserFilter = None,
        team: TeamFilter = None,
        model: ModelFilter = None,
        deployment: DeploymentFilter = None,
        tier: TierFilter = None,
        start: Start = None,
        end: End = None,
        format_: Format = "json",
    ) -> Response[UsageReply]:
        names = (n.strip() for n in (group_by or "").split(",") if n)
        grouping = check_group_by(names)
        span = parse_range(start, end, reader.now(), bucket)
        given = {
            "user": user,
            "team": team,
            "model": model,
            "deployment": deployment,
            "tier": tier,
        }
        filters: dict[Dimension, str] = {
            d: value.strip() for d in DIMENSIONS if (value := given[d]) is not None
        }
        rows = await reader.analytics.usage(span, group_by=grouping, bucket=bucket, filters=filters)
        # Users' and teams' names beside their ids (best effort, as /v1/top's).
        named: dict[str, dict[str, str]] = {
            d: await reader.names(d) for d in grouping if d in ("user", "team")
        }
        data = [UsageRowReply.row(row, named) for row in rows]
        if format_ == "csv":
            keys = [c for d in grouping for c in ((d, f"{d}_name") if d in named else (d,))]
            columns = [*(["bucket"] if bucket != "none" else []), *keys, *MEASURE_COLUMNS]
            return _csv(data, columns)
        total = UsageRow(
            bucket=None, keys={}, **{k: sum(getattr(r, k) for r in rows) for k in MEASURES}
        )
        return Response(
            UsageReply(
                start=iso(span.start),
                end=iso(span.end),
                group_by=list(grouping),
                bucket=bucket,
                filters=filters,
                total=Measures.of(total),
                data=data,
            )
        )

    @get(
        "/top",
        summary="The largest users, teams, ... by cost, tokens, requests or errors",
        **_ops(503),
    )
    async def top(
        self,
        reader: Reader_,
        by: By = "user",
        metric: MetricParam = "cost",
        limit: Limit = 10,
        start: Start = None,
        end: End = None,
        format_: Format = "json",
    ) -> Response[TopReply]:
        span = parse_range(start, end, reader.now())
        rows = await reader.analytics.top(span, by=by, metric=metric, limit=limit)
        names = await reader.names(by)
        data = [
            TopRow(rank=i, id=row.keys[by], name=names.get(row.keys[by]), **measures(row))
            for i, row in enumerate(rows, 1)
        ]
        if format_ == "csv":
            return _csv(data, _TOP_COLUMNS)
        return Response(
            TopReply(
                start=iso(span.start),
                end=iso(span.end),
                by=by,
                metric=metric,
                limit=limit,
                data=data,
            )
        )

    @get(
        "/budgets",
        summary="This month's spend of each user or team against its budget",
        **_ops(503),
    )
    async def budgets(
        self, reader: Reader_, scope_: Scope = "team", format_: Format = "json"
    ) -> Response[BudgetsReply]:
        scope = scope_  # `scope` is Litestar's name for the ASGI scope
        users, teams = await reader.users_and_teams()
        span, rows = await reader.analytics.budgets(
            scope, now=reader.now(), settings=reader.settings, users=users, teams=teams
        )
        data = [BudgetRow.of(r) for r in rows]
        if format_ == "csv":
            return _csv(data, _BUDGET_COLUMNS)
        return Response(
            BudgetsReply(start=iso(span.start), end=iso(span.end), scope=scope, data=data)
        )

    @get(
        "/deployments/costs",
        summary="Each deployment's real cost per 1000 tokens from its GPU-hours, beside the "
        "price charged",
        **_ops(503),
    )
    async def deployment_costs(
        self,
        reader: Reader_,
        start: Start = None,
        end: End = None,
        format_: Format = "json",
    ) -> Response[CostsReply]:
        span = parse_range(start, end, reader.now())
        costs = await reader.analytics.deployment_costs(
            span, now=reader.now(), settings=reader.settings
        )
        data = [CostRow.of(c) for c in costs]
        if format_ == "csv":
            return _csv(data, _COST_COLUMNS)
        return Response(CostsReply(start=iso(span.start), end=iso(span.end), data=data))

    @get(
        "/savings",
        summary="Savings and ROI against each model's commercial reference price",
        **_ops(503),
    )
    async def savings(
        self,
        reader: Reader_,
        start: Start = None,
        end: End = None,
        format_: Format = "json",
    ) -> Response[SavingsReply]:
        span = parse_range(start, end, reader.now())
        items = await reader.analytics.savings(span, now=reader.now(), settings=reader.settings)
        data = [SavingsRow.of(s) for s in items]
        total = SavingsRow.of(sum_savings(items))
        if format_ == "csv":  # the last line, model "*": every model with a reference price
            return _csv([*data, total], _SAVINGS_COLUMNS)
        return Response(
            SavingsReply(start=iso(span.start), end=iso(span.end), total=total, data=data)
        )


CONTROLLERS = (AnalyticsController,)
