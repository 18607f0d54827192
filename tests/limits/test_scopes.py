"""Scopes: an admission charges the user's limits, its API key's and its team's, all or none.

The same assertions on the memory limiter, on one Redis server (every scope in one script call),
on that server with the Cluster's two-call path forced (``split=True``: team first, compensated
when the user's call refuses), and on a real Redis Cluster. Then exactness: two processes, each
its own limiter, race members of one team for the team's budget, on both Redis paths.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import uuid
from collections.abc import Awaitable, Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

import pytest
from redis_topologies import Topologies

from citadel.limits.decision import LimitDecision, Limiter, Limits, Reservation, Scope
from citadel.limits.memory import MemoryLimiter
from citadel.limits.policy import refusal_message
from citadel.limits.redis import RedisLimiter
from citadel.stores.endpoint import connect_redis
from citadel.stores.redis import RedisClient

REDIS_URL = os.environ.get("CITADEL_TEST_REDIS", "redis://127.0.0.1:6379/8")
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
TEAM_BUDGET = 1_000  # micro-USD

Body = Callable[[Limiter, str], Awaitable[None]]
Runner = Callable[[Body], None]


@pytest.fixture(params=["memory", "redis", "redis-split", "cluster"])
def run(request: pytest.FixtureRequest, topologies: Topologies) -> Runner:
    """Runs a body against a fresh limiter of the backend and a tag of its own (for ids)."""

    def runner(body: Body) -> None:
        async def main() -> None:
            limiter: Limiter
            if request.param == "memory":
                limiter = MemoryLimiter("UTC", 600)
            elif request.param == "cluster":
                limiter = RedisLimiter(
                    connect_redis(topologies.url("cluster"), timeout=2.0), "UTC", 600
                )
                assert limiter._split
            else:
                client = RedisClient.from_url(REDIS_URL, timeout=2.0)
                limiter = RedisLimiter(client, "UTC", 600, split=request.param == "redis-split")
            try:
                await body(limiter, uuid.uuid4().hex[:12])
            finally:
                await limiter.aclose()

        asyncio.run(main())

    return runner


def team(tag: str, budget: int = TEAM_BUDGET) -> Scope:
    return Scope("team", f"team_{tag}", Limits(cost_per_month_micros=budget))


async def admit(
    limiter: Limiter,
    user: str,
    limits: Limits,
    scopes: tuple[Scope, ...],
    *,
    cost: int = 0,
    tokens: int = 0,
    now: float = NOW,
) -> LimitDecision:
    return await limiter.admit(
        user,
        limits,
        lease_id=uuid.uuid4().hex,
        tokens=tokens,
        cost_micros=cost,
        now=now,
        scopes=scopes,
    )


async def team_spent(limiter: Limiter, scope: Scope) -> int:
    snapshot = await limiter.team_usage(scope.id, scope.limits, NOW)
    (figure,) = snapshot.limits
    assert ("cost_per_month", TEAM_BUDGET) == (figure.name, figure.limit)
    return figure.used


def held(decision: LimitDecision) -> Reservation:
    assert decision.reservation is not None, decision
    return decision.reservation


def test_members_share_the_team_budget(run: Runner) -> None:
    """Two members' requests charge one team counter; the one that would pass the budget is
    refused by the team, with the team named, though the member's own budget has room."""
    own = Limits(cost_per_month_micros=10_000)

    async def body(limiter: Limiter, tag: str) -> None:
        scope = team(tag)
        alice, bob = f"usr_a{tag}", f"usr_b{tag}"
        assert (await admit(limiter, alice, own, (scope,), cost=600)).allowed
        assert (await admit(limiter, bob, own, (scope,), cost=400)).allowed
        assert 1_000 == await team_spent(limiter, scope)
        refused = await admit(limiter, bob, own, (scope,), cost=1)
        assert (False, "cost_per_month", "team", None) == (
            refused.allowed,
            refused.refused_by,
            refused.refused_scope,
            refused.reservation,
        )
        message = refusal_message(refused, limits=scope.limits)
        assert message.startswith("Team budget reached"), message
        assert "$0.001" in message, message
        # bob's own counter was not charged by the refusal
        (bobs,) = (await limiter.usage(bob, own, NOW)).limits
        assert 400 == bobs.used

    run(body)


def test_settling_returns_unused_budget_to_the_team(run: Runner) -> None:
    """A reservation settled below its estimate gives the difference back to the team too."""
    own = Limits(cost_per_month_micros=10_000)

    async def body(limiter: Limiter, tag: str) -> None:
        scope = team(tag)
        user = f"usr_{tag}"
        first = held(await admit(limiter, user, own, (scope,), cost=1_000))
        assert (first.scopes[0].kind, first.scopes[0].id) == ("team", scope.id)
        assert not (await admit(limiter, user, own, (scope,), cost=1)).allowed
        await limiter.reconcile(first, own, tokens=0, cost_micros=250, now=NOW + 1)
        assert 250 == await team_spent(limiter, scope)
        (mine,) = (await limiter.usage(user, own, NOW + 1)).limits
        assert 250 == mine.used
        assert (await admit(limiter, user, own, (scope,), cost=750)).allowed
        assert not (await admit(limiter, user, own, (scope,), cost=1)).allowed

    run(body)


def test_a_refusal_by_the_user_leaves_the_team_uncharged(run: Runner) -> None:
    """When the user's own limit refuses, the team's counter is as before: in a Cluster the
    team's call had already reserved, and the compensating call returned it."""
    own = Limits(requests_per_minute=2)

    async def body(limiter: Limiter, tag: str) -> None:
        scope = team(tag)
        user = f"usr_{tag}"
        for _ in range(2):
            assert (await admit(limiter, user, own, (scope,), cost=100)).allowed
        for _ in range(5):
            refused = await admit(limiter, user, own, (scope,), cost=100)
            assert ("requests_per_minute", "user") == (refused.refused_by, refused.refused_scope)
        assert 200 == await team_spent(limiter, scope)

    run(body)


