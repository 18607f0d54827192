"""The limiter's maths: pure functions on integers, with ``now`` passed in.

Theory of operation
-------------------
Time is counted in integer milliseconds (``to_ms``) so that the Python and Lua backends, which
both compute in IEEE doubles, agree to the last unit: every quantity below stays an integer under
2**53, where doubles are exact.

*Rates* (requests and tokens per minute) use GCRA, the generic cell rate algorithm. Its state is
one time, the theoretical arrival time TAT; the emission interval is ``T = period / limit``. A
request of ``cost`` units arriving at ``now`` moves TAT to ``max(TAT, now) + cost * T``, and it is
admitted only if that new TAT lies at most one period ahead of ``now``. The burst tolerance is
thus the full limit: from an idle state, ``limit`` units pass at one instant and no more. The
guarantee: over any interval ``[t1, t2]`` the admitted cost is at most ``limit + (t2 - t1) / T``.

``T`` is rarely a whole number of milliseconds, so TAT is held exactly as ``Tat(ms, frac)`` =
``ms + frac / limit``. The arithmetic works on the *level* ``(TAT - now) * limit``: the backlog in
``1/limit`` milliseconds, which is zero when the budget is full and ``limit * period`` when it is
empty. A request adds ``cost * period`` to the level; time drains ``limit`` per millisecond.

*Reconciliation* settles a token reservation to the actual usage. An unused part is refunded by
lowering TAT by ``(reserved - actual) * T``, never below ``now`` (what has drained is gone). An
over-run is charged in full, capped at one period of debt beyond a full bucket so the numbers
stay bounded. With refunds, the admitted reservations over ``[t1, t2]`` are bounded by the
guarantee above plus the tokens refunded during ``[t1, t2]``.

*Concurrency* is a set of leases, each with an expiry ``now + lease_ttl``: a lease is released
by reconciliation, or expires by itself when its gateway crashed before releasing it.

*Quotas* (tokens per day and month, cost per month) are counters keyed by the calendar day or
month in the limiter's time zone; a new day is a new key, so the rollover needs no reset.

When several limits refuse a request, the one with the longest wait is reported, since the
request cannot pass before every refusing limit could admit it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final
from zoneinfo import ZoneInfo

from citadel.limits.decision import (
    LimitDecision,
    LimitName,
    Limits,
    LimitUsage,
    Reservation,
    Scope,
    ScopeKind,
)

PERIOD_MS: Final = 60_000  # the window of the per-minute limits
MAX_RATE: Final = 10_000_000_000  # per minute: keeps 3 * limit * PERIOD_MS under 2**53
# Quotas and concurrency are counters the Lua scripts hold as doubles: exact up to 2**53.
MAX_COUNT: Final = 2**53 - 1
CONCURRENCY_RETRY_MS: Final = 1_000  # a slot frees when any request ends: suggest a short wait
UNSET: Final = -1  # how an unset (unlimited) limit travels to the Lua scripts

# The order in which limits are checked, and the codes the Lua scripts use for them (index + 1).
LIMIT_NAMES: Final[tuple[LimitName, ...]] = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_requests",
    "tokens_per_day",
    "tokens_per_month",
    "cost_per_month",
)


def to_ms(now: float) -> int:
    """Unix seconds to whole milliseconds, the limiter's unit of time."""
    return round(now * 1000)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- GCRA -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tat:
    """A theoretical arrival time, exactly: ``ms + frac / limit`` milliseconds."""

    ms: int
    frac: int

    def encode(self) -> str:
        """The form the Redis backend stores: ``"ms:frac"``."""
        return f"{self.ms}:{self.frac}"

    @classmethod
    def decode(cls, raw: bytes | str) -> Tat:
        text = raw.decode() if isinstance(raw, bytes) else raw
        ms, _, frac = text.partition(":")
        return cls(int(ms), int(frac or 0))


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One GCRA admission: the level after it if allowed, else how long to wait."""

    allowed: bool
    level: int  # after admission when allowed, else unchanged
    retry_after_ms: int


def check_limit(limit: int) -> int:
    """``limit`` if the exact arithmetic can hold it; negative limits count as zero."""
    if limit > MAX_RATE:
        raise ValueError(f"a per-minute limit of {limit} is too large: expected at most {MAX_RATE}")
    return max(limit, 0)


def gcra_level(tat: Tat | None, limit: int, now_ms: int) -> int:
    """The backlog ``(TAT - now) * limit``; zero when TAT is not ahead of ``now``."""
    if tat is None or tat.ms < now_ms or limit <= 0:
        return 0
    return (tat.ms - now_ms) * limit + tat.frac


def gcra_tat(level: int, limit: int, now_ms: int) -> Tat | None:
    """The TAT that has ``level`` at ``now``; None when the budget is full (nothing to store)."""
    if level <= 0 or limit <= 0:
        return None
    ms, frac = divmod(level, limit)
    return Tat(now_ms + ms, frac)


def gcra_admit(level: int, limit: int, cost: int, period_ms: int = PERIOD_MS) -> RateCheck:
    """Admit ``cost`` units if the new TAT is at most one period ahead of now.

    A request costlier than the whole limit can never pass; it is told to retry after one period.
    """
    capacity = limit * period_ms
    if cost > limit:
        return RateCheck(allowed=False, level=level, retry_after_ms=period_ms)
    after = level + cost * period_ms
    if after <= capacity:
        return RateCheck(allowed=True, level=after, retry_after_ms=0)
    return RateCheck(allowed=False, level=level, retry_after_ms=_ceil_div(after - capacity, limit))


def gcra_settle(
    level: int, limit: int, reserved: int, actual: int, period_ms: int = PERIOD_MS
) -> int:
    """The level once a reservation of ``reserved`` units turned out to use ``actual``.

    A refund lowers TAT by ``(reserved - actual) * T`` but never below now (level 0); an over-run
    raises it by the excess, up to one period of debt beyond a full bucket.
    """
    after = level + (actual - reserved) * period_ms
    if after <= 0:
        return 0
    return min(after, 2 * limit * period_ms)


def gcra_remaining(level: int, limit: int, period_ms: int = PERIOD_MS) -> int:
    """Units admissible at once now: ``limit`` when the budget is full."""
    return max(0, (limit * period_ms - level) // period_ms)


def gcra_reset_ms(level: int, limit: int) -> int:
    """Milliseconds until the budget is full again (TAT - now, rounded up)."""
    return _ceil_div(level, limit) if limit > 0 and level > 0 else 0


# --- quotas and leases ------------------------------------------------------------------------


def quota_admits(used: int, limit: int, amount: int) -> bool:
    """A calendar quota admits ``amount`` more if the total stays within the limit."""
    return used + amount <= limit


def quota_settle(used: int, reserved: int, actual: int) -> int:
    """The counter once a reservation is settled: never below zero; an over-run counts in full."""
    return max(0, used + actual - reserved)


def live_leases(leases: Mapping[str, int], now_ms: int) -> dict[str, int]:
    """The leases (id -> expiry in ms) that have not expired at ``now``."""
    return {lease: expiry for lease, expiry in leases.items() if expiry > now_ms}


def lease_retry_ms(earliest_expiry_ms: int, now_ms: int) -> int:
    """How long to wait for a slot: a second, or less if a lease expires sooner."""
    return min(CONCURRENCY_RETRY_MS, max(earliest_expiry_ms - now_ms, 1))


# --- calendar periods -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Periods:
    """The calendar day and month containing one instant, in one time zone (Unix seconds)."""

    day: str  # 2026-11-24
    day_starts_at: float
    day_ends_at: float
    month: str  # 2026-11
    month_starts_at: float
    month_ends_at: float

    def contains(self, now: float) -> bool:
        return self.day_starts_at <= now < self.day_ends_at


def _midnight(date: dt.date, tz: ZoneInfo) -> float:
    # A midnight skipped by a DST jump resolves (fold=0) to the first instant of the new day.
    return dt.datetime(date.year, date.month, date.day, tzinfo=tz).timestamp()


def periods(now: float, tz: ZoneInfo) -> Periods:
    """The day and month that contain ``now`` in ``tz``, with their bounds."""
    today = dt.datetime.fromtimestamp(now, tz).date()
    first = today.replace(day=1)
    next_first = (first + dt.timedelta(days=32)).replace(day=1)
    return Periods(
        day=today.isoformat(),
        day_starts_at=_midnight(today, tz),
        day_ends_at=_midnight(today + dt.timedelta(days=1), tz),
        month=f"{today.year:04d}-{today.month:02d}",
        month_starts_at=_midnight(first, tz),
        month_ends_at=_midnight(next_first, tz),
    )


class Calendar:
    """``periods`` for one zone, remembering the last day so most calls compute nothing."""

    __slots__ = ("_last", "tz")

    def __init__(self, timezone: str) -> None:
        self.tz = ZoneInfo(timezone)
        self._last: Periods | None = None

    def at(self, now: float) -> Periods:
        last = self._last
        if last is not None and last.contains(now):
            return last
        self._last = current = periods(now, self.tz)
        return current


def reserve(
    calendar: Calendar,
    principal: str,
    *,
    lease_id: str,
    tokens: int,
    cost_micros: int,
    now: float,
    scopes: Sequence[Scope] = (),
) -> tuple[int, Periods, Reservation]:
    """Where an admission at ``now`` starts: ``now`` in ms, its periods, what it would reserve."""
    now_ms = to_ms(now)
    at = calendar.at(now_ms / 1000)
    reservation = Reservation(
        principal=principal,
        lease_id=lease_id,
        tokens=tokens,
        cost_micros=cost_micros,
        admitted_at=now,
        day=at.day,
        month=at.month,
        scopes=tuple(scopes),
    )
    return now_ms, at, reservation


# --- one admission ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Observed:
    """What the store holds for one principal at ``now`` (expired leases already dropped)."""

    requests_level: int = 0
    tokens_level: int = 0
    leases: int = 0
    earliest_lease_ms: int = 0  # expiry of the lease that ends first, when there are leases
    day_tokens: int = 0
    month_tokens: int = 0
    month_cost: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking every limit: which one refused, and the rate levels after it."""

    refused_by: LimitName | None
    retry_after_ms: int
    requests_level: int  # after admission when allowed, else as observed
    tokens_level: int


