"""The in-memory limiter: the embedded default, for one gateway process.

It keeps the same state as the Redis backend (a TAT per rate, a set of leases, a counter per
calendar day and month) in dictionaries, and decides with the same pure functions
(``citadel.limits.maths``), so both backends answer alike. It is safe under asyncio without a
lock because no decision awaits: each call runs to completion before another starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from citadel.limits.decision import LimitDecision, Limits, Reservation, UsageSnapshot
from citadel.limits.maths import (
    Calendar,
    Observed,
    Periods,
    Tat,
    Verdict,
    decision,
    gcra_level,
    gcra_settle,
    gcra_tat,
    judge,
    live_leases,
    quota_settle,
    reserve,
    to_ms,
    usage_figures,
)

__all__ = ["MemoryLimiter"]


@dataclass(slots=True)
class _Principal:
    requests: Tat | None = None
    tokens: Tat | None = None
    leases: dict[str, int] = field(default_factory=dict)  # lease id -> expiry (ms)
    day_tokens: dict[str, int] = field(default_factory=dict)  # day -> tokens
    month_tokens: dict[str, int] = field(default_factory=dict)  # month -> tokens
    month_cost: dict[str, int] = field(default_factory=dict)  # month -> micro-USD


def _charge(counters: dict[str, int], period: str, amount: int) -> None:
    """Add to a period's counter, creating it even for zero so that an over-run can be settled
    to it; a new period drops all but the last one (its reservations may still be settled)."""
    if period not in counters and len(counters) > 1:
        last = max(counters)
        for old in [key for key in counters if key != last]:
            del counters[old]
    counters[period] = counters.get(period, 0) + amount


def _settle(counters: dict[str, int], period: str, reserved: int, actual: int) -> None:
    if period in counters:
        counters[period] = quota_settle(counters[period], reserved, actual)


class MemoryLimiter:
    """Limits for one process; see ``citadel.limits.decision.Limiter`` for the contract."""

    __slots__ = ("_calendar", "_lease_ttl_ms", "_principals")

    def __init__(self, timezone: str, lease_ttl: float) -> None:
        self._calendar = Calendar(timezone)
        self._lease_ttl_ms = to_ms(lease_ttl)
        self._principals: dict[str, _Principal] = {}

    def _observe(
        self, state: _Principal, limits: Limits, now_ms: int, periods: Periods
    ) -> Observed:
        if state.leases:
            state.leases = live_leases(state.leases, now_ms)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        return Observed(
            requests_level=0 if rpm is None else gcra_level(state.requests, rpm, now_ms),
            tokens_level=0 if tpm is None else gcra_level(state.tokens, tpm, now_ms),
            leases=len(state.leases),
            earliest_lease_ms=min(state.leases.values(), default=0),
            day_tokens=state.day_tokens.get(periods.day, 0),
            month_tokens=state.month_tokens.get(periods.month, 0),
            month_cost=state.month_cost.get(periods.month, 0),
        )

    async def admit(
        self,
        principal: str,
        limits: Limits,
        *,
        lease_id: str,
        tokens: int,
        cost_micros: int,
        now: float,
    ) -> LimitDecision:
        now_ms, periods, reservation = reserve(
            self._calendar,
            principal,
            lease_id=lease_id,
            tokens=tokens,
            cost_micros=cost_micros,
            now=now,
        )
        if limits.unlimited:
            return decision(limits, Verdict(None, 0, 0, 0), reservation)
        state = self._principals.get(principal)
        if state is None:
            state = self._principals[principal] = _Principal()
        verdict = judge(
            limits,
            self._observe(state, limits, now_ms, periods),
            tokens=tokens,
            cost_micros=cost_micros,
            now_ms=now_ms,
            day_ends_ms=to_ms(periods.day_ends_at),
            month_ends_ms=to_ms(periods.month_ends_at),
        )
        if verdict.refused_by is not None:
            return decision(limits, verdict)
        if limits.requests_per_minute is not None:
            state.requests = gcra_tat(verdict.requests_level, limits.requests_per_minute, now_ms)
        if limits.tokens_per_minute is not None:
            state.tokens = gcra_tat(verdict.tokens_level, limits.tokens_per_minute, now_ms)
        if limits.concurrent_requests is not None:
            state.leases[lease_id] = now_ms + self._lease_ttl_ms
        if limits.tokens_per_day is not None:
            _charge(state.day_tokens, periods.day, tokens)
        if limits.tokens_per_month is not None:
            _charge(state.month_tokens, periods.month, tokens)
        if limits.cost_per_month_micros is not None:
            _charge(state.month_cost, periods.month, cost_micros)
        return decision(limits, verdict, reservation)

    async def reconcile(
        self,
        reservation: Reservation,
        limits: Limits,
        *,
        tokens: int,
        cost_micros: int,
        now: float,
    ) -> None:
        if limits.unlimited:
            return
        state = self._principals.get(reservation.principal)
        if state is None:  # reset since admission: an over-run is still charged, as in Redis
            state = self._principals[reservation.principal] = _Principal()
        now_ms = to_ms(now)
        tpm = limits.tokens_per_minute
        if tpm is not None and tokens != reservation.tokens:
            level = gcra_level(state.tokens, tpm, now_ms)
            settled = gcra_settle(level, tpm, reservation.tokens, tokens)
            state.tokens = gcra_tat(settled, tpm, now_ms)
        state.leases.pop(reservation.lease_id, None)
        if limits.tokens_per_day is not None:
            _settle(state.day_tokens, reservation.day, reservation.tokens, tokens)
        if limits.tokens_per_month is not None:
            _settle(state.month_tokens, reservation.month, reservation.tokens, tokens)
        if limits.cost_per_month_micros is not None:
            _settle(state.month_cost, reservation.month, reservation.cost_micros, cost_micros)

    async def usage(self, principal: str, limits: Limits, now: float) -> UsageSnapshot:
        now_ms = to_ms(now)
        periods = self._calendar.at(now_ms / 1000)
        state = self._principals.get(principal) or _Principal()
        seen = self._observe(state, limits, now_ms, periods)
        figures = usage_figures(
            limits,
            seen,
            now_ms=now_ms,
            latest_lease_ms=max(state.leases.values(), default=0),
            periods=periods,
        )
        return UsageSnapshot(principal=principal, limits=figures)

    async def reset(self, principal: str) -> None:
        self._principals.pop(principal, None)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
