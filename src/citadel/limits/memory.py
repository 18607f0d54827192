"""The in-memory limiter: the embedded default, for one gateway process.

It keeps the same state as the Redis backend (a TAT per rate, a set of leases, a counter per
calendar day and month) in dictionaries, and decides with the same pure functions
(``citadel.limits.maths``), so both backends answer alike. It is safe under asyncio without a
lock because no decision awaits: each call runs to completion before another starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from citadel.limits.decision import (
    LimitDecision,
    Limits,
    Reservation,
    Scope,
    ScopeKind,
    UsageSnapshot,
)
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
    judge_scopes,
    live_leases,
    quota_settle,
    reserve,
    scoped_decision,
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


def _scope_name(principal: str, scope: Scope) -> str:
    """Where a scope's state is kept: apart from every user's (user ids never start with NUL)."""
    if scope.kind == "key":
        return f"\x00key:{principal}:{scope.id}"
    return f"\x00team:{scope.id}"


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

    def _state(self, name: str) -> _Principal:
        state = self._principals.get(name)
        if state is None:
            state = self._principals[name] = _Principal()
        return state

    async def admit(
        self,
        principal: str,
        limits: Limits,
        *,
        lease_id: str,
        tokens: int,
        cost_micros: int,
        now: float,
        scopes: Sequence[Scope] = (),
    ) -> LimitDecision:
        scopes = [scope for scope in scopes if not scope.limits.unlimited]
        now_ms, periods, reservation = reserve(
            self._calendar,
            principal,
            lease_id=lease_id,
            tokens=tokens,
            cost_micros=cost_micros,
            now=now,
            scopes=scopes,
        )
        if limits.unlimited and not scopes:
            return decision(limits, Verdict(None, 0, 0, 0), reservation)
        kinds: list[ScopeKind] = ["user", *(scope.kind for scope in scopes)]
        names = [principal, *(_scope_name(principal, scope) for scope in scopes)]
        every = [limits, *(scope.limits for scope in scopes)]
        states = [self._state(name) for name in names]
        refused, verdicts = judge_scopes(
            [
                (scope_limits, self._observe(state, scope_limits, now_ms, periods))
                for scope_limits, state in zip(every, states, strict=True)
            ],
            tokens=tokens,
            cost_micros=cost_micros,
            now_ms=now_ms,
            day_ends_ms=to_ms(periods.day_ends_at),
            month_ends_ms=to_ms(periods.month_ends_at),
        )
        judged = list(zip(kinds, every, verdicts, strict=True))
        if refused >= 0:
            return scoped_decision(judged, refused)
        for state, scope_limits, verdict in zip(states, every, verdicts, strict=True):
            self._charge(
                state, scope_limits, verdict, lease_id, now_ms, periods, tokens, cost_micros
            )
        return scoped_decision(judged, -1, reservation)

    def _charge(
        self,
        state: _Principal,
        limits: Limits,
        verdict: Verdict,
        lease_id: str,
        now_ms: int,
        periods: Periods,
        tokens: int,
        cost_micros: int,
    ) -> None:
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

    async def reconcile(
        self,
        reservation: Reservation,
        limits: Limits,
        *,
        tokens: int,
        cost_micros: int,
        now: float,
    ) -> None:
        now_ms = to_ms(now)
        principal = reservation.principal
        settle = [(principal, limits)] + [
            (_scope_name(principal, scope), scope.limits) for scope in reservation.scopes
        ]
        for name, scope_limits in settle:
            if not scope_limits.unlimited:
                # reset since admission: an over-run is still charged, as in Redis
                self._settle(
                    self._state(name), scope_limits, reservation, tokens, cost_micros, now_ms
                )

    @staticmethod
    def _settle(
        state: _Principal,
        limits: Limits,
        reservation: Reservation,
        tokens: int,
        cost_micros: int,
        now_ms: int,
    ) -> None:
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

    async def team_usage(self, team_id: str, limits: Limits, now: float) -> UsageSnapshot:
        return await self._usage(
            _scope_name("", Scope("team", team_id, limits)), team_id, limits, now
        )

    async def count_team_spend(self, team_id: str, micros: int, now: float) -> None:
        name = _scope_name("", Scope("team", team_id, Limits()))
        month = self._calendar.at(now).month
        state = self._principals.setdefault(name, _Principal())
        state.month_cost[month] = max(state.month_cost.get(month, 0), micros)

    async def usage(self, principal: str, limits: Limits, now: float) -> UsageSnapshot:
        return await self._usage(principal, principal, limits, now)

    async def _usage(self, name: str, principal: str, limits: Limits, now: float) -> UsageSnapshot:
        now_ms = to_ms(now)
        periods = self._calendar.at(now_ms / 1000)
        state = self._principals.get(name) or _Principal()
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
        prefix = f"\x00key:{principal}:"
        for name in [name for name in self._principals if name.startswith(prefix)]:
            del self._principals[name]

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
