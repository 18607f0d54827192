"""Team budgets and per-key limits ("virtual keys") at the gateway: two gateway replicas on one
PostgreSQL accounts database and one Redis (the test DB), a real simulator upstream, real
clients (openai, plain HTTP)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import orjson
import pytest

from citadel.accounts.migrate import ACCOUNTS
from citadel.accounts.sql import open_store
from citadel.accounts.store import KeyLimits
from citadel.limits.decision import Limits
from citadel.limits.policy import cost_micros
from citadel.limits.redis import RedisLimiter
from citadel.settings import Price
from citadel.stores.redis import RedisClient

from gateway_helpers import chat, error_of, post_json, request
from support import free_port, scratch_postgres, start_process, stop_process

REDIS_URL = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/8")
PRICE = Price(input_per_1k=1.0, output_per_1k=2.0)
CHAT = "/v1/chat/completions"


@dataclass(frozen=True)
class Replicas:
    urls: tuple[str, str]
    database: str


def _config(tmp: Path, database: str, sim: str) -> Path:
    config = tmp / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "{database}", key_cache_ttl_seconds: 0.2, default_tier: roomy}}
limits: {{backend: "{REDIS_URL}", default_max_tokens: 20}}
tiers:
  roomy: {{cost_per_month_usd: 1000}}
models:
  - name: sim-chat
    price: {{input_per_1k: {PRICE.input_per_1k}, output_per_1k: {PRICE.output_per_1k}}}
    deployments: [{{name: sim-a, url: "{sim}", model: sim-chat}}]
  - name: sim-code
    specialties: [code]
    price: {{input_per_1k: {PRICE.input_per_1k}, output_per_1k: {PRICE.output_per_1k}}}
    deployments: [{{name: sim-b, url: "{sim}", model: sim-chat}}]
  - name: sim-embed
    kind: embedding
    deployments: [{{name: sim-e, url: "{sim}", model: sim-embed}}]
""",
        encoding="utf-8",
    )
    return config