def test_a_key_has_its_own_limits_under_its_owner(run: Runner) -> None:
    """A key's requests per minute and budget refuse with the key named; the owner's other key
    is unaffected, and the owner's counters are charged by both."""
    own = Limits(requests_per_minute=100, cost_per_month_micros=10_000)

    async def body(limiter: Limiter, tag: str) -> None:
        user = f"usr_{tag}"
        narrow = Scope("key", f"key_n{tag}", Limits(requests_per_minute=2))
        broke = Scope("key", f"key_b{tag}", Limits(cost_per_month_micros=300))
        first = await admit(limiter, user, own, (narrow,))
        assert (2, 1) == (first.requests_limit, first.requests_remaining)  # the tightest
        assert (await admit(limiter, user, own, (narrow,))).allowed
        refused = await admit(limiter, user, own, (narrow,))
        assert ("requests_per_minute", "key") == (refused.refused_by, refused.refused_scope)
        assert "this API key's own requests per minute (limit 2)" in refusal_message(
            refused, limits=narrow.limits
        )
        assert (await admit(limiter, user, own, (broke,), cost=300)).allowed
        over = await admit(limiter, user, own, (broke,), cost=1)
        assert ("cost_per_month", "key") == (over.refused_by, over.refused_scope)
        assert (await admit(limiter, user, own, (), cost=1)).allowed  # no key limits: passes
        rpm, cost = (await limiter.usage(user, own, NOW)).limits
        assert (4, 301) == (rpm.used, cost.used)
        await limiter.reset(user)

    run(body)


def test_user_key_and_team_together(run: Runner) -> None:
    """All three scopes in one admission: the longest wait names the refusal, and a refusal by
    any of them charges none."""
    own = Limits(requests_per_minute=10)

    async def body(limiter: Limiter, tag: str) -> None:
        user = f"usr_{tag}"
        scope = team(tag)
        key = Scope("key", f"key_{tag}", Limits(tokens_per_minute=100))
        scopes = (key, scope)
        assert (await admit(limiter, user, own, scopes, tokens=60, cost=900)).allowed
        by_key = await admit(limiter, user, own, scopes, tokens=60, cost=10)
        assert ("tokens_per_minute", "key") == (by_key.refused_by, by_key.refused_scope)
        by_team = await admit(limiter, user, own, scopes, tokens=10, cost=200)
        assert ("cost_per_month", "team") == (by_team.refused_by, by_team.refused_scope)
        assert 900 == await team_spent(limiter, scope)
        (rpm,) = (await limiter.usage(user, own, NOW)).limits
        assert 1 == rpm.used
        await limiter.reset(user)

    run(body)


# -- exactness across replicas -------------------------------------------------------------------


def race(
    team_id: str,
    users: list[str],
    split: bool,
    costs: list[int],
    barrier: Barrier,
    results: Queue[list[int]],
) -> None:
    """One replica: its own limiter; every member's admission at once; report the costs
    admitted."""

    async def main() -> list[int]:
        client = RedisClient.from_url(REDIS_URL, timeout=10.0)
        limiter = RedisLimiter(client, "UTC", 600, split=split)
        scope = Scope("team", team_id, Limits(cost_per_month_micros=TEAM_BUDGET))
        own = Limits(cost_per_month_micros=10**9, requests_per_minute=10_000)
        try:
            await limiter.ping()
            barrier.wait()
            decisions = await asyncio.gather(
                *(
                    limiter.admit(
                        users[i % len(users)],
                        own,
                        lease_id=uuid.uuid4().hex,
                        tokens=0,
                        cost_micros=cost,
                        now=NOW,
                        scopes=(scope,),
                    )
                    for i, cost in enumerate(costs)
                )
            )
            return [cost for cost, got in zip(costs, decisions, strict=True) if got.allowed]
        finally:
            await limiter.aclose()

    results.put(asyncio.run(main()))


@pytest.mark.parametrize("split", [False, True], ids=["one-call", "two-calls"])
def test_two_replicas_admit_exactly_the_team_budget(split: bool) -> None:
    """Two processes, each a limiter of its own, race 8 members of one team with 1 micro-USD
    requests (twice the budget in all): exactly the budget is admitted, and the team's counter
    says so."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results: Queue[list[int]] = context.Queue()
    tag = uuid.uuid4().hex[:12]
    team_id = f"team_{tag}"
    users = [f"usr_{i}{tag}" for i in range(8)]
    racers = [
        context.Process(
            target=race,
            args=(team_id, users[i::2], split, [1] * TEAM_BUDGET, barrier, results),
        )
        for i in range(2)
    ]
    for racer in racers:
        racer.start()
    admitted = [cost for _ in racers for cost in results.get(timeout=60)]
    for racer in racers:
        racer.join(timeout=30)
        assert 0 == racer.exitcode
    assert TEAM_BUDGET == sum(admitted)

    async def spent() -> int:
        limiter = RedisLimiter(RedisClient.from_url(REDIS_URL, timeout=2.0), "UTC", 600)
        try:
            scope = Scope("team", team_id, Limits(cost_per_month_micros=TEAM_BUDGET))
            (figure,) = (await limiter.team_usage(team_id, scope.limits, NOW)).limits
            for user in users:
                await limiter.reset(user)
            await limiter._client.execute("DEL", f"citadel:{{t:{team_id}}}:cost:2027-01")
            return figure.used
        finally:
            await limiter.aclose()

    assert TEAM_BUDGET == asyncio.run(spent())
