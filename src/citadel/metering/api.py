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
bad parameter is a 400 naming it; the ledger unreachable a 503.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal, Protocol

import orjson

from citadel.accounts.store import AccountStore, Team, User
from citadel.errors import BadRequest, StoreUnavailable, Unavailable
from citadel.gateway.auth import AdminKeyAuthenticator
from citadel.http.server import Request, Response
from citadel.metering.analytics import Analytics
from citadel.metering.budgets import BudgetUse
from citadel.metering.pricing import DeploymentCost, Savings, sum_savings, usd
from citadel.metering.query import (
    parse_bucket,
    parse_choice,
    parse_metric,
    parse_query,
    parse_range,
    parse_whole,
)
from citadel.metering.ranges import (
    DIMENSIONS,
    METRICS,
    Bucket,
    Dimension,
    Metric,
    QueryError,
    TimeRange,
    check_group_by,
)
from citadel.metering.rollups import UsageRow
from citadel.metering.schema import MEASURES
from citadel.openapi import Operation, PathHandler
from citadel.settings import Settings

__all__ = ["MAX_TOP", "AnalyticsApi", "ApiDeps", "guarded"]

_log = logging.getLogger("citadel.metering")

MAX_TOP: Final = 1000


def guarded(auth: AdminKeyAuthenticator, handler: PathHandler) -> PathHandler:
    """``handler`` behind the admin key; a bad parameter a 400, an unreachable store a 503."""

    async def translated(request: Request, params: Mapping[str, str]) -> Response:
        try:
            return await handler(request, params)
        except QueryError as exc:
            raise BadRequest(exc.message, param=exc.param) from exc
        except StoreUnavailable as exc:
            what = "The usage ledger" if exc.store == "sql" else exc.store
            raise Unavailable(f"{what} is unavailable: {exc.detail}. Try again later.") from exc

    return auth.guard(translated)


# -- writing -----------------------------------------------------------------------------------


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _money(prefix: str, micros: int | None) -> dict[str, Any]:
    return {f"{prefix}_usd": usd(micros), f"{prefix}_micros": micros}


def _per_1k(value: float | None) -> float | None:
    return None if value is None else value / 1_000_000


def _measures(row: UsageRow) -> dict[str, Any]:
    return {
        "requests": row.requests,
        "errors": row.errors,
        "refusals": row.refusals,
        "failures": row.failures,
        "error_rate": row.error_rate,
        "refusal_rate": row.refusal_rate,
        "failure_rate": row.failure_rate,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.tokens,
        **_money("cost", row.cost_micros),
        "latency_ms_mean": row.latency_ms_mean,
        "ttft_ms_mean": row.ttft_ms_mean,
    }


def _cost_json(cost: DeploymentCost) -> dict[str, Any]:
    totals = cost.totals
    return {
        "deployment": cost.deployment,
        "model": cost.model,
        "configured": cost.configured,
        "gpus": cost.gpus,
        "gpu_hour_usd": cost.gpu_hour_usd,
        "hours": cost.hours,
        "costed_from": _iso(cost.costed_from),
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "total_tokens": totals.tokens,
        "tokens_per_hour": cost.tokens_per_hour,
        **_money("charged", totals.cost_micros),
        **_money("infra", cost.infra_micros),
        **_money("margin", cost.margin_micros),
        **_money("reference", cost.reference_micros),
        "infra_per_1k_usd": _per_1k(cost.infra_per_1k_micros),
        "charged_per_1k_usd": _per_1k(cost.charged_per_1k_micros),
    }


def _savings_json(item: Savings) -> dict[str, Any]:
    totals = item.totals
    return {
        "model": item.model,
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        **_money("charged", totals.cost_micros),
        **_money("infra", item.infra_micros),
        **_money("reference", item.reference_micros),
        **_money("savings", item.savings_micros),
        **_money("savings_vs_charged", item.savings_vs_charged_micros),
        "savings_ratio": item.savings_ratio,
        "roi": item.roi,
    }


def _budget_json(row: BudgetUse) -> dict[str, Any]:
    return {
        "scope": row.scope,
        "id": row.id,
        "name": row.name,
        "team_id": row.team_id,
        "tier": row.tier,
        "members": row.members,
        **_money("spent", row.spent_micros),
        **_money("budget", row.budget_micros),
        **_money("remaining", row.remaining_micros),
        "utilisation": row.utilisation,
    }


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _answer(
    query: Mapping[str, str],
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    columns: Sequence[str],
) -> Response:
    """JSON (``meta`` and the rows as ``data``), or CSV: a header row of ``columns``, then a line
    per row."""
    if query.get("format", "json") == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(columns)
        writer.writerows([_csv_value(row.get(c)) for c in columns] for row in rows)
        return Response(200, out.getvalue().encode(), content_type=b"text/csv; charset=utf-8")
    return Response(200, orjson.dumps({**meta, "data": rows}))


