"""Analytics latency over the usage ledger at 1 and 10 million events, on PostgreSQL.

For each scale, a dedicated database (``citadel_bench_<hex>``, dropped at the end) is migrated
with the ledger's own migrations and its synthetic raw events (``usage_events``) are loaded with
COPY; then every rollup (full and narrow, hourly and daily) is computed from them by the product's
own ``citadel.metering.ledger.rebuild_rollups`` (the same sums the writer keeps, checked below
against the raw events). Then each query below runs through ``citadel.metering.analytics.Analytics``
(SQLAlchemy, asyncpg: the service's own code path, which reads the narrowest rollup that has the
columns asked for), warm, ``--runs`` times, and its p50 and p99 are printed:

- ``by-team 30d``: cost by team over the 30 days to the end of the last hour (hour-aligned, not
  day-aligned, so it reads hourly + daily + hourly rollups): the headline query, target p50 under
  100 ms at 10 million events;
- ``by-team per day 30d``, ``by-model per hour 7d``, ``top-10 users 30d``, ``spend by user this
  month`` (what /v1/budgets reads), ``deployment costs 30d``;
- the reference: the same answer as ``by-team 30d`` computed from the raw events
  (``SELECT team_id, sum(cost_micros) FROM usage_events WHERE ts ...``), measured in the same run;
  its answer is checked equal to the rollups'.

With ``--full-only`` too, the same queries again reading only the full rollups (``usage_hourly``
and ``usage_daily``, keyed by user, team, model, deployment and tier), for comparison.

Data: ~2,000 users (Zipf-like activity), 50 teams, 4 tiers, 10 models with 2 deployments each,
each user using 1-3 favourite models; 60 days with a diurnal load curve; random token counts,
latencies and ~6 % errors.

    .venv/bin/python bench/ledger_queries.py [--events 1000000,10000000] [--runs 50] [--json PATH]
        [--server postgresql://postgres@127.0.0.1:5432] [--full-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import Table, text

from citadel.metering.analytics import Analytics
from citadel.metering.ledger import COLUMNS, rebuild_rollups
from citadel.metering.migrate import LEDGER
from citadel.metering.ranges import TimeRange
from citadel.metering.schema import ROLLUPS
from citadel.settings import Deployment, GatewaySettings, Model, Price, Settings
from citadel.stores.sql import build_engine

USERS, TEAMS, MODELS, DAYS = 2000, 50, 10, 60
TIERS = (("free", 0.5), ("standard", 0.3), ("premium", 0.15), ("enterprise", 0.05))
END = datetime(2024, 6, 30, 14, tzinfo=UTC)  # the end of the data: mid-afternoon, not midnight
START = END - timedelta(days=DAYS)
TARGET_MS = 100.0
# The ledger's indexes on usage_events, dropped for the bulk load and built again after it.
_EVENT_INDEXES = {
    "ix_usage_events_ts": "CREATE INDEX ix_usage_events_ts ON usage_events (ts)",
}


# -- the synthetic organisation -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class User:
    id: str
    team: str
    tier: str
    models: tuple[int, ...]


def organisation(rng: random.Random) -> tuple[list[User], list[float]]:
    """Users with teams, tiers and favourite models, and their cumulative activity weights."""
    team_weights = [1 / (i + 1) ** 0.7 for i in range(TEAMS)]  # some teams much larger
    model_weights = [1 / (i + 1) for i in range(MODELS)]
    users = []
    for i in range(USERS):
        team = rng.choices(range(TEAMS), weights=team_weights)[0]
        tier = rng.choices([t for t, _ in TIERS], weights=[w for _, w in TIERS])[0]
        favourites = set(rng.choices(range(MODELS), weights=model_weights, k=rng.randint(1, 3)))
        users.append(User(f"usr_{i:016x}", f"team_{team:016x}", tier, tuple(sorted(favourites))))
    activity = [1 / (rank + 1) ** 0.8 for rank in range(USERS)]  # a few heavy users
    rng.shuffle(activity)
    cumulative, total = [], 0.0
    for weight in activity:
        total += weight
        cumulative.append(total)
    return users, cumulative


def settings() -> Settings:
    models = tuple(
        Model(
            name=f"model-{m}",
            deployments=tuple(
                Deployment(
                    name=f"model-{m}-{d}",
                    url="http://127.0.0.1:1",
                    upstream_model=f"model-{m}",
                    gpu_hour_usd=1.0 + m * 0.25,
                    gpus=1 + d,
                )
                for d in range(2)
            ),
            price=Price(input_per_1k=0.0005, output_per_1k=0.0015),
            reference_price=Price(input_per_1k=0.005, output_per_1k=0.015),
        )
        for m in range(MODELS)
    )
    return Settings(gateway=GatewaySettings(admin_key="sk-bench"), models=models)


def hourly_counts(events: int) -> list[int]:
    """Events per hour over DAYS days: a diurnal curve (quiet nights), weekends at half load."""
    weights = []
    for h in range(DAYS * 24):
        when = START + timedelta(hours=h)
        day = 0.5 if when.weekday() >= 5 else 1.0
        weights.append(day * (0.25 + math.sin(math.pi * ((when.hour - 6) % 24) / 24) ** 2))
    scale = events / sum(weights)
    counts = [int(w * scale) for w in weights]
    counts[-1] += events - sum(counts)
    return counts


# -- loading ------------------------------------------------------------------------------------


async def load(conn: asyncpg.Connection, uri: str, events: int, seed: int = 1) -> dict[str, float]:
    """Generate ``events`` events hour by hour and COPY them (indexes built after); then compute
    every rollup from them with the ledger's ``rebuild_rollups``."""
    rng = random.Random(seed)
    users, cumulative = organisation(rng)
    began = time.perf_counter()
    for name in _EVENT_INDEXES:
        await conn.execute(f"DROP INDEX IF EXISTS {name}")
    await conn.execute("ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS pk_usage_events")
    batch: list[tuple[Any, ...]] = []
    number = 0
    for h, count in enumerate(hourly_counts(events)):
        hour = START + timedelta(hours=h)
        for u in rng.choices(range(USERS), cum_weights=cumulative, k=count):
            user = users[u]
            model = user.models[rng.randrange(len(user.models))]
            deployment = f"model-{model}-{rng.getrandbits(1)}"
            prompt = rng.randrange(20, 3000)
            completion = rng.randrange(0, 1200)
            cost = (prompt * 5 + completion * 15 + 9) // 10  # the models' price, rounded up
            status = 200 if rng.random() > 0.06 else 500
            latency = rng.uniform(50.0, 8000.0)
            ttft = rng.uniform(10.0, 900.0) if number % 3 == 0 else None
            ts = hour + timedelta(seconds=rng.random() * 3600)
            batch.append(
                (
                    f"{number:032x}", ts, f"req{number}", user.id, user.team, "key", user.tier,
                    "/v1/chat/completions", f"model-{model}", deployment, prompt, completion,
                    latency, ttft, status, ttft is not None, False, False, cost,
                )
            )  # fmt: skip
            number += 1
        if len(batch) >= 200_000:
            await conn.copy_records_to_table("usage_events", records=batch, columns=COLUMNS)
            batch = []
    await conn.copy_records_to_table("usage_events", records=batch, columns=COLUMNS)
    copied = time.perf_counter()
    await conn.execute(
        "ALTER TABLE usage_events ADD CONSTRAINT pk_usage_events PRIMARY KEY (event_id)"
    )
    for statement in _EVENT_INDEXES.values():
        await conn.execute(statement)
    indexed = time.perf_counter()
    engine = build_engine(uri)
    try:
        await rebuild_rollups(engine)
    finally:
        await engine.dispose()
    rolled = time.perf_counter()
    await conn.execute("VACUUM ANALYZE")  # what autovacuum does soon after a load this size
    done = time.perf_counter()
    sizes = {
        table: float(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        for table in ("usage_events", *(t.name for t, _ in ROLLUPS))
    }
    return {
        **sizes,
        "load_s": copied - began,
        "index_s": indexed - copied,
        "rebuild_rollups_s": rolled - indexed,
        "vacuum_s": done - rolled,
    }


# -- measuring ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Point:
    events: int
    rollups: str  # "schema": every rollup, the narrowest read; "full only": the full ones only
    query: str
    runs: int
    p50_ms: float
    p99_ms: float
    rows: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def timed(
    call: Callable[[], Awaitable[Any]], runs: int, warmup: int = 3
) -> tuple[list[float], Any]:
    for _ in range(warmup):
        answer = await call()
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        answer = await call()
        times.append((time.perf_counter() - began) * 1000)
    return times, answer


async def measure(
    uri: str, events: int, runs: int, label: str, rollups: tuple[tuple[Table, int], ...]
) -> list[Point]:
    engine = build_engine(uri)
    analytics = Analytics(engine, timeout=120, rollups=rollups)
    config = settings()
    month = TimeRange(END.replace(day=1, hour=0), END)
    last_30 = TimeRange(END - timedelta(days=30), END)
    days_30 = TimeRange(END.replace(hour=0) - timedelta(days=30), END.replace(hour=0))
    last_7 = TimeRange(END - timedelta(days=7), END)
    queries: dict[str, Callable[[], Awaitable[Any]]] = {
        "by-team 30d": lambda: analytics.usage(last_30, group_by=("team",)),
        "by-team per day 30d": lambda: analytics.usage(days_30, group_by=("team",), bucket="day"),
        "by-model per hour 7d": lambda: analytics.usage(last_7, group_by=("model",), bucket="hour"),
        "top-10 users 30d": lambda: analytics.top(last_30, by="user", limit=10),
        "spend by user this month": lambda: analytics.spend(month, "user"),
        "deployment costs 30d": lambda: analytics.deployment_costs(
            last_30, now=END, settings=config
        ),
    }
    raw = text(
        "SELECT team_id, CAST(sum(cost_micros) AS BIGINT) FROM usage_events "
        "WHERE ts >= :start AND ts < :end GROUP BY team_id"
    )

    async def reference() -> list[Any]:
        async with engine.connect() as conn:
            result = await conn.execute(raw, {"start": last_30.start, "end": last_30.end})
            return list(result.all())

    points: list[Point] = []

    def record(name: str, times: list[float], rows: int) -> None:
        p50, p99 = statistics.median(times), percentile(times, 0.99)
        points.append(Point(events, label, name, len(times), p50, p99, rows))
        print(f"    {name:<40} p50 {p50:8.2f} ms   p99 {p99:8.2f} ms", flush=True)

    try:
        answers = {}
        for name, call in queries.items():
            times, answer = await timed(call, runs)
            answers[name] = answer
            record(name, times, len(answer))
        times, rows = await timed(reference, max(3, runs // 10), warmup=1)
        record("reference: by-team 30d from raw events", times, len(rows))
        from_rollups = {r.keys["team"]: r.cost_micros for r in answers["by-team 30d"]}
        if from_rollups != {team: int(cost) for team, cost in rows}:
            raise SystemExit("the rollups' by-team answer differs from the raw events'")
    finally:
        await engine.dispose()
    return points


async def admin(server: str, sql: str) -> None:
    conn = await asyncpg.connect(f"{server}/postgres", timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def run_scale(
    server: str, events: int, runs: int, full_only: bool
) -> tuple[dict[str, float], list[Point]]:
    name = f"citadel_bench_{uuid.uuid4().hex[:12]}"
    await admin(server, f'CREATE DATABASE "{name}"')
    uri = f"{server}/{name}"
    try:
        await LEDGER.upgrade(uri)
        conn = await asyncpg.connect(uri, timeout=10)
        try:
            print(f"{events:,} events: loading ...", flush=True)
            sizes = await load(conn, uri, events)
            rows = ", ".join(f"{t.name} {sizes[t.name]:,.0f}" for t, _ in ROLLUPS)
            print(
                f"  loaded in {sizes['load_s']:.0f} s + {sizes['index_s']:.0f} s indexes + "
                f"{sizes['rebuild_rollups_s']:.0f} s rebuild_rollups + {sizes['vacuum_s']:.0f} s "
                f"VACUUM ANALYZE; rows: events {sizes['usage_events']:,.0f}, {rows}",
                flush=True,
            )
            print("  with the schema's rollups (the narrowest that answers):", flush=True)
            points = await measure(uri, events, runs, "schema", ROLLUPS)
            if full_only:
                print("  with the full rollups only (user in the key):", flush=True)
                points += await measure(uri, events, runs, "full only", ROLLUPS[:2])
        finally:
            await conn.close()
        return sizes, points
    finally:
        await admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", default="1000000,10000000", help="comma-separated scales")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per query (after 3 warm)")
    parser.add_argument(
        "--server",
        default=os.environ.get("CITADEL_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432"),
        help="a PostgreSQL server (a database is created and dropped on it)",
    )
    parser.add_argument("--json", help="write every point to this file")
    parser.add_argument(
        "--full-only",
        action="store_true",
        help="measure again reading the full rollups only (user in the key), for comparison",
    )
    args = parser.parse_args()
    scales = [int(s) for s in args.events.split(",")]
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {sys.version.split()[0]}",
        "scales": [],
    }
    results = []
    for events in scales:
        sizes, points = asyncio.run(run_scale(args.server, events, args.runs, args.full_only))
        results.append(points)
        report["scales"].append(
            {"events": events, "sizes": sizes, "points": [asdict(p) for p in points]}
        )
    print("\n| query | rollups | " + " | ".join(f"{e:,}: p50 / p99 ms" for e in scales) + " |")
    print("|---|---|" + "---:|" * len(scales))
    for i, point in enumerate(results[0]):
        cells = [f"{points[i].p50_ms:.1f} / {points[i].p99_ms:.1f}" for points in results]
        print(f"| {point.query} | {point.rollups} | " + " | ".join(cells) + " |")
    for points in results:
        for headline in (p for p in points if p.query == "by-team 30d"):
            reference = next(
                p
                for p in points
                if p.query.startswith("reference") and p.rollups == headline.rollups
            )
            verdict = "met" if headline.p50_ms < TARGET_MS else "missed"
            print(
                f"{headline.events:,} events, {headline.rollups} rollups: by-team 30d p50 "
                f"{headline.p50_ms:.1f} ms (under {TARGET_MS:.0f}: {verdict}); from the raw "
                f"events {reference.p50_ms:.0f} ms, {reference.p50_ms / headline.p50_ms:.0f}x"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
