"""Ledger rules' teams by id or name, resolved against a real accounts store (SQLite)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from citadel.accounts.sql import open_store
from citadel.alerting.definitions import AlertingSettings, parse_alerting
from citadel.alerting.teams import resolve_teams
from citadel.errors import ConfigError


def _rules(*teams: str) -> AlertingSettings:
    return parse_alerting({"rules": [
        {"name": f"Budget{i}", "kind": "forecast", "threshold": 5,
         "ledger": {"metric": "team_spend", "team": team}, "horizon_seconds": "month_end"}
        for i, team in enumerate(teams)]})  # fmt: skip


def _resolve(tmp_path: Path, settings: AlertingSettings) -> tuple[str, AlertingSettings]:
    async def run() -> tuple[str, AlertingSettings]:
        store = await open_store(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", migrate=True)
        try:
            team = await store.create_team("research")
            return team.id, await resolve_teams(settings, store)
        finally:
            await store.aclose()

    return asyncio.run(run())


def test_a_team_given_by_name_watches_that_teams_id(tmp_path: Path) -> None:
    """`team: research` becomes the team's id, the id the ledger records."""
    team_id, settings = _resolve(tmp_path, _rules("research"))
    [rule] = settings.rules
    assert rule.ledger is not None
    assert team_id == rule.ledger.team


def test_an_unknown_team_is_refused_naming_the_key_and_the_known_teams(tmp_path: Path) -> None:
    """A team neither id nor name of a team in the store is a ConfigError at load time."""
    with pytest.raises(ConfigError) as caught:
        _resolve(tmp_path, _rules("research", "nope"))
    assert "alerting.rules[1].ledger.team" == caught.value.key
    assert "research (team_" in str(caught.value)
