"""Exactness across processes: four processes race for one principal's limits through Redis.

Each process has its own event loop and RedisClient, waits at a barrier, then fires all of its
admissions at once, with the same fixed ``now`` everywhere so no budget refills during the race.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import uuid
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from citadel.limits.decision import Limits
from citadel.limits.redis import RedisLimiter
from citadel.stores.redis import RedisClient

REDIS_URL = "redis://127.0.0.1:6379/15"
NOW = 1_800_000_000.0
PROCESSES = 4


def race(
    principal: str,
    limits: Limits,
    sizes: list[int],
    barrier: Barrier,
    results: Queue[list[int]],
) -> None:
    """One racer: admit a request of each size concurrently; report the sizes admitted."""

    async def main() -> list[int]:
        limiter = RedisLimiter(RedisClient.from_url(REDIS_URL, timeout=10.0), "UTC", 600)
        try:
            await limiter.ping()  # connected and warm before the start
            barrier.wait()
            decisions = await asyncio.gather(
                *(
                    limiter.admit(
                        principal,
                        limits,
                        lease_id=uuid.uuid4().hex,
                        tokens=size,
                        cost_micros=0,
                        now=NOW,
                    )
                    for size in sizes
                )
            )
            return [size for size, got in zip(sizes, decisions, strict=True) if got.allowed]
        finally:
            await limiter.aclose()

    results.put(asyncio.run(main()))


def run_race(limits: Limits, sizes: list[list[int]]) -> list[int]:
    """Race one process per list of sizes; the sizes admitted, over all processes."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(sizes))
    results: Queue[list[int]] = context.Queue()
    principal = f"race-{uuid.uuid4().hex}"
    racers = [
        context.Process(target=race, args=(principal, limits, mine, barrier, results))
        for mine in sizes
    ]
    for racer in racers:
        racer.start()
    admitted = [size for _ in racers for size in results.get(timeout=60)]
    for racer in racers:
        racer.join(timeout=30)
        assert 0 == racer.exitcode
    asyncio.run(_reset(principal))
    return admitted


async def _reset(principal: str) -> None:
    limiter = RedisLimiter(RedisClient.from_url(REDIS_URL, timeout=2.0), "UTC", 600)
    await limiter.reset(principal)
    await limiter.aclose()


def test_exactly_n_requests_are_admitted_across_processes() -> None:
    """With N requests per minute, four racing processes get exactly N admissions between them."""
    limit = 250
    admitted = run_race(Limits(requests_per_minute=limit), [[0] * limit] * PROCESSES)
    assert limit == len(admitted)


def test_admitted_token_reservations_never_exceed_the_limit() -> None:
    """Admitted reservations fill the tokens-per-minute budget without ever exceeding it."""
    limit, largest = 20_000, 500
    draw = random.Random(7)
    sizes = [[draw.randint(1, largest) for _ in range(150)] for _ in range(PROCESSES)]
    admitted = run_race(Limits(tokens_per_minute=limit), sizes)
    assert limit - largest < sum(admitted) <= limit
