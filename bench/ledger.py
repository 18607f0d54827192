"""How fast usage events go into the PostgreSQL ledger: the batch writer against one INSERT each.

Ingest. For each of ``--runs`` passes, into a fresh database on the server (tables emptied
between measurements), it measures events/s of:

- ``ledger``: the writer's path without Redis: ``--events`` wire payloads decoded
  (``decode_row``) and written by ``Ledger.write_rows`` in batches of ``--batch``, one
  transaction each (COPY into a temporary table, then one INSERT ... SELECT with every rollup,
  full and narrow, upserted from the batch), ``--concurrency`` transactions
  in flight while the next batch is decoded, as the writer does;
- ``end to end``: the same events XADDed to a Redis Stream beforehand (not timed: that is the
  gateway's side; its rate is printed apart), then drained by ``LedgerWriter.run`` (XREADGROUP,
  decode, write, XACK, with the same batch size and concurrency) until the group has
  acknowledged every entry;
- ``insert each`` (the reference): one ``INSERT ... ON CONFLICT DO NOTHING`` per event into
  ``usage_events`` only (no rollups), autocommit, a prepared statement on one asyncpg
  connection, on a ``--sample`` of the events;

and prints medians and the ratios to the reference. Targets: ``ledger`` at least 20x the
reference and at least 20,000 events/s.

    .venv/bin/python bench/ledger.py [--server postgresql://postgres@127.0.0.1:5432]
        [--redis redis://127.0.0.1:6379/10] [--events 200000] [--sample 5000] [--batch 10000]
        [--concurrency 2] [--runs 3] [--quiet-wait 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import asyncpg
import orjson

from citadel.metering.events import UsageEvent, new_event_id
from citadel.metering.ledger import COLUMNS, Ledger, decode_row, encode_event, event_row
from citadel.metering.migrate import LEDGER
from citadel.metering.schema import ROLLUPS
from citadel.metering.writer import LedgerWriter
from citadel.settings import MeteringSettings
from citadel.stores.redis import RedisClient
from citadel.stores.sql import build_engine

TARGET_RATIO = 20.0
TARGET_RATE = 20_000.0
_INSERT_ONE = (
    f"INSERT INTO usage_events ({', '.join(COLUMNS)}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))}) ON CONFLICT (event_id) DO NOTHING"
)


@dataclass(slots=True)
class Point:
    name: str
    run: int
    events: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def make_events(
    count: int, *, rate: float = 2000.0, users: int = 2000, seed: int = 7
) -> list[UsageEvent]:
    """Events as a busy gateway makes them, ``rate`` a second: ``users`` users in 50 teams whose
    activity is heavy-tailed (Zipf, s = 1.1: a few users make most requests), 6 models on 12
    deployments (the first models busier), a few per cent errors, half streamed."""
    rng = random.Random(seed)
    start = 1_717_200_000.0
    user_weights = list(itertools.accumulate(1 / (k + 1) ** 1.1 for k in range(users)))
    deployments = [(f"model-{m}", f"model-{m}-{d}") for m in range(6) for d in range(2)]
    deployment_weights = list(itertools.accumulate(1 / (k // 2 + 1) for k in range(12)))
    picked_users = rng.choices(range(users), cum_weights=user_weights, k=count)
    picked_deployments = rng.choices(deployments, cum_weights=deployment_weights, k=count)
    events = []
    for i in range(count):
        user = picked_users[i]
        model, deployment = picked_deployments[i]
        prompt, completion = rng.randrange(10, 4000), rng.randrange(1, 1000)
        streamed = rng.random() < 0.5
        events.append(
            UsageEvent(
                event_id=new_event_id(start + i / rate, rng.randbytes(10)),
                time=start + i / rate,
                request_id=f"req-{i}",
                user=f"usr_{user:016x}",
                team=f"team_{user % 50:016x}",
                key_id=f"key_{user:016x}",
                tier=("free", "pro", "enterprise")[user % 3],
                endpoint="chat",
                model=model,
                deployment=deployment,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_seconds=rng.uniform(0.05, 20),
                ttft_seconds=rng.uniform(0.01, 1) if streamed else None,
                status=500 if rng.random() < 0.02 else 200,
                streamed=streamed,
                cancelled=False,
                usage_estimated=False,
                cost_micros=prompt * 500 + completion * 1500,
            )
        )
    return events


async def _empty(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        tables = ", ".join(["usage_events", *(t.name for t, _ in ROLLUPS)])
        await connection.execute(f"TRUNCATE {tables}")
        await connection.execute("VACUUM ANALYZE usage_events")
    finally:
        await connection.close()


async def _count(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        return int(await connection.fetchval("SELECT count(*) FROM usage_events"))
    finally:
        await connection.close()


async def bench_ledger(url: str, payloads: list[bytes], batch: int, concurrency: int) -> float:
    """Seconds to decode and write every payload, ``concurrency`` batches in flight at once
    (as ``LedgerWriter.run`` does, without Redis)."""
    engine = build_engine(url)
    ledger = Ledger(engine)
    try:
        # Connect and warm up every connection outside the timing.
        await asyncio.gather(*(ledger.write_rows([decode_row(p)]) for p in payloads[:concurrency]))
        await _empty(url)
        writing: set[asyncio.Task[int]] = set()
        started = time.perf_counter()
        for i in range(0, len(payloads), batch):
            rows = [decode_row(p) for p in payloads[i : i + batch]]
            while len(writing) >= concurrency:
                done, writing = await asyncio.wait(writing, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            writing.add(asyncio.get_running_loop().create_task(ledger.write_rows(rows)))
        for task in writing:
            await task
        return time.perf_counter() - started
    finally:
        await engine.dispose()


async def bench_end_to_end(
    url: str, redis_url: str, payloads: list[bytes], batch: int, concurrency: int
) -> tuple[float, float]:
    """Seconds to XADD every payload (pipelined) and seconds for a writer to drain them."""
    stream = f"citadel:{{bench-{uuid.uuid4().hex[:8]}}}:events"
    redis = RedisClient.from_url(redis_url, timeout=30)
    engine = build_engine(url)
    try:
        writer = LedgerWriter(
            redis,
            engine,
            stream=stream,
            group="ledger",
            consumer="bench",
            batch_size=batch,
            concurrency=concurrency,
        )
        await writer.ensure_group()
        await Ledger(engine).write_rows([decode_row(payloads[0])])  # warm the pool
        await _empty(url)
        started = time.perf_counter()
        for i in range(0, len(payloads), 5000):
            await asyncio.gather(
                *(redis.execute("XADD", stream, "*", "e", p) for p in payloads[i : i + 5000])
            )
        xadd = time.perf_counter() - started
        watcher = RedisClient.from_url(redis_url, timeout=30)  # the writer's blocks on its own
        try:
            stop = asyncio.Event()
            started = time.perf_counter()
            task = asyncio.get_running_loop().create_task(writer.run(stop))
            while await _lag(watcher, stream):  # noqa: ASYNC110 - polling another process's work
                await asyncio.sleep(0.005)
            drain = time.perf_counter() - started
            stop.set()
            await task
        finally:
            await watcher.aclose()
        return xadd, drain
    finally:
        await redis.execute("DEL", stream)
        await redis.aclose()
        await engine.dispose()


async def _lag(redis: RedisClient, stream: str) -> int:
    """Entries the group has not acknowledged (XINFO GROUPS: lag + pending)."""
    info = dict(zip(*[iter((await redis.execute("XINFO", "GROUPS", stream))[0])] * 2, strict=True))
    return int(info[b"lag"] or 0) + int(info[b"pending"])


async def bench_insert_each(url: str, events: list[UsageEvent]) -> float:
    connection = await asyncpg.connect(url)
    try:
        await _empty(url)
        await connection.execute(_INSERT_ONE, *event_row(events[0]))  # prepared, then cached
        await connection.execute("DELETE FROM usage_events")
        started = time.perf_counter()
        for event in events:
            await connection.execute(_INSERT_ONE, *event_row(event))
        return time.perf_counter() - started
    finally:
        await connection.close()


async def _admin(server: str, sql: str) -> None:
    connection = await asyncpg.connect(f"{server}/postgres")
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def busy_cores(interval: float = 0.5) -> float | None:
    """How many cores' worth of CPU the whole machine used over ``interval`` (Linux), or None."""

    def busy() -> float:
        with open("/proc/stat") as stat:
            fields = [float(f) for f in stat.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle and iowait
        return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")

    try:
        before, started = busy(), time.perf_counter()
        time.sleep(interval)
        return (busy() - before) / (time.perf_counter() - started)
    except (OSError, ValueError, IndexError):
        return None


def wait_for_quiet(limit: float) -> float | None:
    """Wait (up to ``limit`` seconds) until other processes use under 0.3 of a core (this one is
    idle meanwhile); return what they used last."""
    deadline = time.monotonic() + limit
    while True:
        other = busy_cores()
        if other is None or other < 0.3 or time.monotonic() >= deadline:
            return other
        time.sleep(0.5)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    events = make_events(args.events)
    payloads = [encode_event(e) for e in events]
    sample = events[: args.sample]
    name = f"citadel_bench_{uuid.uuid4().hex[:8]}"
    await _admin(args.server, f'CREATE DATABASE "{name}"')
    url = f"{args.server}/{name}"
    points: list[Point] = []
    xadd_rates: list[float] = []
    try:
        await LEDGER.upgrade(url)
        for run_index in range(args.runs):
            other = wait_for_quiet(args.quiet_wait)
            if other is not None:
                print(f"run {run_index + 1}: others use {other:.1f} cores", file=sys.stderr)
            seconds = await bench_insert_each(url, sample)
            points.append(Point("insert each", run_index, len(sample), seconds))
            assert len(sample) == await _count(url)
            seconds = await bench_ledger(url, payloads, args.batch, args.concurrency)
            points.append(Point("ledger", run_index, len(events), seconds))
            assert len(events) == await _count(url)
            if not args.no_redis:
                xadd, drain = await bench_end_to_end(
                    url, args.redis, payloads, args.batch, args.concurrency
                )
                points.append(Point("end to end", run_index, len(events), drain))
                xadd_rates.append(len(events) / xadd)
                assert len(events) == await _count(url)
            print(
                f"run {run_index + 1}: "
                + ", ".join(f"{p.name} {p.rate:,.0f}/s" for p in points if p.run == run_index),
                file=sys.stderr,
            )
    finally:
        await _admin(args.server, f'DROP DATABASE "{name}" WITH (FORCE)')
    medians = {
        n: statistics.median(p.rate for p in points if p.name == n)
        for n in dict.fromkeys(p.name for p in points)
    }
    return {
        "events": args.events,
        "sample": args.sample,
        "batch": args.batch,
        "concurrency": args.concurrency,
        "runs": args.runs,
        "medians_events_per_s": medians,
        "xadd_events_per_s": statistics.median(xadd_rates) if xadd_rates else None,
        "points": [{**asdict(p), "rate": p.rate} for p in points],
    }


def report(result: dict[str, Any]) -> bool:
    medians = result["medians_events_per_s"]
    reference = medians["insert each"]
    print(
        f"\nLedger ingest into PostgreSQL: {result['events']:,} events in batches of "
        f"{result['batch']:,}, {result['concurrency']} in flight (reference: {result['sample']:,} "
        f"events); medians of {result['runs']} runs"
    )
    print(f"{'path':<14}{'events/s':>12}{'x reference':>14}")
    for name, rate in medians.items():
        print(f"{name:<14}{rate:>12,.0f}{rate / reference:>13.1f}x")
    if result["xadd_events_per_s"] is not None:
        print(f"(XADD into the stream, pipelined: {result['xadd_events_per_s']:,.0f} events/s)")
    ratio = medians["ledger"] / reference
    ok = ratio >= TARGET_RATIO and medians["ledger"] >= TARGET_RATE
    print(
        f"targets: >= {TARGET_RATIO:.0f}x and >= {TARGET_RATE:,.0f} events/s: "
        + ("met" if ok else "NOT met")
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server",
        default=os.environ.get("CITADEL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432"),
        help="a PostgreSQL server (a database is created there and dropped)",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--no-redis", action="store_true", help="skip the end-to-end path")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--sample", type=int, default=5_000)
    default_batch = MeteringSettings().batch_size
    parser.add_argument(
        "--batch",
        type=int,
        default=default_batch,
        help=f"events per transaction (default: metering.batch_size's, {default_batch:,})",
    )
    parser.add_argument(
        "--concurrency", type=int, default=2, help="transactions in flight (the writer's default)"
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait, before each run, for the machine to be idle (default: 60)",
    )
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    ok = report(result)
    if args.json:
        with open(args.json, "wb") as file:
            file.write(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