def judge(
    limits: Limits,
    seen: Observed,
    *,
    tokens: int,
    cost_micros: int,
    now_ms: int,
    day_ends_ms: int,
    month_ends_ms: int,
) -> Verdict:
    """Check every set limit; the refusal with the longest wait wins (ties: the first checked).

    ``admit.lua`` performs exactly these steps; keep the two in step.
    """
    refusals: list[tuple[int, LimitName]] = []
    requests_level, tokens_level = seen.requests_level, seen.tokens_level
    if limits.requests_per_minute is not None:
        rate = gcra_admit(requests_level, check_limit(limits.requests_per_minute), 1)
        if rate.allowed:
            requests_level = rate.level
        else:
            refusals.append((rate.retry_after_ms, "requests_per_minute"))
    if limits.tokens_per_minute is not None:
        rate = gcra_admit(tokens_level, check_limit(limits.tokens_per_minute), tokens)
        if rate.allowed:
            tokens_level = rate.level
        else:
            refusals.append((rate.retry_after_ms, "tokens_per_minute"))
    if limits.concurrent_requests is not None and seen.leases >= max(limits.concurrent_requests, 0):
        wait = lease_retry_ms(seen.earliest_lease_ms, now_ms) if seen.leases else PERIOD_MS
        refusals.append((wait, "concurrent_requests"))
    if limits.tokens_per_day is not None and not quota_admits(
        seen.day_tokens, max(limits.tokens_per_day, 0), tokens
    ):
        refusals.append((day_ends_ms - now_ms, "tokens_per_day"))
    if limits.tokens_per_month is not None and not quota_admits(
        seen.month_tokens, max(limits.tokens_per_month, 0), tokens
    ):
        refusals.append((month_ends_ms - now_ms, "tokens_per_month"))
    if limits.cost_per_month_micros is not None and not quota_admits(
        seen.month_cost, max(limits.cost_per_month_micros, 0), cost_micros
    ):
        refusals.append((month_ends_ms - now_ms, "cost_per_month"))
    if not refusals:
        return Verdict(None, 0, requests_level, tokens_level)
    wait, name = refusals[0]
    for other_wait, other in refusals[1:]:
        if other_wait > wait:
            wait, name = other_wait, other
    return Verdict(name, wait, seen.requests_level, seen.tokens_level)


