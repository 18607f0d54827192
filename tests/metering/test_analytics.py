"""Analytics over the ledger's rollups, on SQLite and PostgreSQL: every query is checked against
sums computed here, in Python, from the raw events written through the ledger.

A few thousand random events (seeded) over 70 days are written once per backend with
``Ledger.write`` (the writer's own insert, which maintains the rollups); each test asks the
analytics a question and answers it again by looping over the events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Table

from citadel.accounts.store import Team, User
from citadel.limits.policy import cost_micros
from citadel.metering import analytics as analytics_module
from citadel.metering.analytics import Analytics
from citadel.metering.events import UsageEvent
from citadel.metering.ledger import Ledger
from citadel.metering.migrate import LEDGER
from citadel.metering.ranges import DIMENSIONS, QueryError, TimeRange, check_group_by, month_range
from citadel.metering.rollups import UsageRow, rollup
from citadel.metering.schema import ROLLUPS, rollup_key
from citadel.settings import (
    Deployment,
    GatewaySettings,
    LimitsSettings,
    Model,
    Price,
    Settings,
    Tier,
)
from citadel.stores.sql import build_engine

from support import scratch_database

NOW = datetime(2024, 6, 20, 15, 37, 12, tzinfo=UTC)
NOW_HOUR = datetime(2024, 6, 20, 15, tzinfo=UTC)
HOUR, DAY = timedelta(hours=1), timedelta(days=1)
EVENTS = 4000

TIERS = (
    Tier(name="free", cost_per_month_usd=5.0),
    Tier(name="standard", cost_per_month_usd=200.0),
    Tier(name="enterprise"),  # unlimited
)


def _deployment(name: str, gpu_hour: float, gpus: int, price: Price | None = None) -> Deployment:
    return Deployment(
        name=name,
        url="http://127.0.0.1:1",
        upstream_model=name,
        gpu_hour_usd=gpu_hour,
        gpus=gpus,
        price=price,
    )


MODELS = (
    Model(
        name="llama",
        deployments=(
            _deployment("llama-a", 2.5, 2),
            _deployment("llama-b", 1.2, 1, Price(input_per_1k=0.0004, output_per_1k=0.0012)),
        ),
        price=Price(input_per_1k=0.0005, output_per_1k=0.0015),
        reference_price=Price(input_per_1k=0.01, output_per_1k=0.03),
    ),
    Model(
        name="mistral",
        deployments=(_deployment("mistral-a", 0.8, 1),),
        price=Price(input_per_1k=0.0002, output_per_1k=0.0006),
        reference_price=Price(input_per_1k=0.002, output_per_1k=0.006),
    ),
    Model(
        name="embed",
        kind="embedding",
        deployments=(_deployment("embed-a", 0.0, 1),),
        price=Price(input_per_1k=0.0001),
    ),
)
# What the ledger holds: the configured deployments, one gone from the settings, and a model
# gone from them altogether.
SERVED = (
    ("llama", "llama-a"),
    ("llama", "llama-b"),
    ("llama", "llama-old"),
    ("mistral", "mistral-a"),
    ("embed", "embed-a"),
    ("retired", "retired-a"),
)
TEAMS = ("team_a", "team_b", "team_c", "team_d", "team_e", "")  # "": no team


def settings(timezone: str = "UTC") -> Settings:
    return Settings(
        gateway=GatewaySettings(admin_key="sk-test"),
        models=MODELS,
        tiers=TIERS,
        limits=LimitsSettings(timezone=timezone),
    )


# -- the events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    id: str
    team: str
    tier: str
    old_tier: str  # the tier of their events before the switch (most never switched)


PEOPLE = [
    Person(
        id=f"usr_{i:03d}",
        team=TEAMS[i % len(TEAMS)],
        tier=TIERS[i % 3].name,
        old_tier=TIERS[(i + 1) % 3].name if i % 7 == 0 else TIERS[i % 3].name,
    )
    for i in range(40)
] + [Person(id="admin", team="", tier="admin", old_tier="admin")]
SWITCH = NOW - timedelta(days=3, hours=5)


def make_events(count: int, seed: int = 7) -> list[UsageEvent]:
    """Random events over the 70 days before NOW, some on exact hour and day boundaries."""
    rng = random.Random(seed)
    start = (NOW - timedelta(days=70)).timestamp()
    events = []
    for i in range(count):
        if i % 50 == 0:  # exactly on a boundary, the instant a bucket starts
            at = float(int(rng.uniform(start, NOW.timestamp()) // 3600) * 3600)
        elif i % 50 == 1:  # the last microsecond-ish before a bucket ends
            at = float(int(rng.uniform(start, NOW.timestamp()) // 86400 + 1) * 86400) - 0.001
        else:
            at = rng.uniform(start, NOW.timestamp())
        at = min(at, NOW.timestamp() - 1)
        person = rng.choice(PEOPLE[:10] * 5 + PEOPLE)  # a few heavy users
        model, deployment = rng.choice(SERVED)
        prompt, completion = rng.randint(0, 4000), rng.randint(0, 2000)
        streamed = rng.random() < 0.4
        events.append(
            UsageEvent(
                event_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                time=at,
                request_id=f"req-{i}",
                user=person.id,
                team=person.team,
                key_id=f"key-{person.id}",
                tier=person.tier if at >= SWITCH.timestamp() else person.old_tier,
                endpoint="/v1/chat/completions",
                model=model,
                deployment=deployment,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_seconds=rng.uniform(0.05, 9.0),
                ttft_seconds=rng.uniform(0.01, 1.0) if streamed else None,
                status=rng.choice((200,) * 12 + (400, 429, 502, 499)),
                streamed=streamed,
                cancelled=False,
                usage_estimated=False,
                cost_micros=cost_micros(
                    Price(input_per_1k=0.0005, output_per_1k=0.0015), prompt, completion
                ),
            )
        )
    return events


ALL = make_events(EVENTS)


# -- the databases ------------------------------------------------------------------------------


async def _load(uri: str, events: Sequence[UsageEvent]) -> None:
    await LEDGER.upgrade(uri)
    engine = build_engine(uri)
    try:
        ledger = Ledger(engine)
        cut = len(events) * 7 // 8
        for start in range(0, cut, 700):
            await ledger.write(events[start : min(start + 700, cut)])
        # Redelivered with new ones: only the new ones are rolled up, in every rollup.
        overlap = events[cut - 300 :]
        assert len(events) - cut == await ledger.write(overlap)
        assert 0 == await ledger.write(events[:100])  # redelivered: counted once
    finally:
        await engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def ledger(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The URI of a ledger holding ALL, on each backend."""
    sqlite_file = tmp_path_factory.mktemp("ledger") / "ledger.db"
    with scratch_database(request.param, sqlite_file, lambda uri: _load(uri, ALL)) as uri:
        yield uri