def _columns(rows: list[dict[str, Any]], fallback: Sequence[str]) -> list[str]:
    return list(rows[0]) if rows else list(fallback)


_MEASURE_COLUMNS: Final = (
    "requests",
    "errors",
    "refusals",
    "failures",
    "error_rate",
    "refusal_rate",
    "failure_rate",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "cost_micros",
    "latency_ms_mean",
    "ttft_ms_mean",
)
_FORMATS: Final = ("json", "csv")
_RANGE_QUERY: Final = (
    (
        "start",
        "start of the range, inclusive: RFC 3339, a date or Unix seconds (widened to the "
        "whole UTC hour it falls in)",
    ),
    ("end", "end of the range, exclusive (default: the end of the current hour)"),
    ("format", "json (default) or csv"),
)


class ApiDeps(Protocol):
    """What the handlers read (``citadel.metering.app.MeteringDeps`` has it)."""

    analytics: Analytics
    accounts: AccountStore

    @property
    def clock(self) -> Callable[[], float]:
        """Unix seconds."""
        ...


class AnalyticsApi:
    """The handlers, over one settings object and the ledger and accounts they read."""

    def __init__(self, settings: Settings, deps: ApiDeps) -> None:
        self.settings = settings
        self.analytics = deps.analytics
        self.accounts = deps.accounts
        self.clock = deps.clock
        self.auth = AdminKeyAuthenticator(settings.gateway.admin_key)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def routes(self) -> list[tuple[Operation, PathHandler]]:
        def op(
            path: str, summary: str, query: tuple[tuple[str, str], ...], **more: Any
        ) -> Operation:
            return Operation(
                method="GET",
                path=path,
                summary=summary,
                tags=("analytics",),
                query=query,
                errors=(400, 503),
                response={"type": "object"},
                **more,
            )

        dims = ", ".join(DIMENSIONS)
        return [
            (op("/v1/usage", "Usage and cost, grouped and bucketed", (
                ("group_by", f"comma-separated, any of: {dims}"),
                ("bucket", "hour, day (whole UTC days) or none (default)"),
                *((d, f"only this {d}") for d in DIMENSIONS),
                *_RANGE_QUERY)), self.usage),
            (op("/v1/top", "The largest users, teams, ... by cost, tokens, requests or errors", (
                ("by", f"one of: {dims} (default user)"),
                ("metric", f"one of: {', '.join(METRICS)} (default cost)"),
                ("limit", f"how many, 1 to {MAX_TOP} (default 10)"),
                *_RANGE_QUERY)), self.top),
            (op("/v1/budgets", "This month's spend of each user or team against its budget", (
                ("scope", "team (default) or user"), ("format", "json (default) or csv"))),
             self.budgets),
            (op("/v1/deployments/costs",
                "Each deployment's real cost per 1000 tokens from its GPU-hours, beside the price "
                "charged", _RANGE_QUERY), self.deployment_costs),
            (op("/v1/savings", "Savings and ROI against each model's commercial reference price",
                _RANGE_QUERY), self.savings),
        ]  # fmt: skip

    # -- handlers -------------------------------------------------------------------------------

    async def usage(self, request: Request, params: Mapping[str, str]) -> Response:
        query = parse_query(request, ("group_by", "bucket", *DIMENSIONS, "start", "end", "format"))
        parse_choice(query, "format", _FORMATS, "json")
        group_by = check_group_by(n.strip() for n in query.get("group_by", "").split(",") if n)
        bucket: Bucket = parse_bucket(query)
        span = parse_range(query, self.now(), bucket)
        filters: dict[Dimension, str] = {d: query[d] for d in DIMENSIONS if d in query}
        rows = await self.analytics.usage(span, group_by=group_by, bucket=bucket, filters=filters)
        # Users' and teams' names beside their ids (best effort, as /v1/top's).
        named = [d for d in group_by if d in ("user", "team")]
        names = {d: await self._names(d) for d in named}
        data = []
        for row in rows:
            item: dict[str, Any] = {"bucket": _iso(row.bucket)} if bucket != "none" else {}
            for d, value in row.keys.items():
                item[d] = value
                if d in names:
                    item[f"{d}_name"] = names[d].get(value)
            data.append(item | _measures(row))
        keys = [c for d in group_by for c in ((d, f"{d}_name") if d in names else (d,))]
        columns = [*(["bucket"] if bucket != "none" else []), *keys, *_MEASURE_COLUMNS]
        total = UsageRow(
            bucket=None,
            keys={},
            **{k: sum(getattr(r, k) for r in rows) for k in MEASURES},
        )
        meta = {
            "object": "usage",
            **_span(span),
            "group_by": list(group_by),
            "bucket": bucket,
            "filters": filters,
            "total": _measures(total),
        }
        return _answer(query, data, meta, columns)

    async def top(self, request: Request, params: Mapping[str, str]) -> Response:
        query = parse_query(request, ("by", "metric", "limit", "start", "end", "format"))
        parse_choice(query, "format", _FORMATS, "json")
        by = check_group_by([parse_choice(query, "by", DIMENSIONS, "user")])[0]
        metric: Metric = parse_metric(query)
        limit = parse_whole(query, "limit", 10, MAX_TOP)
        span = parse_range(query, self.now())
        rows = await self.analytics.top(span, by=by, metric=metric, limit=limit)
        names = await self._names(by)
        data = [
            {"rank": i, "id": row.keys[by], "name": names.get(row.keys[by])} | _measures(row)
            for i, row in enumerate(rows, 1)
        ]
        meta = {"object": "top", **_span(span), "by": by, "metric": metric, "limit": limit}
        return _answer(query, data, meta, ["rank", "id", "name", *_MEASURE_COLUMNS])

    async def _names(self, by: Dimension) -> dict[str, str]:
        """Users' and teams' names, best effort: the ledger answered, the accounts may not."""
        try:
            if by == "user":
                return {u.id: u.name for u in await self.accounts.list_users()}
            if by == "team":
                return {t.id: t.name for t in await self.accounts.list_teams()}
        except StoreUnavailable as exc:
            _log.warning("names unavailable", extra={"detail": exc.detail})
        return {}

    async def budgets(self, request: Request, params: Mapping[str, str]) -> Response:
        query = parse_query(request, ("scope", "format"))
        parse_choice(query, "format", _FORMATS, "json")
        scope: Literal["user", "team"] = (
            "user" if parse_choice(query, "scope", ("team", "user"), "team") == "user" else "team"
        )
        users, teams = await self._accounts()
        span, rows = await self.analytics.budgets(
            scope, now=self.now(), settings=self.settings, users=users, teams=teams
        )
        data = [_budget_json(r) for r in rows]
        meta = {"object": "budgets", **_span(span), "scope": scope}
        return _answer(query, data, meta, _columns(data, _BUDGET_COLUMNS))

    async def _accounts(self) -> tuple[list[User], list[Team]]:
        try:
            return await self.accounts.list_users(), await self.accounts.list_teams()
        except StoreUnavailable as exc:
            raise Unavailable(
                f"The accounts database is unavailable: {exc.detail}. Try again later."
            ) from exc

    async def deployment_costs(self, request: Request, params: Mapping[str, str]) -> Response:
        query = parse_query(request, ("start", "end", "format"))
        parse_choice(query, "format", _FORMATS, "json")
        span = parse_range(query, self.now())
        costs = await self.analytics.deployment_costs(span, now=self.now(), settings=self.settings)
        data = [_cost_json(c) for c in costs]
        meta = {"object": "deployment_costs", **_span(span)}
        return _answer(query, data, meta, _columns(data, _COST_COLUMNS))

    async def savings(self, request: Request, params: Mapping[str, str]) -> Response:
        query = parse_query(request, ("start", "end", "format"))
        parse_choice(query, "format", _FORMATS, "json")
        span = parse_range(query, self.now())
        items = await self.analytics.savings(span, now=self.now(), settings=self.settings)
        data = [_savings_json(s) for s in items]
        total = _savings_json(sum_savings(items))
        meta = {"object": "savings", **_span(span), "total": total}
        if query.get("format") == "csv":
            data.append(total)  # the last line, model "*": every model with a reference price
        return _answer(query, data, meta, list(total))


_BUDGET_COLUMNS: Final = tuple(
    _budget_json(BudgetUse(scope="team", id="", name="", spent_micros=0, budget_micros=None))
)
_COST_COLUMNS: Final = (
    "deployment",
    "model",
    "configured",
    "gpus",
    "gpu_hour_usd",
    "hours",
    "costed_from",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "tokens_per_hour",
    "charged_usd",
    "charged_micros",
    "infra_usd",
    "infra_micros",
    "margin_usd",
    "margin_micros",
    "reference_usd",
    "reference_micros",
    "infra_per_1k_usd",
    "charged_per_1k_usd",
)


def _span(span: TimeRange) -> dict[str, Any]:
    return {"start": _iso(span.start), "end": _iso(span.end)}
