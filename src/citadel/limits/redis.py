"""The Redis limiter: every gateway replica shares one set of limits.

One EVALSHA of ``admit.lua`` per admission checks and reserves every limit of the principal
atomically, and one of ``reconcile.lua`` settles it (sent up to ``SETTLE_DELAY`` late, with the
next command on the connection: usually the next request's admission, which Redis then runs
after it, so a lease returned is free for that admission). Python computes ``now`` in
milliseconds and the calendar periods (``citadel.limits.maths``); the scripts do the same integer
steps as ``maths.judge`` and no calendar maths. The keys of one principal share the hash tag
``{u:<principal>}``, so they live in one Redis Cluster slot:

    citadel:{u:<principal>}:rpm               GCRA TAT of requests per minute, "ms:frac"
    citadel:{u:<principal>}:tpm               GCRA TAT of tokens per minute
    citadel:{u:<principal>}:leases            sorted set: lease id -> expiry (ms)
    citadel:{u:<principal>}:day:<yyyy-mm-dd>  tokens charged to that day
    citadel:{u:<principal>}:month:<yyyy-mm>   tokens charged to that month
    citadel:{u:<principal>}:cost:<yyyy-mm>    micro-USD charged to that month
    citadel:{u:<principal>}:keys              set of the dated keys above, for reset()

An admission's further scopes keep the same keys under their own prefixes:

    citadel:{u:<principal>}:key:<key id>:...  an API key's own limits: the owner's hash tag, so a
                                              key is always charged in the user's call (a key
                                              never changes owner); its dated keys are indexed
                                              in the user's ``keys`` set
    citadel:{t:<team>}:...                    a team's own limits (its monthly budget)

Every key carries a TTL, so a principal that goes quiet leaves nothing behind. Any failure,
an error reply included, raises StoreUnavailable.

One script call, or two in a Cluster: a team's counters are shared by its members, each of whom
hashes to a slot of its own, so no tag puts a user's and its team's keys in one slot (tagging
users by team would put a whole team on one shard, and lose a user's month when it changes
team). On one server or a Sentinel group (``split`` False) every scope goes in one call, atomic
as before. In a Cluster (``split`` True, the default for a ``ClusterClient``) the team's scope is
admitted first in a call of its own, then the user's and key's; when the second refuses, a
compensating call settles the first to zero, returning what it reserved. Exactness holds: each
counter is checked and charged atomically against every reservation outstanding, so a team's
budget is never exceeded; between the two calls a member's doomed request holds part of the
team's budget for one round trip, so another member near the budget's edge may be refused that a
single call would have admitted (never the reverse). A gateway that dies between the calls
leaves the team's reservation charged, as any admitted request of a dead gateway is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Final

from citadel.errors import StoreUnavailable
from citadel.limits.decision import (
    LimitDecision,
    Limits,
    Reservation,
    Scope,
    ScopeKind,
    UsageSnapshot,
)
from citadel.limits.maths import (
    LIMIT_NAMES,
    PERIOD_MS,
    UNSET,
    Calendar,
    Observed,
    Tat,
    Verdict,
    check_limit,
    gcra_level,
    reserve,
    scoped_decision,
    to_ms,
    usage_figures,
)
from citadel.stores.endpoint import RedisStore
from citadel.stores.redis import Arg, RedisError, Script

__all__ = ["RedisLimiter", "principal_keys"]

_log = logging.getLogger("citadel.limits")

_KEEP_MS: Final = 60_000  # dated counters outlive their period by the lease TTL and this
# A settlement may wait this long to travel with the next admission (one write and one wake-up
# of Redis per request instead of two; docs/decisions.md); an admission never waits.
SETTLE_DELAY: Final = 0.005


def _script(name: str) -> Script:
    return Script(resources.files("citadel.limits").joinpath(name).read_text(encoding="utf-8"))


ADMIT: Final = _script("admit.lua")
RECONCILE: Final = _script("reconcile.lua")
USAGE: Final = _script("usage.lua")
SEED: Final = _script("seed.lua")


def _prefix(principal: str) -> str:
    return f"citadel:{{u:{principal}}}:"


def _scope_prefix(principal: str, scope: Scope) -> str:
    if scope.kind == "key":
        return f"{_prefix(principal)}key:{scope.id}:"
    return f"citadel:{{t:{scope.id}}}:"


def _keys(p: str, day: str, month: str, index: str) -> list[str]:
    return [
        p + "rpm",
        p + "tpm",
        p + "leases",
        p + "day:" + day,
        p + "month:" + month,
        p + "cost:" + month,
        index,
    ]


def principal_keys(principal: str, day: str, month: str) -> list[str]:
    """The keys ``admit.lua`` takes for a principal on one day, in its KEYS order."""
    p = _prefix(principal)
    return _keys(p, day, month, p + "keys")


@dataclass(frozen=True, slots=True)
class _Part:
    """One scope of an admission as the scripts see it: its kind, key prefix and limits."""

    kind: ScopeKind
    prefix: str
    index: str  # the set its dated keys are listed in, for reset()
    limits: Limits

    @property
    def shared(self) -> bool:
        """Whether the part hashes apart from the user's slot (a team's)."""
        return self.kind == "team"


def _parts(principal: str, limits: Limits, scopes: Sequence[Scope]) -> list[_Part]:
    """The user's part, then each scope's; every part is kept (an unlimited one is skipped by
    the callers), so that indices match ``kinds`` in the decision."""
    user = _prefix(principal)
    parts = [_Part("user", user, user + "keys", limits)]
    for scope in scopes:
        prefix = _scope_prefix(principal, scope)
        index = user + "keys" if scope.kind == "key" else prefix + "keys"
        parts.append(_Part(scope.kind, prefix, index, scope.limits))
    return parts


def _limit_args(limits: Limits) -> list[Arg]:
    return [
        _rate(limits.requests_per_minute),
        _rate(limits.tokens_per_minute),
        _count(limits.concurrent_requests),
        _count(limits.tokens_per_day),
        _count(limits.tokens_per_month),
        _count(limits.cost_per_month_micros),
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

    __slots__ = ("_calendar", "_client", "_keep_ms", "_lease_ttl_ms", "_settle_delay", "_split")

    def __init__(
        self,
        client: RedisStore,
        timezone: str,
        lease_ttl: float,
        *,
        split: bool | None = None,
        settle_delay: float = SETTLE_DELAY,
    ) -> None:
        self._client = client
        self._settle_delay = settle_delay
        self._calendar = Calendar(timezone)
        self._lease_ttl_ms = to_ms(lease_ttl)
        self._keep_ms = self._lease_ttl_ms + _KEEP_MS
        # A team's keys and a user's share no slot in a Cluster: two calls (module docstring).
        self._split = bool(getattr(client, "sharded", False)) if split is None else split

    def _groups(self, parts: Sequence[_Part]) -> list[list[_Part]]:
        """The script calls an admission makes: the parts with limits, all in one call, or in
        a Cluster the team's first and then the user's and key's."""
        live = [part for part in parts if not part.limits.unlimited]
        if not self._split:
            return [live] if live else []
        groups = [
            [part for part in live if part.shared],
            [part for part in live if not part.shared],
        ]
        return [group for group in groups if group]

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
        now_ms, periods, reservation = reserve(
            self._calendar,
            principal,
            lease_id=lease_id,
            tokens=tokens,
            cost_micros=cost_micros,
            now=now,
            scopes=[scope for scope in scopes if not scope.limits.unlimited],
        )
        parts = _parts(principal, limits, scopes)
        verdicts = {id(part): Verdict(None, 0, 0, 0) for part in parts}
        common: list[Arg] = [
            now_ms,
            tokens,
            cost_micros,
            lease_id,
            self._lease_ttl_ms,
            to_ms(periods.day_ends_at),
            to_ms(periods.month_ends_at),
            PERIOD_MS,
            self._keep_ms,
        ]
        admitted: list[list[_Part]] = []
        refused = -1
        for group in self._groups(parts):
            keys = [
                key
                for part in group
                for key in _keys(part.prefix, periods.day, periods.month, part.index)
            ]
            args = common + [arg for part in group for arg in _limit_args(part.limits)]
            try:
                reply = await self._client.evalsha(ADMIT, keys, args)
            except RedisError as exc:
                await self._release(admitted, reservation)
                raise _unavailable("admit", exc) from exc
            code, wait, scope = reply[0], reply[1], reply[2]
            for i, part in enumerate(group):
                name = LIMIT_NAMES[code - 1] if code and scope == i + 1 else None
                levels = reply[3 + 2 * i], reply[4 + 2 * i]
                verdicts[id(part)] = Verdict(name, wait if name else 0, *levels)
            if code:
                refused = parts.index(group[scope - 1])
                await self._release(admitted, reservation)
                break
            admitted.append(group)
        judged = [(part.kind, part.limits, verdicts[id(part)]) for part in parts]
        return scoped_decision(judged, refused, reservation if refused < 0 else None)

    async def _release(self, groups: Sequence[Sequence[_Part]], reservation: Reservation) -> None:
        """Undo admitted calls of an admission a later call refused: settle them to zero."""
        for group in groups:
            try:
                await self._settle(
                    group, reservation, tokens=0, cost_micros=0, now=None, deferred=0.0
                )
            except RedisError as exc:  # the reservation stays charged: conservative, logged
                _log.warning(
                    "could not return a refused admission's reservation",
                    extra={"principal": reservation.principal, "error": str(exc)},
                )

    async def _settle(
        self,
        group: Sequence[_Part],
        reservation: Reservation,
        *,
        tokens: int,
        cost_micros: int,
        now: float | None,
        deferred: float,
    ) -> None:
        keys: list[Arg] = []
        args: list[Arg] = [
            to_ms(reservation.admitted_at if now is None else now),
            PERIOD_MS,
            reservation.tokens,
            tokens,
            reservation.cost_micros,
            cost_micros,
            reservation.lease_id,
        ]
        for part in group:
            p = part.prefix
            keys += [
                p + "tpm",
                p + "leases",
                p + "day:" + reservation.day,
                p + "month:" + reservation.month,
                p + "cost:" + reservation.month,
            ]
            args += [
                _rate(part.limits.tokens_per_minute),
                int(part.limits.tokens_per_day is not None),
                int(part.limits.tokens_per_month is not None),
                int(part.limits.cost_per_month_micros is not None),
            ]
        await self._client.evalsha(RECONCILE, keys, args, deferred=deferred)

    async def reconcile(
        self,
        reservation: Reservation,
        limits: Limits,
        *,
        tokens: int,
        cost_micros: int,
        now: float,
    ) -> None:
        parts = _parts(reservation.principal, limits, reservation.scopes)
        try:
            for group in self._groups(parts):
                await self._settle(
                    group,
                    reservation,
                    tokens=tokens,
                    cost_micros=cost_micros,
                    now=now,
                    deferred=self._settle_delay,
                )
        except RedisError as exc:
            raise _unavailable("reconcile", exc) from exc

    async def usage(self, principal: str, limits: Limits, now: float) -> UsageSnapshot:
        return await self._usage(_prefix(principal), principal, limits, now)

    async def team_usage(self, team_id: str, limits: Limits, now: float) -> UsageSnapshot:
        return await self._usage(
            _scope_prefix("", Scope("team", team_id, limits)), team_id, limits, now
        )

    async def count_team_spend(self, team_id: str, micros: int, now: float) -> None:
        prefix = _scope_prefix("", Scope("team", team_id, Limits()))
        periods = self._calendar.at(now)
        ttl = max(1, to_ms(periods.month_ends_at) - to_ms(now)) + self._keep_ms
        keys = [prefix + "cost:" + periods.month, prefix + "keys"]
        try:
            await self._client.evalsha(SEED, keys, [max(0, micros), ttl])
        except RedisError as exc:
            raise _unavailable("count_team_spend", exc) from exc

    async def _usage(
        self, prefix: str, principal: str, limits: Limits, now: float
    ) -> UsageSnapshot:
        now_ms = to_ms(now)
        periods = self._calendar.at(now_ms / 1000)
        keys = _keys(prefix, periods.day, periods.month, "")[:6]
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
