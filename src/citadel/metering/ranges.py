"""The terms an analytics question is asked in: its time range, bucket width, groupings and metric,
each checked on the way in.

A range is a half-open interval ``[start, end)`` aligned to whole UTC hours (whole UTC days for
daily buckets), at most ``MAX_DAYS`` long (``MAX_HOURLY_DAYS`` for hourly buckets). Read without
buckets, it is split into the whole UTC days in its middle, read at daily width, and the hours
before the first and after the last whole day, read at hourly width (``TimeRange.parts``).
``TimeRange.checked`` and ``check_group_by`` raise ``QueryError`` naming the bad parameter, which
the HTTP adapter answers with a 400.

"This month" is the calendar month in ``limits.timezone``, from its first hour (``month_range``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal
from zoneinfo import ZoneInfo

from citadel.errors import CitadelError
from citadel.limits.maths import periods

__all__ = [
    "BUCKETS",
    "DAILY",
    "DIMENSIONS",
    "HOURLY",
    "MAX_DAYS",
    "MAX_HOURLY_DAYS",
    "METRICS",
    "Bucket",
    "Dimension",
    "Metric",
    "QueryError",
    "TimeRange",
    "ceil_hour",
    "check_group_by",
    "floor_hour",
    "month_range",
]

Dimension = Literal["user", "team", "model", "deployment", "tier"]
Bucket = Literal["hour", "day", "none"]
Metric = Literal["cost", "tokens", "requests", "errors", "refusals", "failures"]

DIMENSIONS: Final[tuple[Dimension, ...]] = ("user", "team", "model", "deployment", "tier")
BUCKETS: Final[tuple[Bucket, ...]] = ("hour", "day", "none")
METRICS: Final[tuple[Metric, ...]] = (
    "cost",
    "tokens",
    "requests",
    "errors",
    "refusals",
    "failures",
)
MAX_DAYS: Final = 400  # the longest range any query may span
MAX_HOURLY_DAYS: Final = 31  # the longest range of hourly buckets (744 of them)

_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)
HOURLY, DAILY = 3600, 86400  # bucket widths, seconds


class QueryError(CitadelError, ValueError):
    """A query parameter is invalid; ``param`` names it, the message says what was expected."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


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

    def seconds_since(self, since: datetime | None, now: datetime) -> float:
        """How much of the range has passed by ``now`` from ``since`` on, in seconds (0 when
        ``since`` is None: it never began)."""
        if since is None:
            return 0.0
        start = max(self.start, since)
        until = min(self.end, now)
        return max(0.0, (until - start).total_seconds())

    def parts(self, bucket: Bucket) -> list[tuple[int, datetime, datetime]]:
        """The sub-ranges of the range, each with the bucket width (seconds) it is read at."""
        if bucket == "hour":
            return [(HOURLY, self.start, self.end)]
        if bucket == "day":
            return [(DAILY, self.start, self.end)]
        first, last = _ceil_day(self.start), _floor_day(self.end)
        if first >= last:
            return [(HOURLY, self.start, self.end)]
        parts = [(DAILY, first, last)]
        if self.start < first:
            parts.insert(0, (HOURLY, self.start, first))
        if last < self.end:
            parts.append((HOURLY, last, self.end))
        return parts


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
