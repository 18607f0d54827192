"""Per-user API keys and exact limits at the gateway, against real Redis and a real simulator."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import openai
import orjson
import pytest

from citadel.accounts.sql import open_store

from gateway_helpers import Stack, chat, error_of, metric_value, post_json, request
from support import free_port, start_process, stop_process

CHAT = "/v1/chat/completions"
REDIS_DB = 13


@dataclass(frozen=True)
class LimitedGateway:
    url: str
    database: str


def _redis_cli(*args: str, port: int = 6379) -> None:
    subprocess.run(
        ["redis-cli", "-p", str(port), "-n", str(REDIS_DB), *args],
        check=True,
        capture_output=True,
        timeout=10,
    )


def limited_config(tmp: Path, sim: str, redis_url: str, failure_mode: str = "open") -> Path:
    database = f"sqlite+aiosqlite:///{tmp / 'accounts.db'}"
    config = tmp / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "{database}", key_cache_ttl_seconds: 0.2, default_tier: roomy}}
limits: {{backend: "{redis_url}", failure_mode: {failure_mode}, default_max_tokens: 150}}
tiers:
  roomy: {{}}
  tiny: {{requests_per_minute: 3}}
  tokeny: {{tokens_per_minute: 200}}
  single: {{concurrent_requests: 1}}
  daily: {{tokens_per_day: 60}}
  embed-only: {{models: [sim-embed]}}
models:
  - name: sim-chat
    price: {{input_per_1k: 1.0, output_per_1k: 2.0}}
    deployments: [{{name: sim-a, url: "{sim}", model: sim-chat}}]
  - name: sim-embed
    kind: embedding
    deployments: [{{name: sim-e, url: "{sim}", model: sim-embed}}]
"""
    )
    return config


