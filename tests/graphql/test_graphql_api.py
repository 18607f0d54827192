"""The GraphQL service as a real process: `citadel serve graphql-api` on PostgreSQL (accounts and
the ledger) and Redis (the limiter, the live feed), queried with the `gql` client over HTTP and
WebSocket (graphql-transport-ws).

Two teams, one user each (Alice in A, Bob in B), each with a key and usage in the ledger; the
figures asserted are sums of the events seeded here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from gql import Client, GraphQLRequest
from gql.client import AsyncClientSession
from gql.transport.exceptions import TransportQueryError
from gql.transport.httpx import HTTPXAsyncTransport
from gql.transport.websockets import WebsocketsTransport

from citadel.accounts.sql import open_store
from citadel.metering.events import UsageEvent
from citadel.metering.ledger import Ledger, encode_event
from citadel.metering.migrate import LEDGER
from citadel.stores.redis import RedisClient
from citadel.stores.sql import build_engine

from support import free_port, scratch_postgres, start_process, stop_process, usage_event

ADMIN = "sk-test-graphql-admin-0123456789"
REDIS = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/5")
CONFIG = """
models:
  - name: llama
    aliases: [big]
    price: {{input_per_1k: 0.0005, output_per_1k: 0.0015}}
    reference_price: {{input_per_1k: 0.01, output_per_1k: 0.03}}
    deployments:
      - {{name: llama-a, url: "http://127.0.0.1:9", gpu_hour_usd: 2.5}}
      - {{name: llama-b, url: "http://127.0.0.1:9"}}
  - name: coder
    specialties: [code]
    deployments:
      - {{name: coder-a, url: "http://127.0.0.1:9"}}
  - name: echo
    deployments:
      - {{name: echo-a, url: "http://127.0.0.1:{sim}", model: sim-chat}}
tiers:
  free: {{requests_per_minute: 30, cost_per_month_usd: 5, models: [llama, echo]}}
  pro: {{requests_per_minute: 600}}
accounts:
  database: "{database}"
  default_tier: free
limits:
  backend: "{redis}"
metering:
  stream: "{stream}"
alerting:
  defaults: false
  rules:
    - name: AliceTeamBudget
      kind: forecast
      ledger: {{metric: team_spend, team: "{alice_team}"}}
      threshold: 0.001
      horizon_seconds: month_end
      model: linear
      min_points: 3
      severity: critical
    - name: TrafficAnomaly
      kind: anomaly
      query: sum(rate(citadel_gateway_requests_total[1m]))
"""


@dataclass(frozen=True)
class Person:
    user: str
    team: str
    key: str  # the secret
    key_id: str
    events: tuple[UsageEvent, ...]

    @property
    def cost(self) -> int:
        return sum(e.cost_micros for e in self.events)


@dataclass(frozen=True)
class Stack:
    port: int
    alice: Person
    bob: Person
    stream: str
    config: Path
    sim: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/graphql"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/graphql"


def _events(user: str, team: str, key_id: str, count: int, now: float) -> tuple[UsageEvent, ...]:
    return tuple(
        usage_event(
            time=now - 3600 - i * 60,
            user=user,
            team=team,
            key_id=key_id,
            model="llama",
            deployment="llama-a",
            prompt_tokens=10 + i,
            completion_tokens=20,
            cost_micros=1000 + i,
        )
        for i in range(count)
    )


async def _seed(uri: str) -> tuple[Person, Person]:
    await LEDGER.upgrade(uri)
    store = await open_store(uri, migrate=True)
    now = time.time()
    people = []
    try:
        for name, count in (("Alice", 5), ("Bob", 3)):
            team = await store.create_team(f"Team {name} {uuid.uuid4().hex[:6]}")
            user = await store.create_user(
                name=name, email=f"{uuid.uuid4().hex}@example.com", tier="free", team_id=team.id
            )
            key, secret = await store.create_key(user.id, name="laptop")
            events = _events(user.id, team.id, key.id, count, now)
            people.append(Person(user.id, team.id, secret, key.id, events))
    finally:
        await store.aclose()
    engine = build_engine(uri)
    try:
        await Ledger(engine).write([e for p in people for e in p.events])
    finally:
        await engine.dispose()
    return people[0], people[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("graphql")
    stream = f"citadel:{{usage}}:graphql-test:{uuid.uuid4().hex}"
    with scratch_postgres() as uri:
        alice, bob = asyncio.run(_seed(uri))
        config = tmp / "citadel.yaml"
        sim = free_port()
        config.write_text(
            CONFIG.format(database=uri, redis=REDIS, stream=stream, sim=sim, alice_team=alice.team)
        )
        port = free_port()
        env = {"CITADEL_ADMIN_KEY": ADMIN, "CITADEL_ENV": "test", "REDIS_ENDPOINT": REDIS}
        args = [sys.executable, "-m", "citadel", "--config", str(config)]
        proc = start_process([*args, "serve", "graphql-api", "--port", str(port)], port, env=env)
        try:
            yield Stack(port, alice, bob, stream, config, sim, env)
        finally:
            stop_process(proc)

            async def clean() -> None:
                client = RedisClient.from_url(REDIS, timeout=1.0)
                await client.execute("DEL", stream)
                await client.aclose()

            asyncio.run(clean())


@asynccontextmanager
async def http_session(stack: Stack, key: str | None = ADMIN) -> AsyncIterator[AsyncClientSession]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    client = Client(transport=HTTPXAsyncTransport(url=stack.url, headers=headers, timeout=20))
    async with client as session:
        yield session


def run(
    stack: Stack, query: str, variables: dict[str, Any] | None = None, key: str | None = ADMIN
) -> dict[str, Any]:
    """The data of one query over HTTP (a GraphQL error raises TransportQueryError)."""

    async def main() -> dict[str, Any]:
        async with http_session(stack, key) as session:
            return await session.execute(GraphQLRequest(query, variable_values=variables))

    return asyncio.run(main())


def errors_of(
    stack: Stack, query: str, variables: dict[str, Any] | None = None, key: str | None = ADMIN
) -> list[dict[str, Any]]:
    with pytest.raises(TransportQueryError) as caught:
        run(stack, query, variables, key)
    errors: list[dict[str, Any]] = caught.value.errors or []
    assert errors, "expected GraphQL errors"
    return errors


def raw_post(stack: Stack, body: Any, key: str | None = ADMIN) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=10) as client:
        return client.post(stack.url, json=body, headers=headers)


# -- models, deployments, routing ------------------------------------------------------------


def test_models_with_their_deployments_live_state_prices_and_tiers(stack: Stack) -> None:
    data = run(
        stack,
        """{ models { totalCount nodes { name aliases price { inputPer1k outputPer1k }
             tiersAllowed deployments { nodes { name model state breaker healthy drained
             inFlight requests } } } } }""",
    )
    models = {m["name"]: m for m in data["models"]["nodes"]}
    assert 3 == data["models"]["totalCount"]
    llama = models["llama"]
    assert ["big"] == llama["aliases"]
    assert {"inputPer1k": 0.0005, "outputPer1k": 0.0015} == llama["price"]
    assert ["free", "pro"] == llama["tiersAllowed"]
    assert ["pro"] == models["coder"]["tiersAllowed"]  # free allows llama only
    deployments = {d["name"]: d for d in llama["deployments"]["nodes"]}
    assert {"llama-a", "llama-b"} == set(deployments)
    for d in deployments.values():
        assert "llama" == d["model"]
        assert "closed" == d["breaker"]
        assert d["drained"] is False
        assert d["state"] in ("healthy", "unhealthy")


def test_route_explain_is_the_dry_run(stack: Stack) -> None:
    data = run(
        stack,
        'query ($m: String!) { routeExplain(model: $m, prompt: "hello") '
        "{ requestedModel model endpoint task deployment reason evaluations } }",
        {"m": "llama"},
    )
    explained = data["routeExplain"]
    assert "llama" == explained["requestedModel"]
    assert "chat" == explained["endpoint"]
    assert explained["deployment"] in ("llama-a", "llama-b")
    assert explained["reason"]
    assert "llama" == explained["evaluations"][0]["model"]
    errors = errors_of(stack, '{ routeExplain(model: "nope") { reason } }')
    assert "NOT_FOUND" == errors[0]["extensions"]["code"]
    assert "model_not_found" == errors[0]["extensions"]["reason"]


# -- accounts ---------------------------------------------------------------------------------


TEAMS = """
{ teams(first: 20) { totalCount nodes { id name users(first: 5) { nodes { id name tier status
    limits { requestsPerMinute costPerMonthUsd } quota { name limit used remaining }
    keys(first: 5) { totalCount nodes { id name prefix revoked lastUsedAt } }
    usage { requests tokens costUsd } } } } } }
