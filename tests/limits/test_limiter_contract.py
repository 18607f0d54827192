"""The Limiter contract: the same assertions on the memory limiter, on Redis (DB 15), and on a
TLS server, a Sentinel group and a Redis Cluster.

Time is passed in, so the tests move a fake ``now`` instead of sleeping; each test uses its own
principal, so the Redis runs do not meet other tests' keys.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from zoneinfo import ZoneInfo

import pytest
from redis_topologies import Topologies

from citadel.errors import ConfigError
from citadel.limits.backend import create_limiter
from citadel.limits.decision import LimitDecision, Limiter, Limits, LimitUsage, Reservation
from citadel.limits.memory import MemoryLimiter
from citadel.limits.redis import RedisLimiter
from citadel.stores.endpoint import connect_redis
from citadel.stores.redis import RedisClient

REDIS_URL = "redis://127.0.0.1:6379/15"
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
PARIS = ZoneInfo("Europe/Paris")

Body = Callable[[Limiter, str], Awaitable[None]]
Runner = Callable[..., None]


@pytest.fixture(params=["memory", "redis", "tls", "sentinel", "cluster"])
def run(request: pytest.FixtureRequest, topologies: Topologies) -> Runner:
    """Runs a test body against a fresh limiter of the backend and a principal of its own."""

    def runner(body: Body, *, timezone: str = "UTC", lease_ttl: float = 600.0) -> None:
        async def main() -> None:
            limiter: Limiter
            if request.param == "memory":
                limiter = MemoryLimiter(timezone, lease_ttl)
            elif request.param == "redis":
                client = RedisClient.from_url(REDIS_URL, timeout=2.0)
                limiter = RedisLimiter(client, timezone, lease_ttl)
            else:  # the same assertions on each topology (tests/redis_topologies.py)
                store = connect_redis(topologies.url(request.param), timeout=2.0)
                limiter = RedisLimiter(store, timezone, lease_ttl)
            principal = f"contract-{uuid.uuid4().hex}"
            try:
                await body(limiter, principal)
            finally:
                await limiter.reset(principal)
                await limiter.aclose()

        asyncio.run(main())

    return runner


async def admit(
    limiter: Limiter,
    principal: str,
    limits: Limits,
    now: float,
    *,
    tokens: int = 0,
    cost: int = 0,
    lease: str | None = None,
) -> LimitDecision:
    return await limiter.admit(
        principal,
        limits,
        lease_id=lease or uuid.uuid4().hex,
        tokens=tokens,
        cost_micros=cost,
        now=now,
    )


async def usage(limiter: Limiter, principal: str, limits: Limits, now: float) -> dict[str, int]:
    snapshot = await limiter.usage(principal, limits, now)
    return {figure.name: figure.used for figure in snapshot.limits}


def held(decision: LimitDecision) -> Reservation:
    assert decision.reservation is not None, decision
    return decision.reservation


def test_requests_per_minute(run: Runner) -> None:
    """Exactly the limit passes at once; the next waits one emission interval."""
    limits = Limits(requests_per_minute=5)

    async def body(limiter: Limiter, principal: str) -> None:
        first = await admit(limiter, principal, limits, NOW)
        assert (True, 5, 4, 12.0) == (
            first.allowed,
            first.requests_limit,
            first.requests_remaining,
            first.requests_reset,
        )
        for _ in range(4):
            assert (await admit(limiter, principal, limits, NOW)).allowed
        refused = await admit(limiter, principal, limits, NOW)
        assert (False, "requests_per_minute", 12.0, 0, 60.0, None) == (
            refused.allowed,
            refused.refused_by,
            refused.retry_after,
            refused.requests_remaining,
            refused.requests_reset,
            refused.reservation,
        )
        assert not (await admit(limiter, principal, limits, NOW + 11.999)).allowed
        assert (await admit(limiter, principal, limits, NOW + 12)).allowed

    run(body)


def test_tokens_per_minute(run: Runner) -> None:
    """Reservations are weighted by tokens; the wait is until enough tokens are back."""
    limits = Limits(tokens_per_minute=1000)

    async def body(limiter: Limiter, principal: str) -> None:
        first = await admit(limiter, principal, limits, NOW, tokens=400)
        assert (1000, 600, 24.0) == (
            first.tokens_limit,
            first.tokens_remaining,
            first.tokens_reset,
        )
        assert (await admit(limiter, principal, limits, NOW, tokens=400)).allowed
        refused = await admit(limiter, principal, limits, NOW, tokens=400)
        assert ("tokens_per_minute", 12.0, 200) == (
            refused.refused_by,
            refused.retry_after,
            refused.tokens_remaining,
        )
        assert (await admit(limiter, principal, limits, NOW, tokens=200)).allowed
        assert (await admit(limiter, principal, limits, NOW + 24, tokens=400)).allowed

    run(body)


def test_concurrent_requests(run: Runner) -> None:
    """Leases cap the requests in flight; reconciling one frees its slot."""
    limits = Limits(concurrent_requests=2)

    async def body(limiter: Limiter, principal: str) -> None:
        first = held(await admit(limiter, principal, limits, NOW))
        assert (await admit(limiter, principal, limits, NOW)).allowed
        refused = await admit(limiter, principal, limits, NOW)
        assert ("concurrent_requests", 1.0) == (refused.refused_by, refused.retry_after)
        await limiter.reconcile(first, limits, tokens=0, cost_micros=0, now=NOW + 1)
        assert (await admit(limiter, principal, limits, NOW + 1)).allowed
        assert not (await admit(limiter, principal, limits, NOW + 1)).allowed

    run(body)


def test_a_lease_expires_after_its_ttl(run: Runner) -> None:
    """A lease never reconciled (a crashed gateway) frees its slot once the TTL has passed."""
    limits = Limits(concurrent_requests=1)

    async def body(limiter: Limiter, principal: str) -> None:
        assert (await admit(limiter, principal, limits, NOW)).allowed
        almost = await admit(limiter, principal, limits, NOW + 29.999)
        assert ("concurrent_requests", 0.001) == (almost.refused_by, almost.retry_after)
        assert 1 == (await usage(limiter, principal, limits, NOW + 29.999))["concurrent_requests"]
        assert 0 == (await usage(limiter, principal, limits, NOW + 30))["concurrent_requests"]
        assert (await admit(limiter, principal, limits, NOW + 30)).allowed

    run(body, lease_ttl=30)


def test_the_day_quota_rolls_over_at_midnight_in_the_zone(run: Runner) -> None:
    """The daily quota is per calendar day in the configured zone, renewed at local midnight."""
    limits = Limits(tokens_per_day=1000)
    midnight = dt.datetime(2026, 11, 25, tzinfo=PARIS).timestamp()  # 23:00 UTC

    async def body(limiter: Limiter, principal: str) -> None:
        evening = held(await admit(limiter, principal, limits, midnight - 60, tokens=1000))
        assert "2026-11-24" == evening.day
        refused = await admit(limiter, principal, limits, midnight - 60, tokens=1)
        assert ("tokens_per_day", 60.0) == (refused.refused_by, refused.retry_after)
        assert not (await admit(limiter, principal, limits, midnight - 0.001, tokens=1)).allowed
        morning = held(await admit(limiter, principal, limits, midnight, tokens=1000))
        assert "2026-11-25" == morning.day
        assert {"tokens_per_day": 1000} == await usage(limiter, principal, limits, midnight)
        # a reservation of the old day settles to the old day's counter, not the new one
        await limiter.reconcile(evening, limits, tokens=10, cost_micros=0, now=midnight + 1)
        assert {"tokens_per_day": 1000} == await usage(limiter, principal, limits, midnight + 1)

    run(body, timezone="Europe/Paris")


def test_month_quotas_of_tokens_and_cost(run: Runner) -> None:
    """Month quotas count tokens and micro-USD until the first of the next month."""
    limits = Limits(tokens_per_month=10_000, cost_per_month_micros=1_000_000)
    now = dt.datetime(2026, 11, 30, 22, tzinfo=PARIS).timestamp()

    async def body(limiter: Limiter, principal: str) -> None:
        first = held(await admit(limiter, principal, limits, now, tokens=100, cost=600_000))
        refused = await admit(limiter, principal, limits, now, tokens=100, cost=500_000)
        assert ("cost_per_month", 7200.0) == (refused.refused_by, refused.retry_after)
        await limiter.reconcile(first, limits, tokens=50, cost_micros=400_000, now=now)
        assert (await admit(limiter, principal, limits, now, tokens=100, cost=500_000)).allowed
        assert {"tokens_per_month": 150, "cost_per_month": 900_000} == await usage(
            limiter, principal, limits, now
        )
        over = await admit(limiter, principal, limits, now, tokens=9851)
        assert ("tokens_per_month", 7200.0) == (over.refused_by, over.retry_after)
        assert (await admit(limiter, principal, limits, now + 7200, tokens=9851)).allowed

    run(body, timezone="Europe/Paris")


def test_nothing_is_reserved_when_one_limit_refuses(run: Runner) -> None:
    """A refusal by any limit leaves every other limit untouched."""
    limits = Limits(
        requests_per_minute=10,
        tokens_per_minute=1000,
        concurrent_requests=2,
        tokens_per_day=5000,
        tokens_per_month=50_000,
        cost_per_month_micros=10_000,
    )

    async def body(limiter: Limiter, principal: str) -> None:
        assert (await admit(limiter, principal, limits, NOW, tokens=600, cost=100)).allowed
        before = await usage(limiter, principal, limits, NOW)
        for tokens, cost, refused_by in (
            (600, 100, "tokens_per_minute"),
            (100, 20_000, "cost_per_month"),
        ):
            refused = await admit(limiter, principal, limits, NOW, tokens=tokens, cost=cost)
            assert refused_by == refused.refused_by
            assert before == await usage(limiter, principal, limits, NOW)
        assert (await admit(limiter, principal, limits, NOW, tokens=100)).allowed
        full = await usage(limiter, principal, limits, NOW)
        refused = await admit(limiter, principal, limits, NOW, tokens=100)
        assert "concurrent_requests" == refused.refused_by
        assert full == await usage(limiter, principal, limits, NOW)
        assert {
            "requests_per_minute": 2,
            "tokens_per_minute": 700,
            "concurrent_requests": 2,
            "tokens_per_day": 700,
            "tokens_per_month": 700,
            "cost_per_month": 100,
        } == full

    run(body)


def test_reconcile_refunds_tokens_and_charges_overruns(run: Runner) -> None:
    """Unused tokens come back to the minute budget and the quotas; an over-run is charged."""
    limits = Limits(tokens_per_minute=1000, tokens_per_day=10_000, concurrent_requests=5)

    async def body(limiter: Limiter, principal: str) -> None:
        big = held(await admit(limiter, principal, limits, NOW, tokens=800))
        assert not (await admit(limiter, principal, limits, NOW, tokens=300)).allowed
        await limiter.reconcile(big, limits, tokens=100, cost_micros=0, now=NOW)
        assert {"tokens_per_minute": 100, "concurrent_requests": 0, "tokens_per_day": 100} == (
            await usage(limiter, principal, limits, NOW)
        )
        small = held(await admit(limiter, principal, limits, NOW, tokens=300))
        await limiter.reconcile(small, limits, tokens=500, cost_micros=0, now=NOW)
        assert {"tokens_per_minute": 600, "concurrent_requests": 0, "tokens_per_day": 600} == (
            await usage(limiter, principal, limits, NOW)
        )
        # a refund never lowers the budget below empty, however late it comes
        late = held(await admit(limiter, principal, limits, NOW + 30, tokens=100))
        await limiter.reconcile(late, limits, tokens=0, cost_micros=0, now=NOW + 120)
        assert {"tokens_per_minute": 0, "concurrent_requests": 0, "tokens_per_day": 600} == (
            await usage(limiter, principal, limits, NOW + 120)
        )

    run(body)


def test_usage_reports_every_set_limit(run: Runner) -> None:
    """usage() gives limit, used, remaining and reset time of each limit that is set."""
    limits = Limits(
        requests_per_minute=6,
        tokens_per_minute=600,
        concurrent_requests=3,
        tokens_per_day=1000,
        tokens_per_month=2000,
        cost_per_month_micros=300,
    )
    now = dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC).timestamp()

    async def body(limiter: Limiter, principal: str) -> None:
        await admit(limiter, principal, limits, now, tokens=300, cost=100)
        await admit(limiter, principal, limits, now + 1, tokens=100, cost=100)
        snapshot = await limiter.usage(principal, limits, now + 1)
        day_end = dt.datetime(2026, 11, 25, tzinfo=dt.UTC).timestamp()
        month_end = dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
        assert principal == snapshot.principal
        assert (
            LimitUsage(name="requests_per_minute", limit=6, used=2, remaining=4, reset_at=now + 20),
            LimitUsage(
                name="tokens_per_minute", limit=600, used=390, remaining=210, reset_at=now + 40
            ),
            LimitUsage(
                name="concurrent_requests", limit=3, used=2, remaining=1, reset_at=now + 601
            ),
            LimitUsage(
                name="tokens_per_day", limit=1000, used=400, remaining=600, reset_at=day_end
            ),
            LimitUsage(
                name="tokens_per_month", limit=2000, used=400, remaining=1600, reset_at=month_end
            ),
            LimitUsage(
                name="cost_per_month", limit=300, used=200, remaining=100, reset_at=month_end
            ),
        ) == snapshot.limits

    run(body)


def test_reset_forgets_everything(run: Runner) -> None:
    """After reset() the principal starts afresh on every limit."""
    limits = Limits(
        requests_per_minute=1,
        tokens_per_minute=100,
        concurrent_requests=1,
        tokens_per_day=100,
        tokens_per_month=100,
        cost_per_month_micros=100,
    )

    async def body(limiter: Limiter, principal: str) -> None:
        assert (await admit(limiter, principal, limits, NOW, tokens=100, cost=100)).allowed
        assert not (await admit(limiter, principal, limits, NOW)).allowed
        await limiter.reset(principal)
        assert dict.fromkeys(
            (
                "requests_per_minute",
                "tokens_per_minute",
                "concurrent_requests",
                "tokens_per_day",
                "tokens_per_month",
                "cost_per_month",
            ),
            0,
        ) == await usage(limiter, principal, limits, NOW)
        assert (await admit(limiter, principal, limits, NOW, tokens=100, cost=100)).allowed

    run(body)


def test_the_longest_wait_is_reported(run: Runner) -> None:
    """When several limits refuse, the answer names the one that frees last."""
    limits = Limits(requests_per_minute=1, tokens_per_day=10)

    async def body(limiter: Limiter, principal: str) -> None:
        assert (await admit(limiter, principal, limits, NOW, tokens=10)).allowed
        refused = await admit(limiter, principal, limits, NOW, tokens=1)
        day_end = dt.datetime(2027, 1, 16, tzinfo=dt.UTC).timestamp()
        assert ("tokens_per_day", day_end - NOW) == (refused.refused_by, refused.retry_after)

    run(body)


def test_unlimited_principals_are_admitted_without_figures(run: Runner) -> None:
    """No limit set: every request passes, with a reservation and no rate-limit figures."""

    async def body(limiter: Limiter, principal: str) -> None:
        got = await admit(limiter, principal, Limits(), NOW, tokens=10**9)
        assert (True, None, None) == (got.allowed, got.requests_limit, got.tokens_limit)
        await limiter.reconcile(held(got), Limits(), tokens=5, cost_micros=0, now=NOW)
        await limiter.ping()

    run(body)


@pytest.mark.parametrize(("uri", "kind"), [("memory://", MemoryLimiter), (REDIS_URL, RedisLimiter)])
def test_create_limiter_picks_the_backend_by_uri(uri: str, kind: type) -> None:
    """memory:// and redis:// name the two backends."""
    limiter = create_limiter(uri, timezone="UTC", lease_ttl=600, timeout=0.25)
    asyncio.run(limiter.aclose())
    assert isinstance(limiter, kind)


