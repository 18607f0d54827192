"""No N+1: the SQL statements of a nested query do not grow with its rows. The schema runs
in-process over PostgreSQL with 1, 10 and 100 users (in 1, 5 and 20 teams, each with a key and
ledger events), and SQLAlchemy's cursor events count every statement sent."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import event

from citadel.accounts.auth import ADMIN
from citadel.accounts.sql import SqlAccountStore
from citadel.feed import MemoryFeed
from citadel.graphql.context import Context, Services, Viewer
from citadel.graphql.schema import build_schema
from citadel.limits.backend import create_limiter
from citadel.metering.analytics import Analytics
from citadel.metering.ledger import Ledger
from citadel.metering.migrate import LEDGER
from citadel.metrics import Registry
from citadel.routing.router import Router
from citadel.settings import load_settings
from citadel.stores.sql import build_engine

from support import scratch_postgres, usage_event

QUERY = """
{ teams(first: 100) { totalCount nodes { name usage { requests costUsd }
    users(first: 100) { nodes { name team { name } limits { requestsPerMinute }
      quota { name used } usage { requests costUsd }
      keys(first: 100) { nodes { prefix revoked } } } } } }
  users(first: 100) { nodes { id team { id } } } }
"""


async def _statements(uri: str, teams: int, users: int, tmp: Path) -> tuple[int, dict[str, Any]]:
    from citadel.accounts.migrate import ACCOUNTS

    await ACCOUNTS.upgrade(uri)
    await LEDGER.upgrade(uri)
    config = tmp / f"citadel-{users}.yaml"
    config.write_text(f'accounts: {{database: "{uri}"}}\nlimits: {{backend: "memory://"}}\n')
    settings = load_settings(str(config), {})
    engine = build_engine(uri)
    store = SqlAccountStore(engine)
    now = time.time()
    made = [await store.create_team(f"T{t} {uuid.uuid4().hex[:6]}") for t in range(teams)]
    events = []
    for u in range(users):
        team = made[u % teams]
        user = await store.create_user(
            name=f"U{u}", email=f"{uuid.uuid4().hex}@example.com", tier="free", team_id=team.id
        )
        key, _ = await store.create_key(user.id, name="k")
        events.append(
            usage_event(time=now - 3600, user=user.id, team=team.id, key_id=key.id, cost_micros=9)
        )
    await Ledger(engine).write(events)
    limiter = create_limiter("memory://", timezone="UTC", lease_ttl=60, timeout=1)
    services = Services(
        settings=settings,
        accounts=store,
        analytics=Analytics(engine),
        limiter=limiter,
        router=Router(settings, registry=Registry()),
        feed=MemoryFeed(),
    )
    count = 0

    def counted(*_args: object) -> None:
        nonlocal count
        count += 1

    event.listen(engine.sync_engine, "before_cursor_execute", counted)
    try:
        result = await build_schema(max_cost=10**7).execute(
            QUERY, context_value={"citadel": Context(services, Viewer(ADMIN))}
        )
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", counted)
        await limiter.aclose()
        await store.aclose()
    assert result.errors is None, result.errors
    assert result.data is not None
    return count, result.data


def test_statements_do_not_grow_with_rows(tmp_path: Path) -> None:
    counts = {}
    for teams, users in ((1, 1), (5, 10), (20, 100)):
        with scratch_postgres() as uri:
            count, data = asyncio.run(_statements(uri, teams, users, tmp_path))
        assert teams == data["teams"]["totalCount"]
        members = [u for t in data["teams"]["nodes"] for u in t["users"]["nodes"]]
        assert users == len(members)
        assert users == len(data["users"]["nodes"])
        assert all(1 == u["usage"]["requests"] for u in members)
        assert all(1 == len(u["keys"]["nodes"]) for u in members)
        assert all(u["team"] is not None for u in members)
        counts[users] = count
    # the teams, the users, the keys, and one usage query for users and one for teams: the
    # same for 1 user as for 100
    assert 1 == len(set(counts.values())), counts
    assert counts[1] <= 8, counts  # 5 when measured