"""


def test_teams_users_keys_limits_quota_and_usage_never_a_secret(stack: Stack) -> None:
    data = run(stack, TEAMS)
    teams = {t["id"]: t for t in data["teams"]["nodes"]}
    assert {stack.alice.team, stack.bob.team} <= set(teams)
    for person in (stack.alice, stack.bob):
        (user,) = teams[person.team]["users"]["nodes"]
        assert person.user == user["id"]
        assert "free" == user["tier"]
        assert {"requestsPerMinute": 30, "costPerMonthUsd": 5.0} == user["limits"]
        quota = {q["name"]: q for q in user["quota"]}
        assert 30 == quota["requests_per_minute"]["limit"]
        (key,) = user["keys"]["nodes"]
        assert person.key_id == key["id"]
        assert person.key.startswith(key["prefix"])
        assert key["revoked"] is False
        usage = user["usage"]
        assert len(person.events) == usage["requests"]
        assert sum(e.prompt_tokens + e.completion_tokens for e in person.events) == usage["tokens"]
        assert person.cost / 1_000_000 == pytest.approx(usage["costUsd"])
    # the schema has no field that could carry a secret
    assert "secret" not in str(data)


def test_usage_grouped_bucketed_and_paginated_by_cursor(stack: Stack) -> None:
    query = """query ($first: Int, $after: String) {
        usage(groupBy: [USER], bucket: HOUR, first: $first, after: $after) {
          totalCount pageInfo { hasNextPage endCursor }
          edges { cursor node { bucket keys requests costUsd } } } }"""
    seen: list[dict[str, Any]] = []
    after = None
    for _ in range(20):
        page = run(stack, query, {"first": 1, "after": after})["usage"]
        seen.extend(edge["node"] for edge in page["edges"])
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert len(seen) == page["totalCount"]
    for person in (stack.alice, stack.bob):
        rows = [r for r in seen if r["keys"]["user"] == person.user]
        assert len(person.events) == sum(r["requests"] for r in rows)
        assert person.cost / 1_000_000 == pytest.approx(sum(r["costUsd"] for r in rows))
    backwards = run(stack, "{ usage(groupBy: [USER], last: 1) { nodes { keys } pageInfo "
                    "{ hasPreviousPage } } }")["usage"]  # fmt: skip
    assert 1 == len(backwards["nodes"])


def test_costs_savings_budgets_and_top_users(stack: Stack) -> None:
    data = run(
        stack,
        """{ costs { nodes { deployment requests chargedUsd } }
             savings { nodes { model requests referenceUsd } }
             budgets(scope: USER) { nodes { id spentUsd budgetUsd } }
             topUsers(metric: COST, first: 1) { nodes { keys costUsd } } }""",
    )
    costs = {c["deployment"]: c for c in data["costs"]["nodes"]}
    assert len(stack.alice.events) + len(stack.bob.events) == costs["llama-a"]["requests"]
    savings = {s["model"]: s for s in data["savings"]["nodes"]}
    assert savings["llama"]["referenceUsd"] > 0
    budgets = {b["id"]: b for b in data["budgets"]["nodes"]}
    assert 5.0 == budgets[stack.alice.user]["budgetUsd"]
    (top,) = data["topUsers"]["nodes"]
    assert stack.alice.user == top["keys"]["user"]  # Alice spent more


# -- tenant scoping ---------------------------------------------------------------------------


def test_a_user_key_sees_only_its_own_user_team_keys_and_usage(stack: Stack) -> None:
    alice, bob = stack.alice, stack.bob
    data = run(stack, TEAMS, key=alice.key)
    (team,) = data["teams"]["nodes"]
    assert alice.team == team["id"]
    (user,) = team["users"]["nodes"]
    assert alice.user == user["id"]
    assert [alice.key_id] == [k["id"] for k in user["keys"]["nodes"]]
    mine = run(
        stack,
        """query ($bob: ID!, $bobTeam: ID!) { viewer { admin userId teamId }
             users { nodes { id } } user(id: $bob) { id } team(id: $bobTeam) { id }
             usage(groupBy: [USER]) { nodes { keys requests } }
             budgets(scope: USER) { nodes { id } } budgetsTeams: budgets(scope: TEAM)
             { nodes { id } } }""",
        {"bob": bob.user, "bobTeam": bob.team},
        key=alice.key,
    )
    assert {"admin": False, "userId": alice.user, "teamId": alice.team} == mine["viewer"]
    assert [alice.user] == [u["id"] for u in mine["users"]["nodes"]]
    assert mine["user"] is None
    assert mine["team"] is None
    assert [{"user": alice.user}] == [r["keys"] for r in mine["usage"]["nodes"]]
    assert [alice.user] == [b["id"] for b in mine["budgets"]["nodes"]]
    assert [alice.team] == [b["id"] for b in mine["budgetsTeams"]["nodes"]]
    assert bob.user not in str(mine)
    refused = errors_of(
        stack,
        "query ($u: String) { usage(filter: {user: $u}) { nodes { requests } } }",
        {"u": bob.user},
        key=alice.key,
    )
    assert "FORBIDDEN" == refused[0]["extensions"]["code"]
    for field in ("costs", "savings", "topUsers"):
        refused = errors_of(stack, f"{{ {field} {{ totalCount }} }}", key=alice.key)
        assert "FORBIDDEN" == refused[0]["extensions"]["code"], field


def test_a_user_key_cannot_change_another_users_objects(stack: Stack) -> None:
    alice, bob = stack.alice, stack.bob
    for mutation, variables in (
        ("mutation ($id: ID!) { revokeKey(id: $id) { id } }", {"id": bob.key_id}),
        ('mutation ($u: ID!) { createKey(userId: $u, name: "x") { secret } }', {"u": bob.user}),
        ("mutation ($id: ID!) { disableUser(id: $id) { id } }", {"id": bob.user}),
        ('mutation ($id: ID!) { updateUser(id: $id, input: {name: "Eve"}) { id } }',
         {"id": alice.user}),
        ('mutation { createTeam(name: "Mine") { id } }', {}),
        ("mutation ($id: ID!) { disableTeam(id: $id) { id } }", {"id": bob.team}),
        ('mutation ($id: ID!) { updateTeam(id: $id, input: {name: "Mine"}) { id } }',
         {"id": bob.team}),
        ('mutation { restoreDeployment(name: "llama-a") { name } }', {}),
    ):  # fmt: skip
        errors = errors_of(stack, mutation, variables, key=alice.key)
        assert errors[0]["extensions"]["code"] in ("FORBIDDEN", "NOT_FOUND"), mutation
    still = run(stack, "query ($u: ID!) { user(id: $u) { status keys { nodes { revoked } } } }",
                {"u": bob.user})["user"]  # fmt: skip
    assert "ACTIVE" == still["status"]
    assert [False] == [k["revoked"] for k in still["keys"]["nodes"]]


# -- mutations --------------------------------------------------------------------------------


def test_admin_creates_updates_and_disables_users_and_teams_and_keys(stack: Stack) -> None:
    name = f"Team New {uuid.uuid4().hex[:6]}"
    team = run(stack, "mutation ($n: String!) { createTeam(name: $n) { id name } }", {"n": name})[
        "createTeam"
    ]
    user = run(
        stack,
        "mutation ($input: CreateUserInput!) { createUser(input: $input) { id tier teamId } }",
        {
            "input": {
                "name": "Carol",
                "email": f"{uuid.uuid4().hex}@example.com",
                "teamId": team["id"],
            }
        },
    )["createUser"]
    assert "free" == user["tier"]
    assert team["id"] == user["teamId"]
    changed = run(
        stack,
        """mutation ($id: ID!) { updateUser(id: $id, input: {tier: "pro",
             overrides: {requestsPerMinute: 7}}) { tier limits { requestsPerMinute } } }""",
        {"id": user["id"]},
    )["updateUser"]
    assert {"tier": "pro", "limits": {"requestsPerMinute": 7}} == changed
    created = run(
        stack,
        'mutation ($u: ID!) { createKey(userId: $u, name: "ci") { secret key { id prefix } } }',
        {"u": user["id"]},
    )["createKey"]
    assert created["secret"].startswith(created["key"]["prefix"])
    # the new key works, and sees its own user
    viewer = run(stack, "{ viewer { userId } }", key=created["secret"])["viewer"]
    assert user["id"] == viewer["userId"]
    revoked = run(stack, "mutation ($id: ID!) { revokeKey(id: $id) { revoked } }",
                  {"id": created["key"]["id"]})["revokeKey"]  # fmt: skip
    assert revoked["revoked"] is True
    disabled = run(stack, "mutation ($id: ID!) { disableUser(id: $id) { status } }",
                   {"id": user["id"]})["disableUser"]  # fmt: skip
    assert "DISABLED" == disabled["status"]
    errors = errors_of(stack, 'mutation { updateUser(id: "usr_nope", input: {name: "x"}) { id } }')
    assert "NOT_FOUND" == errors[0]["extensions"]["code"]
    errors = errors_of(
        stack, 'mutation ($id: ID!) { updateUser(id: $id, input: {tier: "gold"}) { id } }',
        {"id": user["id"]},
    )  # fmt: skip
    assert "BAD_USER_INPUT" == errors[0]["extensions"]["code"]
    assert "tier" == errors[0]["extensions"]["param"]


def test_create_key_takes_the_keys_own_limits_with_the_rest_apis_checks(stack: Stack) -> None:
    """createKey takes a budget, models, per-minute limits and an expiry time as POST /v1/keys
    does, and answers them; an unknown model, a past time, both expiries or a negative rate is
    BAD_USER_INPUT naming the argument."""
    user = run(
        stack,
        "mutation ($input: CreateUserInput!) { createUser(input: $input) { id } }",
        {"input": {"name": "Dan", "email": f"{uuid.uuid4().hex}@example.com"}},
    )["createUser"]["id"]
    made = run(
        stack,
        """mutation ($u: ID!) { createKey(userId: $u, budgetUsd: 2.5, models: [" big"],
             requestsPerMinute: 10, tokensPerMinute: 5000, expiresAt: "2099-01-31T00:00:00Z")
             { key { budgetUsd models requestsPerMinute tokensPerMinute expiresAt } } }""",
        {"u": user},
    )["createKey"]["key"]
    assert {"budgetUsd": 2.5, "models": ["big"], "requestsPerMinute": 10,
            "tokensPerMinute": 5000, "expiresAt": "2099-01-31T00:00:00+00:00"} == made  # fmt: skip
    for bad, param in (
        ('models: ["gpt-9"]', "models[0]"),
        ('expiresAt: "2001-01-01T00:00:00Z"', "expiresAt"),
        ('expiresAt: "2099-01-01T00:00:00Z", expiresInDays: 3', "expiresAt"),
        ("requestsPerMinute: -1", "requestsPerMinute"),
        ("budgetUsd: -1", "budgetUsd"),
    ):
        errors = errors_of(
            stack, f"mutation ($u: ID!) {{ createKey(userId: $u, {bad}) {{ secret }} }}",
            {"u": user},
        )  # fmt: skip
        assert ("BAD_USER_INPUT", param) == (
            errors[0]["extensions"]["code"],
            errors[0]["extensions"].get("param"),
        ), (bad, errors)


# -- protection and errors ----------------------------------------------------------------------


def test_cost_is_reported_and_a_query_over_it_is_refused_before_running(stack: Stack) -> None:
    reply = raw_post(stack, {"query": "{ teams(first: 10) { nodes { users(first: 10) "
                             "{ nodes { name } } } } }"})  # fmt: skip
    assert 200 == reply.status_code
    cost = reply.json()["extensions"]["cost"]
    assert 121 == cost["requestedQueryCost"]
    assert 0 < cost["actualQueryCost"] <= cost["requestedQueryCost"]
    heavy = ("{ teams(first: 100) { nodes { users(first: 100) { nodes { keys(first: 100) "
             "{ nodes { id } } } } } } }")  # fmt: skip
    reply = raw_post(stack, {"query": heavy})
    assert reply.status_code in (200, 400)
    body = reply.json()
    assert body.get("data") is None
    (error,) = body["errors"]
    assert "QUERY_TOO_COSTLY" == error["extensions"]["code"]
    assert error["extensions"]["requestedQueryCost"] > error["extensions"]["maximumQueryCost"]


@pytest.mark.parametrize(
    ("query", "code", "words"),
    [
        ("{ models { nodes { name }", "GRAPHQL_PARSE_FAILED", "Syntax Error"),
        ("{ models { nodes { colour } } }", "GRAPHQL_VALIDATION_FAILED", "colour"),
        ("{ models(first: 0) { totalCount } }", "BAD_USER_INPUT", "'first'"),
        ("{ models(first: 101) { totalCount } }", "BAD_USER_INPUT", "between 1 and 100"),
        ('{ models(after: "bogus") { totalCount } }', "BAD_USER_INPUT", "cursor"),
        ("{ teams { nodes { users { nodes { team { users { nodes { team { users { nodes "
         "{ team { users { nodes { id } } } } } } } } } } } } } }", "GRAPHQL_VALIDATION_FAILED",
         "depth"),
        ('{ usage(range: {start: "2026-01-01T00:30:00Z"}) { totalCount } }', "BAD_USER_INPUT",
         "whole UTC hour"),
        ("{ " + " ".join(f"a{i}: costs {{ totalCount }}" for i in range(100)) + " }",
         "GRAPHQL_VALIDATION_FAILED", "aliases"),
    ],
)  # fmt: skip
def test_bad_queries_are_graphql_errors_with_a_code(
    stack: Stack, query: str, code: str, words: str
) -> None:
    reply = raw_post(stack, {"query": query})
    assert reply.status_code in (200, 400), reply.text
    (error, *_) = reply.json()["errors"]
    assert code == error["extensions"]["code"], error
    assert words.lower() in error["message"].lower()


def test_wrong_variable_types_and_bad_bodies_are_errors_not_500(stack: Stack) -> None:
    reply = raw_post(stack, {"query": "query ($n: Int) { models(first: $n) { totalCount } }",
                             "variables": {"n": "ten"}})  # fmt: skip
    assert reply.status_code in (200, 400)
    assert "GRAPHQL_VALIDATION_FAILED" == reply.json()["errors"][0]["extensions"]["code"]
    with httpx.Client(timeout=10) as client:
        bad = client.post(stack.url, content=b"{not json",
                          headers={"Authorization": f"Bearer {ADMIN}",
                                   "content-type": "application/json"})  # fmt: skip
    assert 400 == bad.status_code


def test_no_key_or_a_wrong_one_is_401(stack: Stack) -> None:
    assert 401 == raw_post(stack, {"query": "{ viewer { admin } }"}, key=None).status_code
    reply = raw_post(stack, {"query": "{ viewer { admin } }"}, key="sk-wrong")
    assert 401 == reply.status_code
    assert "error" in reply.json()


# -- subscriptions ----------------------------------------------------------------------------


async def _publish(stack: Stack, event: UsageEvent) -> None:
    client = RedisClient.from_url(REDIS, timeout=2.0)
    try:
        await client.execute("XADD", stack.stream, "*", "e", encode_event(event))
    finally:
        await client.aclose()


async def _last_position(stack: Stack) -> str:
    """The stream's newest position: a subscription from it misses nothing published later,
    however long it takes to reach the feed's tail."""
    client = RedisClient.from_url(REDIS, timeout=2.0)
    try:
        rows = await client.execute("XREVRANGE", stack.stream, "+", "-", "COUNT", 1)
    finally:
        await client.aclose()
    return rows[0][0].decode() if rows else "0-0"


