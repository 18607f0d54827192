"""The analytics API's query parameters and replies: each parameter a typed, annotated argument and
each reply a ``msgspec.Struct``, so that one definition gives the validation (a bad parameter is a
400 naming it), the OpenAPI schema and the encoding. Money is given twice, in US dollars
(``*_usd``, for reading) and micro-dollars (``*_micros``, exact, for sums); times are RFC 3339 UTC
strings (``2026-11-24T08:00:00Z``).

A range is ``start`` and ``end``: RFC 3339, a date, or Unix seconds, whole UTC hours; by default
the last 30 days up to the end of the current hour (``parse_range``).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, TypedDict

import msgspec
from litestar.params import Parameter, QueryParameter
from msgspec import UNSET, UnsetType

from citadel.metering.budgets import BudgetUse
from citadel.metering.pricing import DeploymentCost, Savings, usd
from citadel.metering.ranges import (
    DIMENSIONS,
    METRICS,
    Bucket,
    Dimension,
    Metric,
    QueryError,
    TimeRange,
)
from citadel.metering.rollups import UsageRow

__all__ = [
    "DEFAULT_DAYS",
    "MAX_TOP",
    "MEASURE_COLUMNS",
    "BudgetRow",
    "BudgetsReply",
    "CostRow",
    "CostsReply",
    "Measures",
    "SavingsReply",
    "SavingsRow",
    "TopReply",
    "TopRow",
    "UsageReply",
    "UsageRowReply",
    "iso",
    "measures",
    "parse_range",
    "parse_time",
]

DEFAULT_DAYS: Final = 30
MAX_TOP: Final = 1000
# Times outside these years are refused: a range's arithmetic (a default start 30 days before an
# end, a bucket after the last) must stay inside what ``datetime`` can hold.
_FIRST_YEAR, _LAST_YEAR = 1970, 9000
_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)
_DIMS = ", ".join(DIMENSIONS)

# -- query parameters -------------------------------------------------------------------------

Format = Annotated[
    Literal["json", "csv"], QueryParameter(name="format", description="json (default) or csv")
]
Start = Annotated[
    str | None,
    Parameter(
        description="start of the range, inclusive: RFC 3339, a date or Unix seconds; a whole "
        f"UTC hour (default: {DEFAULT_DAYS} days before end, 1 day with hourly buckets)"
    ),
]
End = Annotated[
    str | None,
    Parameter(description="end of the range, exclusive (default: the end of the current hour)"),
]
GroupBy = Annotated[str | None, Parameter(description=f"comma-separated, any of: {_DIMS}")]
BucketParam = Annotated[
    Bucket, Parameter(description="hour, day (whole UTC days) or none (default)")
]
By = Annotated[Dimension, Parameter(description=f"one of: {_DIMS} (default user)")]
MetricParam = Annotated[
    Metric, Parameter(description=f"one of: {', '.join(METRICS)} (default cost)")
]
Limit = Annotated[
    int, Parameter(ge=1, le=MAX_TOP, description=f"how many, 1 to {MAX_TOP} (default 10)")
]
Scope = Annotated[
    Literal["team", "user"], QueryParameter(name="scope", description="team (default) or user")
]


def _only(dimension: str) -> Any:
    return Parameter(pattern=r"\S", description=f"only this {dimension}")


UserFilter = Annotated[str | None, _only("user")]
TeamFilter = Annotated[str | None, _only("team")]
ModelFilter = Annotated[str | None, _only("model")]
DeploymentFilter = Annotated[str | None, _only("deployment")]
TierFilter = Annotated[str | None, _only("tier")]


def parse_time(name: str, text: str) -> datetime:
    """``text`` as an aware UTC datetime: RFC 3339 with an offset, a date (its UTC midnight) or
    Unix seconds. QueryError names ``name`` otherwise."""
    text = text.strip().replace(" ", "+")  # a "+hh:mm" offset not percent-encoded: a space
    try:
        if text.lstrip("-").isdigit():
            when: datetime | None = datetime.fromtimestamp(int(text), UTC)
        else:
            when = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        when = None
    if when is None:
        raise QueryError(
            name,
            f"'{name}' must be an RFC 3339 time such as 2024-06-01T00:00:00Z, a date such as "
            f"2024-06-01, or Unix seconds; got {text[:100]!r}.",
        )
    if when.tzinfo is None:
        if len(text) > 10:  # a time without an offset is ambiguous
            raise QueryError(name, f"'{name}' must carry a time zone (Z or +hh:mm); got {text!r}.")
        when = when.replace(tzinfo=UTC)
    if not _FIRST_YEAR <= when.year <= _LAST_YEAR:
        raise QueryError(
            name, f"'{name}' must be in the years {_FIRST_YEAR} to {_LAST_YEAR}; got {text!r}."
        )
    return when.astimezone(UTC)


def parse_range(
    start: str | None, end: str | None, now: datetime, bucket: Bucket = "none"
) -> TimeRange:
    """The range from ``start`` and ``end``; by default the 30 days up to the end of the current
    hour (of the current day, with daily buckets)."""
    if end is not None:
        until = parse_time("end", end)
    else:
        hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        until = hour.replace(hour=0) + _DAY if bucket == "day" else hour + _HOUR
    if start is not None:
        since = parse_time("start", start)
    else:
        since = until - timedelta(days=DEFAULT_DAYS if bucket != "hour" else 1)
    return TimeRange.checked(since, until, bucket)


# -- replies ----------------------------------------------------------------------------------

Time = Annotated[str, msgspec.Meta(description="RFC 3339, UTC")]
Usd = Annotated[float | None, msgspec.Meta(description="US dollars; null: unknown or unlimited")]
Micros = Annotated[int | None, msgspec.Meta(description="micro-dollars (1e-6 USD), exact")]


def iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _per_1k(value: float | None) -> float | None:
    return None if value is None else value / 1_000_000


class Measures(msgspec.Struct, kw_only=True):
    """What a group of requests used and cost."""

    requests: int
    errors: Annotated[int, msgspec.Meta(description="requests answered with a status >= 400")]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: Usd
    cost_micros: Micros
    latency_ms_mean: float | None
    ttft_ms_mean: Annotated[float | None, msgspec.Meta(description="time to first token")]

    @classmethod
    def of(cls, row: UsageRow) -> Measures:
        return cls(**measures(row))


class _MeasureFields(TypedDict):
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None
    cost_micros: int | None
    latency_ms_mean: float | None
    ttft_ms_mean: float | None


def measures(row: UsageRow) -> _MeasureFields:
    """The fields of ``Measures`` for one row, for it and the replies that extend it."""
    return {
        "requests": row.requests,
        "errors": row.errors,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "total_tokens": row.tokens,
        "cost_usd": usd(row.cost_micros),
        "cost_micros": row.cost_micros,
        "latency_ms_mean": row.latency_ms_mean,
        "ttft_ms_mean": row.ttft_ms_mean,
    }


MEASURE_COLUMNS: Final = tuple(Measures.__struct_fields__)


class UsageRowReply(Measures, kw_only=True):
    """One group (and bucket): only the fields grouped by are present."""

    bucket: Time | UnsetType = UNSET
    user: str | UnsetType = UNSET
    team: str | UnsetType = UNSET
    model: str | UnsetType = UNSET
    deployment: str | UnsetType = UNSET
    tier: str | UnsetType = UNSET

    @classmethod
    def row(cls, row: UsageRow) -> UsageRowReply:
        reply = cls(**measures(row))
        if row.bucket is not None:
            reply.bucket = iso(row.bucket)
        for dimension, value in row.keys.items():
            setattr(reply, dimension, value)
        return reply


class UsageReply(msgspec.Struct, kw_only=True):
    start: Time
    end: Time
    group_by: list[Dimension]
    bucket: Bucket
    filters: dict[Dimension, str]
    total: Measures
    data: list[UsageRowReply]
    object: Literal["usage"] = "usage"


class TopRow(Measures, kw_only=True):
    rank: Annotated[int, msgspec.Meta(description="1: the largest")]
    id: str
    name: Annotated[str | None, msgspec.Meta(description="a user's or team's name, if known")]


class TopReply(msgspec.Struct, kw_only=True):
    start: Time
    end: Time
    by: Dimension
    metric: Metric
    limit: int
    data: list[TopRow]
    object: Literal["top"] = "top"


class BudgetRow(msgspec.Struct, kw_only=True):
    scope: Literal["user", "team"]
    id: str
    name: str
    team_id: Annotated[str | None, msgspec.Meta(description="users only")]
    tier: Annotated[str | None, msgspec.Meta(description="users only")]
    members: Annotated[int | None, msgspec.Meta(description="teams only")]
    spent_usd: Usd
    spent_micros: Micros
    budget_usd: Usd
    budget_micros: Micros
    remaining_usd: Usd
    remaining_micros: Micros
    utilisation: Annotated[float | None, msgspec.Meta(description="spent over budget")]

    @classmethod
    def of(cls, row: BudgetUse) -> BudgetRow:
        return cls(
            scope=row.scope,
            id=row.id,
            name=row.name,
            team_id=row.team_id,
            tier=row.tier,
            members=row.members,
            spent_usd=usd(row.spent_micros),
            spent_micros=row.spent_micros,
            budget_usd=usd(row.budget_micros),
            budget_micros=row.budget_micros,
            remaining_usd=usd(row.remaining_micros),
            remaining_micros=row.remaining_micros,
            utilisation=row.utilisation,
        )


class BudgetsReply(msgspec.Struct, kw_only=True):
    start: Time
    end: Time
    scope: Literal["user", "team"]
    data: list[BudgetRow]
    object: Literal["budgets"] = "budgets"


class CostRow(msgspec.Struct, kw_only=True):
    deployment: str
    model: str
    configured: Annotated[bool, msgspec.Meta(description="false: no longer in the settings")]
    gpus: int
    gpu_hour_usd: float
    hours: float
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    tokens_per_hour: float
    charged_usd: Usd
    charged_micros: Micros
    infra_usd: Usd
    infra_micros: Micros
    margin_usd: Usd
    margin_micros: Micros
    reference_usd: Usd
    reference_micros: Micros
    infra_per_1k_usd: float | None
    charged_per_1k_usd: float | None

    @classmethod
    def of(cls, cost: DeploymentCost) -> CostRow:
        totals = cost.totals
        return cls(
            deployment=cost.deployment,
            model=cost.model,
            configured=cost.configured,
            gpus=cost.gpus,
            gpu_hour_usd=cost.gpu_hour_usd,
            hours=cost.hours,
            requests=totals.requests,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            total_tokens=totals.tokens,
            tokens_per_hour=cost.tokens_per_hour,
            charged_usd=usd(totals.cost_micros),
            charged_micros=totals.cost_micros,
            infra_usd=usd(cost.infra_micros),
            infra_micros=cost.infra_micros,
            margin_usd=usd(cost.margin_micros),
            margin_micros=cost.margin_micros,
            reference_usd=usd(cost.reference_micros),
            reference_micros=cost.reference_micros,
            infra_per_1k_usd=_per_1k(cost.infra_per_1k_micros),
            charged_per_1k_usd=_per_1k(cost.charged_per_1k_micros),
        )


class CostsReply(msgspec.Struct, kw_only=True):
    start: Time
    end: Time
    data: list[CostRow]
    object: Literal["deployment_costs"] = "deployment_costs"


class SavingsRow(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(description='"*": every model with a reference price')]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    charged_usd: Usd
    charged_micros: Micros
    infra_usd: Usd
    infra_micros: Micros
    reference_usd: Usd
    reference_micros: Micros
    savings_usd: Usd
    savings_micros: Micros
    savings_vs_charged_usd: Usd
    savings_vs_charged_micros: Micros
    savings_ratio: float | None
    roi: Annotated[float | None, msgspec.Meta(description="savings over infrastructure cost")]

    @classmethod
    def of(cls, item: Savings) -> SavingsRow:
        totals = item.totals
        return cls(
            model=item.model,
            requests=totals.requests,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            charged_usd=usd(totals.cost_micros),
            charged_micros=totals.cost_micros,
            infra_usd=usd(item.infra_micros),
            infra_micros=item.infra_micros,
            reference_usd=usd(item.reference_micros),
            reference_micros=item.reference_micros,
            savings_usd=usd(item.savings_micros),
            savings_micros=item.savings_micros,
            savings_vs_charged_usd=usd(item.savings_vs_charged_micros),
            savings_vs_charged_micros=item.savings_vs_charged_micros,
            savings_ratio=item.savings_ratio,
            roi=item.roi,
        )


class SavingsReply(msgspec.Struct, kw_only=True):
    start: Time
    end: Time
    total: Annotated[SavingsRow, msgspec.Meta(description="the models with a reference price")]
    data: list[SavingsRow]
    object: Literal["savings"] = "savings"
