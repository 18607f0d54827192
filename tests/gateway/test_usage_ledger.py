"""Every forwarded request becomes one usage event in the ledger (embedded default: SQLite)."""

from __future__ import annotations

import asyncio
import time

import orjson
import sqlalchemy as sa

from citadel.accounts.sql import build_engine
from citadel.metering.schema import usage_events

from gateway_helpers import Stack, chat, post_json


def ledger_rows(database: str, request_ids: list[str]) -> list[dict[str, object]]:
    async def read() -> list[dict[str, object]]:
        engine = build_engine(database)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    sa.select(usage_events).where(usage_events.c.request_id.in_(request_ids))
                )
                return [dict(row._mapping) for row in result]
        finally:
            await engine.dispose()

    return asyncio.run(read())


def test_each_request_is_one_ledger_event_with_the_usage_and_cost(stack: Stack) -> None:
    """N requests (streamed and not) become N events with the simulator's tokens and the price."""
    sent: dict[str, dict[str, int]] = {}
    for i in range(6):
        rid = f"ledger-test-{time.time_ns()}-{i}"
        stream = i % 2 == 1
        status, _, body = post_json(
            stack.gateway,
            "/v1/chat/completions",
            chat(max_tokens=5 + i, stream=stream, stream_options={"include_usage": True})
            if stream
            else chat(max_tokens=5 + i),
            {"x-request-id": rid},
        )
        assert 200 == status
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