def _subscription(position: str) -> GraphQLRequest:
    return GraphQLRequest(SUBSCRIBE, variable_values={"after": position})


SUBSCRIBE = """subscription ($after: String) { usageEvents(after: $after) {
    eventId userId model costUsd user { id name keys { totalCount } } } }"""


def _ws_client(stack: Stack, key: str) -> Client:
    transport = WebsocketsTransport(
        url=stack.ws,
        init_payload={"authorization": f"Bearer {key}"},
        subprotocols=[WebsocketsTransport.GRAPHQL_TRANSPORT_WS_PROTOCOL]
        if hasattr(WebsocketsTransport, "GRAPHQL_TRANSPORT_WS_PROTOCOL")
        else ["graphql-transport-ws"],
    )
    return Client(transport=transport)


def test_usage_events_arrive_over_graphql_transport_ws_scoped_to_the_key(stack: Stack) -> None:
    alice, bob = stack.alice, stack.bob

    async def collect(
        key: str, want: int, ready: asyncio.Event, position: str
    ) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        async with _ws_client(stack, key) as session:
            generator = session.subscribe(_subscription(position))
            ready.set()
            async for result in generator:
                got.append(result["usageEvents"])
                if len(got) >= want:
                    break
            await generator.aclose()  # stop the subscription before the socket closes
        return got

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        admin_ready, alice_ready = asyncio.Event(), asyncio.Event()
        position = await _last_position(stack)
        admin = asyncio.create_task(collect(ADMIN, 2, admin_ready, position))
        mine = asyncio.create_task(collect(alice.key, 1, alice_ready, position))
        await asyncio.wait_for(asyncio.gather(admin_ready.wait(), alice_ready.wait()), 10)
        await _publish(stack, usage_event(user=bob.user, team=bob.team, model="llama"))
        await _publish(stack, usage_event(user=alice.user, team=alice.team, model="llama"))
        return await asyncio.wait_for(asyncio.gather(admin, mine), 15)

    admin_events, alice_events = asyncio.run(main())
    assert [bob.user, alice.user] == [e["userId"] for e in admin_events]
    assert "Bob" == admin_events[0]["user"]["name"]
    assert [alice.user] == [e["userId"] for e in alice_events]  # never Bob's
    assert 1 == alice_events[0]["user"]["keys"]["totalCount"]