def judge_scopes(
    checks: Sequence[tuple[Limits, Observed]],
    *,
    tokens: int,
    cost_micros: int,
    now_ms: int,
    day_ends_ms: int,
    month_ends_ms: int,
) -> tuple[int, tuple[Verdict, ...]]:
    """``judge`` each scope (the user's, then its key's and team's limits); the refusal with the
    longest wait over all of them wins (ties: the first checked). Returns the index of the scope
    that refused (-1: every scope admits) and each scope's verdict; on a refusal every verdict
    carries its observed levels, since nothing is reserved anywhere.

    ``admit.lua`` performs exactly these steps; keep the two in step.
    """
    verdicts = [
        judge(
            limits,
            seen,
            tokens=tokens,
            cost_micros=cost_micros,
            now_ms=now_ms,
            day_ends_ms=day_ends_ms,
            month_ends_ms=month_ends_ms,
        )
        for limits, seen in checks
    ]
    refused, wait = -1, -1
    for index, verdict in enumerate(verdicts):
        if verdict.refused_by is not None and verdict.retry_after_ms > wait:
            refused, wait = index, verdict.retry_after_ms
    if refused >= 0:
        verdicts = [
            Verdict(v.refused_by, v.retry_after_ms, seen.requests_level, seen.tokens_level)
            for v, (_, seen) in zip(verdicts, checks, strict=True)
        ]
    return refused, tuple(verdicts)


