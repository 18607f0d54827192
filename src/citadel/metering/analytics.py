"""Business analytics over the usage ledger: usage and cost by any grouping, top users and teams,
budget use, the real cost of each deployment, and savings against a commercial API.

Theory of operation. Every query reads the rollups, never the ledger's raw events, so its cost
grows with the range's hours (or days) times the distinct keys in them, not with requests. A
range is a half-open interval ``[start, end)`` aligned to whole UTC hours; it is split into the
whole UTC days in its middle, read from a daily rollup, and the hours before the first and after
the last whole day, read from an hourly one. Each part is aggregated on its own, and the parts'
partial sums are added by an outer aggregate. Hourly buckets therefore read the hourly rollup
(at most ``MAX_HOURLY_DAYS`` of it), daily buckets the daily one (a range of whole days), and an
ungrouped-in-time query reads as few rows as its range allows. Of the rollups of one bucket
width (``schema.ROLLUPS``: the full one, and the narrower ones by team, by deployment and by
user), each part reads the one likely smallest that still has every column grouped or filtered
on (``rollup``): cost by team reads ``usage_*_team``, by model or deployment
``usage_*_deployment``, by user ``usage_*_user``, and only a question that needs the user with
the model or the deployment (or the team with the deployment) reads the full rollups. Each gives
the same sums: the ledger writer adds every event to all of them in one transaction.

Amounts are integer micro-USD and token counts integers, summed exactly by the database (cast
to BIGINT: PostgreSQL's SUM of a BIGINT is a NUMERIC). Inputs come validated: ``TimeRange.checked``
and ``check_group_by`` raise ``QueryError`` naming the bad parameter, which the HTTP adapter
answers with a 400.

Budgets are those the limiter enforces: a user's ``cost_per_month_usd`` (tier, then override);
a team's is the sum of its members' (unlimited when any member's is). "This month" is the
calendar month in ``limits.timezone``, from its first hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    Subquery,
    Table,
    cast,
    desc,
    func,
    select,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from citadel.accounts.store import Team, User
from citadel.errors import CitadelError, StoreUnavailable
from citadel.limits.maths import periods
from citadel.limits.policy import effective_limits
from citadel.metering.pricing import DeploymentCost, Savings, Totals, deployment_cost, savings
from citadel.metering.schema import ROLLUPS, usage_hourly
from citadel.settings import Settings, Tier

__all__ = [
    "BUCKETS",
    "DIMENSIONS",
    "MAX_DAYS",
    "MAX_HOURLY_DAYS",
    "MAX_ROWS",
    "METRICS",
    "Analytics",
    "BudgetUse",
    "QueryError",
    "TimeRange",
    "UsageRow",
    "budget_use",
    "check_group_by",
    "month_range",
    "savings_by_model",
]

Dimension = Literal["user", "team", "model", "deployment", "tier"]
Bucket = Literal["hour", "day", "none"]
Metric = Literal["cost", "tokens", "requests", "errors"]

DIMENSIONS: Final[tuple[Dimension, ...]] = ("user", "team", "model", "deployment", "tier")
BUCKETS: Final[tuple[Bucket, ...]] = ("hour", "day", "none")
METRICS: Final[tuple[Metric, ...]] = ("cost", "tokens", "requests", "errors")
MAX_DAYS: Final = 400  # the longest range any query may span
MAX_HOURLY_DAYS: Final = 31  # the longest range of hourly buckets (744 of them)
MAX_ROWS: Final = 100_000  # the most rows one answer may have

_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)
_HOURLY, _DAILY = 3600, 86400  # bucket widths, seconds
_COLUMN: Final[Mapping[Dimension, str]] = {
    "user": "user_id",
    "team": "team_id",
    "model": "model",
    "deployment": "deployment",
    "tier": "tier",
}
_MEASURES: Final = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "latency_ms_sum",
    "ttft_ms_sum",
    "ttft_requests",
)
_FLOATS: Final = frozenset({"latency_ms_sum", "ttft_ms_sum"})
DEFAULT_TIMEOUT: Final = 10.0  # seconds for one analytics query


class QueryError(CitadelError, ValueError):
    """A query parameter is invalid; ``param`` names it, the message says what was expected."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


# -- ranges -------------------------------------------------------------------------------------