def _serve(config: Path, *args: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [sys.executable, "-m", "citadel", "--config", str(config), *args, str(port)]
    return start_process(command, port, env={"CITADEL_ADMIN_KEY": "sk-test-admin"}), port


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    tmp = tmp_path_factory.mktemp("virtual-keys")
    with scratch_postgres(prepare=ACCOUNTS.upgrade) as database:
        sim_port = free_port()
        sim = start_process(
            [sys.executable, "-m", "citadel", "sim", "--port", str(sim_port)], sim_port
        )
        procs = []
        try:
            config = _config(tmp, database, f"http://127.0.0.1:{sim_port}")
            ports = []
            for _ in range(2):
                proc, port = _serve(config, "serve", "gateway", "--port")
                procs.append(proc)
                ports.append(port)
            urls = (f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}")
            yield Replicas(urls, database)
        finally:
            for proc in procs:
                stop_process(proc)
            stop_process(sim)


def _store_call(database: str, action: str, **kw: object) -> object:
    async def go() -> object:
        store = await open_store(database, migrate=False)
        try:
            if action == "team":
                team = await store.create_team(f"team-{uuid.uuid4().hex[:8]}")
                await store.set_team_budget(team.id, kw["budget"])  # type: ignore[arg-type]
                return team.id
            user = await store.create_user(
                name="tester",
                email=f"{uuid.uuid4().hex}@example.com",
                tier="roomy",
                team_id=kw.get("team"),  # type: ignore[arg-type]
            )
            key, secret = await store.create_key(
                user.id,
                name="test",
                expires_at=kw.get("expires_at"),  # type: ignore[arg-type]
                limits=kw.get("limits"),  # type: ignore[arg-type]
            )
            return user.id, key.id, secret
        finally:
            await store.aclose()

    return asyncio.run(go())


def new_team(database: str, budget_micros: int) -> str:
    team = _store_call(database, "team", budget=budget_micros)
    assert isinstance(team, str)
    return team


def new_key(
    database: str,
    *,
    team: str | None = None,
    limits: KeyLimits | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, str, str]:
    """A fresh user (of ``team``) and a key: (user id, key id, secret)."""
    made = _store_call(database, "user", team=team, limits=limits, expires_at=expires_at)
    assert isinstance(made, tuple)
    return made


def another_key(database: str, user: str) -> str:
    """A second key, with no limits of its own, for ``user``: its secret."""

    async def go() -> str:
        store = await open_store(database, migrate=False)
        try:
            return (await store.create_key(user, name="other"))[1]
        finally:
            await store.aclose()

    return asyncio.run(go())


def call(url: str, secret: str, doc: object) -> tuple[int, dict[str, str], bytes]:
    return post_json(url, CHAT, doc, {"authorization": f"Bearer {secret}"}, auth=False)


def spent(principal: str, limits: Limits, *, team: bool = False) -> int:
    """What the shared limiter holds against a user's or a team's monthly budget."""

    async def go() -> int:
        limiter = RedisLimiter(RedisClient.from_url(REDIS_URL, timeout=2.0), "UTC", 600)
        try:
            if team:
                snapshot = await limiter.team_usage(principal, limits, time.time())
            else:
                snapshot = await limiter.usage(principal, limits, time.time())
            return next(f.used for f in snapshot.limits if f.name == "cost_per_month")
        finally:
            await limiter.aclose()

    return asyncio.run(go())


def wait_equal(expected: int, read: object, what: str) -> None:
    """Reconciliation runs after each reply, in the background: wait (bounded) for it."""
    deadline = time.monotonic() + 10
    got = None
    while time.monotonic() < deadline:
        got = read()  # type: ignore[operator]
        if got == expected:
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: {got} != {expected}")


def test_members_on_two_replicas_share_the_team_budget_to_the_micro_dollar(
    replicas: Replicas,
) -> None:
    """Two members of one team, each request sent to the other replica in turn, until the
    team's budget refuses one: a 429 naming the team (openai's RateLimitError); every member's
    served request is charged to the team and to the member, exactly the price of its usage,
    and the team never passes its budget."""
    budget = 200_000  # $0.20: a handful of requests of about $0.03 each
    team = new_team(replicas.database, budget)
    members = [new_key(replicas.database, team=team) for _ in range(2)]
    served: dict[str, int] = {user: 0 for user, _, _ in members}
    refusal = None
    for i in range(40):
        user, _, secret = members[i % 2]
        status, headers, body = call(replicas.urls[i % 2], secret, chat(max_tokens=10))
        if status == 429:
            refusal = (headers, error_of(body))
            break
        assert 200 == status, body
        usage = orjson.loads(body)["usage"]
        served[user] += cost_micros(PRICE, usage["prompt_tokens"], usage["completion_tokens"])
        time.sleep(0.02)
    assert refusal is not None, "the team budget never refused a request"
    headers, error = refusal
    assert "team_cost_per_month" == headers["x-citadel-limit"]
    assert "retry-after" in headers
    assert error["message"].startswith("Team budget reached"), error
    assert "(limit $0.20)" in error["message"], error
    assert all(served.values()), served  # both members were served, on both replicas
    total = sum(served.values())
    assert total <= budget
    team_limits = Limits(cost_per_month_micros=budget)
    wait_equal(total, lambda: spent(team, team_limits, team=True), "team spend")
    for user, cost in served.items():
        assert cost == spent(user, Limits(cost_per_month_micros=10**9))
    client = openai.OpenAI(base_url=f"{replicas.urls[1]}/v1", api_key=members[0][2], max_retries=0)
    with pytest.raises(openai.RateLimitError, match="Team budget reached"):
        client.chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=10
        )
    client.close()


