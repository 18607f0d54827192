"""The Redis limiter: every gateway replica shares one set of limits.

One EVALSHA of ``admit.lua`` per admission checks and reserves every limit of the principal
atomically, and one of ``reconcile.lua`` settles it. Python computes ``now`` in milliseconds and
the calendar periods (``citadel.limits.maths``); the scripts do the same integer steps as
``maths.judge`` and no calendar maths. The keys of one principal share the hash tag
``{u:<principal>}``, so they live in one Redis Cluster slot:

    citadel:{u:<principal>}:rpm               GCRA TAT of requests per minute, "ms:frac"
    citadel:{u:<principal>}:tpm               GCRA TAT of tokens per minute
    citadel:{u:<principal>}:leases            sorted set: lease id -> expiry (ms)
    citadel:{u:<principal>}:day:<yyyy-mm-dd>  tokens charged to that day
    citadel:{u:<principal>}:month:<yyyy-mm>   tokens charged to that month
    citadel:{u:<principal>}:cost:<yyyy-mm>    micro-USD charged to that month
    citadel:{u:<principal>}:keys              set of the dated keys above, for reset()

Every key carries a TTL, so a principal that goes quiet leaves nothing behind. Any failure,
an error reply included, raises StoreUnavailable.
"""

from __future__ import annotations

from importlib import resources
from typing import Final

from citadel.errors import StoreUnavailable
from citadel.limits.decision import LimitDecision, Limits, Reservation, UsageSnapshot
from citadel.limits.maths import (
    LIMIT_NAMES,
    PERIOD_MS,
    UNSET,
    Calendar,
    Observed,
    Tat,
    Verdict,
    check_limit,
    decision,
    gcra_level,
    reserve,
    to_ms,
    usage_figures,
)
from citadel.stores.endpoint import RedisStore
from citadel.stores.redis import Arg, RedisError, Script

__all__ = ["RedisLimiter", "principal_keys"]

_KEEP_MS: Final = 60_000  # dated counters outlive their period by the lease TTL and this


def _script(name: str) -> Script:
    return Script(resources.files("citadel.limits").joinpath(name).read_text(encoding="utf-8"))


ADMIT: Final = _script("admit.lua")
RECONCILE: Final = _script("reconcile.lua")
USAGE: Final = _script("usage.lua")


def _prefix(principal: str) -> str:
    return f"citadel:{{u:{principal}}}:"


def principal_keys(principal: str, day: str, month: str) -> list[str]:
    """The keys ``admit.lua`` takes for a principal on one day, in its KEYS order."""
    p = _prefix(principal)
    return [
        p + "rpm",
        p + "tpm",
        p + "leases",
        p + "day:" + day,
        p + "month:" + month,
        p + "cost:" + month,
        p + "keys",
    ]


def _unavailable(call: str, exc: RedisError) -> StoreUnavailable:
    # An error reply (LOADING after a restart, BUSY, READONLY after a failover, OOM, ...) leaves
    # the limits undecided, like an outage: the gateway's failure mode applies.
    return StoreUnavailable("redis", f"{call} failed: {exc}")


def _rate(limit: int | None) -> int:
    return UNSET if limit is None else check_limit(limit)


def _count(limit: int | None) -> int:
    return UNSET if limit is None else max(limit, 0)


class RedisLimiter:
    """Limits shared through Redis; see ``citadel.limits.decision.Limiter`` for the contract.

    The limiter owns ``client``: ``aclose`` closes it.
    """

    __slots__ = ("_calendar", "_client", "_keep_ms", "_lease_ttl_ms")

    def __init__(self, client: RedisStore, timezone: str, lease_ttl: float) -> None:
        self._client = client
        self._calendar = Calendar(timezone)
        self._lease_ttl_ms = to_ms(lease_ttl)
        self._keep_ms = self._lease_ttl_ms + _KEEP_MS

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
        args: list[Arg] = [
            now_ms,
            _rate(limits.requests_per_minute),
            _rate(limits.tokens_per_minute),
            _count(limits.concurrent_requests),
            _count(limits.tokens_per_day),
            _count(limits.tokens_per_month),
            _count(limits.cost_per_month_micros),
            tokens,
            cost_micros,
            lease_id,
            self._lease_ttl_ms,
            to_ms(periods.day_ends_at),
            to_ms(periods.month_ends_at),
            PERIOD_MS,
            self._keep_ms,
        ]
        keys = principal_keys(principal, periods.day, periods.month)
        try:
            reply = await self._client.evalsha(ADMIT, keys, args)
        except RedisError as exc:
            raise _unavailable("admit", exc) from exc
        refused, wait, requests_level, tokens_level = reply
        verdict = Verdict(
            LIMIT_NAMES[refused - 1] if refused else None, wait, requests_level, tokens_level
        )
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
        p = _prefix(reservation.principal)
        keys = [
            p + "tpm",
            p + "leases",
            p + "day:" + reservation.day,
            p + "month:" + reservation.month,
            p + "cost:" + reservation.month,
        ]
        args: list[Arg] = [
            to_ms(now),
            _rate(limits.tokens_per_minute),
            PERIOD_MS,
            reservation.tokens,
            tokens,
            reservation.cost_micros,
            cost_micros,
            reservation.lease_id,
            int(limits.tokens_per_day is not None),
            int(limits.tokens_per_month is not None),
            int(limits.cost_per_month_micros is not None),
        ]
        try:
            await self._client.evalsha(RECONCILE, keys, args)
        except RedisError as exc:
            raise _unavailable("reconcile", exc) from exc

    async def usage(self, principal: str, limits: Limits, now: float) -> UsageSnapshot:
        now_ms = to_ms(now)
        periods = self._calendar.at(now_ms / 1000)
        keys = principal_keys(principal, periods.day, periods.month)[:6]
        try:
            reply = await self._client.evalsha(USAGE, keys, [now_ms])
        except RedisError as exc:
            raise _unavailable("usage", exc) from exc
        rpm_tat, tpm_tat, leases, earliest, latest, day, month, cost = reply
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        seen = Observed(
            requests_level=gcra_level(Tat.decode(rpm_tat) if rpm_tat else None, rpm or 0, now_ms),
            tokens_level=gcra_level(Tat.decode(tpm_tat) if tpm_tat else None, tpm or 0, now_ms),
            leases=leases,
            earliest_lease_ms=int(float(earliest)),
            day_tokens=int(day),
            month_tokens=int(month),
            month_cost=int(cost),
        )
        figures = usage_figures(
            limits, seen, now_ms=now_ms, latest_lease_ms=int(float(latest)), periods=periods
        )
        return UsageSnapshot(principal=principal, limits=figures)

    async def reset(self, principal: str) -> None:
        p = _prefix(principal)
        try:
            dated = await self._client.execute("SMEMBERS", p + "keys")
            await self._client.execute(
                "DEL", p + "rpm", p + "tpm", p + "leases", p + "keys", *dated
            )
        except RedisError as exc:
            raise _unavailable("reset", exc) from exc

    async def ping(self) -> None:
        await self._client.ping()

    async def aclose(self) -> None:
        await self._client.aclose()