def floor_hour(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def ceil_hour(when: datetime) -> datetime:
    floor = floor_hour(when)
    return floor if floor == when else floor + _HOUR


def _floor_day(when: datetime) -> datetime:
    return floor_hour(when).replace(hour=0)


def _ceil_day(when: datetime) -> datetime:
    floor = _floor_day(when)
    return floor if floor == when else floor + _DAY


@dataclass(frozen=True, slots=True)
class TimeRange:
    """A half-open interval ``[start, end)`` of whole UTC hours."""

    start: datetime
    end: datetime

    @classmethod
    def checked(cls, start: datetime, end: datetime, bucket: Bucket = "none") -> TimeRange:
        """The range, or QueryError naming the parameter at fault: ``end`` after ``start``, both
        whole UTC hours (whole days for daily buckets), spanning at most ``MAX_DAYS`` days (at
        most ``MAX_HOURLY_DAYS`` for hourly buckets)."""
        for name, when in (("end", end), ("start", start)):  # a default start follows end
            if when.tzinfo is None:
                raise QueryError(name, f"'{name}' must carry a time zone (Z or +hh:mm).")
            if floor_hour(when) != when:
                raise QueryError(
                    name,
                    f"'{name}' must be a whole UTC hour, such as "
                    f"{_iso(floor_hour(when))}; got {_iso(when)}.",
                )
            if bucket == "day" and _floor_day(when) != when:
                raise QueryError(
                    name,
                    f"'{name}' must be a UTC midnight with daily buckets, such as "
                    f"{_iso(_floor_day(when))}; got {_iso(when)}.",
                )
        if end <= start:
            raise QueryError("end", f"'end' ({_iso(end)}) must be after 'start' ({_iso(start)}).")
        limit = MAX_HOURLY_DAYS if bucket == "hour" else MAX_DAYS
        if end - start > timedelta(days=limit):
            days = (end - start) / _DAY
            what = " with hourly buckets" if bucket == "hour" else ""
            raise QueryError(
                "end",
                f"The range from 'start' to 'end' spans {days:g} days; at most {limit} days are "
                f"allowed{what}.",
            )
        return cls(start.astimezone(UTC), end.astimezone(UTC))

    def clipped_seconds(self, now: datetime) -> float:
        """How much of the range has passed by ``now``, in seconds."""
        until = min(self.end, max(self.start, now))
        return (until - self.start).total_seconds()

    def parts(self, bucket: Bucket) -> list[tuple[int, datetime, datetime]]:
        """The sub-ranges of the range, each with the bucket width (seconds) it is read at."""
        if bucket == "hour":
            return [(_HOURLY, self.start, self.end)]
        if bucket == "day":
            return [(_DAILY, self.start, self.end)]
        first, last = _ceil_day(self.start), _floor_day(self.end)
        if first >= last:
            return [(_HOURLY, self.start, self.end)]
        parts = [(_DAILY, first, last)]
        if self.start < first:
            parts.insert(0, (_HOURLY, self.start, first))
        if last < self.end:
            parts.append((_HOURLY, last, self.end))
        return parts


def rollup(
    width: int, needed: Iterable[str], rollups: Sequence[tuple[Table, int]] = ROLLUPS
) -> Table:
    """Of ``rollups``, the one of buckets ``width`` seconds wide, with every column ``needed``,
    that is likely the smallest (aggregate navigation: a rollup without the user column is many
    times smaller, so when one exists it serves every question that does not name users)."""
    wanted = set(needed)
    candidates = [t for t, w in rollups if w == width and wanted <= _key(t)]
    if not candidates:
        raise LookupError(f"no rollup of {width} s buckets has the columns {sorted(wanted)}")
    return min(candidates, key=_size)


def _key(table: Table) -> set[str]:
    return {c.name for c in table.primary_key.columns} - {"bucket"}


# Rough distinct values per key column, to guess which rollup is smallest: the product over its
# key columns (their combinations are dense, in practice, apart from the user's own team and tier).
_CARDINALITY: Final[Mapping[str, int]] = {
    "user_id": 2000,
    "team_id": 50,
    "deployment": 20,
    "model": 10,
    "tier": 4,
}


def _size(table: Table) -> int:
    return math.prod(_CARDINALITY.get(name, 100) for name in _key(table))


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


def month_range(now: datetime, timezone: str) -> TimeRange:
    """This calendar month in ``timezone`` up to the end of the current hour, from the hour its
    first day starts in (a zone with a half-hour offset gains that half hour)."""
    bounds = periods(now.timestamp(), ZoneInfo(timezone))
    start = floor_hour(datetime.fromtimestamp(bounds.month_starts_at, UTC))
    return TimeRange(start, max(ceil_hour(now), start + _HOUR))


def check_group_by(names: Iterable[str]) -> tuple[Dimension, ...]:
    """Grouping names, each one of ``DIMENSIONS`` and none twice; QueryError names the bad one."""
    found: list[Dimension] = []
    for name in names:
        dimension = next((d for d in DIMENSIONS if d == name), None)
        if dimension is None:
            raise QueryError(
                "group_by", f"'group_by' must name some of: {', '.join(DIMENSIONS)}; got {name!r}."
            )
        if dimension in found:
            raise QueryError("group_by", f"'group_by' names {name!r} twice.")
        found.append(dimension)
    return tuple(found)


# -- rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRow:
    """The usage of one group (and one time bucket, if bucketed)."""

    bucket: datetime | None
    keys: Mapping[str, str]  # dimension -> value, in the order grouped by
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    latency_ms_sum: float
    ttft_ms_sum: float
    ttft_requests: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def totals(self) -> Totals:
        return Totals(
            requests=self.requests,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cost_micros=self.cost_micros,
        )

    @property
    def latency_ms_mean(self) -> float | None:
        return self.latency_ms_sum / self.requests if self.requests else None

    @property
    def ttft_ms_mean(self) -> float | None:
        return self.ttft_ms_sum / self.ttft_requests if self.ttft_requests else None


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetUse:
    """How much of its monthly cost budget a user or a team has spent."""

    scope: Literal["user", "team"]
    id: str
    name: str
    spent_micros: int
    budget_micros: int | None  # None: unlimited
    team_id: str | None = None  # users only
    tier: str | None = None  # users only
    members: int | None = None  # teams only

    @property
    def utilisation(self) -> float | None:
        """Spent over budget (1.0: all of it); None when there is no positive budget."""
        if not self.budget_micros or self.budget_micros <= 0:
            return None
        return self.spent_micros / self.budget_micros

    @property
    def remaining_micros(self) -> int | None:
        if self.budget_micros is None:
            return None
        return max(0, self.budget_micros - self.spent_micros)


def _user_budget(user: User, tiers: Mapping[str, Tier]) -> int | None:
    tier = tiers.get(user.tier)
    if tier is None:
        return None  # a tier no longer configured: no budget the limiter could enforce
    return effective_limits(tier, user.overrides).cost_per_month_micros


def budget_use(
    scope: Literal["user", "team"],
    *,
    spent: Mapping[str, int],
    users: Sequence[User],
    teams: Sequence[Team],
    tiers: Sequence[Tier],
) -> list[BudgetUse]:
    """Each user's (or team's) spend against its budget, the most used first. Spenders the
    accounts store does not know (the admin key, say) are listed too, without a budget."""
    by_tier = {t.name: t for t in tiers}
    rows: list[BudgetUse] = []
    if scope == "user":
        known = set()
        for user in users:
            known.add(user.id)
            rows.append(
                BudgetUse(
                    scope="user",
                    id=user.id,
                    name=user.name,
                    spent_micros=spent.get(user.id, 0),
                    budget_micros=_user_budget(user, by_tier),
                    team_id=user.team_id,
                    tier=user.tier,
                )
            )
        rows += [
            BudgetUse(scope="user", id=uid, name="", spent_micros=amount, budget_micros=None)
            for uid, amount in spent.items()
            if uid not in known
        ]
    else:
        members: dict[str, list[User]] = {}
        for user in users:
            if user.team_id is not None:
                members.setdefault(user.team_id, []).append(user)
        known = set()
        for team in teams:
            known.add(team.id)
            budgets = [_user_budget(u, by_tier) for u in members.get(team.id, [])]
            total = None if any(b is None for b in budgets) else sum(b or 0 for b in budgets)
            rows.append(
                BudgetUse(
                    scope="team",
                    id=team.id,
                    name=team.name,
                    spent_micros=spent.get(team.id, 0),
                    budget_micros=total,
                    members=len(budgets),
                )
            )
        rows += [
            BudgetUse(scope="team", id=tid, name="", spent_micros=amount, budget_micros=None)
            for tid, amount in spent.items()
            if tid not in known
        ]
    rows.sort(key=lambda r: (-(r.utilisation or 0.0), -r.spent_micros, r.id))
    return rows


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


# -- the queries ------------------------------------------------------------------------------


def _sum(table: Table | Subquery, name: str) -> ColumnElement[Any]:
    column = table.c[name]
    total = func.sum(column) if name in _FLOATS else cast(func.sum(column), BigInteger)
    return total.label(name)


def _part(
    table: Table,
    start: datetime,
    end: datetime,
    group_by: Sequence[Dimension],
    bucketed: bool,
    filters: Mapping[Dimension, str],
) -> Select[Any]:
    keys = [table.c[_COLUMN[d]] for d in group_by]
    if bucketed:
        keys.insert(0, table.c.bucket)
    statement = select(*keys, *(_sum(table, m) for m in _MEASURES)).where(
        table.c.bucket >= start, table.c.bucket < end
    )
    for dimension, value in filters.items():
        statement = statement.where(table.c[_COLUMN[dimension]] == value)
    return statement.group_by(*keys) if keys else statement


def _order_key(found: Subquery, metric: Metric) -> ColumnElement[Any]:
    if metric == "tokens":
        return found.c.prompt_tokens + found.c.completion_tokens
    name = {"cost": "cost_micros", "requests": "requests", "errors": "errors"}[metric]
    return found.c[name]


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
        filters = filters or {}
        needed = {_COLUMN[d] for d in (*group_by, *filters)}
        parts = [
            _part(rollup(width, needed, self._rollups), start, end, group_by, bucketed, filters)
            for width, start, end in span.parts(bucket)
        ]
        keys: list[str] = (["bucket"] if bucketed else []) + [_COLUMN[d] for d in group_by]
        statement: Select[Any] = parts[0]
        if len(parts) > 1:
            union = union_all(*parts).subquery("parts")
            outer = [union.c[k] for k in keys]
            statement = select(*outer, *(_sum(union, m) for m in _MEASURES))
            if outer:
                statement = statement.group_by(*outer)
        # Ordered outside, where the sums are plain columns an expression may use.
        found = statement.subquery("usage")
        ordering: list[ColumnElement[Any]] = [found.c[k] for k in keys]
        if order is not None:
            ordering.insert(0, desc(_order_key(found, order)))
        statement = (
            select(found)
            .order_by(*ordering)
            .limit(min(limit, MAX_ROWS) if limit is not None else MAX_ROWS + 1)
        )
        rows = await self._rows(statement)
        if len(rows) > MAX_ROWS:
            raise QueryError(
                "group_by",
                f"The answer would have more than {MAX_ROWS} rows; narrow the range, use a "
                "coarser bucket, group by fewer fields or add a filter.",
            )
        return [self._usage_row(row, bucketed, group_by) for row in rows]

    @staticmethod
    def _usage_row(row: Sequence[Any], bucketed: bool, group_by: Sequence[Dimension]) -> UsageRow:
        at = 1 if bucketed else 0
        keys: dict[str, str] = {d: str(row[at + i]) for i, d in enumerate(group_by)}
        values = row[at + len(group_by) :]
        # A group with no rows at all (an ungrouped query over an empty range) sums to NULL.
        ints = [int(v or 0) for v in values]
        return UsageRow(
            bucket=row[0] if bucketed else None,
            keys=keys,
            requests=ints[0],
            errors=ints[1],
            prompt_tokens=ints[2],
            completion_tokens=ints[3],
            cost_micros=ints[4],
            latency_ms_sum=float(values[5] or 0.0),
            ttft_ms_sum=float(values[6] or 0.0),
            ttft_requests=ints[7],
        )

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
        table = rollup(_HOURLY, {"user_id", "tier"}, self._rollups)
        where = (table.c.bucket >= start, table.c.bucket < end)
        users = func.count(func.distinct(table.c.user_id))
        total = await self._rows(select(users).where(*where))
        by_tier = await self._rows(
            select(table.c.tier, users).where(*where).group_by(table.c.tier).order_by(table.c.tier)
        )
        return int(total[0][0] or 0), {str(r[0]): int(r[1]) for r in by_tier}

    async def deployment_costs(
        self, span: TimeRange, *, now: datetime, settings: Settings
    ) -> list[DeploymentCost]:
        """Every configured deployment (and any other the ledger names) over ``span``: what it
        served and was charged, and its infrastructure cost over the part of ``span`` passed."""
        rows = await self.usage(span, group_by=("deployment", "model"))
        seconds = span.clipped_seconds(now)
        served: dict[str, Totals] = {}
        seen_model: dict[str, str] = {}
        for row in rows:
            name = row.keys["deployment"]
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
                        seconds=seconds,
                        reference=model.reference_price,
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
                    seconds=seconds,
                    reference=None if model_settings is None else model_settings.reference_price,
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
        from citadel.accounts.sql import translate_errors

        try:
            with translate_errors(self._timeout):
                async with asyncio.timeout(self._timeout):
                    yield
        except StoreUnavailable as exc:
            detail = exc.detail.replace("the accounts tables", "the usage ledger's tables")
            raise StoreUnavailable("sql", detail) from exc.__cause__