def test_a_subscription_with_a_bad_key_is_closed_4403(stack: Stack) -> None:
    import websockets

    async def main() -> tuple[int | None, str | None]:
        async with websockets.connect(stack.ws, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            await ws.send('{"type": "connection_init", "payload": {"authorization": "Bearer x"}}')
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return ws.close_code, ws.close_reason

    code, _reason = asyncio.run(main())
    assert 4403 == code


def test_health_reports_schema_and_stores(stack: Stack) -> None:
    with httpx.Client(timeout=10) as client:
        health = client.get(f"http://127.0.0.1:{stack.port}/health").json()
    assert "ok" == health["status"]
    assert {"schema", "accounts", "ledger", "limiter"} <= set(health["dependencies"])


def test_the_legacy_graphql_ws_protocol_carries_subscriptions_too(stack: Stack) -> None:
    alice = stack.alice

    async def main() -> dict[str, Any]:
        transport = WebsocketsTransport(
            url=stack.ws,
            init_payload={"authorization": f"Bearer {alice.key}"},
            subprotocols=[WebsocketsTransport.APOLLO_SUBPROTOCOL],
        )
        async with Client(transport=transport) as session:
            generator = session.subscribe(_subscription(await _last_position(stack)))
            first = asyncio.ensure_future(generator.__anext__())
            await _publish(stack, usage_event(user=alice.user, team=alice.team, model="coder"))
            result = await asyncio.wait_for(first, 15)
            await generator.aclose()
            return result["usageEvents"]

    event = asyncio.run(main())
    assert alice.user == event["userId"]
    assert "coder" == event["model"]


async def _raw_ws(stack: Stack, messages: list[str], *, wait: float = 10) -> int | None:
    """Send ``messages`` on a graphql-transport-ws socket; the close code the server chose."""
    import websockets

    async with websockets.connect(stack.ws, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        for message in messages:
            await ws.send(message)
        try:
            async with asyncio.timeout(wait):
                while True:
                    await ws.recv()
        except websockets.ConnectionClosed:
            pass
        return ws.close_code


def _init(key: str = ADMIN) -> str:
    return orjson.dumps(
        {"type": "connection_init", "payload": {"authorization": f"Bearer {key}"}}
    ).decode()


def _subscribe(ident: str) -> str:
    return orjson.dumps(
        {
            "id": ident,
            "type": "subscribe",
            "payload": {"query": "subscription { usageEvents { eventId } }"},
        }
    ).decode()


@pytest.mark.parametrize(
    ("messages", "code"),
    [
        (['{"type": "connection_init", "payload": 7}'], 4400),  # a payload that is no object
        (['{"type": "nonsense"}'], 4400),
        ([_subscribe("early")], 4401),  # subscribe before the connection is acknowledged
        ([_init("sk-not-a-key")], 4403),
        ([_init(), _init()], 4429),  # a second connection_init
        ([_init(), _subscribe("one"), _subscribe("one")], 4409),  # the same id twice
        ([], 4408),  # no connection_init in time
    ],
)
def test_graphql_transport_ws_close_codes(stack: Stack, messages: list[str], code: int) -> None:
    assert code == asyncio.run(_raw_ws(stack, messages))


# -- GET, the playground ----------------------------------------------------------------------


def test_queries_over_get_but_never_mutations(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(timeout=10) as client:
        reply = client.get(stack.url, params={"query": "{ viewer { admin } }"}, headers=auth)
        assert 200 == reply.status_code
        assert {"viewer": {"admin": True}} == reply.json()["data"]
        mutation = 'mutation { createTeam(name: "over GET") { id } }'
        refused = client.get(stack.url, params={"query": mutation}, headers=auth)
        assert refused.status_code in (400, 405)
        teams = run(stack, "{ teams(first: 100) { nodes { name } } }")["teams"]["nodes"]
        assert "over GET" not in [t["name"] for t in teams]


def test_the_playground_needs_the_admin_key_and_ships_its_own_assets(stack: Stack) -> None:
    html = {"Accept": "text/html"}
    with httpx.Client(timeout=10) as client:
        anonymous = client.get(stack.url, headers=html)
        assert 401 == anonymous.status_code
        assert anonymous.headers["www-authenticate"].startswith("Basic")
        user = client.get(stack.url, headers={**html, "Authorization": f"Bearer {stack.alice.key}"})
        assert 401 == user.status_code  # a user's key is not enough for the page
        page = client.get(stack.url, headers=html, auth=("admin", ADMIN))
        assert 200 == page.status_code
        assert page.headers["content-type"].startswith("text/html")
        sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert sources
        for source in sources:
            assert source.startswith("/graphql/assets/"), source  # no CDN
            asset = client.get(f"http://127.0.0.1:{stack.port}{source}")
            assert 200 == asset.status_code, source
            assert len(asset.content) > 1000
        # the page's own queries carry the browser's Basic credentials, and work
        reply = client.post(
            stack.url, json={"query": "{ viewer { admin } }"}, auth=("admin", ADMIN)
        )
        assert {"viewer": {"admin": True}} == reply.json()["data"]
        assert 404 == client.get(f"http://127.0.0.1:{stack.port}/graphql/assets/x.js").status_code


def test_a_request_through_the_gateway_appears_in_usage_events(stack: Stack) -> None:
    """The gateway (another process) XADDs its usage event to the stream the feed reads."""
    alice = stack.alice
    args = [sys.executable, "-m", "citadel", "--config", str(stack.config)]
    sim = start_process(
        [sys.executable, "-m", "citadel", "sim", "--port", str(stack.sim)], stack.sim
    )
    gateway_port = free_port()
    try:
        gateway = start_process(
            [*args, "serve", "gateway", "--port", str(gateway_port), "--workers", "1"],
            gateway_port,
            env=stack.env,
        )
        try:

            async def main() -> dict[str, Any]:
                async with _ws_client(stack, alice.key) as session:
                    position = await _last_position(stack)
                    generator = session.subscribe(_subscription(position))
                    first = asyncio.ensure_future(generator.__anext__())
                    async with httpx.AsyncClient(timeout=20) as client:
                        reply = await client.post(
                            f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
                            headers={"Authorization": f"Bearer {alice.key}"},
                            json={"model": "echo", "max_tokens": 5,
                                  "messages": [{"role": "user", "content": "hi"}]},
                        )  # fmt: skip
                    assert 200 == reply.status_code, reply.text
                    result = await asyncio.wait_for(first, 20)
                    await generator.aclose()
                    event: dict[str, Any] = result["usageEvents"]
                    return event

            event = asyncio.run(main())
        finally:
            stop_process(gateway)
    finally:
        stop_process(sim)
    assert alice.user == event["userId"]
    assert "echo" == event["model"]
    assert "Alice" == event["user"]["name"]


# -- predictive alerting -----------------------------------------------------------------------

ALERTING = """
{ forecasts { totalCount nodes { rule kind source threshold severity outcome error
    findings { series outcome detail points value model forecast { at mean } } } }
  anomalies { totalCount nodes { rule kind source outcome error } }
  alerts { totalCount nodes { rule severity labels annotations startsAt endsAt } } }
"""


def test_forecasts_anomalies_and_alerts_from_the_alerting_modules(stack: Stack) -> None:
    """The ledger rule on Alice's team: her month-to-date spend (seeded) is over the 0.001 USD
    threshold, so it fires; the PromQL rule has no Prometheus here, so it is an error."""
    data = run(stack, ALERTING)
    forecast = data["forecasts"]["nodes"]
    assert ["AliceTeamBudget"] == [f["rule"] for f in forecast]
    assert f"ledger:team_spend({stack.alice.team})" == forecast[0]["source"]
    assert "firing" == forecast[0]["outcome"], forecast[0]
    finding = forecast[0]["findings"][0]
    assert stack.alice.team == finding["series"]["team"]
    assert abs(finding["value"] - stack.alice.cost / 1e6) < 1e-9
    anomaly = data["anomalies"]["nodes"]
    assert [("TrafficAnomaly", "error")] == [(a["rule"], a["outcome"]) for a in anomaly]
    assert "PROMETHEUS_ENDPOINT" in anomaly[0]["error"]
    alerts = data["alerts"]["nodes"]
    assert [("AliceTeamBudget", "critical")] == [(a["rule"], a["severity"]) for a in alerts]
    assert stack.alice.team == alerts[0]["labels"]["team"]
    assert "AliceTeamBudget" == alerts[0]["labels"]["alertname"]
    # a user's key: its own team's ledger rules and alerts only, never the platform's
    mine = run(stack, ALERTING, key=stack.alice.key)
    assert 1 == mine["forecasts"]["totalCount"] == mine["alerts"]["totalCount"]
    assert 0 == mine["anomalies"]["totalCount"]
    theirs = run(stack, ALERTING, key=stack.bob.key)
    assert 0 == theirs["forecasts"]["totalCount"]
    assert 0 == theirs["anomalies"]["totalCount"] == theirs["alerts"]["totalCount"]


# -- teams, drains, chatCompletion -----------------------------------------------------------


def test_admin_updates_and_disables_a_team(stack: Stack) -> None:
    name = f"Team Up {uuid.uuid4().hex[:6]}"
    team = run(stack, "mutation ($n: String!) { createTeam(name: $n) { id } }", {"n": name})[
        "createTeam"
    ]
    user = run(
        stack,
        "mutation ($input: CreateUserInput!) { createUser(input: $input) { id } }",
        {"input": {"name": "Dan", "email": f"{uuid.uuid4().hex}@example.com",
                   "teamId": team["id"]}},
    )["createUser"]  # fmt: skip
    secret = run(stack, "mutation ($u: ID!) { createKey(userId: $u) { secret } }",
                 {"u": user["id"]})["createKey"]["secret"]  # fmt: skip
    assert user["id"] == run(stack, "{ viewer { userId } }", key=secret)["viewer"]["userId"]
    renamed = f"{name} renamed"
    changed = run(
        stack,
        "mutation ($id: ID!, $n: String!) { updateTeam(id: $id, input: {name: $n, "
        "budgetUsd: 12.5}) { id name budgetUsd } }",
        {"id": team["id"], "n": renamed},
    )["updateTeam"]
    assert {"id": team["id"], "name": renamed, "budgetUsd": 12.5} == changed
    cleared = run(stack, "mutation ($id: ID!) { updateTeam(id: $id, input: {budgetUsd: null}) "
                  "{ name budgetUsd } }", {"id": team["id"]})["updateTeam"]  # fmt: skip
    assert {"name": renamed, "budgetUsd": None} == cleared  # the name left out is unchanged
    # a user's key may not; an unknown team, a taken name, a bad budget: clear errors
    errors = errors_of(stack, 'mutation ($id: ID!) { updateTeam(id: $id, input: {name: "x"}) '
                       "{ id } }", {"id": team["id"]}, key=secret)  # fmt: skip
    assert "FORBIDDEN" == errors[0]["extensions"]["code"]
    errors = errors_of(stack, 'mutation { updateTeam(id: "team_nope", input: {name: "x"}) { id } }')
    assert ("NOT_FOUND", "id") == (
        errors[0]["extensions"]["code"],
        errors[0]["extensions"]["param"],
    )
    errors = errors_of(stack, "mutation ($id: ID!) { updateTeam(id: $id, input: {budgetUsd: -1}) "
                       "{ id } }", {"id": team["id"]})  # fmt: skip
    assert "BAD_USER_INPUT" == errors[0]["extensions"]["code"]
    bob_team = run(stack, "query ($u: ID!) { user(id: $u) { teamId } }", {"u": stack.bob.user})
    taken = run(stack, "query ($t: ID!) { team(id: $t) { name } }",
                {"t": bob_team["user"]["teamId"]})["team"]["name"]  # fmt: skip
    errors = errors_of(stack, "mutation ($id: ID!, $n: String!) { updateTeam(id: $id, "
                       "input: {name: $n}) { id } }", {"id": team["id"], "n": taken})  # fmt: skip
    assert "CONFLICT" == errors[0]["extensions"]["code"]
    # disabling the team disables its members: their keys stop working
    disabled = run(stack, "mutation ($id: ID!) { disableTeam(id: $id) { id users { nodes "
                   "{ id status } } } }", {"id": team["id"]})["disableTeam"]  # fmt: skip
    assert [{"id": user["id"], "status": "DISABLED"}] == disabled["users"]["nodes"]
    statuses = []
    for _ in range(40):  # the key cache holds a key for at most 5 s
        statuses.append(raw_post(stack, {"query": "{ viewer { userId } }"}, key=secret).status_code)
        if statuses[-1] == 401:
            break
        time.sleep(0.25)
    assert 401 == statuses[-1], statuses


async def _drained_in_redis() -> set[str]:
    client = RedisClient.from_url(REDIS, timeout=2.0)
    try:
        members = await client.execute("SMEMBERS", "citadel:{routing}:drained")
    finally:
        await client.aclose()
    return {m.decode() for m in members}


DEPLOYMENT = "{ name drained state }"


def test_drain_and_restore_a_deployment_as_the_routing_service_does(stack: Stack) -> None:
    try:
        drained = run(stack, f'mutation {{ drainDeployment(name: "llama-b") {DEPLOYMENT} }}')
        assert {"name": "llama-b", "drained": True, "state": "drained"} == drained[
            "drainDeployment"
        ]
        assert "llama-b" in asyncio.run(_drained_in_redis())  # every replica applies it
        live = run(stack, '{ model(name: "llama") { deployments { nodes { name drained } } } }')
        nodes = {d["name"]: d["drained"] for d in live["model"]["deployments"]["nodes"]}
        assert {"llama-a": False, "llama-b": True} == nodes
        explained = run(stack, '{ routeExplain(model: "llama") { deployment } }')
        assert "llama-a" == explained["routeExplain"]["deployment"]
        errors = errors_of(stack, 'mutation { drainDeployment(name: "llama-a") { name } }',
                           key=stack.alice.key)  # fmt: skip
        assert "FORBIDDEN" == errors[0]["extensions"]["code"]
        errors = errors_of(stack, 'mutation { drainDeployment(name: "nope") { name } }')
        assert "NOT_FOUND" == errors[0]["extensions"]["code"]
        assert "deployment_not_found" == errors[0]["extensions"]["reason"]
    finally:
        restored = run(stack, f'mutation {{ restoreDeployment(name: "llama-b") {DEPLOYMENT} }}')
    assert {"name": "llama-b", "drained": False} == {
        k: restored["restoreDeployment"][k] for k in ("name", "drained")
    }
    assert "llama-b" not in asyncio.run(_drained_in_redis())


CHAT = """mutation ($input: ChatCompletionInput!) { chatCompletion(input: $input) {
    id object model requestId deployment choices { index message { role content } finishReason }
    usage { promptTokens completionTokens totalTokens } } }"""


async def _usage_after(stack: Stack, position: str, request_id: str) -> UsageEvent | None:
    from citadel.metering.ledger import decode_event

    client = RedisClient.from_url(REDIS, timeout=2.0)
    try:
        for _ in range(100):  # the sink flushes within metering.flush_seconds
            rows = await client.execute("XRANGE", stack.stream, f"({position}", "+")
            for _id, fields in rows:
                event = decode_event(dict(zip(fields[::2], fields[1::2], strict=True))[b"e"])
                if event.request_id == request_id:
                    return event
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    return None


def test_chat_completion_runs_the_gateways_path_in_process(stack: Stack) -> None:
    """Auth (the caller's key), routing (echo's deployment on the simulator), metering (a usage
    event on the ledger's stream with the caller's user), limits (a tier's refusal)."""
    sim = start_process(
        [sys.executable, "-m", "citadel", "sim", "--port", str(stack.sim)], stack.sim
    )
    try:
        position = asyncio.run(_last_position(stack))
        given = {"model": "echo", "maxTokens": 5,
                 "messages": [{"role": "user", "content": "hello there"}]}  # fmt: skip
        answer = run(stack, CHAT, {"input": given}, key=stack.alice.key)["chatCompletion"]
        assert "chat.completion" == answer["object"]
        assert "echo-a" == answer["deployment"]
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["choices"][0]["message"]["content"]
        usage = answer["usage"]
        assert 0 < usage["completionTokens"] <= 5
        assert usage["totalTokens"] == usage["promptTokens"] + usage["completionTokens"]
        event = asyncio.run(_usage_after(stack, position, answer["requestId"]))
        assert event is not None, "no usage event for the completion"
        assert (stack.alice.user, "echo", "echo-a", 200) == (
            event.user,
            event.model,
            event.deployment,
            event.status,
        )
        # the tier's policy: free may not use coder (the gateway's own 403)
        errors = errors_of(stack, CHAT, {"input": {**given, "model": "coder"}},
                           key=stack.alice.key)  # fmt: skip
        assert "FORBIDDEN" == errors[0]["extensions"]["code"]
        assert "model_not_allowed" == errors[0]["extensions"]["reason"]
        errors = errors_of(stack, CHAT, {"input": {**given, "model": "nope"}})
        assert "NOT_FOUND" == errors[0]["extensions"]["code"]
        errors = errors_of(stack, CHAT, {"input": {**given, "extra": {"stream": True}}})
        assert ("BAD_USER_INPUT", "input.extra.stream") == (
            errors[0]["extensions"]["code"],
            errors[0]["extensions"]["param"],
        )
    finally:
        stop_process(sim)


# -- the cost budget per key and minute ------------------------------------------------------


@contextlib.contextmanager
def _service_with(stack: Stack, extra: str, tmp: Path) -> Iterator[Stack]:
    """A second graphql-api process on the same stores, with ``extra`` appended to the config."""
    config = tmp / "citadel-extra.yaml"
    config.write_text(stack.config.read_text() + extra)
    port = free_port()
    args = [sys.executable, "-m", "citadel", "--config", str(config)]
    proc = start_process([*args, "serve", "graphql-api", "--port", str(port)], port, env=stack.env)
    try:
        yield dataclasses.replace(stack, port=port, config=config)
    finally:
        stop_process(proc)


TIERS = "{ tiers(first: 2) { nodes { name } } }"  # costs 3, and its answer holds 3 objects


def test_a_keys_cost_budget_per_minute_refuses_before_running(stack: Stack, tmp_path: Path) -> None:
    with _service_with(stack, "graphql:\n  cost_per_minute: 30\n", tmp_path) as small:
        alice = small.alice
        # 20 aliases of createKey cost 40: over the budget by itself, refused before running
        aliases = " ".join(
            f'k{i}: createKey(userId: "{alice.user}", name: "budget") {{ secret key {{ id }} }}'
            for i in range(20)
        )
        reply = raw_post(small, {"query": f"mutation {{ {aliases} }}"}, key=alice.key)
        assert 200 == reply.status_code
        body = reply.json()
        assert body.get("data") is None
        error = body["errors"][0]
        assert "RATE_LIMITED" == error["extensions"]["code"]
        assert "query_cost_budget_exceeded" == error["extensions"]["reason"]
        assert 40 == error["extensions"]["requestedQueryCost"]
        assert 30 == error["extensions"]["budgetPerMinute"]
        assert "by itself" in error["message"]
        query = "query ($u: ID!) { user(id: $u) { keys(first: 100) { nodes { name } } } }"
        keys = run(small, query, {"u": alice.user})["user"]["keys"]["nodes"]
        assert "budget" not in {k["name"] for k in keys}  # no resolver ran
        # queries of cost 3 spend it: about ten pass, then one is refused with the cost
        remaining, refusal = [], None
        for _ in range(30):
            answer = raw_post(small, {"query": TIERS}, key=alice.key).json()
            if "errors" in answer:
                refusal = answer["errors"][0]
                break
            remaining.append(answer["extensions"]["cost"]["budgetRemaining"])
        assert refusal is not None, remaining
        assert 9 <= len(remaining) <= 13, remaining
        assert remaining == sorted(remaining, reverse=True)
        assert 3 == refusal["extensions"]["requestedQueryCost"]
        assert refusal["extensions"]["retryAfterSeconds"] > 0
        assert "try again in" in refusal["message"]

        # a subscription is charged once, when it starts: over the budget, it never starts
        async def subscribe() -> list[dict[str, Any]]:
            query = "subscription { usageEvents { user { keys(first: 100) { nodes { id } } } } }"
            async with _ws_client(small, alice.key) as session:
                try:
                    async for _ in session.subscribe(GraphQLRequest(query)):
                        break
                except TransportQueryError as exc:
                    return exc.errors or []
            raise AssertionError("the subscription over the budget started")

        refused = asyncio.run(asyncio.wait_for(subscribe(), 20))
        assert "query_cost_budget_exceeded" == refused[0]["extensions"]["reason"]
        # the budget is the key's: Bob's, and the admin's (none), are untouched
        assert "errors" not in raw_post(small, {"query": TIERS}, key=small.bob.key).json()
        for _ in range(15):
            assert "errors" not in raw_post(small, {"query": TIERS}).json()


# -- persisted queries ----------------------------------------------------------------------


def _persisted(sha: str) -> dict[str, Any]:
    return {"persistedQuery": {"version": 1, "sha256Hash": sha}}


def test_persisted_queries_as_apollo_sends_them(stack: Stack) -> None:
    import hashlib

    from graphql import parse, print_ast

    # the text as the gql client sends it (it prints the document it parsed)
    query = print_ast(
        parse(f"query Models{uuid.uuid4().hex[:8]} {{ models {{ nodes {{ name }} }} }}")
    )
    sha = hashlib.sha256(query.encode()).hexdigest()
    # an unknown hash: PersistedQueryNotFound
    reply = raw_post(stack, {"extensions": _persisted(sha)})
    assert 200 == reply.status_code
    error = reply.json()["errors"][0]
    assert ("PersistedQueryNotFound", "PERSISTED_QUERY_NOT_FOUND") == (
        error["message"],
        error["extensions"]["code"],
    )

    # the hash with its query registers it (the gql client sends both) and runs it
    async def register() -> dict[str, Any]:
        async with http_session(stack) as session:
            request = GraphQLRequest(query, extensions=_persisted(sha))
            return await session.execute(request)

    data = asyncio.run(register())
    assert {"llama", "coder", "echo"} == {m["name"] for m in data["models"]["nodes"]}
    # now the hash alone runs it, over POST and over GET, for any key
    reply = raw_post(stack, {"extensions": _persisted(sha)}, key=stack.alice.key)
    assert data == reply.json()["data"]
    assert "cost" in reply.json()["extensions"]
    with httpx.Client(timeout=10) as client:
        got = client.get(
            stack.url,
            params={"extensions": orjson.dumps(_persisted(sha)).decode()},
            headers={"Authorization": f"Bearer {ADMIN}", "Accept": "application/json"},
        )
    assert 200 == got.status_code, got.text
    assert data == got.json()["data"]
    # a hash that is not the query's, a bad hash, another version: clear errors
    for extensions, code in (
        (_persisted("0" * 64), "PERSISTED_QUERY_HASH_MISMATCH"),
        ({"persistedQuery": {"version": 1, "sha256Hash": "xyz"}}, "BAD_USER_INPUT"),
        ({"persistedQuery": {"version": 2, "sha256Hash": sha}}, "PERSISTED_QUERY_NOT_SUPPORTED"),
    ):
        reply = raw_post(stack, {"query": query, "extensions": extensions})
        assert 200 == reply.status_code
        assert code == reply.json()["errors"][0]["extensions"]["code"], reply.json()


def test_a_persisted_query_is_known_to_every_replica(stack: Stack, tmp_path: Path) -> None:
    """Registered through one process, run by hash through another: they share Redis."""
    import hashlib

    query = f"query Tiers{uuid.uuid4().hex[:8]} {{ tiers {{ nodes {{ name }} }} }}"
    sha = hashlib.sha256(query.encode()).hexdigest()
    assert "errors" not in raw_post(stack, {"query": query, "extensions": _persisted(sha)}).json()
    with _service_with(stack, "", tmp_path) as other:
        reply = raw_post(other, {"extensions": _persisted(sha)})
    assert {"free", "pro"} == {t["name"] for t in reply.json()["data"]["tiers"]["nodes"]}


# -- operation metrics ----------------------------------------------------------------------


def _metrics(stack: Stack) -> dict[str, float]:
    with httpx.Client(timeout=10) as client:
        text = client.get(f"http://127.0.0.1:{stack.port}/metrics").text
    samples = {}
    for line in text.splitlines():
        if line.startswith("citadel_graphql_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_operations_by_name_and_outcome_duration_cost_and_refusals_on_metrics(
    stack: Stack,
) -> None:
    name = f"Probe{uuid.uuid4().hex[:8]}"
    before = _metrics(stack)
    for _ in range(3):
        run(stack, f"query {name} {{ tiers(first: 2) {{ nodes {{ name }} }} }}")
    deep = ("{ teams { nodes { users { nodes { team { users { nodes { team { users { nodes "
            "{ team { users { nodes { id } } } } } } } } } } } } } }")  # fmt: skip
    errors_of(stack, deep)
    errors_of(stack, "{ " + " ".join(f"a{i}: costs {{ totalCount }}" for i in range(100)) + " }")
    errors_of(stack, "{ teams(first: 100) { nodes { users(first: 100) { nodes { keys(first: 100) "
                     "{ nodes { id } } } } } } }")  # fmt: skip
    errors_of(stack, "{ models { nodes { colour } } }")
    errors_of(stack, '{ routeExplain(model: "nope") { reason } }')
    after = _metrics(stack)

    def grew(sample: str) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    ops = "citadel_graphql_operations_total"
    assert 3 == grew(f'{ops}{{operation="{name}",type="query",outcome="ok"}}')
    assert 1 == grew(f'{ops}{{operation="anonymous",type="query",outcome="invalid"}}')
    assert 1 == grew(f'{ops}{{operation="anonymous",type="query",outcome="error"}}')
    assert 3 == grew(f'{ops}{{operation="anonymous",type="query",outcome="refused"}}')
    for reason in ("depth", "aliases", "cost"):
        assert 1 == grew(f'citadel_graphql_refusals_total{{reason="{reason}"}}'), reason
    duration = "citadel_graphql_operation_duration_seconds_count"
    assert 3 == grew(f'{duration}{{operation="{name}",type="query"}}')
    # every one of the probe's three operations requested 3 and held 3
    cost = "citadel_graphql_operation_cost"
    assert grew(f'{cost}_sum{{kind="requested"}}') >= 9
    assert grew(f'{cost}_bucket{{kind="actual",le="3.0"}}') >= 3


# -- the GraphQL-over-HTTP audit suite ------------------------------------------------------------

NODE_PACKAGE = Path(__file__).parent / "node"


def _audits(stack: Stack, tmp: Path) -> list[dict[str, Any]]:
    """graphql-http's audits against the service, installed by ``npm ci`` from the checked-in
    lock file into ``tmp`` (a fresh machine has only Node and the npm registry)."""
    import shutil
    import subprocess

    npm, node = shutil.which("npm"), shutil.which("node")
    assert npm is not None, "the audit suite needs npm (Node 20)"
    assert node is not None, "the audit suite needs Node 20"
    for name in ("package.json", "package-lock.json", "audit.mjs"):
        shutil.copy(NODE_PACKAGE / name, tmp / name)
    subprocess.run(
        [npm, "ci", "--cache", str(tmp / ".npm"), "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=tmp,
        check=True,
        timeout=180,
        capture_output=True,
    )
    done = subprocess.run(
        [node, "audit.mjs", stack.url],
        cwd=tmp,
        check=True,
        timeout=120,
        capture_output=True,
        env={**os.environ, "CITADEL_AUDIT_KEY": ADMIN},
    )
    results: list[dict[str, Any]] = orjson.loads(done.stdout)
    return results


def test_every_graphql_over_http_audit_passes(stack: Stack, tmp_path: Path) -> None:
    results = _audits(stack, tmp_path)
    assert len(results) > 40  # the suite ran
    failed = [
        (r["id"], r["name"], r["status"], r["reason"]) for r in results if r["status"] != "ok"
    ]
    assert [] == failed, "\n".join(map(str, failed))


# -- deploymentState, alerts, chatCompletionStream ---------------------------------------------

PROTOCOLS = {
    "graphql-transport-ws": WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL,
    "graphql-ws": WebsocketsTransport.APOLLO_SUBPROTOCOL,
}


def _ws(stack: Stack, key: str, protocol: str = "graphql-transport-ws") -> Client:
    transport = WebsocketsTransport(
        url=stack.ws,
        init_payload={"authorization": f"Bearer {key}"},
        subprotocols=[PROTOCOLS[protocol]],
    )
    return Client(transport=transport)


async def _feed_last(topic: str) -> str:
    """The newest position of a feed topic's stream (``0-0`` when it has none yet)."""
    from citadel.feed.redis import stream_key

    client = RedisClient.from_url(REDIS, timeout=2.0)
    try:
        rows = await client.execute("XREVRANGE", stream_key(topic), "+", "-", "COUNT", 1)
    finally:
        await client.aclose()
    return rows[0][0].decode() if rows else "0-0"


async def _publish_feed(topic: str, event: dict[str, Any]) -> None:
    """An event as another process's Publisher puts it on the feed."""
    from citadel.feed.redis import stream_key

    client = RedisClient.from_url(REDIS, timeout=2.0)
    try:
        await client.execute("XADD", stream_key(topic), "*", "e", orjson.dumps(event))
    finally:
        await client.aclose()


async def _collect(
    stack: Stack,
    key: str,
    request: GraphQLRequest,
    field: str,
    until: Any,
    ready: asyncio.Event,
    protocol: str = "graphql-transport-ws",
) -> list[dict[str, Any]]:
    """The events of one subscription until ``until(events)`` holds."""
    got: list[dict[str, Any]] = []
    async with _ws(stack, key, protocol) as session:
        generator = session.subscribe(request)
        first = asyncio.ensure_future(generator.__anext__())
        await asyncio.sleep(0.5)  # the subscription reaches the feed's tail
        ready.set()
        got.append((await first)[field])
        while not until(got):
            got.append((await generator.__anext__())[field])
        await generator.aclose()
    return got


def _drains(events: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    return [(e["deployment"], e["drained"]) for e in events if e["kind"] == "drain"]


STATE = """subscription ($model: String, $after: String) { deploymentState(model: $model,
    after: $after) { position kind deployment model source drained healthy breaker inFlight
    requests time } }"""


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_deployment_state_follows_drains_of_the_models_a_key_may_use(
    stack: Stack, protocol: str
) -> None:
    """A drain through this service's router (the routing service's own code) is on the feed's
    deployments topic, which every gateway's router publishes to as well; Alice's free tier
    allows llama and echo, never coder."""

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        position = await _feed_last("deployments")
        admin_ready, alice_ready = asyncio.Event(), asyncio.Event()
        admin = asyncio.create_task(
            _collect(stack, ADMIN,
                     GraphQLRequest(STATE, variable_values={"model": "big", "after": position}),
                     "deploymentState", lambda got: len(_drains(got)) >= 2, admin_ready, protocol)
        )  # fmt: skip
        alice = asyncio.create_task(
            _collect(stack, stack.alice.key, GraphQLRequest(STATE), "deploymentState",
                     lambda got: len(_drains(got)) >= 2, alice_ready, protocol)
        )  # fmt: skip
        await asyncio.wait_for(asyncio.gather(admin_ready.wait(), alice_ready.wait()), 15)
        # coder's only deployment cannot be drained: a gateway replica's event says it was
        coder = {"kind": "drain", "deployment": "coder-a", "model": "coder", "drained": True}
        await _publish_feed("deployments", {**coder, "source": "gateway@x:1", "time": time.time()})
        await _run_async(stack, 'mutation { drainDeployment(name: "llama-b") { name } }')
        await _run_async(stack, 'mutation { restoreDeployment(name: "llama-b") { name } }')
        return await asyncio.wait_for(asyncio.gather(admin, alice), 20)

    try:
        admin_events, alice_events = asyncio.run(main())
    finally:
        run(stack, 'mutation { restoreDeployment(name: "llama-b") { name } }')
    assert [("llama-b", True), ("llama-b", False)] == _drains(admin_events)  # "big" is llama
    assert {"llama"} == {e["model"] for e in admin_events}
    assert all(e["source"].startswith("graphql-api@") for e in admin_events if e["kind"] == "drain")
    assert [("llama-b", True), ("llama-b", False)] == _drains(alice_events)  # never coder-a
    assert {"llama", "echo"} >= {e["model"] for e in alice_events}
    assert admin_events[0]["position"] > "0-0"


async def _run_async(
    stack: Stack, query: str, variables: dict[str, Any] | None = None, key: str = ADMIN
) -> dict[str, Any]:
    async with http_session(stack, key) as session:
        return await session.execute(GraphQLRequest(query, variable_values=variables))


def _subscription_errors(
    stack: Stack, key: str, query: str, variables: dict[str, Any], protocol: str
) -> list[dict[str, Any]]:
    async def main() -> None:
        async with _ws(stack, key, protocol) as session:
            generator = session.subscribe(GraphQLRequest(query, variable_values=variables))
            await asyncio.wait_for(generator.__anext__(), 15)

    with pytest.raises(TransportQueryError) as caught:
        asyncio.run(main())
    errors: list[dict[str, Any]] = caught.value.errors or []
    assert errors, "expected GraphQL errors"
    return errors


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_deployment_state_bad_input_is_a_clear_graphql_error(stack: Stack, protocol: str) -> None:
    errors = _subscription_errors(stack, stack.alice.key, STATE, {"model": "coder"}, protocol)
    assert ("FORBIDDEN", "model_not_allowed", "model") == tuple(
        errors[0]["extensions"][k] for k in ("code", "reason", "param")
    )
    errors = _subscription_errors(stack, ADMIN, STATE, {"model": "nope"}, protocol)
    assert "NOT_FOUND" == errors[0]["extensions"]["code"]
    assert "'nope'" in errors[0]["message"]
    errors = _subscription_errors(stack, ADMIN, STATE, {"after": "yesterday"}, protocol)
    assert ("BAD_USER_INPUT", "after") == (
        errors[0]["extensions"]["code"],
        errors[0]["extensions"]["param"],
    )
    assert "not a feed position" in errors[0]["message"]


ALERT_EVENTS = """subscription ($after: String) { alerts(after: $after) { position state rule
    severity fingerprint labels startsAt endsAt source } }"""


def test_alerts_arrive_as_the_predictive_alerting_service_raises_them(stack: Stack) -> None:
    """The predictive-alerting service (another process, the same config) evaluates Alice's
    team's budget rule, which fires (her seeded spend is over its threshold): the alert is on the
    feed's alerts topic, seen by the admin and Alice, never by Bob (no rule of his team)."""
    alerting_port = free_port()
    args = [sys.executable, "-m", "citadel", "--config", str(stack.config)]

    async def main() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        position = await _feed_last("alerts")
        request = GraphQLRequest(ALERT_EVENTS, variable_values={"after": position})
        ready = [asyncio.Event() for _ in range(2)]

        def fired(got: list[dict[str, Any]]) -> bool:
            return any(e["rule"] == "AliceTeamBudget" for e in got)

        admin = asyncio.create_task(_collect(stack, ADMIN, request, "alerts", fired, ready[0]))
        alice = asyncio.create_task(
            _collect(stack, stack.alice.key, request, "alerts", fired, ready[1], "graphql-ws")
        )
        bob: list[dict[str, Any]] = []

        async def watch_bob() -> None:
            async with _ws(stack, stack.bob.key) as session:
                bob.extend([result["alerts"] async for result in session.subscribe(request)])

        bob_task = asyncio.create_task(watch_bob())
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 15)
        service = start_process(
            [*args, "serve", "predictive-alerting", "--port", str(alerting_port)],
            alerting_port,
            env=stack.env,
            timeout=30,
        )
        try:
            admin_events, alice_events = await asyncio.wait_for(asyncio.gather(admin, alice), 40)
            await asyncio.sleep(1.0)  # Bob's subscription had the same events to see
        finally:
            stop_process(service)
            bob_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bob_task
        return admin_events, alice_events, bob

    admin_events, alice_events, bob_events = asyncio.run(main())
    alert = next(e for e in admin_events if e["rule"] == "AliceTeamBudget")
    assert ("firing", "critical", None) == (alert["state"], alert["severity"], alert["endsAt"])
    assert stack.alice.team == alert["labels"]["team"]
    assert alert["source"].startswith("predictive-alerting@")
    assert [alert["fingerprint"]] == [e["fingerprint"] for e in alice_events]
    assert [] == bob_events


STREAM = """subscription ($input: ChatCompletionInput!) { chatCompletionStream(input: $input) {
    index id model role content finishReason requestId deployment
    usage { promptTokens completionTokens totalTokens } } }"""
TBT_MS = 150


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_chat_completion_stream_delivers_tokens_before_the_completion_ends(
    stack: Stack, protocol: str
) -> None:
    """The simulator spaces its tokens ``TBT_MS`` apart: the first chunk reaches the subscriber
    while the model is still generating (long before the last), through the gateway's path in
    this service (Alice's key: her limits, her usage event in the ledger)."""
    sim = start_process(
        [sys.executable, "-m", "citadel", "sim", "--port", str(stack.sim),
         "--tbt-ms", str(TBT_MS)],
        stack.sim,
    )  # fmt: skip
    given = {"model": "echo", "maxTokens": 8,
             "messages": [{"role": "user", "content": "count to eight please"}]}  # fmt: skip

    async def main() -> list[tuple[float, dict[str, Any]]]:
        async with _ws(stack, stack.alice.key, protocol) as session:
            request = GraphQLRequest(STREAM, variable_values={"input": given})
            return [
                (time.monotonic(), result["chatCompletionStream"])
                async for result in session.subscribe(request)
            ]

    try:
        position = asyncio.run(_last_position(stack))
        arrived = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        stop_process(sim)
    chunks = [c for _, c in arrived]
    assert list(range(len(chunks))) == [c["index"] for c in chunks]
    tokens = [(t, c) for t, c in arrived if c["content"]]
    assert len(tokens) >= 4, chunks
    # the first tokens were delivered while the others were still being generated
    assert tokens[-1][0] - tokens[0][0] >= (len(tokens) - 2) * TBT_MS / 1000 * 0.8
    assert "".join(c["content"] or "" for c in chunks)
    last = chunks[-1]
    assert last["usage"] is not None
    assert 0 < last["usage"]["completionTokens"] <= 8
    assert any(c["finishReason"] in ("stop", "length") for c in chunks)
    assert {"echo-a"} == {c["deployment"] for c in chunks}
    request_id = chunks[0]["requestId"]
    event = asyncio.run(_usage_after(stack, position, request_id))
    assert event is not None, "no usage event for the streamed completion"
    assert (stack.alice.user, "echo-a", True) == (event.user, event.deployment, event.streamed)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_chat_completion_stream_bad_input_is_a_clear_graphql_error(
    stack: Stack, protocol: str
) -> None:
    given = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    errors = _subscription_errors(
        stack, stack.alice.key, STREAM, {"input": {**given, "model": "coder"}}, protocol
    )
    assert ("FORBIDDEN", "model_not_allowed") == (
        errors[0]["extensions"]["code"],
        errors[0]["extensions"]["reason"],
    )
    errors = _subscription_errors(stack, ADMIN, STREAM, {"input": {**given, "model": "nope"}},
                                  protocol)  # fmt: skip
    assert "NOT_FOUND" == errors[0]["extensions"]["code"]
    errors = _subscription_errors(
        stack, ADMIN, STREAM, {"input": {**given, "extra": {"stream": False}}}, protocol
    )
    assert ("BAD_USER_INPUT", "input.extra.stream") == (
        errors[0]["extensions"]["code"],
        errors[0]["extensions"]["param"],
    )
    errors = _subscription_errors(stack, ADMIN, STREAM, {"input": {"model": "echo"}}, protocol)
    assert "GRAPHQL_VALIDATION_FAILED" == errors[0]["extensions"]["code"]  # messages missing
