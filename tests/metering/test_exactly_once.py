"""Exactly-once metering end to end, with real processes: the simulator, the gateway (usage to a
Redis Stream), a ledger writer process, a private PostgreSQL, and the official openai client.

Two phases of N requests each, mixed streamed and not: in the first the PostgreSQL server is
stopped and started again while requests flow; in the second the ledger writer is SIGKILLed
while requests flow and a new one started. After each, the ledger must hold exactly N events of
that phase, each with the tokens the client was told and the cost those tokens come to.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import asyncpg
import openai
import pytest
from pg import PrivatePostgres, available

from citadel.errors import StoreUnavailable
from citadel.stores.redis import RedisClient

from support import free_port, process_output, start_process, stop_process

pytestmark = pytest.mark.timeout(300)

ADMIN_KEY = "sk-test-exactly-once"
REDIS = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/10")
N = 300
# USD per 1000 tokens, chosen so that a token costs a whole number of micro-USD.
PRICE_IN, PRICE_OUT = 0.5, 1.5  # 500 and 1500 micro-USD per token


def cost(prompt_tokens: int, completion_tokens: int) -> int:
    return prompt_tokens * 500 + completion_tokens * 1500


@dataclass
class Seen:
    """What the client was told about one request."""

    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    streamed: bool


@dataclass
class Stack:
    config: Path
    gateway: str
    postgres: PrivatePostgres
    stream: str
    writers: list[subprocess.Popen[bytes]]

    def start_writer(self) -> subprocess.Popen[bytes]:
        log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - the child writes to it
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "citadel", "--config", str(self.config)),
                *("ledger-writer", "--claim-idle-seconds", "1"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        proc.citadel_log = log  # type: ignore[attr-defined]
        self.writers.append(proc)
        return proc


def _write_config(path: Path, sim: str, database: str, stream: str) -> None:
    path.write_text(
        f"""
accounts: {{database: "sqlite+aiosqlite:///{path.parent / "accounts.db"}"}}
endpoints: {{redis: "{REDIS}"}}
metering:
  database: "{database}"
  stream: "{stream}"
  flush_seconds: 0.05
  batch_size: 64
  spool_path: "{path.parent / "usage.spool"}"
models:
  - name: phase-db
    price: {{input_per_1k: {PRICE_IN}, output_per_1k: {PRICE_OUT}}}
    deployments:
      - {{name: sim-db, url: "{sim}", model: sim-chat}}
  - name: phase-writer
    price: {{input_per_1k: {PRICE_IN}, output_per_1k: {PRICE_OUT}}}
    deployments:
      - {{name: sim-w, url: "{sim}", model: sim-chat}}
"""
    )


def _redis_reachable() -> str | None:
    async def ping() -> None:
        client = RedisClient.from_url(REDIS, timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(ping())
    except StoreUnavailable as exc:
        return f"Redis is not reachable at {REDIS}: {exc}"
    return None


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    reason = available() or _redis_reachable()
    if reason is not None:
        pytest.skip(reason)
    with tempfile.TemporaryDirectory() as directory, PrivatePostgres() as postgres:
        root = Path(directory)
        stream = f"citadel:{{usage-e2e-{uuid.uuid4().hex[:10]}}}:events"
        sim_port, gateway_port = free_port(), free_port()
        config = root / "citadel.yaml"
        _write_config(config, f"http://127.0.0.1:{sim_port}", postgres.url, stream)
        migrate = subprocess.run(
            [sys.executable, "-m", "citadel", "--config", str(config), "migrate"],
            capture_output=True,
            check=False,
            timeout=60,
        )
        assert 0 == migrate.returncode, migrate.stderr.decode()
        sim = start_process(
            [sys.executable, "-m", "citadel", "sim", "--port", str(sim_port)], sim_port
        )
        gateway = None
        stack = None
        try:
            gateway = start_process(
                [
                    *(sys.executable, "-m", "citadel", "--config", str(config)),
                    *("serve", "gateway", "--port", str(gateway_port)),
                ],
                gateway_port,
                env={"CITADEL_ADMIN_KEY": ADMIN_KEY},
            )
            stack = Stack(config, f"http://127.0.0.1:{gateway_port}", postgres, stream, [])
            yield stack
        finally:
            if stack is not None:
                for writer in stack.writers:
                    stop_process(writer)
            if gateway is not None:
                stop_process(gateway)
            stop_process(sim)
            asyncio.run(_delete_stream(stream))


async def _delete_stream(stream: str) -> None:
    client = RedisClient.from_url(REDIS, timeout=2)
    try:
        await client.execute("DEL", stream, f"{stream}:dead")
    finally:
        await client.aclose()


# -- driving requests ---------------------------------------------------------------------------


def _one(client: openai.OpenAI, model: str, i: int) -> Seen:
    messages = [{"role": "user", "content": f"request {i}: " + "words " * (i % 17)}]
    max_tokens = 1 + i % 23
    if i % 2:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [c.usage for c in raw.parse() if c.usage is not None]
        assert 1 == len(usage)
        prompt, completion = usage[0].prompt_tokens, usage[0].completion_tokens
    else:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
        )
        reply = raw.parse()
        assert reply.usage is not None
        prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
    return Seen(raw.headers["x-request-id"], model, prompt, completion, bool(i % 2))


def drive(stack: Stack, model: str, count: int, start: int) -> list[Seen]:
    """``count`` requests through the gateway, 8 at a time; what the client saw of each."""
    client = openai.OpenAI(base_url=stack.gateway + "/v1", api_key=ADMIN_KEY, max_retries=0)
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: _one(client, model, i), range(start, start + count)))


def drive_around(
    stack: Stack, model: str, before: Callable[[], None], after: Callable[[], None]
) -> list[Seen]:
    """N requests in three thirds: ``before`` runs ahead of the middle third, ``after`` behind
    it, so the middle third's events meet whatever ``before`` broke."""
    third = N // 3
    seen = drive(stack, model, third, 0)
    before()
    seen += drive(stack, model, third, third)
    after()
    seen += drive(stack, model, N - 2 * third, 2 * third)
    return seen


