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


def _app_rules(tmp_path: Path, team: str) -> list[dict[str, object]]:
    """The rules /v1/rules of the alerting app (in-process) answers, its rule watching
    ``team``, after a start against a store that has a team named research."""
    from litestar.testing import AsyncTestClient

    from citadel.alerting.app import AlertingDeps, create_app
    from citadel.settings import load_settings

    tmp_path.mkdir()
    uri = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    config = tmp_path / "citadel.yaml"
    config.write_text(
        f'accounts: {{database: "{uri}"}}\n'
        "alerting:\n  defaults: false\n  rules:\n"
        "    - {name: Budget, kind: forecast, threshold: 5, horizon_seconds: month_end,\n"
        f"       ledger: {{metric: team_spend, team: {team}}}}}\n"
    )
    settings = load_settings(str(config), {"CITADEL_ADMIN_KEY": "sk-a", "CITADEL_ENV": "test"})

    async def run() -> list[dict[str, object]]:
        store = await open_store(uri, migrate=True)
        await store.create_team("research")
        app = create_app(settings, AlertingDeps(accounts=store, run_scheduler=False))
        try:
            async with AsyncTestClient(app) as client:
                reply = await client.get("/v1/rules", headers={"authorization": "Bearer sk-a"})
                rules: list[dict[str, object]] = reply.json()["data"]
                return rules
        finally:
            await store.aclose()

    return asyncio.run(run())


def test_the_service_watches_a_named_team_by_id_and_will_not_start_on_an_unknown_one(
    tmp_path: Path,
) -> None:
    """/v1/rules shows the named team's id; an unknown team stops the start (ConfigError)."""
    [rule] = _app_rules(tmp_path / "named", "research")
    assert isinstance(rule["ledger"], dict)
    assert str(rule["ledger"]["team"]).startswith("team_")
    with pytest.raises(BaseException) as caught:  # noqa: PT011 - the lifespan wraps it in a group
        _app_rules(tmp_path / "unknown", "nope")
    [error] = _leaves(caught.value)
    assert isinstance(error, ConfigError), error
    assert "alerting.rules[0].ledger.team" == error.key


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def test_graphqls_alerting_view_resolves_team_names_too(tmp_path: Path) -> None:
    """GraphQL evaluates the alerting rules in place: its rule given by team name watches that
    team's id as the predictive-alerting service's does."""
    from citadel.graphql.alerting import AlertingView
    from citadel.metering.analytics import Analytics
    from citadel.metering.migrate import LEDGER
    from citadel.settings import load_settings
    from citadel.stores.sql import build_engine

    uri = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    config = tmp_path / "citadel.yaml"
    config.write_text(
        f'accounts: {{database: "{uri}"}}\n'
        "alerting:\n  defaults: false\n  rules:\n"
        "    - {name: Research, kind: forecast, threshold: 5, horizon_seconds: month_end,\n"
        "       ledger: {metric: team_spend, team: research}}\n"
    )
    settings = load_settings(str(config), {"CITADEL_ENV": "test"})

    async def run() -> tuple[str, str | None]:
        await LEDGER.upgrade(uri)
        store = await open_store(uri, migrate=True)
        engine = build_engine(uri)
        try:
            team = await store.create_team("research")
            view = AlertingView(settings, Analytics(engine), accounts=store)
            await view.refresh()
            [rule] = view.settings.rules
            assert rule.ledger is not None
            assert view.scheduler.settings is view.settings
            return team.id, rule.ledger.team
        finally:
            await engine.dispose()
            await store.aclose()

    team_id, watched = asyncio.run(run())
    assert team_id == watched