@pytest.mark.parametrize(
    ("uri", "timezone", "key"),
    [("postgresql://x", "UTC", "limits.backend"), ("memory://", "Mars/Olympus", "limits.timezone")],
)
def test_create_limiter_refuses_bad_settings(uri: str, timezone: str, key: str) -> None:
    """An unknown backend or time zone is a ConfigError naming the setting."""
    with pytest.raises(ConfigError, match=key):
        create_limiter(uri, timezone=timezone, lease_ttl=600, timeout=0.25)


def test_redis_keys_share_the_principals_hash_tag_and_all_expire() -> None:
    """Every key of a principal carries {u:<principal>} and a TTL; reset() deletes them all."""
    limits = Limits(
        requests_per_minute=10,
        tokens_per_minute=1000,
        concurrent_requests=2,
        tokens_per_day=5000,
        tokens_per_month=50_000,
        cost_per_month_micros=10_000,
    )
    principal = f"keys-{uuid.uuid4().hex}"

    async def main() -> tuple[dict[bytes, int], list[bytes]]:
        client = RedisClient.from_url(REDIS_URL, timeout=2.0)
        limiter = RedisLimiter(client, "UTC", 600)
        try:
            await admit(limiter, principal, limits, NOW, tokens=100, cost=10)
            names = await client.execute("KEYS", f"*{principal}*")
            ttls = {name: await client.execute("PTTL", name) for name in names}
            await limiter.reset(principal)
            return ttls, await client.execute("KEYS", f"*{principal}*")
        finally:
            await limiter.aclose()

    ttls, left = asyncio.run(main())
    tag = f"citadel:{{u:{principal}}}:"
    suffixes = ("rpm", "tpm", "leases", "day:2027-01-15", "month:2027-01", "cost:2027-01", "keys")
    assert sorted(tag + suffix for suffix in suffixes) == sorted(name.decode() for name in ttls)
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    assert [] == left
