"""The usage ledger as a source of alert series, for a platform without Prometheus.

    metrics = LedgerMetrics(engine, accounts, settings)
    series = await metrics.series(rule.ledger, step=15, lookback=3600, now=time.time())

The same store the custom-metrics service (:9091) reads: ``usage_events`` for what happened at
the rule's step, the team rollup and the accounts store for the month so far and each team's
budget. Series (each point at the end of its step, the last one a step that has *settled*):

- ``model_request_rate``: requests per second, per model (steps without requests are 0);
- ``model_error_ratio``: requests answered 5xx over requests, per model (no point for a step
  without requests, rather than a 0/0);
- ``model_latency_p95`` / ``model_ttft_p95``: the 95th percentile of the requests' latency (of
  the streamed ones' time to first token) over the last 5 minutes, in seconds;
- ``team_budget_use``: each team's month-to-date spend over its monthly budget (1.0: all of it),
  for the teams with a budget that have spent this month.

Theory of operation. Events are read once each: every call reads only those with a start time
between the end of the last read and ``now - settle_seconds`` (the time an event may take to
reach the ledger: the gateway's flush, the ledger writer), and adds them to in-memory buckets of
the step, kept for the longest lookback asked. So a round costs the events of one interval, not
of the lookback, and an event that reaches the ledger later than the settle time is not counted.
Latencies are kept as log-spaced histograms (10 % wide bins), so a percentile is within 5 %.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from citadel.accounts.store import AccountStore, Team, User
from citadel.alerting.definitions import LedgerQuery
from citadel.alerting.prometheus import Series
from citadel.errors import CitadelError
from citadel.metering.analytics import Analytics
from citadel.metering.budgets import budget_use
from citadel.metering.ranges import TimeRange, month_range
from citadel.metering.schema import usage_events
from citadel.settings import Settings

__all__ = ["LedgerMetrics", "LedgerUnavailable", "percentile"]

_BINS = 200  # latency bins: 1 ms x 1.1^k, up to ~190 000 s
_RATIO = 1.1
_WINDOW = 300.0  # the percentiles' window, as PromQL's rate(...[5m])
_ACCOUNTS_TTL = 60.0  # budgets are re-read this often


class LedgerUnavailable(CitadelError):
    """The ledger (or the accounts store) could not be read."""


def _bin(ms: float) -> int:
    if ms <= 1.0:
        return 0
    return min(_BINS - 1, int(math.log(ms) / math.log(_RATIO)) + 1)


def percentile(hist: np.ndarray[Any, np.dtype[np.float64]], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a latency histogram, in seconds (the geometric middle of
    its bin); None when it is empty."""
    total = float(hist.sum())
    if total <= 0:
        return None
    index = int(np.searchsorted(np.cumsum(hist), q * total))
    if index == 0:
        return 0.001
    low, high = _RATIO ** (index - 1), _RATIO**index
    return math.sqrt(low * high) / 1000.0


@dataclass(slots=True)
class _Cell:
    requests: int = 0
    failures: int = 0
    latency: np.ndarray[Any, np.dtype[np.float64]] = field(default_factory=lambda: np.zeros(_BINS))
    ttft: np.ndarray[Any, np.dtype[np.float64]] = field(default_factory=lambda: np.zeros(_BINS))