def _tightest(rates: Sequence[tuple[int | None, int]]) -> tuple[int, int] | None:
    """Of the (limit, level) pairs whose limit is set, the one with the fewest units left."""
    best: tuple[int, int] | None = None
    for limit, level in rates:
        if limit is None:
            continue
        if best is None or gcra_remaining(level, limit) < gcra_remaining(best[1], best[0]):
            best = (limit, level)
    return best


def scoped_decision(
    scopes: Sequence[tuple[ScopeKind, Limits, Verdict]],
    refused: int,
    reservation: Reservation | None = None,
) -> LimitDecision:
    """The LimitDecision for the verdicts of several scopes (``judge_scopes``): the refusing
    scope's limit and wait, and the ``x-ratelimit-*`` figures of the tightest per-minute limit
    of any scope (a key's 10 requests a minute under a tier's 100 are what the caller meets)."""
    requests = _tightest(
        [(limits.requests_per_minute, v.requests_level) for _, limits, v in scopes]
    )
    tokens = _tightest([(limits.tokens_per_minute, v.tokens_level) for _, limits, v in scopes])
    allowed = refused < 0
    verdict = scopes[refused][2] if not allowed else None
    return LimitDecision(
        allowed=allowed,
        refused_by=None if verdict is None else verdict.refused_by,
        refused_scope=None if allowed else scopes[refused][0],
        retry_after=0.0 if verdict is None else verdict.retry_after_ms / 1000,
        requests_limit=None if requests is None else requests[0],
        requests_remaining=None if requests is None else gcra_remaining(requests[1], requests[0]),
        requests_reset=None
        if requests is None
        else gcra_reset_ms(requests[1], max(requests[0], 0)) / 1000,
        tokens_limit=None if tokens is None else tokens[0],
        tokens_remaining=None if tokens is None else gcra_remaining(tokens[1], tokens[0]),
        tokens_reset=None if tokens is None else gcra_reset_ms(tokens[1], max(tokens[0], 0)) / 1000,
        reservation=reservation if allowed else None,
    )


def decision(
    limits: Limits, verdict: Verdict, reservation: Reservation | None = None
) -> LimitDecision:
    """The LimitDecision (with its x-ratelimit-* figures) for the verdict of one principal."""
    refused = -1 if verdict.refused_by is None else 0
    return scoped_decision((("user", limits, verdict),), refused, reservation)


def usage_figures(
    limits: Limits, seen: Observed, *, now_ms: int, latest_lease_ms: int, periods: Periods
) -> tuple[LimitUsage, ...]:
    """One LimitUsage per set limit; ``used`` includes reservations not yet reconciled."""
    now = now_ms / 1000
    out: list[LimitUsage] = []

    def add(name: LimitName, limit: int, used: int, reset_at: float) -> None:
        out.append(
            LimitUsage(
                name=name, limit=limit, used=used, remaining=max(0, limit - used), reset_at=reset_at
            )
        )

    rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
    if rpm is not None:
        level = seen.requests_level
        reset_at = now + gcra_reset_ms(level, max(rpm, 0)) / 1000
        add("requests_per_minute", rpm, _ceil_div(level, PERIOD_MS), reset_at)
    if tpm is not None:
        level = seen.tokens_level
        reset_at = now + gcra_reset_ms(level, max(tpm, 0)) / 1000
        add("tokens_per_minute", tpm, _ceil_div(level, PERIOD_MS), reset_at)
    if limits.concurrent_requests is not None:
        reset_at = max(latest_lease_ms, now_ms) / 1000
        add("concurrent_requests", limits.concurrent_requests, seen.leases, reset_at)
    if limits.tokens_per_day is not None:
        add("tokens_per_day", limits.tokens_per_day, seen.day_tokens, periods.day_ends_at)
    if limits.tokens_per_month is not None:
        add("tokens_per_month", limits.tokens_per_month, seen.month_tokens, periods.month_ends_at)
    if limits.cost_per_month_micros is not None:
        add("cost_per_month", limits.cost_per_month_micros, seen.month_cost, periods.month_ends_at)
    return tuple(out)