def test_a_key_has_its_own_requests_per_minute_and_budget(replicas: Replicas) -> None:
    """A key's own rpm refuses its third request with the key named, while its owner's other
    key goes on; a key's own budget refuses once spent."""
    user, _, narrow = new_key(replicas.database, limits=KeyLimits(requests_per_minute=2))
    other = another_key(replicas.database, user)
    status, headers, _ = call(replicas.urls[0], narrow, chat(max_tokens=5))
    assert (200, "2", "1") == (
        status,
        headers["x-ratelimit-limit-requests"],
        headers["x-ratelimit-remaining-requests"],
    )
    assert 200 == call(replicas.urls[1], narrow, chat(max_tokens=5))[0]
    status, headers, body = call(replicas.urls[0], narrow, chat(max_tokens=5))
    assert (429, "key_requests_per_minute") == (status, headers["x-citadel-limit"])
    assert "this API key's own requests per minute (limit 2)" in error_of(body)["message"]
    for url in replicas.urls:  # the owner's key without limits of its own is not refused
        assert 200 == call(url, other, chat(max_tokens=5))[0]
    _, _, broke = new_key(replicas.database, limits=KeyLimits(budget_micros=1_000))
    status, headers, body = call(replicas.urls[1], broke, chat(max_tokens=5))
    assert (429, "key_cost_per_month") == (status, headers["x-citadel-limit"])
    assert "this API key's own cost per month (limit $0.001)" in error_of(body)["message"]


def test_a_key_uses_only_its_models_and_lists_only_them(replicas: Replicas) -> None:
    """A key limited to sim-chat gets a 403 for sim-code and a 404 looking it up; /v1/models
    lists sim-chat and `auto`, and `auto` is served by sim-chat even for a code prompt."""
    _, _, secret = new_key(replicas.database, limits=KeyLimits(models=("sim-chat",)))
    status, _, body = call(replicas.urls[0], secret, {**chat(), "model": "sim-code"})
    assert 403 == status
    error = error_of(body)
    assert ("model_not_allowed", "model") == (error["code"], error["param"])
    assert "This API key may not use the model `sim-code`" in error["message"]
    auth = {"authorization": f"Bearer {secret}"}
    listed = request(replicas.urls[1], "GET", "/v1/models", headers=auth, auth=False)
    assert 200 == listed[0]
    assert ["sim-chat", "auto"] == [m["id"] for m in orjson.loads(listed[2])["data"]]
    path = "/v1/models/sim-code"
    assert 404 == request(replicas.urls[0], "GET", path, headers=auth, auth=False)[0]
    code = "def add(a, b):\n    return a + b\n\nFix this Python function."
    status, _, body = call(replicas.urls[0], secret, {**chat(code), "model": "auto"})
    assert 200 == status, body
    assert "sim-chat" == orjson.loads(body)["model"]


def test_an_expired_key_is_a_401_that_says_so(replicas: Replicas) -> None:
    """An expired key's 401 says it expired, and when; a key expiring later still works."""
    past = datetime.now(UTC) - timedelta(minutes=5)
    _, key_id, expired = new_key(replicas.database, expires_at=past)
    status, _, body = call(replicas.urls[0], expired, chat())
    assert 401 == status
    error = error_of(body)
    assert "api_key_expired" == error["code"]
    assert (
        f"This API key ({key_id}) expired at {past.isoformat(timespec='seconds')}"
        in (error["message"])
    )
    client = openai.OpenAI(base_url=f"{replicas.urls[1]}/v1", api_key=expired, max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        client.models.list()
    client.close()
    later = datetime.now(UTC) + timedelta(days=1)
    _, _, fresh = new_key(replicas.database, expires_at=later)
    assert 200 == call(replicas.urls[1], fresh, chat())[0]


def test_a_deleted_users_keys_stop_working_on_every_replica(replicas: Replicas) -> None:
    """Issue 18 item 5 at the gateway: once a user is deleted (their keys revoked in the same
    transaction), both replicas answer their key 401 within the key cache's TTL (0.2 s here);
    another user's key is untouched."""
    user, _, secret = new_key(replicas.database)
    _, _, other = new_key(replicas.database)
    for url in replicas.urls:
        assert 200 == call(url, secret, chat())[0]

    async def delete() -> None:
        store = await open_store(replicas.database, migrate=False)
        try:
            await store.delete_user(user)
        finally:
            await store.aclose()

    asyncio.run(delete())
    time.sleep(0.5)
    for url in replicas.urls:
        status, _, body = call(url, secret, chat())
        assert 401 == status, body
        assert "authentication_error" == error_of(body)["type"]
        assert 200 == call(url, other, chat())[0]