class TableLock:
    """An ACCESS EXCLUSIVE lock on usage_events, held by a connection of the test's own (in a
    thread with its own event loop) until released: writes to the ledger wait meanwhile."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._connection: asyncpg.Connection | None = None
        self._url = url

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def acquire(self) -> None:
        async def lock() -> None:
            self._connection = await asyncpg.connect(self._url, timeout=5)
            await self._connection.execute(
                "BEGIN; LOCK TABLE usage_events IN ACCESS EXCLUSIVE MODE"
            )

        self._call(lock())

    def release(self) -> None:
        """Roll the lock's transaction back and stop the thread (once; later calls do nothing)."""
        if self._loop.is_closed():
            return

        async def unlock() -> None:
            if self._connection is not None:
                await self._connection.execute("ROLLBACK")
                await self._connection.close()

        try:
            self._call(unlock())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


async def _pending(stream: str) -> int:
    client = RedisClient.from_url(REDIS, timeout=2)
    try:
        return int((await client.execute("XPENDING", stream, "ledger"))[0])
    finally:
        await client.aclose()


async def _ledger(url: str, model: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        return await connection.fetch(
            "SELECT event_id, request_id, prompt_tokens, completion_tokens, cost_micros, status"
            " FROM usage_events WHERE model = $1",
            model,
        )
    finally:
        await connection.close()


async def _rollup(url: str, model: str) -> tuple[int, int, int, int]:
    connection = await asyncpg.connect(url, timeout=5)
    try:
        row = await connection.fetchrow(
            "SELECT sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cost_micros)"
            " FROM usage_hourly WHERE model = $1",
            model,
        )
        assert row is not None
        return tuple(int(v or 0) for v in row)  # type: ignore[return-value]
    finally:
        await connection.close()


def assert_ledger_holds_exactly(stack: Stack, seen: list[Seen], model: str) -> None:
    """Wait (bounded) until the ledger has N events of ``model``; check each against the client."""
    assert N == len({s.request_id for s in seen})
    deadline = time.monotonic() + 60
    rows: list[asyncpg.Record] = []
    while time.monotonic() < deadline:
        try:
            rows = asyncio.run(_ledger(stack.postgres.url, model))
        except (OSError, asyncpg.PostgresError):
            rows = []
        if len(rows) >= N:
            break
        time.sleep(0.25)
    logs = "\n".join(process_output(w)[-3000:] for w in stack.writers)
    assert N == len(rows), f"ledger holds {len(rows)} events of {model}; writers said:\n{logs}"
    assert N == len({r["event_id"] for r in rows})
    stored = {r["request_id"]: r for r in rows}
    assert {s.request_id for s in seen} == set(stored)
    for s in seen:
        row = stored[s.request_id]
        tokens = (s.prompt_tokens, s.completion_tokens)
        expected = (*tokens, cost(*tokens))
        assert expected == (row["prompt_tokens"], row["completion_tokens"], row["cost_micros"])
        # A stream the client closes right after [DONE] may end the gateway's relay before it
        # finished, and be recorded as 499 (cancelled); its usage is complete either way.
        assert row["status"] in ((200, 499) if s.streamed else (200,))
    prompt = sum(s.prompt_tokens for s in seen)
    completion = sum(s.completion_tokens for s in seen)
    assert (N, prompt, completion, cost(prompt, completion)) == asyncio.run(
        _rollup(stack.postgres.url, model)
    )


# -- the tests ----------------------------------------------------------------------------------


def test_postgres_stopped_and_restarted_mid_run_loses_and_repeats_nothing(stack: Stack) -> None:
    """N requests, a third of them while the ledger's PostgreSQL is down: exactly N events."""
    stack.start_writer()

    def after() -> None:
        time.sleep(0.5)  # the writer keeps failing and backing off meanwhile
        stack.postgres.start()

    seen = drive_around(stack, "phase-db", stack.postgres.stop, after)
    assert_ledger_holds_exactly(stack, seen, "phase-db")


def test_writer_killed_mid_batch_loses_and_repeats_nothing(stack: Stack) -> None:
    """N requests while the ledger writer is SIGKILLed in the middle of a batch (read, not
    committed, not acknowledged) and another is started: exactly N events."""
    if not any(w.poll() is None for w in stack.writers):
        stack.start_writer()
    lock = TableLock(stack.postgres.url)

    def crash() -> None:
        # The writer has read a batch and waits on the lock inside its transaction.
        deadline = time.monotonic() + 10
        while asyncio.run(_pending(stack.stream)) == 0:
            assert time.monotonic() < deadline, "the writer never held a batch"
            time.sleep(0.05)
        for writer in stack.writers:
            if writer.poll() is None:
                writer.send_signal(signal.SIGKILL)
                writer.wait()
        lock.release()
        stack.start_writer()  # takes over the dead writer's batch once it has idled 1 s

    try:
        seen = drive_around(stack, "phase-writer", lock.acquire, crash)
    finally:
        lock.release()
    assert_ledger_holds_exactly(stack, seen, "phase-writer")
