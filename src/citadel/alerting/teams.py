"""Ledger rules' teams, given by id or by name, resolved against the accounts store at start.

    settings = await resolve_teams(settings, accounts)

A rule's ``ledger.team`` may be the team's id (``team_...``) or its name: a name becomes the id
(the ledger records ids), so the rule watches the team it names. A team the store does not know
is a ``ConfigError`` naming ``alerting.rules[i].ledger.team`` and the teams it could have been,
so the service refuses to start rather than watch nothing.
"""

from __future__ import annotations

from dataclasses import replace

from citadel.accounts.store import AccountStore, Team
from citadel.alerting.definitions import AlertingSettings, Rule
from citadel.errors import ConfigError

__all__ = ["resolve_teams"]


def _known(teams: list[Team]) -> str:
    shown = ", ".join(f"{t.name} ({t.id})" for t in teams[:20])
    more = f" and {len(teams) - 20} more" if len(teams) > 20 else ""
    return shown + more if teams else "none yet"


async def resolve_teams(settings: AlertingSettings, accounts: AccountStore) -> AlertingSettings:
    """``settings`` with every ledger rule's team as an id; ConfigError for a team the accounts
    store has under neither id nor name. (StoreUnavailable if the store cannot be read.)"""
    rules = settings.rules
    if not any(r.ledger is not None and r.ledger.team is not None for r in rules):
        return settings
    teams = await accounts.list_teams()
    by_id = {t.id: t for t in teams}
    by_name = {t.name: t for t in teams}
    resolved: list[Rule] = []
    index = -1  # the rule's place in alerting.rules (the defaults come first and have no team)
    for rule in rules:
        index += not rule.default
        ledger = rule.ledger
        if ledger is None or ledger.team is None or ledger.team in by_id:
            resolved.append(rule)
            continue
        team = by_name.get(ledger.team)
        if team is None:
            raise ConfigError(
                f"alerting.rules[{index}].ledger.team",
                ledger.team,
                f"the id or name of a team in the accounts store (teams: {_known(teams)})",
            )
        resolved.append(replace(rule, ledger=replace(ledger, team=team.id)))
    return replace(settings, rules=tuple(resolved))
