"""A team budget set mid-month counts the month's spend the usage ledger already holds
(the rate-limiting app in-process over SQLite, the limiter in memory and in real Redis)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from citadel.accounts.sql import open_store
from citadel.limits.app import create_app, default_deps
from citadel.metering.ledger import Ledger
from citadel.metering.migrate import LEDGER
from citadel.settings import load_settings
from citadel.stores.sql import build_engine

from support import usage_event

ADMIN = "sk-test-admin-ledger"
REDIS = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/8")


async def _seed(uri: str, now: float) -> str:
    """A team whose member spent $0.30 this month before any budget; its id."""
    await LEDGER.upgrade(uri)
    store = await open_store(uri, migrate=True)
    try:
        team = await store.create_team(f"t-{uuid.uuid4().hex}")
    finally:
        await store.aclose()
    engine = build_engine(uri)
    try:
        events = [
            usage_event(time=now - 120 - i, user="usr_x", team=team.id, cost_micros=100_000)
            for i in range(3)
        ]
        await Ledger(engine).write(events)
    finally:
        await engine.dispose()
    return team.id


@pytest.mark.parametrize("backend", ["memory://", REDIS])
def test_a_budget_set_mid_month_counts_the_months_spend_already_in_the_ledger(
    tmp_path: Path, backend: str
) -> None:
    """$0.30 spent before a $1 budget is set: the budget shows $0.30 spent and $0.70 left, and
    setting it again (raised to $2) counts nothing twice."""
    uri = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    config = tmp_path / "citadel.yaml"
    config.write_text(f'accounts: {{database: "{uri}"}}\nlimits: {{backend: "{backend}"}}\n')
    settings = load_settings(str(config), {"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test"})

    async def main() -> tuple[dict[str, float], dict[str, float]]:
        team_id = await _seed(uri, time.time())
        app = create_app(settings, default_deps(settings))
        headers = {"authorization": f"Bearer {ADMIN}"}
        async with AsyncTestClient(app) as client:
            path = f"/v1/teams/{team_id}/budget"
            first = await client.put(path, json={"budget_usd": 1.0}, headers=headers)
            assert 200 == first.status_code, first.text
            again = await client.put(path, json={"budget_usd": 2.0}, headers=headers)
            assert 200 == again.status_code, again.text
            return first.json(), again.json()

    first, again = asyncio.run(main())
    assert (0.3, 0.7) == (first["spent_usd"], first["remaining_usd"])
    assert (0.3, 1.7) == (again["spent_usd"], again["remaining_usd"])


# Strawberry's Litestar handler leaves its `context` and `root_value` dependencies inferred
# (their code, not ours)
@pytest.mark.filterwarnings("ignore:.*Inferred dependency field")
def test_a_budget_set_through_graphql_counts_the_months_spend_too(tmp_path: Path) -> None:
    """GraphQL's updateTeam(budgetUsd:) starts the team's counter where the REST PUT does: at
    the month's spend in the ledger (read back through the rate-limiting API, same Redis)."""
    from citadel.graphql.app import create_app as create_graphql
    from citadel.graphql.app import default_deps as graphql_deps

    uri = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"
    config = tmp_path / "citadel.yaml"
    config.write_text(f'accounts: {{database: "{uri}"}}\nlimits: {{backend: "{REDIS}"}}\n')
    settings = load_settings(str(config), {"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test"})
    headers = {"authorization": f"Bearer {ADMIN}"}

    async def main() -> dict[str, float]:
        team_id = await _seed(uri, time.time())
        mutation = "mutation ($id: ID!) { updateTeam(id: $id, input: {budgetUsd: 1}) { id } }"
        async with AsyncTestClient(create_graphql(settings, graphql_deps(settings))) as graphql:
            reply = await graphql.post(
                "/graphql",
                json={"query": mutation, "variables": {"id": team_id}},
                headers=headers,
            )
            assert 200 == reply.status_code, reply.text
            assert "errors" not in reply.json(), reply.text
        async with AsyncTestClient(create_app(settings, default_deps(settings))) as rest:
            budget = await rest.get(f"/v1/teams/{team_id}/budget", headers=headers)
            assert 200 == budget.status_code, budget.text
            shown: dict[str, float] = budget.json()
            return shown

    shown = asyncio.run(main())
    assert (1.0, 0.3, 0.7) == (shown["budget_usd"], shown["spent_usd"], shown["remaining_usd"])
