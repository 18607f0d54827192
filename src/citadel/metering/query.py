"""Reading the analytics API's query string: each parameter checked, a bad one a ``QueryError``
naming it (which the API answers 400).

Ranges are ``start`` and ``end`` (RFC 3339, a date, or Unix seconds); by default the last 30 days
up to the end of the current hour. The ledger's rollups count by UTC hour (by UTC day for daily
buckets), so a time inside an hour widens the range to the whole hour it falls in (``start``
down, ``end`` up): the reply's ``start`` and ``end`` are the range read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import parse_qsl

from citadel.http.server import Request
from citadel.metering.ranges import (
    BUCKETS,
    METRICS,
    Bucket,
    Metric,
    QueryError,
    TimeRange,
    ceil_hour,
    floor_hour,
)

__all__ = [
    "DEFAULT_DAYS",
    "parse_bucket",
    "parse_choice",
    "parse_metric",
    "parse_query",
    "parse_range",
    "parse_time",
    "parse_whole",
]

DEFAULT_DAYS: Final = 30
_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)


def parse_query(request: Request, known: Sequence[str]) -> dict[str, str]:
    """The query string's parameters; an unknown, repeated or empty one is a 400 naming it."""
    found: dict[str, str] = {}
    for name, value in parse_qsl(request.query, keep_blank_values=True):
        if name not in known:
            raise QueryError(
                name, f"Unknown query parameter '{name}'; expected: {', '.join(known)}."
            )
        if name in found:
            raise QueryError(name, f"Query parameter '{name}' is given twice.")
        if not value.strip():
            raise QueryError(name, f"Query parameter '{name}' is empty.")
        found[name] = value.strip()
    return found


def parse_time(name: str, text: str) -> datetime:
    """``text`` as an aware UTC datetime: RFC 3339 with an offset, a date (its UTC midnight) or
    Unix seconds. QueryError names ``name`` otherwise."""
    text = text.replace(" ", "+")  # a "+hh:mm" offset not percent-encoded arrives as a space
    try:
        if text.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(text), UTC)
        when = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        when = None
    if when is None:
        raise QueryError(
            name,
            f"'{name}' must be an RFC 3339 time such as 2024-06-01T00:00:00Z, a date such as "
            f"2024-06-01, or Unix seconds; got {text!r}.",
        )
    if when.tzinfo is None:
        if len(text) > 10:  # a time without an offset is ambiguous
            raise QueryError(name, f"'{name}' must carry a time zone (Z or +hh:mm); got {text!r}.")
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def parse_choice(query: Mapping[str, str], name: str, choices: Sequence[str], default: str) -> str:
    value = query.get(name, default)
    if value not in choices:
        raise QueryError(name, f"'{name}' must be one of: {', '.join(choices)}; got {value!r}.")
    return value


def parse_bucket(query: Mapping[str, str]) -> Bucket:
    value = parse_choice(query, "bucket", BUCKETS, "none")
    return next(b for b in BUCKETS if b == value)


def parse_metric(query: Mapping[str, str]) -> Metric:
    value = parse_choice(query, "metric", METRICS, "cost")
    return next(m for m in METRICS if m == value)


def parse_range(query: Mapping[str, str], now: datetime, bucket: Bucket = "none") -> TimeRange:
    """``start`` and ``end`` from the query, widened to whole UTC hours (days, with daily
    buckets); by default the 30 days up to the end of the current hour (of the current day, with
    daily buckets)."""
    if "end" in query:
        end = parse_time("end", query["end"])
    else:
        hour = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        end = hour.replace(hour=0) + _DAY if bucket == "day" else hour + _HOUR
    if "start" in query:
        start = parse_time("start", query["start"])
    else:
        start = end - timedelta(days=DEFAULT_DAYS if bucket != "hour" else 1)
    if end <= start:  # before widening: a range of 10:40 to 10:20 is a mistake, not an hour
        return TimeRange.checked(start, end, bucket)  # raises, naming 'end'
    start, end = floor_hour(start), ceil_hour(end)
    if bucket == "day":
        start = start.replace(hour=0)
        if end.hour:
            end = end.replace(hour=0) + _DAY
    return TimeRange.checked(start, end, bucket)


def parse_whole(query: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= maximum:
        raise QueryError(
            name, f"'{name}' must be a whole number from 1 to {maximum}; got {text!r}."
        )
    return int(text)
