"""Every request the gateway answers for a principal is one usage event in the ledger: served,
failed upstream (502), no deployment left (503), refused by the tier (403) or the limits (429),
or a bad body (400); an unauthenticated one (401) is not. Real processes: the simulator, a
gateway with its limiter and usage stream on Redis, the ledger writer draining the stream into
PostgreSQL; the analytics read the error, failure and refusal counts from the rollups."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from citadel.accounts.migrate import ACCOUNTS
from citadel.accounts.sql import open_store
from citadel.metering.analytics import Analytics
from citadel.metering.migrate import LEDGER
from citadel.metering.ranges import TimeRange, floor_hour
from citadel.metering.schema import usage_events
from citadel.stores.sql import build_engine

from gateway_helpers import Stack, chat, post_json, request
from support import free_port, scratch_postgres, start_process, stop_process

CHAT = "/v1/chat/completions"
REDIS_DB = 9  # this branch's own database


@dataclass(frozen=True)
class Ledgered:
    gateway: str
    database: str  # PostgreSQL: accounts and ledger


async def _migrate(uri: str) -> None:
    await ACCOUNTS.upgrade(uri)
    await LEDGER.upgrade(uri)


def _config(tmp: Path, sim: str, database: str) -> Path:
    redis = f"redis://127.0.0.1:6379/{REDIS_DB}"
    config = tmp / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "{database}", key_cache_ttl_seconds: 0.2, default_tier: capped}}
limits: {{backend: "{redis}", default_max_tokens: 20}}
metering:
  stream: "citadel:{{usage-{uuid.uuid4().hex[:10]}}}:events"
  flush_seconds: 0.05
  spool_path: "{tmp / "usage.spool"}"
  journal_path: "{tmp / "usage.journal"}"
routing:
  # One failure opens a circuit for a minute: the second request to `flaky` finds no deployment.
  breaker: {{consecutive_failures: 1, open_seconds: 60, max_open_seconds: 120}}
tiers:
  capped: {{requests_per_minute: 3, models: [sim-chat, flaky]}}
models:
  - name: sim-chat
    deployments: [{{name: sim-a, url: "{sim}", model: sim-chat}}]
  - name: flaky
    deployments: [{{name: sim-f, url: "{sim}", model: sim-chat}}]
  - name: other
    deployments: [{{name: sim-o, url: "{sim}", model: sim-chat}}]
"""
    )
    return config


@pytest.fixture
def ledgered(stack: Stack, tmp_path: Path) -> Iterator[Ledgered]:
    with scratch_postgres(prepare=_migrate) as database:
        config = _config(tmp_path, stack.sim, database)
        port = free_port()
        command = [sys.executable, "-m", "citadel", "--config", str(config), "serve", "gateway"]
        gateway = start_process(
            [*command, "--port", str(port)],
            port,
            env={"CITADEL_ADMIN_KEY": "sk-test-admin"},
            timeout=60,
        )
        writer = subprocess.Popen(
            [sys.executable, "-m", "citadel", "--config", str(config), "ledger-writer"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield Ledgered(f"http://127.0.0.1:{port}", database)
        finally:
            stop_process(writer)
            stop_process(gateway)


def _new_key(database: str) -> tuple[str, str]:
    async def make() -> tuple[str, str]:
        store = await open_store(database, migrate=False)
        try:
            user = await store.create_user(
                name="newcomer", email=f"{uuid.uuid4().hex}@example.com", tier="capped"
            )
            key, secret = await store.create_key(user.id, name="laptop")
            return key.id, secret
        finally:
            await store.aclose()

    return asyncio.run(make())


def _rows(database: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        engine = build_engine(database)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(sa.select(usage_events))
                return [dict(r._mapping) for r in result]
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _usage(database: str, span: TimeRange) -> dict[str, int]:
    async def read() -> dict[str, int]:
        engine = build_engine(database)
        try:
            (row,) = await Analytics(engine).usage(span)
            return {
                "requests": row.requests,
                "errors": row.errors,
                "refusals": row.refusals,
                "failures": row.failures,
            }
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_each_kind_of_answer_is_one_event_with_its_status_and_reason(ledgered: Ledgered) -> None:
    key_id, secret = _new_key(ledgered.database)
    auth = {"authorization": f"Bearer {secret}"}
    url = ledgered.gateway
    began = datetime.now(UTC)
    sent: list[tuple[int, str]] = []

    def send(doc: Any, expected: int, headers: dict[str, str] | None = None) -> None:
        status, got, body = post_json(url, CHAT, doc, {**auth, **(headers or {})}, auth=False)
        assert expected == status, body
        sent.append((status, got["x-request-id"]))

    send(chat(max_tokens=5), 200)  # served (1 of 3 requests a minute)
    send({**chat(), "model": "other"}, 403)  # the tier does not allow `other`
    status, got, _ = request(url, "POST", CHAT, b"{not json", auth, auth=False)
    assert 400 == status
    sent.append((status, got["x-request-id"]))  # a bad body, from a known caller
    send({**chat(), "model": "flaky"}, 502, {"x-sim-fault": "status=500"})  # 2 of 3
    send({**chat(), "model": "flaky"}, 503)  # the circuit is open: no deployment (3 of 3)
    send(chat(max_tokens=5), 429)  # the fourth request this minute
    status, _, _ = post_json(url, CHAT, chat(), {"authorization": "Bearer sk-nope"}, auth=False)
    assert 401 == status  # no principal: metrics only

    deadline = time.monotonic() + 20
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(rows) < len(sent):
        time.sleep(0.2)
        rows = _rows(ledgered.database)
    time.sleep(0.5)  # anything more (a second event of one request, the 401) would be here now
    rows = _rows(ledgered.database)
    by_request = {r["request_id"]: r for r in rows}
    assert len(sent) == len(rows) == len(by_request)  # one event each, none for the 401
    found = [
        (
            r["status"],
            r["reason"],
            r["refused"],
            r["model"],
            r["deployment"],
            r["key_id"],
        )
        for r in (by_request[rid] for _, rid in sent)
    ]
    bad_body_reason = found[2][1]
    assert bad_body_reason  # the parser's code, whatever it is named
    assert [
        (200, "", False, "sim-chat", "sim-a", key_id),
        (403, "model_not_allowed", True, "other", "", key_id),
        (400, bad_body_reason, False, "", "", key_id),
        (502, "upstream_500", False, "flaky", "sim-f", key_id),  # sim-f answered 500
        (503, "no_deployment_available", False, "flaky", "", key_id),  # none answered
        (429, "requests_per_minute", True, "sim-chat", "", key_id),
    ] == found
    assert all(r["cost_micros"] == 0 for r in rows if r["status"] != 200)
    assert rows[0]["user_id"]
    assert all(r["user_id"] == rows[0]["user_id"] for r in rows)

    # The rollups count them: error, failure and refusal rates come from the analytics.
    hour = floor_hour(began)
    span = TimeRange.checked(hour - timedelta(hours=1), hour + timedelta(hours=2))
    usage = _usage(ledgered.database, span)
    assert {"requests": 6, "errors": 5, "refusals": 2, "failures": 2} == usage