@dataclass(slots=True)
class _Grain:
    """The buckets of one step: [start, read_until) read, per model and per team."""

    step: float
    start: float  # a whole hour: the month's spend before it comes from the rollups
    read_until: float
    models: dict[int, dict[str, _Cell]] = field(default_factory=dict)
    spend: dict[int, dict[str, int]] = field(default_factory=dict)  # micro-USD per team

    def index(self, when: float) -> int:
        return int((when - self.start) // self.step)

    def end(self, index: int) -> float:
        return self.start + (index + 1) * self.step

    def complete(self) -> int:
        """How many buckets from the start are wholly read."""
        return int((self.read_until - self.start) // self.step)


class LedgerMetrics:
    """Alert series from the usage ledger; one instance per service (it keeps the buckets)."""

    def __init__(
        self,
        engine: AsyncEngine,
        accounts: AccountStore | None,
        settings: Settings,
        *,
        settle_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._analytics = Analytics(engine)
        self._accounts = accounts
        self._settings = settings
        flush = settings.metering.flush_seconds
        self.settle_seconds = 2 * flush + 2.0 if settle_seconds is None else settle_seconds
        self._clock = clock
        self._grains: dict[float, _Grain] = {}
        self._lookback: dict[float, float] = {}
        self._budgets: tuple[float, dict[str, int]] | None = None

    async def series(
        self, query: LedgerQuery, *, step: float, lookback: float, now: float
    ) -> list[Series]:
        """The series of ``query`` over the last ``lookback`` seconds at ``step``."""
        try:
            grain = await self._read(step, lookback, now)
            if query.metric == "team_budget_use":
                return await self._budget_use(grain, query, now, lookback)
        except SQLAlchemyError as exc:
            raise LedgerUnavailable(f"the usage ledger could not be read: {exc}") from exc
        return self._model_series(grain, query, lookback)

    # -- reading --------------------------------------------------------------------------------

    async def _read(self, step: float, lookback: float, now: float) -> _Grain:
        lookback = max(lookback, self._lookback.get(step, 0.0))
        self._lookback[step] = lookback
        until = now - self.settle_seconds
        grain = self._grains.get(step)
        if grain is None or until < grain.read_until - 86400.0:  # new, or the clock went back
            start = math.floor((until - lookback) / 3600.0) * 3600.0
            grain = self._grains[step] = _Grain(step=step, start=start, read_until=start)
        if until > grain.read_until:
            statement = select(
                usage_events.c.ts,
                usage_events.c.model,
                usage_events.c.status,
                usage_events.c.latency_ms,
                usage_events.c.ttft_ms,
                usage_events.c.team_id,
                usage_events.c.cost_micros,
            ).where(
                usage_events.c.ts >= datetime.fromtimestamp(grain.read_until, UTC),
                usage_events.c.ts < datetime.fromtimestamp(until, UTC),
            )
            async with self._engine.connect() as conn:
                rows = (await conn.execute(statement)).all()
            for ts, model, status, latency, ttft, team, cost in rows:
                index = grain.index(ts.timestamp())
                cell = grain.models.setdefault(index, {}).setdefault(model, _Cell())
                cell.requests += 1
                cell.failures += status >= 500
                cell.latency[_bin(float(latency))] += 1
                if ttft is not None:
                    cell.ttft[_bin(float(ttft))] += 1
                if cost:
                    spent = grain.spend.setdefault(index, {})
                    spent[team] = spent.get(team, 0) + int(cost)
            grain.read_until = until
        self._prune(grain, until - lookback)
        return grain

    def _prune(self, grain: _Grain, keep_from: float) -> None:
        """Drop whole hours before ``keep_from`` (the start stays on an hour)."""
        start = math.floor(keep_from / 3600.0) * 3600.0
        if start <= grain.start:
            return
        shift = round((start - grain.start) / grain.step)
        if abs(grain.start + shift * grain.step - start) > 1e-6:
            return  # a step that does not divide an hour: keep the buckets
        for store in (grain.models, grain.spend):
            moved = {i - shift: v for i, v in store.items() if i >= shift}
            store.clear()
            store.update(moved)  # type: ignore[arg-type]
        grain.start = start

    # -- per model ------------------------------------------------------------------------------

    def _model_series(self, grain: _Grain, query: LedgerQuery, lookback: float) -> list[Series]:
        complete = grain.complete()
        first = max(0, grain.index(grain.read_until - lookback))
        names = sorted({m for i, cells in grain.models.items() if i < complete for m in cells})
        if query.model is not None:
            names = [n for n in names if n == query.model]
        found: list[Series] = []
        window = max(1, round(_WINDOW / grain.step))
        for name in names:
            cells = [grain.models.get(i, {}).get(name) for i in range(complete)]
            seen = next((i for i, c in enumerate(cells) if c is not None), complete)
            times: list[float] = []
            values: list[float] = []
            for i in range(max(first, seen), complete):
                value = self._value(query.metric, cells, i, window, grain.step)
                if value is not None:
                    times.append(grain.end(i))
                    values.append(value)
            labels = MappingProxyType({"model": name, "metric": query.metric})
            found.append(Series(labels=labels, times=tuple(times), values=tuple(values)))
        return found

    @staticmethod
    def _value(
        metric: str, cells: Sequence[_Cell | None], i: int, window: int, step: float
    ) -> float | None:
        cell = cells[i]
        if metric == "model_request_rate":
            return (cell.requests if cell else 0) / step
        if metric == "model_error_ratio":
            return cell.failures / cell.requests if cell and cell.requests else None
        recent = [c for c in cells[max(0, i - window + 1) : i + 1] if c is not None]
        if not recent:
            return None
        kind = "latency" if metric == "model_latency_p95" else "ttft"
        return percentile(sum((getattr(c, kind) for c in recent), np.zeros(_BINS)), 0.95)

    # -- per team -------------------------------------------------------------------------------

    async def _budget_use(
        self, grain: _Grain, query: LedgerQuery, now: float, lookback: float
    ) -> list[Series]:
        budgets = await self._team_budgets()
        month = month_range(datetime.fromtimestamp(now, UTC), self._settings.limits.timezone)
        month_start = month.start.timestamp()
        base: dict[str, int] = {}
        if grain.start > month_start:
            span = TimeRange(month.start, datetime.fromtimestamp(grain.start, UTC))
            base = await self._analytics.spend(span, "team")
        complete = grain.complete()
        first = max(0, grain.index(month_start)) if month_start > grain.start else 0
        shown = max(first, grain.index(grain.read_until - lookback))  # the lookback's points
        found: list[Series] = []
        for team, budget in sorted(budgets.items()):
            if query.team is not None and team != query.team:
                continue
            total = base.get(team, 0)
            times: list[float] = []
            values: list[float] = []
            # A team that had spent nothing before the buckets starts at its first spend, as a
            # model starts at its first request (a flat run of zeros is no history of spend).
            since = (
                shown
                if total > 0
                else next(
                    (i for i in range(first, complete) if grain.spend.get(i, {}).get(team)),
                    complete,
                )
            )
            for i in range(first, complete):
                total += grain.spend.get(i, {}).get(team, 0)
                if i >= max(shown, since):
                    times.append(grain.end(i))
                    values.append(total / budget)
            if total <= 0:
                continue  # nothing spent this month: nothing to forecast
            labels = MappingProxyType(
                {"team": team, "metric": query.metric, "budget_usd": f"{budget / 1e6:g}"}
            )
            found.append(Series(labels=labels, times=tuple(times), values=tuple(values)))
        return found

    async def _team_budgets(self) -> dict[str, int]:
        """Each team's monthly budget in micro-USD (teams with a positive one), re-read from the
        accounts store every minute."""
        cached = self._budgets
        if cached is not None and self._clock() - cached[0] < _ACCOUNTS_TTL:
            return cached[1]
        if self._accounts is None:
            return {}
        try:
            users: list[User] = await self._accounts.list_users()
            teams: list[Team] = await self._accounts.list_teams()
        except CitadelError as exc:
            if cached is not None:
                return cached[1]
            raise LedgerUnavailable(f"team budgets could not be read: {exc}") from exc
        rows = budget_use("team", spent={}, users=users, teams=teams, tiers=self._settings.tiers)
        budgets = {r.id: r.budget_micros for r in rows if r.budget_micros and r.budget_micros > 0}
        self._budgets = (self._clock(), budgets)
        return budgets
