"""The custom-metrics service as a real process: `citadel serve custom-metrics` over a ledger
seeded with known events (SQLite), one variant draining a Redis stream into PostgreSQL with the
ledger writer in-process, and one with the database unreachable.

Figures are checked against sums computed here from the events seeded.
"""

from __future__ import annotations

import asyncio
import csv
import http.client
import io
import os
import random
import re
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from litestar.testing import AsyncTestClient

from citadel.accounts.sql import open_store
from citadel.metering.analytics import Analytics
from citadel.metering.app import MeteringDeps, create_app
from citadel.metering.events import UsageEvent
from citadel.metering.ledger import Ledger, encode_event
from citadel.metering.migrate import LEDGER
from citadel.metering.writer import WriterStats
from citadel.settings import load_settings
from citadel.stores.redis import RedisClient
from citadel.stores.sql import build_engine

from conformance import Conformance
from support import free_port, process_output, scratch_postgres, start_process, stop_process

ADMIN = "sk-test-admin"
ENV = {"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test", "REDIS_ENDPOINT": ""}
REDIS = "redis://127.0.0.1:6379/11"
CONFIG = """
models:
  - name: llama
    price: {{input_per_1k: 0.0005, output_per_1k: 0.0015}}
    reference_price: {{input_per_1k: 0.01, output_per_1k: 0.03}}
    deployments:
      - {{name: llama-a, url: "http://127.0.0.1:9", gpu_hour_usd: 2.5, gpus: 2}}
      - {{name: llama-b, url: "http://127.0.0.1:9", gpu_hour_usd: 1.0}}
  - name: mistral
    price: {{input_per_1k: 0.0002, output_per_1k: 0.0006}}
    deployments:
      - {{name: mistral-a, url: "http://127.0.0.1:9", gpu_hour_usd: 0.8}}
tiers:
  free: {{cost_per_month_usd: 5}}
  standard: {{cost_per_month_usd: 200}}
  enterprise: {{}}
accounts:
  database: "{database}"
  default_tier: free
limits:
  backend: "memory://"
{extra}
"""
SERVED = (("llama", "llama-a"), ("llama", "llama-b"), ("mistral", "mistral-a"))
ROUTES = [
    "/v1/usage",
    "/v1/top",
    "/v1/budgets",
    "/v1/deployments/costs",
    "/v1/savings",
]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.json()["error"]
        return error

    def csv(self) -> list[list[str]]:
        return list(csv.reader(io.StringIO(self.body.decode())))