def start_gateway(config: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = start_process(
        [
            sys.executable,
            "-m",
            "citadel",
            "--config",
            str(config),
            "serve",
            "gateway",
            "--port",
            str(port),
        ],
        port,
        env={"CITADEL_ADMIN_KEY": "sk-test-admin"},
    )
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def limited(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LimitedGateway]:
    _redis_cli("FLUSHDB")
    tmp = tmp_path_factory.mktemp("limited")
    config = limited_config(tmp, stack.sim, f"redis://127.0.0.1:6379/{REDIS_DB}")
    proc, url = start_gateway(config)
    try:
        yield LimitedGateway(url, f"sqlite+aiosqlite:///{tmp / 'accounts.db'}")
    finally:
        stop_process(proc)


def new_key(
    database: str,
    tier: str,
    *,
    expires_at: datetime | None = None,
    revoke: bool = False,
    disable: bool = False,
) -> tuple[str, str]:
    """A fresh user of ``tier`` and an API key for them: (key id, secret)."""

    async def make() -> tuple[str, str]:
        store = await open_store(database, migrate=True)
        try:
            user = await store.create_user(
                name="tester", email=f"{uuid.uuid4().hex}@example.com", tier=tier
            )
            key, secret = await store.create_key(user.id, name="test", expires_at=expires_at)
            if revoke:
                await store.revoke_key(key.id)
            if disable:
                await store.update_user(user.id, status="disabled")
            return key.id, secret
        finally:
            await store.aclose()

    return asyncio.run(make())


def revoke(database: str, key_id: str) -> None:
    async def run() -> None:
        store = await open_store(database, migrate=False)
        try:
            await store.revoke_key(key_id)
        finally:
            await store.aclose()

    asyncio.run(run())


def call(
    url: str, secret: str, doc: object, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return post_json(
        url, CHAT, doc, {"authorization": f"Bearer {secret}", **(headers or {})}, auth=False
    )


def test_a_users_key_is_served_and_carries_ratelimit_headers(limited: LimitedGateway) -> None:
    """A valid key is served, and the response carries the x-ratelimit-* headers of its tier."""
    _, secret = new_key(limited.database, "tiny")
    status, headers, _ = call(limited.url, secret, chat())
    assert 200 == status
    assert "3" == headers["x-ratelimit-limit-requests"]
    assert "2" == headers["x-ratelimit-remaining-requests"]
    assert headers["x-ratelimit-reset-requests"].endswith("s")


def test_requests_per_minute_refusal_is_a_429_with_retry_after(limited: LimitedGateway) -> None:
    """The fourth request in a minute of a 3/min tier is a 429 naming the limit, with headers."""
    _, secret = new_key(limited.database, "tiny")
    assert [200, 200, 200] == [call(limited.url, secret, chat())[0] for _ in range(3)]
    status, headers, body = call(limited.url, secret, chat())
    assert 429 == status
    error = error_of(body)
    assert ("rate_limit_exceeded", "requests") == (error["code"], error["type"])
    assert "requests_per_minute" == headers["x-citadel-limit"]
    assert "requests per minute" in error["message"]
    assert int(headers["retry-after"]) >= 1
    assert "0" == headers["x-ratelimit-remaining-requests"]
    client = openai.OpenAI(base_url=limited.url + "/v1", api_key=secret, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="sim-chat", messages=[{"role": "user", "content": "x"}]
        )


def test_tokens_are_reserved_then_reconciled_to_actual_usage(limited: LimitedGateway) -> None:
    """A request reserves prompt + default max_tokens (150); the refund after it lets another in."""
    _, secret = new_key(limited.database, "tokeny")  # 200 tokens per minute
    status, headers, body = call(limited.url, secret, chat())  # reserves ~160, uses ~23
    assert 200 == status
    used = orjson.loads(body)["usage"]["total_tokens"]
    assert used < 40
    assert "200" == headers["x-ratelimit-limit-tokens"]
    deadline = time.monotonic() + 5
    statuses = []
    while time.monotonic() < deadline:
        statuses.append(call(limited.url, secret, chat(max_tokens=16))[0])
        if statuses[-1] == 200:
            break
        time.sleep(0.05)
    assert 200 == statuses[-1]
    # Without reconciliation ~160 + ~26 reserved would already be close to the limit; a request
    # reserving 150 more must now be refused by tokens per minute.
    status, headers, body = call(limited.url, secret, chat(max_tokens=150))
    assert 429 == status
    assert "rate_limit_exceeded" == error_of(body)["code"]
    assert "tokens_per_minute" == headers["x-citadel-limit"]


def test_concurrency_slot_is_held_by_a_stream_and_released_after(limited: LimitedGateway) -> None:
    """With one concurrent request allowed, a second waits its turn until the stream ends."""
    _, secret = new_key(limited.database, "single")
    results: list[int] = []

    def slow_stream() -> None:
        results.append(
            call(limited.url, secret, chat(max_tokens=10, stream=True), {"x-sim-tbt-ms": "80"})[0]
        )

    reader = threading.Thread(target=slow_stream)
    reader.start()
    time.sleep(0.3)
    status, headers, body = call(limited.url, secret, chat())
    assert 429 == status
    assert "rate_limit_exceeded" == error_of(body)["code"]
    assert "concurrent_requests" == headers["x-citadel-limit"]
    reader.join(timeout=10)
    assert [200] == results
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and call(limited.url, secret, chat())[0] != 200:
        time.sleep(0.05)
    assert 200 == call(limited.url, secret, chat())[0]


def test_upstream_failure_releases_the_concurrency_slot(limited: LimitedGateway) -> None:
    """A request that fails upstream gives its slot back."""
    _, secret = new_key(limited.database, "single")
    assert 502 == call(limited.url, secret, chat(), {"x-sim-fault": "status=500"})[0]
    deadline = time.monotonic() + 5
    status = 0
    while time.monotonic() < deadline and status != 200:
        status = call(limited.url, secret, chat())[0]
    assert 200 == status


def test_daily_token_quota_refuses_once_spent(limited: LimitedGateway) -> None:
    """A 60-tokens-per-day tier is refused by tokens_per_day once its day's tokens are reserved."""
    _, secret = new_key(limited.database, "daily")
    status, _, body = call(limited.url, secret, chat(max_tokens=40))
    assert 200 == status
    status, headers, body = call(limited.url, secret, chat(max_tokens=40))
    assert 429 == status
    assert "rate_limit_exceeded" == error_of(body)["code"]
    assert "tokens_per_day" == headers["x-citadel-limit"]


def test_model_outside_the_tier_is_a_403(limited: LimitedGateway) -> None:
    """A tier limited to the embedding model gets a 403 for chat, and embeddings work."""
    _, secret = new_key(limited.database, "embed-only")
    status, _, body = call(limited.url, secret, chat())
    assert 403 == status
    assert "model_not_allowed" == error_of(body)["code"]
    status, _, _ = post_json(
        limited.url,
        "/v1/embeddings",
        {"model": "sim-embed", "input": "hi"},
        {"authorization": f"Bearer {secret}"},
        auth=False,
    )
    assert 200 == status


def test_the_model_list_is_what_the_tier_may_use(limited: LimitedGateway) -> None:
    """/v1/models lists only the models the caller's tier allows, with `auto` (routing's
    virtual model) beside them; a model outside the tier is a 404 on /v1/models/{id}, as
    OpenAI answers a model the caller has no access to; the admin key sees every model."""
    _, secret = new_key(limited.database, "embed-only")
    auth = {"authorization": f"Bearer {secret}"}

    def ids(headers: dict[str, str]) -> list[str]:
        status, _, body = request(limited.url, "GET", "/v1/models", headers=headers, auth=False)
        assert 200 == status
        return [m["id"] for m in orjson.loads(body)["data"]]

    assert ["sim-embed", "auto"] == ids(auth)
    assert ["sim-chat", "sim-embed", "auto"] == ids({"authorization": "Bearer sk-test-admin"})
    assert 404 == request(limited.url, "GET", "/v1/models/sim-chat", headers=auth, auth=False)[0]
    assert 200 == request(limited.url, "GET", "/v1/models/sim-embed", headers=auth, auth=False)[0]
    assert 200 == request(limited.url, "GET", "/v1/models/auto", headers=auth, auth=False)[0]


@pytest.mark.parametrize("kind", ["unknown", "revoked", "disabled_owner"])
def test_unusable_keys_are_401_without_saying_why(limited: LimitedGateway, kind: str) -> None:
    """Unknown and revoked keys and disabled owners all get the same 401 (an expired key's says
    it expired: tests/gateway/test_virtual_keys.py)."""
    if kind == "unknown":
        secret = "sk-cit-" + uuid.uuid4().hex
    else:
        _, secret = new_key(
            limited.database,
            "roomy",
            revoke=kind == "revoked",
            disable=kind == "disabled_owner",
        )
    status, _, body = call(limited.url, secret, chat())
    assert 401 == status
    assert {"message": "Incorrect API key provided.", "code": "invalid_api_key"} == {
        k: error_of(body)[k] for k in ("message", "code")
    }


def test_revocation_takes_effect_within_the_cache_ttl(limited: LimitedGateway) -> None:
    """A key revoked while in use stops working once the 0.2 s key cache expires."""
    key_id, secret = new_key(limited.database, "roomy")
    assert 200 == call(limited.url, secret, chat())[0]
    revoke(limited.database, key_id)
    deadline = time.monotonic() + 5
    status = 200
    while time.monotonic() < deadline and status == 200:
        time.sleep(0.1)
        status = call(limited.url, secret, chat())[0]
    assert 401 == status


def test_refusals_are_counted(limited: LimitedGateway) -> None:
    """Refusals show in citadel_limiter_decisions_total by the limit that refused."""
    _, secret = new_key(limited.database, "tiny")
    for _ in range(4):
        call(limited.url, secret, chat())
    _, _, text = request(limited.url, "GET", "/metrics", auth=False)
    assert 1 <= metric_value(
        text.decode(),
        "citadel_limiter_decisions_total",
        tier="tiny",
        decision="requests_per_minute",
    )


# -- Redis stopped and restarted during a run ---------------------------------------------------


def start_redis(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, timeout=5
        )
        if done.stdout.strip() == b"PONG":
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def health(url: str) -> tuple[int, dict[str, object]]:
    status, _, body = request(url, "GET", "/health", auth=False)
    return status, orjson.loads(body)


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_redis_outage_fails_open_or_closed_and_recovers(
    stack: Stack, tmp_path: Path, mode: str
) -> None:
    """While Redis is down the gateway admits (open) or answers 503 (closed); then it recovers."""
    redis_port = free_port()
    redis = start_redis(redis_port)
    config = limited_config(tmp_path, stack.sim, f"redis://127.0.0.1:{redis_port}/0", mode)
    gateway, url = start_gateway(config)
    try:
        _, secret = new_key(f"sqlite+aiosqlite:///{tmp_path / 'accounts.db'}", "tiny")
        status, headers, _ = call(url, secret, chat())
        assert 200 == status
        assert "x-ratelimit-limit-requests" in headers

        stop_redis(redis)
        status, headers, body = call(url, secret, chat())
        health_status, doc = health(url)
        if mode == "open":
            assert 200 == status
            assert "x-ratelimit-limit-requests" not in headers
            assert (200, "degraded") == (health_status, doc["status"])
        else:
            assert 503 == status
            assert "limiter_unavailable" == error_of(body)["code"]
            assert (503, "down") == (health_status, doc["status"])
        _, _, text = request(url, "GET", "/metrics", auth=False)
        assert 1 <= metric_value(
            text.decode(), "citadel_limiter_failures_total", operation="admit", mode=mode
        )

        redis = start_redis(redis_port)
        status, headers, _ = call(url, secret, chat())
        assert 200 == status
        assert "x-ratelimit-limit-requests" in headers
        assert "ok" == health(url)[1]["status"]
    finally:
        stop_process(gateway)
        if redis.poll() is None:
            stop_redis(redis)


def test_request_over_a_minutes_token_budget_is_a_400_without_retry_after(
    limited: LimitedGateway,
) -> None:
    """A request larger than the tier's whole tokens-per-minute budget can never fit: a 400 that
    says why, and no Retry-After to wait for."""
    _, secret = new_key(limited.database, "tokeny")  # 200 tokens per minute
    status, headers, body = call(limited.url, secret, chat(max_tokens=300))
    assert 400 == status
    error = error_of(body)
    assert ("tokens_per_minute_exceeded", "max_tokens") == (error["code"], error["param"])
    assert "limit 200" in error["message"]
    assert "retry-after" not in headers
