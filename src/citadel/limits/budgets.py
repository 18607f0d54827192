"""A team budget set mid-month starts from what the team already spent this month.

The usage ledger holds that spend; ``count_ledger_spend`` raises the limiter's team counter to
it (only ever raised, so setting a budget again never counts anything twice). The rate-limiting
API's ``PUT /v1/teams/{id}/budget`` and GraphQL's ``updateTeam(budgetUsd:)`` both call it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from citadel.errors import CitadelError
from citadel.limits.decision import Limiter
from citadel.metering.analytics import Analytics
from citadel.metering.ranges import month_range

__all__ = ["LedgerTeamSpend", "TeamSpend", "count_ledger_spend"]

_log = logging.getLogger("citadel.limits")


class TeamSpend(Protocol):
    """The usage ledger's view of a team's spend."""

    async def month_to_date(self, team_id: str, now: float) -> int:
        """Micro-USD the team's members spent this month (in ``limits.timezone``)."""
        ...


class LedgerTeamSpend:
    """A team's spend this month (``limits.timezone``) as the usage ledger holds it."""

    def __init__(self, analytics: Analytics, timezone: str) -> None:
        self._analytics = analytics
        self._timezone = timezone

    async def month_to_date(self, team_id: str, now: float) -> int:
        span = month_range(datetime.fromtimestamp(now, UTC), self._timezone)
        rows = await self._analytics.usage(span, group_by=("team",), filters={"team": team_id})
        return sum(int(row.cost_micros) for row in rows)


async def count_ledger_spend(
    team_id: str, limiter: Limiter, ledger: TeamSpend | None, now: float
) -> None:
    """Raise the team's budget counter to the ledger's month-to-date spend. No ledger: the
    budget counts from now; a ledger that cannot be read leaves the counter, with a warning."""
    if ledger is None:
        return
    try:
        spent = await ledger.month_to_date(team_id, now)
    except (SQLAlchemyError, CitadelError) as exc:
        _log.warning(
            "the team's spend so far could not be read from the ledger",
            extra={"team": team_id, "error": str(exc)},
        )
        return
    await limiter.count_team_spend(team_id, spent, now)