T = TypeVar("T")


def run(
    uri: str,
    body: Callable[[Analytics], Awaitable[T]],
    rollups: Sequence[tuple[Table, int]] = ROLLUPS,
) -> T:
    async def main() -> T:
        engine = build_engine(uri)
        try:
            return await body(Analytics(engine, rollups=rollups))
        finally:
            await engine.dispose()

    return asyncio.run(main())


# -- the same questions, answered from the raw events ---------------------------------------

_ATTR = {
    "user": "user",
    "team": "team",
    "model": "model",
    "deployment": "deployment",
    "tier": "tier",
}


def _within(events: Sequence[UsageEvent], span: TimeRange) -> list[UsageEvent]:
    start, end = span.start.timestamp(), span.end.timestamp()
    return [e for e in events if start <= e.time < end]


def expected_usage(
    span: TimeRange,
    group_by: Sequence[str],
    bucket: str = "none",
    filters: dict[str, str] | None = None,
) -> dict[tuple[Any, ...], list[float]]:
    width = {"hour": 3600, "day": 86400}.get(bucket)
    sums: dict[tuple[Any, ...], list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0.0, 0.0, 0])
    for e in _within(ALL, span):
        if any(getattr(e, _ATTR[d]) != v for d, v in (filters or {}).items()):
            continue
        when = None if width is None else datetime.fromtimestamp(e.time // width * width, UTC)
        row = sums[(when, *(getattr(e, _ATTR[d]) for d in group_by))]
        row[0] += 1
        row[1] += e.status >= 400
        row[2] += e.prompt_tokens
        row[3] += e.completion_tokens
        row[4] += e.cost_micros
        row[5] += e.latency_seconds * 1000
        if e.ttft_seconds is not None:
            row[6] += e.ttft_seconds * 1000
            row[7] += 1
    return dict(sums)


def actual(rows: Sequence[UsageRow], group_by: Sequence[str]) -> dict[tuple[Any, ...], list[float]]:
    found = {}
    for row in rows:
        if row.requests == 0:  # an ungrouped query over nothing: one row of zeros
            continue
        key = (row.bucket, *(row.keys[d] for d in group_by))
        assert key not in found, f"group {key} answered twice"
        found[key] = [
            row.requests,
            row.errors,
            row.prompt_tokens,
            row.completion_tokens,
            row.cost_micros,
            row.latency_ms_sum,
            row.ttft_ms_sum,
            row.ttft_requests,
        ]
    return found


def assert_same(expected: dict[Any, list[float]], found: dict[Any, list[float]]) -> None:
    assert sorted(expected, key=repr) == sorted(found, key=repr)
    for key, sums in expected.items():
        exact = [sums[i] for i in (0, 1, 2, 3, 4, 7)]
        assert exact == [found[key][i] for i in (0, 1, 2, 3, 4, 7)], key
        # Latencies are REAL (float4) in the ledger: close, not equal.
        assert sums[5] == pytest.approx(found[key][5], rel=1e-6), key
        assert sums[6] == pytest.approx(found[key][6], rel=1e-6, abs=1e-6), key


# Ranges: whole days, hours that split into hourly + daily + hourly parts, one hour, all time.
D0 = datetime(2024, 5, 1, tzinfo=UTC)
RANGES = {
    "whole-days": TimeRange(D0, D0 + 30 * DAY),
    "split": TimeRange(D0 + 5 * HOUR, D0 + 10 * DAY + 19 * HOUR),
    "within-a-day": TimeRange(D0 + 3 * HOUR, D0 + 20 * HOUR),
    "one-hour": TimeRange(D0 + 13 * HOUR, D0 + 14 * HOUR),
    "all": TimeRange(NOW_HOUR - 80 * DAY, NOW_HOUR + 9 * HOUR),  # into the future too
    "empty": TimeRange(D0 - 400 * DAY, D0 - 300 * DAY),
}
GROUPINGS: list[tuple[str, ...]] = [
    (),
    *((d,) for d in DIMENSIONS),
    ("team", "model"),
    ("user", "deployment", "tier"),
    tuple(DIMENSIONS),
]


@pytest.mark.parametrize("group_by", GROUPINGS, ids=lambda g: "+".join(g) or "total")
@pytest.mark.parametrize("name", list(RANGES))
def test_usage_over_a_range_matches_the_events(
    ledger: str, name: str, group_by: tuple[str, ...]
) -> None:
    """Usage grouped any way over any range equals the events' sums in that range."""
    span = RANGES[name]
    dims = check_group_by(group_by)
    rows = run(ledger, lambda a: a.usage(span, group_by=dims))
    assert_same(expected_usage(span, group_by), actual(rows, group_by))
    if not group_by:
        assert 1 == len(rows)


@pytest.mark.parametrize("group_by", [(), ("team",), ("model", "tier")], ids=str)
def test_daily_buckets_match_the_events(ledger: str, group_by: tuple[str, ...]) -> None:
    """Daily buckets over 40 whole days equal the events summed per UTC day."""
    span = TimeRange.checked(D0 - 10 * DAY, D0 + 30 * DAY, "day")
    rows = run(ledger, lambda a: a.usage(span, group_by=check_group_by(group_by), bucket="day"))
    assert_same(expected_usage(span, group_by, "day"), actual(rows, group_by))
    buckets = [r.bucket for r in rows]
    assert buckets == sorted(buckets)  # time first, then the keys


@pytest.mark.parametrize("group_by", [(), ("user",), ("deployment", "tier")], ids=str)
def test_hourly_buckets_match_the_events(ledger: str, group_by: tuple[str, ...]) -> None:
    """Hourly buckets over a week, starting mid-day, equal the events summed per UTC hour."""
    span = TimeRange.checked(D0 + 7 * HOUR, D0 + 7 * DAY + 7 * HOUR, "hour")
    rows = run(ledger, lambda a: a.usage(span, group_by=check_group_by(group_by), bucket="hour"))
    assert_same(expected_usage(span, group_by, "hour"), actual(rows, group_by))


def test_filters_keep_only_matching_events(ledger: str) -> None:
    """A filter on team and model (and one on a user) keeps only their events."""
    span = RANGES["split"]
    filters: dict[Any, str] = {"team": "team_b", "model": "llama"}
    rows = run(ledger, lambda a: a.usage(span, group_by=("user",), filters=filters))
    assert_same(expected_usage(span, ("user",), filters=filters), actual(rows, ("user",)))
    one = {"user": "usr_001"}
    rows = run(
        ledger, lambda a: a.usage(span, group_by=("deployment",), bucket="none", filters=one)
    )  # type: ignore[arg-type]
    assert_same(expected_usage(span, ("deployment",), filters=one), actual(rows, ("deployment",)))


@pytest.mark.parametrize("metric", ["cost", "tokens", "requests", "errors"])
@pytest.mark.parametrize("by", ["user", "team"])
def test_top_users_and_teams(ledger: str, by: str, metric: str) -> None:
    """The top 5 by each metric are the 5 largest sums (ties broken by id), largest first."""
    span = RANGES["split"]
    rows = run(ledger, lambda a: a.top(span, by=check_group_by([by])[0], metric=metric, limit=5))  # type: ignore[arg-type]
    sums = expected_usage(span, (by,))
    index = {"cost": [4], "tokens": [2, 3], "requests": [0], "errors": [1]}[metric]
    ranked = sorted(sums.items(), key=lambda kv: (-sum(kv[1][i] for i in index), kv[0][1]))
    assert [k[1] for k, _ in ranked[:5]] == [r.keys[by] for r in rows]
    assert [sum(v[i] for i in index) for _, v in ranked[:5]] == [
        {"cost": r.cost_micros, "tokens": r.tokens, "requests": r.requests, "errors": r.errors}[
            metric
        ]
        for r in rows
    ]


# -- budgets ------------------------------------------------------------------------------------

CREATED = datetime(2024, 1, 1, tzinfo=UTC)
OVERRIDES: dict[str, dict[str, float | None]] = {
    "usr_001": {"cost_per_month_usd": 1.0},
    "usr_004": {"cost_per_month_usd": None},  # unlimited, though the tier has a budget
    "usr_008": {"tokens_per_day": 100.0},  # not a cost limit: the tier's budget stands
}
USERS = [
    User(
        id=p.id,
        name=f"User {p.id}",
        email=f"{p.id}@example.com",
        team_id=p.team or None,
        tier=p.tier,
        status="active",
        created_at=CREATED,
        overrides=OVERRIDES.get(p.id, {}),
    )
    for p in PEOPLE
    if p.id not in ("admin", "usr_039")  # usr_039: a spender the accounts no longer know
] + [
    User(
        id="usr_idle",
        name="Idle",
        email="idle@example.com",
        team_id="team_quiet",
        tier="standard",
        status="active",
        created_at=CREATED,
    )
]
TEAM_LIST = [Team(id=t, name=t.upper(), created_at=CREATED) for t in TEAMS if t] + [
    Team(id="team_quiet", name="QUIET", created_at=CREATED)
]
BUDGET_USD = {t.name: t.cost_per_month_usd for t in TIERS}


def _user_budget(user: User) -> int | None:
    overrides = user.overrides
    usd = (
        overrides["cost_per_month_usd"]
        if "cost_per_month_usd" in overrides
        else BUDGET_USD[user.tier]
    )
    return None if usd is None else round(usd * 1_000_000)


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Paris", "America/New_York"])
def test_user_budgets_this_month(ledger: str, timezone: str) -> None:
    """Each user's spend this month (in the limits' time zone) against tier and override."""
    span, rows = run(
        ledger,
        lambda a: a.budgets(
            "user", now=NOW, settings=settings(timezone), users=USERS, teams=TEAM_LIST
        ),
    )
    local_start = datetime(2024, 6, 1, tzinfo=ZoneInfo(timezone))
    assert span.start == local_start.astimezone(UTC).replace(minute=0)
    assert span.end == datetime(2024, 6, 20, 16, tzinfo=UTC)
    spent: dict[str, int] = defaultdict(int)
    for e in _within(ALL, span):
        spent[e.user] += e.cost_micros
    by_id = {r.id: r for r in rows}
    assert {u.id for u in USERS} | set(spent) == set(by_id)
    for user in USERS:
        row = by_id[user.id]
        assert (spent.get(user.id, 0), _user_budget(user)) == (row.spent_micros, row.budget_micros)
        if row.budget_micros:
            assert row.spent_micros / row.budget_micros == row.utilisation
    assert by_id["usr_039"].budget_micros is None
    assert "" == by_id["usr_039"].name
    assert by_id["usr_004"].budget_micros is None
    assert 1_000_000 == by_id["usr_001"].budget_micros
    keys = [(-(r.utilisation or 0.0), -r.spent_micros, r.id) for r in rows]
    assert keys == sorted(keys)  # the most used first


def test_team_budgets_this_month(ledger: str) -> None:
    """A team spends what its members' events cost; its budget is the sum of its members'."""
    span, rows = run(
        ledger,
        lambda a: a.budgets("team", now=NOW, settings=settings(), users=USERS, teams=TEAM_LIST),
    )
    spent: dict[str, int] = defaultdict(int)
    for e in _within(ALL, span):
        spent[e.team] += e.cost_micros
    by_id = {r.id: r for r in rows}
    for team in TEAM_LIST:
        members = [u for u in USERS if u.team_id == team.id]
        budgets = [_user_budget(u) for u in members]
        budget = None if None in budgets else sum(b or 0 for b in budgets)
        row = by_id[team.id]
        assert (spent.get(team.id, 0), budget, len(members)) == (
            row.spent_micros,
            row.budget_micros,
            row.members,
        )
    assert 0 == by_id["team_quiet"].spent_micros
    assert 200_000_000 == by_id["team_quiet"].budget_micros
    assert spent[""] == by_id[""].spent_micros  # users without a team, as the ledger says


def test_a_team_with_its_own_budget_is_measured_against_it(ledger: str) -> None:
    """A budget set on the team (the accounts store's, at run time) replaces its members' sum,
    even where a member is unlimited; other teams keep the sum."""
    own = {"team_a": 7_500_000, "team_quiet": 0}
    teams = [dataclasses.replace(t, budget_micros=own.get(t.id)) for t in TEAM_LIST]
    span, rows = run(
        ledger,
        lambda a: a.budgets("team", now=NOW, settings=settings(), users=USERS, teams=teams),
    )
    by_id = {r.id: r for r in rows}
    spent = sum(e.cost_micros for e in _within(ALL, span) if e.team == "team_a")
    assert (spent, 7_500_000) == (by_id["team_a"].spent_micros, by_id["team_a"].budget_micros)
    assert spent / 7_500_000 == by_id["team_a"].utilisation
    assert (0, None) == (by_id["team_quiet"].budget_micros, by_id["team_quiet"].utilisation)
    members = [_user_budget(u) for u in USERS if u.team_id == "team_b"]
    expected = None if None in members else sum(b or 0 for b in members)
    assert expected == by_id["team_b"].budget_micros


# -- deployment costs and savings ---------------------------------------------------------------

GPU = {d.name: (d.gpu_hour_usd, d.gpus) for m in MODELS for d in m.deployments}
REFERENCE = {m.name: m.reference_price for m in MODELS}


def _infra(name: str, seconds: float) -> int:
    gpu_hour, gpus = GPU.get(name, (0.0, 0))
    exact = Fraction(repr(gpu_hour)) * gpus * Fraction(seconds) / 3600 * 1_000_000
    return math.floor(exact + Fraction(1, 2))


def _reference(price: Price | None, prompt: int, completion: int) -> int | None:
    if price is None:
        return None
    exact = (
        Fraction(repr(price.input_per_1k)) * prompt
        + Fraction(repr(price.output_per_1k)) * completion
    )
    return math.ceil(exact * 1000)


@pytest.mark.parametrize("name", ["split", "all"])
def test_deployment_costs_match_the_events(ledger: str, name: str) -> None:
    """Each deployment's tokens and charges equal its events'; its infrastructure cost is its
    GPU-hours over the part of the range passed; per 1k is that over its tokens."""
    span = RANGES[name]
    costs = run(ledger, lambda a: a.deployment_costs(span, now=NOW, settings=settings()))
    first = {}  # the hour each deployment first served in: its GPU-hours count from there
    for e in ALL:
        hour = datetime.fromtimestamp(e.time // 3600 * 3600, UTC)
        first[e.deployment] = min(first.get(e.deployment, hour), hour)
    served: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for e in _within(ALL, span):
        row = served[e.deployment]
        row[0] += 1
        row[1] += e.prompt_tokens
        row[2] += e.completion_tokens
        row[3] += e.cost_micros
    by_name = {c.deployment: c for c in costs}
    assert set(GPU) | set(served) == set(by_name)
    for deployment, cost in by_name.items():
        requests, prompt, completion, charged = served.get(deployment, [0, 0, 0, 0])
        totals = cost.totals
        assert [requests, prompt, completion, charged] == [
            totals.requests,
            totals.prompt_tokens,
            totals.completion_tokens,
            totals.cost_micros,
        ]
        since = max(span.start, first[deployment])
        seconds = max(0.0, (min(span.end, NOW) - since).total_seconds())
        assert first[deployment] == cost.costed_from
        assert _infra(deployment, seconds) == cost.infra_micros
        assert seconds / 3600 == pytest.approx(cost.hours)
        assert cost.configured == (deployment in GPU)
        if prompt + completion:
            assert cost.infra_micros * 1000 / (prompt + completion) == cost.infra_per_1k_micros
        model = {d: m for m, d in SERVED}[deployment]
        assert model == cost.model
        assert _reference(REFERENCE.get(model), prompt, completion) == cost.reference_micros
    assert by_name["llama-a"].infra_micros > 0
    assert 0 == by_name["embed-a"].infra_micros


def test_savings_match_the_events(ledger: str) -> None:
    """Per model: the reference price of its tokens against its deployments' GPU cost."""
    span = RANGES["whole-days"]
    items = run(ledger, lambda a: a.savings(span, now=NOW, settings=settings()))
    seconds = (span.end - span.start).total_seconds()
    tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for e in _within(ALL, span):
        tokens[e.model][0] += e.prompt_tokens
        tokens[e.model][1] += e.completion_tokens
        tokens[e.model][2] += e.cost_micros
    by_model = {s.model: s for s in items}
    assert {"llama", "mistral", "embed", "retired"} == set(by_model)
    for model, item in by_model.items():
        prompt, completion, charged = tokens[model]
        infra = sum(_infra(d, seconds) for m, d in SERVED if m == model)
        reference = _reference(REFERENCE.get(model), prompt, completion)
        assert (prompt, completion, charged) == (
            item.totals.prompt_tokens,
            item.totals.completion_tokens,
            item.totals.cost_micros,
        )
        assert (infra, reference) == (item.infra_micros, item.reference_micros)
        if reference is None:
            assert item.savings_micros is None
            assert item.roi is None
        else:
            assert reference - infra == item.savings_micros
            assert reference - charged == item.savings_vs_charged_micros
            assert (reference - infra) / infra == item.roi


def test_active_users_in_the_last_24_hours(ledger: str) -> None:
    """Users with an event in the 24 hours to the end of the current hour, in all and by tier."""
    total, by_tier = run(ledger, lambda a: a.active_users(NOW))
    span = TimeRange(datetime(2024, 6, 19, 16, tzinfo=UTC), datetime(2024, 6, 20, 16, tzinfo=UTC))
    recent = _within(ALL, span)
    assert len({e.user for e in recent}) == total
    tiers: dict[str, set[str]] = defaultdict(set)
    for e in recent:
        tiers[e.tier].add(e.user)
    assert {t: len(u) for t, u in tiers.items()} == by_tier


def test_too_many_rows_is_a_query_error(ledger: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer longer than MAX_ROWS is refused with advice, not truncated silently."""
    monkeypatch.setattr(analytics_module, "MAX_ROWS", 10)
    with pytest.raises(QueryError, match="more than 10 rows") as caught:
        run(ledger, lambda a: a.usage(RANGES["all"], group_by=("user",)))
    assert "group_by" == caught.value.param


def test_an_unreachable_database_is_store_unavailable(tmp_path: Path) -> None:
    """A ledger database that cannot be reached raises StoreUnavailable("sql", ...)."""
    from citadel.errors import StoreUnavailable

    from support import free_port

    uri = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(StoreUnavailable) as caught:
        run(uri, lambda a: a.usage(RANGES["one-hour"]))
    assert "sql" == caught.value.store


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "bucket", "param", "words"),
    [
        (D0 + DAY, D0, "none", "end", "must be after"),
        (D0, D0, "none", "end", "must be after"),
        (D0 + timedelta(minutes=30), D0 + DAY, "none", "start", "whole UTC hour"),
        (D0, D0 + DAY + timedelta(seconds=1), "none", "end", "whole UTC hour"),
        (D0 + HOUR, D0 + 2 * DAY, "day", "start", "UTC midnight"),
        (D0, D0 + 401 * DAY, "none", "end", "at most 400 days"),
        (D0, D0 + 32 * DAY, "hour", "end", "at most 31 days are allowed with hourly"),
        (D0.replace(tzinfo=None), D0 + DAY, "none", "start", "time zone"),
    ],
)
def test_bad_ranges_name_the_parameter(
    start: datetime, end: datetime, bucket: Any, param: str, words: str
) -> None:
    """A range backwards, empty, unaligned, too long or naive is refused naming the parameter."""
    with pytest.raises(QueryError, match=words) as caught:
        TimeRange.checked(start, end, bucket)
    assert param == caught.value.param


def test_longest_ranges_are_allowed() -> None:
    """Exactly 400 days, and exactly 31 days of hours, are fine; offsets are made UTC."""
    assert TimeRange.checked(D0, D0 + 400 * DAY).end == D0 + 400 * DAY
    TimeRange.checked(D0, D0 + 31 * DAY, "hour")
    paris = datetime(2024, 5, 1, 2, tzinfo=ZoneInfo("Europe/Paris"))
    assert D0 == TimeRange.checked(paris, paris + HOUR).start


@pytest.mark.parametrize(
    ("names", "words"), [(["team", "colour"], "'colour'"), (["team", "team"], "twice")]
)
def test_bad_group_by_is_a_query_error(names: list[str], words: str) -> None:
    """An unknown or repeated grouping is refused naming group_by."""
    with pytest.raises(QueryError, match=words) as caught:
        check_group_by(names)
    assert "group_by" == caught.value.param


def test_a_range_splits_into_hours_days_hours() -> None:
    """Hours up to the first midnight, whole days, then the hours after the last midnight."""
    assert [
        (3600, D0 + 5 * HOUR, D0 + DAY),
        (86400, D0 + DAY, D0 + 10 * DAY),
        (3600, D0 + 10 * DAY, D0 + 10 * DAY + 19 * HOUR),
    ] == RANGES["split"].parts("none")
    assert [(3600, D0 + 3 * HOUR, D0 + 20 * HOUR)] == RANGES["within-a-day"].parts("none")
    assert [(86400, D0, D0 + 30 * DAY)] == RANGES["whole-days"].parts("day")


@pytest.mark.parametrize(
    ("needed", "name"),
    [
        ((), "deployment"),
        (("team_id",), "team"),
        (("team_id", "model"), "team"),
        (("team_id", "tier"), "team"),
        (("model",), "deployment"),
        (("deployment", "model"), "deployment"),
        (("tier",), "deployment"),
        (("user_id",), "user"),
        (("user_id", "tier"), "user"),
        (("user_id", "team_id"), "user"),
        (("team_id", "deployment"), ""),
        (("user_id", "model"), ""),
        (("user_id", "team_id", "model", "deployment", "tier"), ""),
    ],
)
def test_the_rollup_read_is_the_narrowest_with_every_column_asked_for(
    needed: tuple[str, ...], name: str
) -> None:
    """Each width has a rollup with every dimension, and the narrowest that has them is read;
    an impossible question is a LookupError."""
    suffix = f"_{name}" if name else ""
    assert f"usage_hourly{suffix}" == rollup(3600, needed).name
    assert f"usage_daily{suffix}" == rollup(86400, needed).name
    with pytest.raises(LookupError, match="colour"):
        rollup(86400, {"colour"})


def _subsets(key: Sequence[str]) -> list[tuple[str, ...]]:
    """(), each dimension of a rollup's key alone, and all of them."""
    dims = [d for d in DIMENSIONS if _COLUMNS[d] in key]
    return [(), *((d,) for d in dims), tuple(dims)]


_COLUMNS = {d: "user_id" if d == "user" else "team_id" if d == "team" else d for d in DIMENSIONS}
# Each family of rollups (hourly and daily), read alone: every query it can answer.
FAMILIES = {
    rollup_key(hourly): ((hourly, 3600), (daily, 86400))
    for (hourly, _), (daily, _) in zip(ROLLUPS[::2], ROLLUPS[1::2], strict=True)
}
FAMILY_CASES = [
    pytest.param(key, group_by, range_name, id=f"{'+'.join(key)}:{'+'.join(group_by)}:{range_name}")
    for key in FAMILIES
    for group_by in _subsets(key)
    for range_name in ("split", "whole-days", "within-a-day")
]


@pytest.mark.parametrize(("key", "group_by", "range_name"), FAMILY_CASES)
def test_each_rollup_answers_like_the_events(
    ledger: str, key: tuple[str, ...], group_by: tuple[str, ...], range_name: str
) -> None:
    """Each rollup, full or narrow, hourly and daily, read on its own (not only when it is the
    narrowest), answers every grouping of its key like the events: ranges of hours + days +
    hours, whole days, hours within a day; and hourly and daily buckets."""
    rollups = FAMILIES[key]
    span = RANGES[range_name]
    dims = check_group_by(group_by)

    async def body(narrow: Analytics) -> tuple[list[UsageRow], ...]:
        plain = await narrow.usage(span, group_by=dims)
        hourly = await narrow.usage(
            TimeRange(span.start, min(span.end, span.start + 3 * DAY)), group_by=dims, bucket="hour"
        )
        days = TimeRange(span.start.replace(hour=0), span.end.replace(hour=0) + DAY)
        daily = await narrow.usage(days, group_by=dims, bucket="day")
        return plain, hourly, daily

    plain, hourly, daily = run(ledger, body, rollups)
    assert_same(expected_usage(span, group_by), actual(plain, group_by))
    three_days = TimeRange(span.start, min(span.end, span.start + 3 * DAY))
    assert_same(expected_usage(three_days, group_by, "hour"), actual(hourly, group_by))
    days = TimeRange(span.start.replace(hour=0), span.end.replace(hour=0) + DAY)
    assert_same(expected_usage(days, group_by, "day"), actual(daily, group_by))


def test_month_range_starts_at_the_local_first_of_the_month() -> None:
    """This month in UTC and in New York (4 hours behind in June), to the end of this hour."""
    assert TimeRange(
        datetime(2024, 6, 1, tzinfo=UTC), datetime(2024, 6, 20, 16, tzinfo=UTC)
    ) == month_range(NOW, "UTC")
    assert datetime(2024, 6, 1, 4, tzinfo=UTC) == month_range(NOW, "America/New_York").start
    first = datetime(2024, 6, 1, 0, 0, 0, tzinfo=UTC)
    assert TimeRange(first, first + HOUR) == month_range(first, "UTC")


# -- a new install: GPU-hours from the first traffic on -------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def new_install(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A ledger whose only traffic is 24 requests to llama-a in the current hour (a refused one
    among them, with no deployment), nothing before."""
    first = NOW_HOUR + timedelta(minutes=5)
    events = [
        UsageEvent(
            event_id=uuid.UUID(int=i + 1).hex,
            time=(first + timedelta(seconds=60 * i)).timestamp(),
            request_id=f"new-{i}",
            user="usr_new",
            team="team_new",
            key_id="key-new",
            tier="free",
            endpoint="chat",
            model="llama",
            deployment="" if i == 23 else "llama-a",
            prompt_tokens=0 if i == 23 else 100,
            completion_tokens=0 if i == 23 else 50,
            latency_seconds=0.2,
            ttft_seconds=None,
            status=429 if i == 23 else 200,
            streamed=False,
            cancelled=False,
            usage_estimated=False,
            cost_micros=0 if i == 23 else 125,
            reason="requests_per_minute" if i == 23 else "",
            refused=i == 23,
        )
        for i in range(24)
    ]
    with scratch_database(
        request.param, tmp_path / "new.db", lambda uri: _load(uri, events)
    ) as uri:
        yield uri


def test_a_new_install_is_charged_gpu_hours_from_its_first_traffic(new_install: str) -> None:
    """24 requests in the current hour: llama-a costs the 37 minutes since that hour began, not
    30 days; the deployments that never served cost nothing; the month to date (the business
    metrics' window) and the default 30 days agree, as do the savings."""
    thirty_days = TimeRange(NOW_HOUR + HOUR - 30 * DAY, NOW_HOUR + HOUR)
    month = month_range(NOW, "UTC")

    def costs_over(span: TimeRange) -> dict[str, Any]:
        found = run(new_install, lambda a: a.deployment_costs(span, now=NOW, settings=settings()))
        return {c.deployment: c for c in found}

    by_window = {"30d": costs_over(thirty_days), "month": costs_over(month)}
    costs = by_window["30d"]
    assert "" not in costs  # the refusal was answered by no deployment: no cost line
    llama = costs["llama-a"]
    seconds = (NOW - NOW_HOUR).total_seconds()
    assert NOW_HOUR == llama.costed_from
    assert _infra("llama-a", seconds) == llama.infra_micros  # $2.50 x 2 GPUs x 37.2 min
    assert seconds / 3600 == pytest.approx(llama.hours)
    assert (23, 2300, 1150) == (
        llama.totals.requests,
        llama.totals.prompt_tokens,
        llama.totals.completion_tokens,
    )
    for name in ("llama-b", "mistral-a"):
        assert (None, 0, 0.0) == (
            costs[name].costed_from,
            costs[name].infra_micros,
            costs[name].hours,
        )
    assert {n: c.infra_micros for n, c in costs.items()} == {
        n: c.infra_micros for n, c in by_window["month"].items()
    }
    savings = {
        s.model: s
        for s in run(new_install, lambda a: a.savings(thirty_days, now=NOW, settings=settings()))
    }
    assert llama.infra_micros == savings["llama"].infra_micros
    # 2300 input and 1150 output tokens at $0.01 and $0.03 per 1k: $0.0575, against ~$3.10.
    assert 57_500 == savings["llama"].reference_micros
    roi = savings["llama"].roi
    assert roi is not None
    assert -1 < roi < -0.9  # still a loss this early, but the loss of 37 minutes, not 30 days
