"""Every forwarded request becomes one usage event in the ledger (embedded default: SQLite)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from citadel.errors import StoreUnavailable
from citadel.gateway.app import create_app, default_deps, usage_sink
from citadel.metering.events import UsageEvent
from citadel.metering.schema import usage_events
from citadel.metering.sinks import RedisStreamSink, SqlLedgerSink
from citadel.settings import (
    AccountsSettings,
    Endpoints,
    GatewaySettings,
    MeteringSettings,
    Settings,
)
from citadel.stores.redis import RedisClient
from citadel.stores.sql import build_engine

from gateway_helpers import Stack, chat, post_json
from support import usage_event

REDIS = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/10")


def ledger_rows(database: str, request_ids: list[str]) -> list[dict[str, object]]:
    return _ledger_rows(database, usage_events.c.request_id.in_(request_ids))


def ledger_rows_of_key(database: str, key_id: str) -> list[dict[str, object]]:
    return _ledger_rows(database, usage_events.c.key_id == key_id)


def _ledger_rows(database: str, where: sa.ColumnElement[bool]) -> list[dict[str, object]]:
    async def read() -> list[dict[str, object]]:
        engine = build_engine(database)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(sa.select(usage_events).where(where))
                return [dict(row._mapping) for row in result]
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_each_request_is_one_ledger_event_with_the_usage_and_cost(stack: Stack) -> None:
    """N requests (streamed and not) become N events with the simulator's tokens and the price."""
    sent: dict[str, dict[str, int]] = {}
    for i in range(6):
        stream = i % 2 == 1
        status, headers, body = post_json(
            stack.gateway,
            "/v1/chat/completions",
            chat(max_tokens=5 + i, stream=stream, stream_options={"include_usage": True})
            if stream
            else chat(max_tokens=5 + i),
        )
        assert 200 == status
        rid = headers["x-request-id"]  # the gateway's own id, the ledger's request id
        if stream:
            events = [e[6:] for e in body.split(b"\n\n") if e.startswith(b"data: {")]
            usage = orjson.loads(events[-1])["usage"]
        else:
            usage = orjson.loads(body)["usage"]
        sent[rid] = usage
    deadline = time.monotonic() + 10
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        rows = ledger_rows(stack.database, list(sent))
        if len(rows) == len(sent):
            break
        time.sleep(0.2)
    assert len(sent) == len(rows)
    for row in rows:
        usage = sent[str(row["request_id"])]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
            row["prompt_tokens"],
            row["completion_tokens"],
        )
        # sim-chat costs 0.5 per 1k input and 1.5 per 1k output tokens (conftest), in micro-USD
        expected = usage["prompt_tokens"] * 500 + usage["completion_tokens"] * 1500
        assert expected == row["cost_micros"]
        assert ("sim-chat", "sim-a", 200) == (row["model"], row["deployment"], row["status"])


# -- the sinks' stores are closed at shutdown ---------------------------------------------------


def _settings(tmp_path: Path, redis: str | None = None) -> Settings:
    return Settings(
        gateway=GatewaySettings(admin_key="sk-test-usage"),
        endpoints=Endpoints(redis=redis),
        accounts=AccountsSettings(database=f"sqlite+aiosqlite:///{tmp_path / 'citadel.db'}"),
        metering=MeteringSettings(
            stream=f"citadel:{{usage-test-{uuid.uuid4().hex[:10]}}}:events",
            spool_path=str(tmp_path / "usage.spool"),
            flush_seconds=0.05,
        ),
    )


def _event() -> UsageEvent:
    return usage_event(
        event_id=uuid.uuid4().hex,
        time=time.time(),
        request_id="req-close",
        endpoint="/v1/chat/completions",
    )


def test_the_gateway_disposes_of_the_embedded_ledgers_engine_at_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embedded default (SQLite, no Redis): the sink's engine is disposed of when the gateway
    shuts down, after the last events were written."""
    disposed: list[AsyncEngine] = []
    dispose = AsyncEngine.dispose

    async def spy(self: AsyncEngine, close: bool = True) -> None:
        disposed.append(self)
        await dispose(self, close)

    monkeypatch.setattr(AsyncEngine, "dispose", spy)
    settings = _settings(tmp_path)
    deps = default_deps(settings)
    sink = deps.usage
    assert isinstance(sink, SqlLedgerSink)
    app = create_app(settings, deps)

    async def run() -> None:
        await app.startup()
        sink.emit(_event())
        await app.shutdown()

    asyncio.run(run())
    assert sink.engine in disposed
    database = settings.accounts.database
    assert 1 == len(ledger_rows(database, ["req-close"]))


def test_the_stream_sink_closes_its_redis_client_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Redis configured: the sink's own client is closed by aclose (the gateway's shutdown
    hook), after the last events were XADDed; a second aclose does nothing more."""
    closed: list[RedisClient] = []
    aclose = RedisClient.aclose

    async def spy(self: RedisClient) -> None:
        closed.append(self)
        await aclose(self)

    monkeypatch.setattr(RedisClient, "aclose", spy)
    settings = _settings(tmp_path, redis=REDIS)
    sink = usage_sink(settings)
    assert isinstance(sink, RedisStreamSink)

    async def run() -> int:
        await sink.start()
        sink.emit(_event())
        await sink.aclose()
        await sink.aclose()
        redis = RedisClient.from_url(REDIS, timeout=2)
        try:
            stream = settings.metering.stream
            length = int(await redis.execute("XLEN", stream))
            await redis.execute("DEL", stream)
            return length
        finally:
            await aclose(redis)

    try:
        assert 1 == asyncio.run(run())
    except StoreUnavailable as exc:
        pytest.skip(f"Redis is not reachable at {REDIS}: {exc}")
    assert 1 == len(closed)
    assert sink.stats().spooled == 0