@dataclass(frozen=True)
class Service:
    port: int
    document: Conformance | None = None

    def get(self, path: str, key: str | None = ADMIN, **params: object) -> Reply:
        headers = {} if key is None else {"authorization": f"Bearer {key}"}
        query = f"?{urlencode(params)}" if params else ""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path + query, headers=headers)
            response = conn.getresponse()
            reply = Reply(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        finally:
            conn.close()
        if self.document is not None:  # every reply is checked against the served document
            content_type = reply.headers.get("content-type", "")
            self.document.check("GET", path, reply.status, reply.body, content_type)
        return reply


# -- the data -----------------------------------------------------------------------------------

NOW = time.time()
TODAY = datetime.fromtimestamp(NOW, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
MONTH = TODAY.replace(day=1)


@dataclass(frozen=True)
class Person:
    id: str
    team: str
    tier: str


def make_events(people: list[Person], count: int, seed: int = 11) -> list[UsageEvent]:
    """Events over the 40 days before now; none from 26 hours to 10 minutes ago, so that
    "active in the last 24 hours" does not depend on when in the hour the test runs."""
    rng = random.Random(seed)
    events = []
    for i in range(count):
        recent = i % 10 == 0
        at = NOW - (rng.uniform(60, 600) if recent else rng.uniform(26 * 3600, 40 * 86400))
        person = rng.choice(people)
        model, deployment = rng.choice(SERVED)
        prompt, completion = rng.randint(1, 3000), rng.randint(0, 1500)
        status = rng.choice((200, 200, 200, 500))
        refused = i % 13 == 5  # refused by a limit: a 429, no upstream asked
        events.append(
            UsageEvent(
                event_id=uuid.uuid4().hex,
                time=at,
                request_id=f"req-{i}",
                user=person.id,
                team=person.team,
                key_id="key",
                tier=person.tier,
                endpoint="/v1/chat/completions",
                model=model,
                deployment=deployment,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_seconds=rng.uniform(0.1, 3.0),
                ttft_seconds=None,
                status=429 if refused else status,
                streamed=False,
                cancelled=False,
                usage_estimated=False,
                cost_micros=rng.randint(1, 20_000),
                reason="requests_per_minute" if refused else "" if status < 400 else "upstream_500",
                refused=refused,
            )
        )
    return events


async def _seed(uri: str, count: int) -> tuple[list[Person], list[UsageEvent]]:
    """Teams and users in the accounts store, and events of theirs in the ledger."""
    await LEDGER.upgrade(uri)
    store = await open_store(uri, migrate=True)
    try:
        people = []
        for t in range(3):
            team = await store.create_team(f"Team {t} {uuid.uuid4().hex[:6]}")
            for u in range(4):
                tier = ("free", "standard", "enterprise")[u % 3]
                user = await store.create_user(
                    name=f"U{t}{u}", email=f"{uuid.uuid4().hex}@example.com", tier=tier,
                    team_id=team.id,
                )  # fmt: skip
                people.append(Person(user.id, team.id, tier))
        loner = await store.create_user(name="Solo", email=f"{uuid.uuid4().hex}@x.io", tier="free")
        people.append(Person(loner.id, "", "free"))
    finally:
        await store.aclose()
    events = make_events(people, count)
    engine = build_engine(uri)
    try:
        await Ledger(engine).write(events)
    finally:
        await engine.dispose()
    return people, events


def _config(tmp: Path, database: str, extra: str = "") -> str:
    path = tmp / "citadel.yaml"
    path.write_text(CONFIG.format(database=database, extra=extra), encoding="utf-8")
    return str(path)


def _command(config: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "citadel", "--config", config,
        "serve", "custom-metrics", "--port", str(port),
    ]  # fmt: skip


@dataclass(frozen=True)
class Seeded:
    service: Service
    people: list[Person]
    events: list[UsageEvent]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    """The service over a SQLite database of accounts and 1500 events."""
    tmp = tmp_path_factory.mktemp("metrics-api")
    uri = f"sqlite+aiosqlite:///{tmp / 'citadel.db'}"
    people, events = asyncio.run(_seed(uri, 1500))
    port = free_port()
    proc = start_process(_command(_config(tmp, uri), port), port, env=ENV)
    try:
        yield Seeded(Service(port, Conformance.fetch("127.0.0.1", port)), people, events)
    finally:
        assert 0 == stop_process(proc), process_output(proc)


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def _sums(events: list[UsageEvent], key: Any, start: datetime, end: datetime) -> dict[Any, int]:
    found: dict[Any, int] = defaultdict(int)
    for e in events:
        if start.timestamp() <= e.time < end.timestamp():
            found[key(e)] += e.cost_micros
    return dict(found)


# -- auth and routes ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
def test_every_route_needs_the_admin_key(seeded: Seeded, path: str) -> None:
    """Without the admin key, or with another one, every analytics route is a 401."""
    assert 401 == seeded.service.get(path, key=None).status
    reply = seeded.service.get(path, key="sk-wrong")
    assert 401 == reply.status
    assert "authentication_error" == reply.error["type"]
    assert 200 == seeded.service.get(path).status


def test_open_routes_and_the_openapi_document(seeded: Seeded) -> None:
    """/health, /metrics, /docs and /openapi.json need no key; the document lists every route."""
    for path in ("/health", "/metrics", "/docs", "/openapi.json"):
        assert 200 == seeded.service.get(path, key=None).status, path
    paths = seeded.service.get("/openapi.json", key=None).json()["paths"]
    assert set(ROUTES) <= set(paths)
    names = {p["name"] for p in paths["/v1/usage"]["get"]["parameters"]}
    assert {"start", "end", "group_by", "bucket", "format", "team"} <= names


def test_health_reports_each_store_and_the_ledger_lag(seeded: Seeded) -> None:
    """On SQLite without Redis: the ledger and accounts ok, Redis and the writer disabled."""
    health = seeded.service.get("/health", key=None).json()
    assert "ok" == health["status"]
    deps = health["dependencies"]
    assert ("ok", "sqlite") == (deps["ledger"]["status"], deps["ledger"]["detail"])
    assert "ok" == deps["accounts"]["status"]
    assert "disabled" == deps["redis"]["status"]
    assert "disabled" == deps["ledger_writer"]["status"]
    assert "ledger_lag" in health
    assert health["ledger_lag"] is None


# -- the figures --------------------------------------------------------------------------------


def test_usage_by_team_per_day_matches_the_events(seeded: Seeded) -> None:
    """Cost per team per UTC day over 20 days equals the events' sums; totals add up."""
    start, end = TODAY - timedelta(days=19), TODAY + timedelta(days=1)
    reply = seeded.service.get(
        "/v1/usage", group_by="team", bucket="day", start=_iso(start), end=_iso(end)
    )
    assert 200 == reply.status, reply.body
    body = reply.json()
    day = 86400

    def key(e: UsageEvent) -> tuple[str, str]:
        return (_iso(datetime.fromtimestamp(e.time // day * day, UTC)), e.team)

    expected = _sums(seeded.events, key, start, end)
    assert expected == {(r["bucket"], r["team"]): r["cost_micros"] for r in body["data"]}
    assert sum(expected.values()) == body["total"]["cost_micros"]
    assert (_iso(start), _iso(end), ["team"], "day") == (
        body["start"],
        body["end"],
        body["group_by"],
        body["bucket"],
    )


def test_a_range_inside_hours_is_widened_to_the_whole_hours(seeded: Seeded) -> None:
    """``start`` and ``end`` may be any RFC 3339 time: the range read is the whole UTC hours
    they fall in (start down, end up), as the reply says, with those hours' figures; an end
    before the start is still a 400 naming it."""
    day = TODAY - timedelta(days=3)
    start = day + timedelta(hours=10, minutes=15, seconds=7)
    end = (day + timedelta(hours=13, minutes=30)).astimezone(timezone(timedelta(hours=2)))
    body = seeded.service.get("/v1/usage", start=start.isoformat(), end=end.isoformat()).json()
    whole = (day + timedelta(hours=10), day + timedelta(hours=14))
    assert (_iso(whole[0]), _iso(whole[1])) == (body["start"], body["end"])
    expected = _sums(seeded.events, lambda e: "", *whole)
    assert expected.get("", 0) == body["total"]["cost_micros"]
    daily = seeded.service.get(
        "/v1/usage", start=start.isoformat(), end=end.isoformat(), bucket="day"
    ).json()
    assert (_iso(day), _iso(day + timedelta(days=1))) == (daily["start"], daily["end"])
    reply = seeded.service.get("/v1/usage", start=end.isoformat(), end=start.isoformat())
    assert 400 == reply.status
    assert "end" == reply.json()["error"]["param"]


def test_usage_defaults_to_the_last_30_days(seeded: Seeded) -> None:
    """No range: the 30 days to the end of the current hour; no grouping: one total row."""
    body = seeded.service.get("/v1/usage").json()
    end = datetime.fromisoformat(body["end"])
    assert timedelta(days=30) == end - datetime.fromisoformat(body["start"])
    start = end - timedelta(days=30)
    events = [e for e in seeded.events if start.timestamp() <= e.time < end.timestamp()]
    assert 1 == len(body["data"])
    row = body["data"][0]
    assert (len(events), sum(e.status >= 400 for e in events)) == (row["requests"], row["errors"])
    refusals, failures = sum(e.refused for e in events), sum(e.status >= 500 for e in events)
    assert 0 < refusals < len(events)
    assert 0 < failures < len(events)
    assert (refusals, failures) == (row["refusals"], row["failures"])
    assert refusals / len(events) == pytest.approx(row["refusal_rate"])
    assert row["errors"] / len(events) == pytest.approx(row["error_rate"])
    assert failures / len(events) == pytest.approx(row["failure_rate"])
    assert sum(e.prompt_tokens + e.completion_tokens for e in events) == row["total_tokens"]


def test_usage_filtered_and_grouped_by_several_fields(seeded: Seeded) -> None:
    """A team filter with user and model grouping keeps only that team's events."""
    team = seeded.people[0].team
    start, end = TODAY - timedelta(days=35), TODAY + timedelta(hours=5)
    body = seeded.service.get(
        "/v1/usage", group_by="user,model", team=team, start=_iso(start), end=_iso(end)
    ).json()
    expected = _sums(
        [e for e in seeded.events if e.team == team], lambda e: (e.user, e.model), start, end
    )
    assert expected == {(r["user"], r["model"]): r["cost_micros"] for r in body["data"]}
    assert {"team": team} == body["filters"]


def test_usage_by_user_and_team_names_them_beside_their_ids(seeded: Seeded) -> None:
    """Grouped by user and team, each row (JSON and CSV) carries the user's and the team's name
    from the accounts store next to the id; an id the accounts do not know has none."""
    reply = seeded.service.get("/v1/usage", group_by="team,user", format="csv")
    header, *lines = reply.csv()
    assert ["team", "team_name", "user", "user_name"] == header[:4]
    rows = seeded.service.get("/v1/usage", group_by="team,user").json()["data"]
    by_user = {r["user"]: r for r in rows}
    assert len(lines) == len(rows)
    solo = next(p for p in seeded.people if not p.team)
    assert ("Solo", None) == (by_user[solo.id]["user_name"], by_user[solo.id]["team_name"])
    first = next(p for p in seeded.people if p.team and p.id in by_user)
    assert by_user[first.id]["team_name"].startswith("Team ")
    assert by_user[first.id]["user_name"].startswith("U")


def test_top_teams_by_cost(seeded: Seeded) -> None:
    """The top teams are ranked by their events' cost, with their names from the accounts."""
    start, end = TODAY - timedelta(days=30), TODAY + timedelta(days=1)
    body = seeded.service.get(
        "/v1/top", by="team", limit=2, start=_iso(start), end=_iso(end)
    ).json()
    sums = _sums(seeded.events, lambda e: e.team, start, end)
    ranked = sorted(sums.items(), key=lambda kv: (-kv[1], kv[0]))[:2]
    assert ranked == [(r["id"], r["cost_micros"]) for r in body["data"]]
    assert [1, 2] == [r["rank"] for r in body["data"]]
    assert all(r["name"].startswith("Team ") for r in body["data"])


def test_budgets_this_month(seeded: Seeded) -> None:
    """Users' and teams' spend this month against their tiers' budgets (free $5, standard
    $200, enterprise unlimited; a team is unlimited when a member is)."""
    spent = _sums(seeded.events, lambda e: e.user, MONTH, TODAY + timedelta(days=1))
    body = seeded.service.get("/v1/budgets", scope="user").json()
    assert _iso(MONTH) == body["start"]
    rows = {r["id"]: r for r in body["data"]}
    budgets = {"free": 5_000_000, "standard": 200_000_000, "enterprise": None}
    for person in seeded.people:
        row = rows[person.id]
        assert (spent.get(person.id, 0), budgets[person.tier]) == (
            row["spent_micros"],
            row["budget_micros"],
        )
        if row["budget_micros"]:
            assert row["spent_micros"] / row["budget_micros"] == row["utilisation"]
    teams = {r["id"]: r for r in seeded.service.get("/v1/budgets").json()["data"]}
    team_spent = _sums(seeded.events, lambda e: e.team, MONTH, TODAY + timedelta(days=1))
    for team in {p.team for p in seeded.people if p.team}:
        assert (team_spent.get(team, 0), None, 4) == (
            teams[team]["spent_micros"],
            teams[team]["budget_micros"],  # each team has an enterprise member
            teams[team]["members"],
        )


def test_deployment_costs_and_savings(seeded: Seeded) -> None:
    """Each deployment's tokens and charges are its events'; GPU cost over 10 days is exact;
    llama's savings are its reference cost less its GPU cost; mistral has no reference."""
    start, end = TODAY - timedelta(days=12), TODAY - timedelta(days=2)
    params = {"start": _iso(start), "end": _iso(end)}
    costs = {
        r["deployment"]: r
        for r in seeded.service.get("/v1/deployments/costs", **params).json()["data"]
    }
    charged = _sums(seeded.events, lambda e: e.deployment, start, end)
    assert {d: charged.get(d, 0) for _, d in SERVED} == {
        d: r["charged_micros"] for d, r in costs.items()
    }
    assert 1_200_000_000 == costs["llama-a"]["infra_micros"]  # $2.50 x 2 GPUs x 240 h
    assert 240.0 == costs["llama-a"]["hours"]
    first = min(e.time for e in seeded.events if e.deployment == "llama-a") // 3600 * 3600
    assert _iso(datetime.fromtimestamp(first, UTC)) == costs["llama-a"]["costed_from"]
    tokens = costs["llama-a"]["total_tokens"]
    assert 1_200_000_000 * 1000 / tokens / 1e6 == pytest.approx(
        costs["llama-a"]["infra_per_1k_usd"]
    )
    body = seeded.service.get("/v1/savings", **params).json()
    items = {r["model"]: r for r in body["data"]}
    llama = items["llama"]
    assert 1_200_000_000 + 240_000_000 == llama["infra_micros"]
    assert llama["reference_micros"] - llama["infra_micros"] == llama["savings_micros"]
    assert items["mistral"]["reference_micros"] is None
    assert llama["savings_micros"] == body["total"]["savings_micros"]


# -- CSV ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ROUTES)
def test_every_route_exports_csv_with_a_header_row(seeded: Seeded, path: str) -> None:
    """``format=csv``: text/csv, a header row naming the JSON fields, a line per JSON row."""
    params = {"group_by": "team,model"} if path == "/v1/usage" else {}
    as_json = seeded.service.get(path, **params).json()
    reply = seeded.service.get(path, format="csv", **params)
    assert 200 == reply.status
    assert reply.headers["content-type"].startswith("text/csv")
    header, *lines = reply.csv()
    data = as_json["data"] + ([as_json["total"]] if path == "/v1/savings" else [])
    assert len(data) == len(lines)
    for row, line in zip(data, lines, strict=True):
        assert set(header) <= set(row), (path, header)
        for name, value in zip(header, line, strict=True):
            if row[name] is None:
                assert "" == value
            elif isinstance(row[name], bool):
                assert str(row[name]).lower() == value
            elif isinstance(row[name], int | float):
                assert row[name] == pytest.approx(float(value))
            else:
                assert row[name] == value


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        ("/v1/usage", {"start": "2024-06-02T00:00:00Z", "end": "2024-06-01T00:00:00Z"}, "end"),
        ("/v1/usage", {"start": "2020-01-01", "end": "2024-01-01"}, "end"),
        ("/v1/usage", {"start": "2024-01-01", "end": "2024-03-01", "bucket": "hour"}, "end"),
        ("/v1/usage", {"start": "2024-06-01T00:40:00Z", "end": "2024-06-01T00:20:00Z"}, "end"),
        ("/v1/usage", {"start": "yesterday"}, "start"),
        ("/v1/usage", {"end": "2024-06-01T00:00:00"}, "end"),
        ("/v1/usage", {"group_by": "colour"}, "group_by"),
        ("/v1/usage", {"group_by": "team,team"}, "group_by"),
        ("/v1/usage", {"bucket": "week"}, "bucket"),
        ("/v1/usage", {"format": "xml"}, "format"),
        ("/v1/usage", {"colour": "red"}, "colour"),
        ("/v1/usage", {"team": ""}, "team"),
        ("/v1/top", {"by": "colour"}, "by"),
        ("/v1/top", {"metric": "joy"}, "metric"),
        ("/v1/top", {"limit": "0"}, "limit"),
        ("/v1/top", {"limit": "1001"}, "limit"),
        ("/v1/top", {"limit": "ten"}, "limit"),
        ("/v1/budgets", {"scope": "planet"}, "scope"),
        ("/v1/budgets", {"start": "2024-01-01"}, "start"),
        ("/v1/deployments/costs", {"start": "2000-01-01"}, "end"),
        ("/v1/savings", {"end": "2024-06-01T00:00:01"}, "end"),
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(
    seeded: Seeded, path: str, params: dict[str, str], param: str
) -> None:
    """Bad ranges, huge ranges, unknown groupings and parameters: a 400 naming the parameter."""
    reply = seeded.service.get(path, **params)
    assert 400 == reply.status, reply.body
    assert "invalid_request_error" == reply.error["type"]
    assert param == reply.error["param"], reply.error["message"]
    assert param in reply.error["message"]


def test_times_may_carry_offsets_and_be_unix_seconds(seeded: Seeded) -> None:
    """+02:00 (encoded or not), a date and Unix seconds all name instants."""
    end = int(datetime(2024, 6, 2, tzinfo=UTC).timestamp())
    for start in ("2024-06-01T02:00:00+02:00", "2024-06-01", "1717200000"):
        reply = seeded.service.get("/v1/usage", start=start, end=str(end))
        assert 200 == reply.status, reply.body
        assert "2024-06-01T00:00:00Z" == reply.json()["start"]
    conn = http.client.HTTPConnection("127.0.0.1", seeded.service.port, timeout=10)
    try:  # a "+" not percent-encoded arrives as a space
        path = f"/v1/usage?start=2024-06-01T02:00:00+02:00&end={end}"
        conn.request("GET", path, headers={"authorization": f"Bearer {ADMIN}"})
        assert 200 == conn.getresponse().status
    finally:
        conn.close()


def test_replies_are_the_ones_the_served_document_describes(seeded: Seeded) -> None:
    """Every route's JSON and CSV 200, 400 and 401 are listed by the service's own OpenAPI
    document, each JSON body valid against its schema (``Service.get`` checks each reply)."""
    bad = {"/v1/top": {"limit": "0"}, "/v1/budgets": {"scope": "planet"}}
    for path in ROUTES:
        grouped = {"group_by": "team,model", "bucket": "day"} if path == "/v1/usage" else {}
        assert 200 == seeded.service.get(path, **grouped).status
        assert 200 == seeded.service.get(path, format="csv").status
        assert 400 == seeded.service.get(path, **bad.get(path, {"start": "soon"})).status
        assert 401 == seeded.service.get(path, key=None).status
    for path in ("/health", "/metrics"):
        assert 200 == seeded.service.get(path, key=None).status
    document = seeded.service.document
    assert document is not None
    expected = {("GET", path, status) for path in ROUTES for status in ("200", "400", "401")}
    assert expected | {("GET", "/health", "200")} <= document.checked
    usage = document.operation("GET", "/v1/usage")
    assert usage is not None
    assert {"application/json", "text/csv"} == set(usage[1]["responses"]["200"]["content"])


# -- /metrics -----------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        found[match.group(1)].append((labels, float(match.group(3))))
    return found


def test_business_metrics_agree_with_the_events(seeded: Seeded) -> None:
    """Spend and tokens by tier, team and model this month, active users by tier, budget use,
    infrastructure cost, savings: present, and equal to the events' figures."""
    metrics = parse_metrics(seeded.service.get("/metrics", key=None).body.decode())
    month = [e for e in seeded.events if e.time >= MONTH.timestamp()]
    spend: dict[tuple[str, str, str], int] = defaultdict(int)
    prompt: dict[tuple[str, str, str], int] = defaultdict(int)
    for e in month:
        spend[(e.tier, e.team, e.model)] += e.cost_micros
        prompt[(e.tier, e.team, e.model)] += e.prompt_tokens
    assert {k: v / 1e6 for k, v in spend.items()} == pytest.approx(
        {(s["tier"], s["team"], s["model"]): v for s, v in metrics["citadel_business_spend_usd"]}
    )
    assert dict(prompt) == {
        (s["tier"], s["team"], s["model"]): v
        for s, v in metrics["citadel_business_tokens"]
        if s["token_type"] == "input"
    }
    # names beside the ids (issue 18 item 3): the team's, or "" for users in no team
    budgets_reply = seeded.service.get("/v1/budgets").json()["data"]
    team_names = {r["id"]: r["name"] for r in budgets_reply if r["scope"] == "team" and r["id"]}
    assert team_names
    assert all(name.startswith("Team ") for name in team_names.values())
    assert {(s["team"], s["team_name"]) for s, _ in metrics["citadel_business_spend_usd"]} == {
        (team, team_names.get(team, "")) for (_tier, team, _model) in spend
    }
    active: dict[str, set[str]] = defaultdict(set)
    for e in seeded.events:
        if e.time > NOW - 3600:
            active[e.tier].add(e.user)
    assert {t: len(u) for t, u in active.items()} == {
        s["tier"]: v for s, v in metrics["citadel_business_active_users"]
    }
    utilisation = {
        (s["scope"], s["id"]): v for s, v in metrics["citadel_business_budget_utilisation_ratio"]
    }
    named = {
        (s["scope"], s["id"]): s["name"]
        for s, _ in metrics["citadel_business_budget_utilisation_ratio"]
    }
    assert all(named.get(("team", team), name) == name for team, name in team_names.items())
    assert all(
        name.startswith(("U", "Solo")) for (scope, _), name in named.items() if scope == "user"
    )
    user_spend = _sums(seeded.events, lambda e: e.user, MONTH, TODAY + timedelta(days=1))
    budgets = {"free": 5e6, "standard": 200e6}
    for person in seeded.people:
        if person.tier in budgets:
            expected = user_spend.get(person.id, 0) / budgets[person.tier]
            assert expected == pytest.approx(utilisation[("user", person.id)])
        else:
            assert ("user", person.id) not in utilisation  # unlimited: no ratio
    infra = {s["deployment"]: v for s, v in metrics["citadel_business_infrastructure_cost_usd"]}
    assert {"llama-a", "llama-b", "mistral-a"} == set(infra)
    assert infra["llama-a"] > 0
    # One definition of a deployment's GPU cost: /v1/deployments/costs over the month to date
    # charges what /metrics does (from its first traffic on; the seconds between them aside).
    costs = seeded.service.get("/v1/deployments/costs", start=_iso(MONTH)).json()["data"]
    assert infra == pytest.approx({c["deployment"]: c["infra_usd"] for c in costs}, rel=1e-3)
    assert ["llama"] == [s["model"] for s, _ in metrics["citadel_business_savings_usd"]]
    assert {"infrastructure", "charged"} == {
        s["kind"] for s, _ in metrics["citadel_business_cost_per_1k_tokens_usd"]
    }
    assert "citadel_ledger_lag_events" not in metrics  # no writer in this service


# -- Redis, PostgreSQL and the writer in-process --------------------------------------------


@pytest.fixture
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards."""
    with scratch_postgres() as uri:
        yield uri


async def _xadd(stream: str, events: list[UsageEvent]) -> None:
    redis = RedisClient.from_url(REDIS, timeout=5)
    try:
        await asyncio.gather(
            *(redis.execute("XADD", stream, "*", "e", encode_event(e)) for e in events)
        )
    finally:
        await redis.aclose()


async def _delete(*keys: str) -> None:
    redis = RedisClient.from_url(REDIS, timeout=5)
    try:
        await redis.execute("DEL", *keys)
    finally:
        await redis.aclose()


def _until(check: Any, timeout: float = 20.0) -> Any:
    """Poll ``check`` until it returns something truthy (a real process: no clock to freeze)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def test_the_writer_drains_the_stream_into_postgresql(
    tmp_path: Path, postgres_database: str
) -> None:
    """With Redis configured the service runs the ledger writer: events XADDed to the stream
    reach the ledger and the analytics; /health and /metrics report the lag and errors."""
    people, seeded_events = asyncio.run(_seed(postgres_database, 200))
    stream = f"citadel:{{usage-{uuid.uuid4().hex[:8]}}}:events"
    extra = f'endpoints:\n  redis: "{REDIS}"\nmetering:\n  stream: "{stream}"\n  batch_size: 100'
    port = free_port()
    proc = start_process(_command(_config(tmp_path, postgres_database, extra), port), port, env=ENV)
    try:
        service = Service(port, Conformance.fetch("127.0.0.1", port))
        streamed = make_events(people, 700, seed=5)
        asyncio.run(_xadd(stream, streamed))
        everything = seeded_events + streamed
        start = datetime.fromtimestamp(NOW, UTC) - timedelta(days=41)
        params = {
            "start": _iso(start.replace(minute=0, second=0, microsecond=0)),
            "end": _iso(TODAY + timedelta(days=1)),
        }

        def stored() -> bool:
            return (
                len(everything) == service.get("/v1/usage", **params).json()["data"][0]["requests"]
            )

        assert _until(stored), process_output(proc)
        health = _until(
            lambda: (h := service.get("/health", key=None).json())["ledger_lag"] == 0 and h
        )
        assert health, service.get("/health", key=None).body
        deps = health["dependencies"]
        assert ("ok", "postgresql") == (deps["ledger"]["status"], deps["ledger"]["detail"])
        assert "ok" == deps["redis"]["status"]
        assert "ok" == deps["ledger_writer"]["status"]
        metrics = parse_metrics(service.get("/metrics", key=None).body.decode())
        assert [({}, 0.0)] == metrics["citadel_ledger_lag_events"]
        assert [({}, 0.0)] == metrics["citadel_ledger_writer_errors_total"]
        by_team = _sums(everything, lambda e: e.team, start, TODAY + timedelta(days=1))
        body = service.get("/v1/usage", group_by="team", **params).json()
        assert by_team == {r["team"]: r["cost_micros"] for r in body["data"]}
    finally:
        assert 0 == stop_process(proc), process_output(proc)
        asyncio.run(_delete(stream, f"{stream}:dead"))


def test_an_unreachable_ledger_is_a_503_and_takes_health_down(tmp_path: Path) -> None:
    """With the database unreachable /health is 503 (the ledger is critical) and every
    analytics route a 503 naming the usage ledger; bad input is still a 400."""
    database = f"postgresql://postgres@127.0.0.1:{free_port()}/citadel"
    port = free_port()
    proc = subprocess.Popen(
        _command(_config(tmp_path, database), port),
        env={**os.environ, **ENV},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        service = Service(port)

        def health() -> Reply | None:
            try:
                return service.get("/health", key=None)
            except OSError:
                return None

        reply = _until(health)
        assert reply is not None
        service = Service(port, Conformance.fetch("127.0.0.1", port))
        reply = service.get("/health", key=None)
        assert 503 == reply.status
        assert "down" == reply.json()["dependencies"]["ledger"]["status"]
        for path in ROUTES:
            answer = service.get(path)
            assert 503 == answer.status, (path, answer.body)
            assert "unavailable" in answer.error["message"]
        assert service.document is not None
        assert {("GET", path, "503") for path in ROUTES} <= service.document.checked
        assert 400 == service.get("/v1/usage", group_by="colour").status
        assert 200 == service.get("/metrics", key=None).status  # without business metrics
    finally:
        stop_process(proc)


# -- in-process: the writer's states ------------------------------------------------------------


class StoppingWriter:
    """A ledger writer that fails at once, having counted three failed batches."""

    async def run(self, stop: asyncio.Event) -> None:
        raise RuntimeError("boom")

    async def lag(self) -> int:
        return 7

    def stats(self) -> WriterStats:
        return WriterStats(batches=0, stored=0, duplicates=0, dead=0, claimed=0, failures=3)


def test_a_writer_that_stops_is_reported_down(tmp_path: Path) -> None:
    """A writer that dies is 'down' in /health (the service degraded, not down); its lag and
    failed batches are in /metrics."""
    uri = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"

    async def main() -> None:
        await LEDGER.upgrade(uri)
        engine = build_engine(uri)
        accounts = await open_store(uri, migrate=True)
        settings = load_settings(_config(tmp_path, uri), {"CITADEL_ENV": "test"})
        deps = MeteringDeps(analytics=Analytics(engine), accounts=accounts, writer=StoppingWriter())
        app = create_app(settings, deps)
        try:
            async with AsyncTestClient(app) as client:  # runs the start-up and shut-down hooks
                await asyncio.sleep(0)  # the writer's task runs, and fails
                reply = await client.get("/health")
                health = reply.json()
                assert (200, "degraded", 7) == (
                    reply.status_code,
                    health["status"],
                    health["ledger_lag"],
                )
                writer = health["dependencies"]["ledger_writer"]
                assert ("down", "the ledger writer stopped: RuntimeError: boom") == (
                    writer["status"],
                    writer["detail"],
                )
                metrics = parse_metrics((await client.get("/metrics")).text)
                assert [({}, 7.0)] == metrics["citadel_ledger_lag_events"]
                assert [({}, 3.0)] == metrics["citadel_ledger_writer_errors_total"]
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_a_deleted_users_history_keeps_their_name(tmp_path: Path) -> None:
    """Issue 18 item 5: deleting a user (and their emptied team) leaves their ledger rows as
    they were: /v1/usage by team and user still counts them, named as before."""
    uri = f"sqlite+aiosqlite:///{tmp_path / 'citadel.db'}"
    start, end = TODAY - timedelta(days=30), TODAY + timedelta(days=1)

    async def main() -> tuple[dict[str, Any], list[Person], list[UsageEvent]]:
        people, events = await _seed(uri, 200)
        accounts = await open_store(uri, migrate=True)
        team_id = people[0].team
        members = [p for p in people if p.team == team_id]
        for person in members:
            await accounts.delete_user(person.id)
        await accounts.delete_team(team_id)
        engine = build_engine(uri)
        settings = load_settings(_config(tmp_path, uri), ENV)
        deps = MeteringDeps(analytics=Analytics(engine), accounts=accounts)
        try:
            async with AsyncTestClient(create_app(settings, deps)) as client:
                reply = await client.get(
                    "/v1/usage",
                    params={"group_by": "team,user", "start": _iso(start), "end": _iso(end)},
                    headers={"authorization": f"Bearer {ADMIN}"},
                )
                assert 200 == reply.status_code, reply.text
                body: dict[str, Any] = reply.json()
        finally:
            await engine.dispose()
            await accounts.aclose()
        return body, members, events

    body, members, events = asyncio.run(main())
    rows = {r["user"]: r for r in body["data"]}
    for person in (p for p in members if p.id in rows):
        row = rows[person.id]
        assert row["user_name"].startswith("U")
        assert row["team_name"].startswith("Team ")
    ids = {p.id for p in members}
    spent = {u: c for u, c in _sums(events, lambda e: e.user, start, end).items() if u in ids}
    assert spent
    assert spent == {u: rows[u]["cost_micros"] for u in spent}
