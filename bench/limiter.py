"""What an admission costs: the limiter's Lua script against a plain INCR, in the same run.

For each of ``--runs`` passes and each concurrency (asyncio tasks sharing one client), it measures
calls/s, p50/p99 latency and client CPU per call of:

- ``admit``: ``RedisLimiter.admit`` with all six limits set (one EVALSHA of admit.lua),
- ``admit.lua only``: the same EVALSHA with its arguments built directly (the script and the
  client, without the limiter's Python around them),
- ``incr``: a plain ``INCR`` through the same thin client (the reference),
- ``redis-py admit.lua`` / ``redis-py incr``: the script and INCR through redis-py's asyncio
  client, when redis-py is installed (it is not a dependency),

and prints the medians across passes and the admit/INCR throughput ratio. "Redis µs" is the
server's own time per call from INFO commandstats (other clients' calls of the same command during
the window count too). The process is pinned to one core when the OS allows; Redis runs wherever
it runs.

    .venv/bin/python bench/limiter.py [--url redis://127.0.0.1:6379/15] [--duration 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from citadel.limits.decision import Limits
from citadel.limits.maths import PERIOD_MS, Calendar, to_ms
from citadel.limits.redis import ADMIT, RedisLimiter, principal_keys
from citadel.stores.redis import RedisClient

# Large enough never to refuse: every call does the full check-and-reserve work.
LIMITS = Limits(
    requests_per_minute=1_000_000_000,
    tokens_per_minute=1_000_000_000,
    concurrent_requests=1_000_000_000,
    tokens_per_day=10**15,
    tokens_per_month=10**15,
    cost_per_month_micros=10**15,
)
LEASE_TTL = 0.5  # leases are never reconciled here: they expire, keeping the sorted set small
PRINCIPALS = 16
WARMUP = 0.3

Call = Callable[[int], Awaitable[Any]]
COMMANDS = {"incr": "incr", "redis-py incr": "incrby"}  # the command each call sends to Redis


@dataclass(slots=True)
class Point:
    name: str
    concurrency: int
    calls_per_s: float
    p50_us: float
    p99_us: float
    cpu_us: float  # client CPU per call
    server_us: float = 0.0  # Redis's own time per call (INFO commandstats), all callers included


async def measure(name: str, call: Call, concurrency: int, duration: float) -> Point:
    """Closed loop: ``concurrency`` tasks call back to back; latencies after the warm-up."""
    latencies: list[int] = []
    counter = itertools.count()
    start = time.perf_counter() + WARMUP
    stop = start + duration
    cpu: list[float] = []

    async def task() -> None:
        clock = time.perf_counter_ns
        record = latencies.append
        while True:
            before = clock()
            await call(next(counter))
            after = clock()
            now = after / 1e9
            if now >= stop:
                return
            if before / 1e9 >= start:
                record(after - before)

    async def cpu_marks() -> None:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu.append(time.process_time())
        await asyncio.sleep(max(0.0, stop - time.perf_counter()))
        cpu.append(time.process_time())

    await asyncio.gather(cpu_marks(), *(task() for _ in range(concurrency)))
    latencies.sort()
    count = len(latencies)
    return Point(
        name=name,
        concurrency=concurrency,
        calls_per_s=count / duration,
        p50_us=latencies[count // 2] / 1000,
        p99_us=latencies[min(count - 1, count * 99 // 100)] / 1000,
        cpu_us=(cpu[1] - cpu[0]) / count * 1e6,
    )


async def server_usec(client: RedisClient) -> dict[str, tuple[int, int]]:
    """Calls and microseconds per command so far, from INFO commandstats."""
    text = (await client.execute("INFO", "commandstats")).decode()
    stats = {}
    for line in text.splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.partition(":")
            values = dict(field.split("=", 1) for field in fields.split(","))
            stats[name.removeprefix("cmdstat_")] = (int(values["calls"]), int(values["usec"]))
    return stats


def thin_calls(client: RedisClient, limiter: RedisLimiter) -> dict[str, Call]:
    async def admit(i: int) -> Any:
        return await limiter.admit(
            f"bench-{i % PRINCIPALS}",
            LIMITS,
            lease_id=f"lease-{i}",
            tokens=100,
            cost_micros=10,
            now=time.time(),
        )

    calendar = Calendar("UTC")

    async def script_only(i: int) -> Any:
        keys, args = admit_arguments(calendar, i)
        return await client.evalsha(ADMIT, keys, args)

    async def incr(i: int) -> Any:
        return await client.execute("INCR", f"bench:{{u:bench-{i % PRINCIPALS}}}:incr")

    return {"admit": admit, "admit.lua only": script_only, "incr": incr}


def admit_arguments(calendar: Calendar, i: int) -> tuple[list[str], list[int | str]]:
    """KEYS and ARGV of admit.lua as RedisLimiter.admit builds them for LIMITS."""
    now_ms = to_ms(time.time())
    periods = calendar.at(now_ms / 1000)
    keys = principal_keys(f"bench-{i % PRINCIPALS}", periods.day, periods.month)
    args: list[int | str] = [
        now_ms,
        100,
        10,
        f"lease-{i}",
        to_ms(LEASE_TTL),
        to_ms(periods.day_ends_at),
        to_ms(periods.month_ends_at),
        PERIOD_MS,
        to_ms(LEASE_TTL) + 60_000,
        *(1_000_000_000,) * 3,
        *(10**15,) * 3,
    ]
    return keys, args


def redis_py_calls(url: str) -> tuple[Any, dict[str, Call]] | None:
    """The same admission (same script, same arguments) and INCR through redis-py, if present."""
    try:
        import redis.asyncio as redis_asyncio  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    client = redis_asyncio.Redis.from_url(url)
    script = client.register_script(ADMIT.source)
    calendar = Calendar("UTC")

    async def admit(i: int) -> Any:
        keys, args = admit_arguments(calendar, i)
        return await script(keys=keys, args=args)

    async def incr(i: int) -> Any:
        return await client.incr(f"bench:{{u:bench-{i % PRINCIPALS}}}:incr")

    return client, {"redis-py admit.lua": admit, "redis-py incr": incr}


async def one_pass(url: str, concurrencies: list[int], duration: float) -> list[Point]:
    client = RedisClient.from_url(url, timeout=5.0)
    limiter = RedisLimiter(client, "UTC", LEASE_TTL)
    calls = thin_calls(client, limiter)
    extra = redis_py_calls(url)
    if extra is not None:
        calls.update(extra[1])
    points = []
    try:
        for concurrency in concurrencies:
            for name, call in calls.items():
                command = COMMANDS.get(name, "evalsha")
                before = (await server_usec(client)).get(command, (0, 0))
                point = await measure(name, call, concurrency, duration)
                after = (await server_usec(client)).get(command, (0, 0))
                point.server_us = (after[1] - before[1]) / max(1, after[0] - before[0])
                points.append(point)
    finally:
        for i in range(PRINCIPALS):
            await limiter.reset(f"bench-{i}")
            await client.execute("DEL", f"bench:{{u:bench-{i}}}:incr")
        await limiter.aclose()
        if extra is not None:
            await extra[0].aclose()
    return points


def pin() -> str:
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity)"
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[-1]})
    return f"pinned to core {cores[-1]} of {len(cores)}"


def install_uvloop(wanted: bool) -> str:
    if wanted:
        try:
            import uvloop
        except ImportError:
            return "asyncio (uvloop missing)"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--runs", type=int, default=3, help="passes; medians are printed")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    print(f"{pin()}; loop: {install_uvloop(not args.no_uvloop)}; python {sys.version.split()[0]}")

    passes = [
        asyncio.run(one_pass(args.url, concurrencies, args.duration)) for _ in range(args.runs)
    ]
    by_key: dict[tuple[str, int], list[Point]] = {}
    for point in itertools.chain.from_iterable(passes):
        by_key.setdefault((point.name, point.concurrency), []).append(point)

    def median(key: tuple[str, int], field: str) -> float:
        return statistics.median(getattr(p, field) for p in by_key[key])

    print(f"medians of {args.runs} passes of {args.duration:g} s each")
    print(
        f"{'call':<20}{'c':>4}{'calls/s':>10}{'p50 µs':>9}{'p99 µs':>9}"
        f"{'client CPU µs':>15}{'Redis µs':>10}"
    )
    for name, concurrency in by_key:
        key = (name, concurrency)
        print(
            f"{name:<20}{concurrency:>4}{median(key, 'calls_per_s'):>10,.0f}"
            f"{median(key, 'p50_us'):>9.1f}{median(key, 'p99_us'):>9.1f}"
            f"{median(key, 'cpu_us'):>15.1f}{median(key, 'server_us'):>10.1f}"
        )
    for concurrency in concurrencies:
        for admit, incr in (("admit", "incr"), ("redis-py admit.lua", "redis-py incr")):
            if (admit, concurrency) in by_key and (incr, concurrency) in by_key:
                ratio = median((admit, concurrency), "calls_per_s") / median(
                    (incr, concurrency), "calls_per_s"
                )
                print(f"{admit}/{incr} throughput at c={concurrency}: {ratio:.2f}")
        thin, py = ("admit.lua only", concurrency), ("redis-py admit.lua", concurrency)
        if py in by_key:
            ratio = median(thin, "calls_per_s") / median(py, "calls_per_s")
            print(f"admit.lua, thin client / redis-py at c={concurrency}: {ratio:.2f}")


if __name__ == "__main__":
    main()
