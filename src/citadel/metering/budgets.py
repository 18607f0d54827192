"""Budget use: each user's or team's spend this month set against the monthly cost budget the
limiter enforces.

A user's budget is its ``cost_per_month_usd`` (tier, then override). A team's is its own, when one
is set in the accounts store (``citadel teams budget``), else the sum of its members' (unlimited
when any member's is). Spenders the accounts store does not know are listed without a budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from citadel.accounts.store import Team, User
from citadel.limits.policy import effective_limits
from citadel.settings import Tier

__all__ = ["BudgetUse", "budget_use"]


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetUse:
    """How much of its monthly cost budget a user or a team has spent."""

    scope: Literal["user", "team"]
    id: str
    name: str
    spent_micros: int
    budget_micros: int | None  # None: unlimited
    team_id: str | None = None  # users only
    tier: str | None = None  # users only
    members: int | None = None  # teams only

    @property
    def utilisation(self) -> float | None:
        """Spent over budget (1.0: all of it); None when there is no positive budget."""
        if not self.budget_micros or self.budget_micros <= 0:
            return None
        return self.spent_micros / self.budget_micros

    @property
    def remaining_micros(self) -> int | None:
        if self.budget_micros is None:
            return None
        return max(0, self.budget_micros - self.spent_micros)


def _user_budget(user: User, tiers: Mapping[str, Tier]) -> int | None:
    tier = tiers.get(user.tier)
    if tier is None:
        return None  # a tier no longer configured: no budget the limiter could enforce
    return effective_limits(tier, user.overrides).cost_per_month_micros


def budget_use(
    scope: Literal["user", "team"],
    *,
    spent: Mapping[str, int],
    users: Sequence[User],
    teams: Sequence[Team],
    tiers: Sequence[Tier],
) -> list[BudgetUse]:
    """Each user's (or team's) spend against its budget, the most used first. Spenders the
    accounts store does not know (the admin key, say) are listed too, without a budget."""
    by_tier = {t.name: t for t in tiers}
    rows: list[BudgetUse] = []
    if scope == "user":
        known = set()
        for user in users:
            known.add(user.id)
            rows.append(
                BudgetUse(
                    scope="user",
                    id=user.id,
                    name=user.name,
                    spent_micros=spent.get(user.id, 0),
                    budget_micros=_user_budget(user, by_tier),
                    team_id=user.team_id,
                    tier=user.tier,
                )
            )
        rows += [
            BudgetUse(scope="user", id=uid, name="", spent_micros=amount, budget_micros=None)
            for uid, amount in spent.items()
            if uid not in known
        ]
    else:
        members: dict[str, list[User]] = {}
        for user in users:
            if user.team_id is not None:
                members.setdefault(user.team_id, []).append(user)
        known = set()
        for team in teams:
            known.add(team.id)
            budgets = [_user_budget(u, by_tier) for u in members.get(team.id, [])]
            total = None if any(b is None for b in budgets) else sum(b or 0 for b in budgets)
            if team.budget_micros is not None:  # the team's own, set at run time
                total = team.budget_micros
            rows.append(
                BudgetUse(
                    scope="team",
                    id=team.id,
                    name=team.name,
                    spent_micros=spent.get(team.id, 0),
                    budget_micros=total,
                    members=len(budgets),
                )
            )
        rows += [
            BudgetUse(scope="team", id=tid, name="", spent_micros=amount, budget_micros=None)
            for tid, amount in spent.items()
            if tid not in known
        ]
    rows.sort(key=lambda r: (-(r.utilisation or 0.0), -r.spent_micros, r.id))
    return rows
