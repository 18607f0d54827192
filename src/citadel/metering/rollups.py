"""Reading usage from the ledger's rollups: which rollup answers a question, the SELECT over its
buckets, and the rows it gives back.

Theory of operation. A query reads the rollups, never the ledger's raw events, so its cost grows
with the range's hours (or days) times the distinct keys in them, not with requests. The range's
parts (``TimeRange.parts``: whole UTC days from a daily rollup, the hours around them from an
hourly one) are each aggregated on their own, and the parts' partial sums are added by an outer
aggregate. Hourly buckets therefore read the hourly rollup, daily buckets the daily one, and an
ungrouped-in-time query reads as few rows as its range allows. Of the rollups of one bucket
width (``schema.ROLLUPS``: the full one, and the narrower ones by team, by deployment and by
user), each part reads the one likely smallest that still has every column grouped or filtered
on (``rollup``): cost by team reads ``usage_*_team``, by model or deployment
``usage_*_deployment``, by user ``usage_*_user``, and only a question that needs the user with
the model or the deployment (or the team with the deployment) reads the full rollups. Each gives
the same sums: the ledger writer adds every event to all of them in one transaction.

Amounts are integer micro-USD and token counts integers, summed exactly by the database (cast
to BIGINT: PostgreSQL's SUM of a BIGINT is a NUMERIC).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

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

from citadel.metering.pricing import Totals
from citadel.metering.ranges import Bucket, Dimension, Metric, TimeRange
from citadel.metering.schema import MEASURES, ROLLUPS

__all__ = ["UsageRow", "rollup", "usage_row", "usage_select"]

_COLUMN: Final[Mapping[Dimension, str]] = {
    "user": "user_id",
    "team": "team_id",
    "model": "model",
    "deployment": "deployment",
    "tier": "tier",
}
_FLOATS: Final = frozenset({"latency_ms_sum", "ttft_ms_sum"})


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
    refusals: int = 0  # refused by the caller's tier or limits (403, 429)
    failures: int = 0  # status >= 500: failed upstream, or no deployment could take it

    @property
    def error_rate(self) -> float | None:
        """Requests answered with an error (status >= 400, refusals included) over requests."""
        return self.errors / self.requests if self.requests else None

    @property
    def refusal_rate(self) -> float | None:
        return self.refusals / self.requests if self.requests else None

    @property
    def failure_rate(self) -> float | None:
        return self.failures / self.requests if self.requests else None

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
    statement = select(*keys, *(_sum(table, m) for m in MEASURES)).where(
        table.c.bucket >= start, table.c.bucket < end
    )
    for dimension, value in filters.items():
        statement = statement.where(table.c[_COLUMN[dimension]] == value)
    return statement.group_by(*keys) if keys else statement


def _order_key(found: Subquery, metric: Metric) -> ColumnElement[Any]:
    if metric == "tokens":
        return found.c.prompt_tokens + found.c.completion_tokens
    name = {
        "cost": "cost_micros",
        "requests": "requests",
        "errors": "errors",
        "refusals": "refusals",
        "failures": "failures",
    }[metric]
    return found.c[name]


def usage_select(
    span: TimeRange,
    *,
    group_by: Sequence[Dimension],
    bucket: Bucket,
    filters: Mapping[Dimension, str],
    order: Metric | None,
    limit: int,
    rollups: Sequence[tuple[Table, int]] = ROLLUPS,
) -> Select[Any]:
    """The SELECT of usage in ``span`` grouped by ``group_by`` (and by ``bucket``), only the rows
    matching ``filters``; ordered by time and keys, or by ``order`` (largest first); at most
    ``limit`` rows. Its rows are read by ``usage_row``."""
    bucketed = bucket != "none"
    needed = {_COLUMN[d] for d in (*group_by, *filters)}
    parts = [
        _part(rollup(width, needed, rollups), start, end, group_by, bucketed, filters)
        for width, start, end in span.parts(bucket)
    ]
    keys: list[str] = (["bucket"] if bucketed else []) + [_COLUMN[d] for d in group_by]
    statement: Select[Any] = parts[0]
    if len(parts) > 1:
        union = union_all(*parts).subquery("parts")
        outer = [union.c[k] for k in keys]
        statement = select(*outer, *(_sum(union, m) for m in MEASURES))
        if outer:
            statement = statement.group_by(*outer)
    # Ordered outside, where the sums are plain columns an expression may use.
    found = statement.subquery("usage")
    ordering: list[ColumnElement[Any]] = [found.c[k] for k in keys]
    if order is not None:
        ordering.insert(0, desc(_order_key(found, order)))
    return select(found).order_by(*ordering).limit(limit)


def usage_row(row: Sequence[Any], bucketed: bool, group_by: Sequence[Dimension]) -> UsageRow:
    """One row of a ``usage_select``."""
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
        refusals=ints[8],
        failures=ints[9],
    )
