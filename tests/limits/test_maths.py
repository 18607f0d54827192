"""The limiter maths: GCRA, reconciliation, leases, quotas and calendar periods."""

from __future__ import annotations

import asyncio
import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citadel.limits.decision import Limits, Reservation
from citadel.limits.maths import (
    PERIOD_MS,
    Calendar,
    Observed,
    Tat,
    check_limit,
    gcra_admit,
    gcra_level,
    gcra_remaining,
    gcra_reset_ms,
    gcra_settle,
    gcra_tat,
    judge,
    lease_retry_ms,
    live_leases,
    periods,
    quota_settle,
    to_ms,
)
from citadel.limits.memory import MemoryLimiter

PARIS = ZoneInfo("Europe/Paris")
NOW_MS = 1_800_000_000_000


def paris(*args: int) -> float:
    return dt.datetime(*args, tzinfo=PARIS).timestamp()  # type: ignore[misc]


def admit_at(tat: Tat | None, limit: int, cost: int, now_ms: int) -> tuple[bool, Tat | None, int]:
    """One GCRA admission on a stored TAT, as the backends do it."""
    check = gcra_admit(gcra_level(tat, limit, now_ms), limit, cost)
    new_tat = gcra_tat(check.level, limit, now_ms) if check.allowed else tat
    return check.allowed, new_tat, check.retry_after_ms


# --- GCRA: examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3, 7, 60, 97, 1000])
def test_gcra_admits_exactly_the_limit_at_one_instant(limit: int) -> None:
    """From idle, exactly ``limit`` requests pass at one instant, even when T is fractional."""
    tat, admitted = None, 0
    for _ in range(limit + 5):
        allowed, tat, _ = admit_at(tat, limit, 1, NOW_MS)
        admitted += allowed
    assert limit == admitted


def test_gcra_retry_after_is_the_exact_wait() -> None:
    """A refused request passes at now + retry_after, and not a millisecond before."""
    limit = 7  # T = 8571.43 ms
    tat = None
    for _ in range(limit):
        _, tat, _ = admit_at(tat, limit, 1, NOW_MS)
    allowed, _, retry = admit_at(tat, limit, 1, NOW_MS)
    assert (False, 8572) == (allowed, retry)
    assert not admit_at(tat, limit, 1, NOW_MS + retry - 1)[0]
    assert admit_at(tat, limit, 1, NOW_MS + retry)[0]


def test_gcra_refills_at_the_rate() -> None:
    """After a burst, one request passes per emission interval T = period / limit."""
    limit = 6  # T = 10 s
    tat = None
    for _ in range(limit):
        _, tat, _ = admit_at(tat, limit, 1, NOW_MS)
    level = gcra_level(tat, limit, NOW_MS + 25_000)
    assert 2 == gcra_remaining(level, limit)
    assert 35_000 == gcra_reset_ms(level, limit)


def test_a_cost_above_the_limit_is_never_admitted() -> None:
    """A request costlier than the whole limit is refused even on an idle budget."""
    check = gcra_admit(0, 100, 101)
    assert (False, PERIOD_MS) == (check.allowed, check.retry_after_ms)


def test_a_zero_limit_admits_only_free_requests() -> None:
    """A limit of zero refuses every request that costs something."""
    assert not gcra_admit(0, 0, 1).allowed
    assert gcra_admit(0, 0, 0).allowed


def test_tat_round_trips_through_its_stored_form() -> None:
    """The "ms:frac" form stored in Redis decodes to the same TAT."""
    tat = Tat(NOW_MS + 8571, 3)
    assert "1800000008571:3" == tat.encode()
    assert tat == Tat.decode(tat.encode().encode())


def test_settle_refunds_but_never_below_now() -> None:
    """A refund lowers the level by the unused part, down to zero and no further."""
    assert 300 * PERIOD_MS == gcra_settle(800 * PERIOD_MS, 1000, 700, 200)
    assert 0 == gcra_settle(100 * PERIOD_MS, 1000, 700, 200)


def test_settle_charges_an_overrun_up_to_one_period_of_debt() -> None:
    """An over-run raises the level by the excess, capped at twice the capacity."""
    assert 900 * PERIOD_MS == gcra_settle(800 * PERIOD_MS, 1000, 100, 200)
    assert 2 * 1000 * PERIOD_MS == gcra_settle(800 * PERIOD_MS, 1000, 100, 10**6)


def test_a_limit_too_large_for_exact_arithmetic_is_refused() -> None:
    """Limits beyond what doubles hold exactly raise an error naming the value."""
    with pytest.raises(ValueError, match="10000000001"):
        check_limit(10_000_000_001)


# --- quotas, leases, judge ------------------------------------------------------------------


def test_quota_settle_never_goes_below_zero_and_charges_overruns() -> None:
    """Settling adds actual - reserved, clamped at zero."""
    assert 700 == quota_settle(1000, 500, 200)
    assert 0 == quota_settle(100, 500, 200)
    assert 1300 == quota_settle(1000, 500, 800)


def test_leases_expire_at_their_expiry() -> None:
    """A lease counts until its expiry and not at it."""
    leases = {"a": NOW_MS + 10, "b": NOW_MS + 20}
    assert {"b": NOW_MS + 20} == live_leases(leases, NOW_MS + 10)
    assert 10 == lease_retry_ms(NOW_MS + 10, NOW_MS)
    assert 1000 == lease_retry_ms(NOW_MS + 600_000, NOW_MS)


def test_judge_reports_the_refusal_with_the_longest_wait() -> None:
    """When several limits refuse, the one that frees last is named."""
    limits = Limits(requests_per_minute=1, tokens_per_day=10)
    seen = Observed(requests_level=PERIOD_MS, day_tokens=10)
    verdict = judge(
        limits,
        seen,
        tokens=5,
        cost_micros=0,
        now_ms=NOW_MS,
        day_ends_ms=NOW_MS + 3_600_000,
        month_ends_ms=NOW_MS + 7_200_000,
    )
    assert ("tokens_per_day", 3_600_000) == (verdict.refused_by, verdict.retry_after_ms)


# --- calendar periods -------------------------------------------------------------------------


def test_periods_in_a_zone() -> None:
    """The day and month are the local ones, with local-midnight bounds."""
    now = paris(2026, 11, 24, 0, 30)  # still 23 November in UTC
    got = periods(now, PARIS)
    assert ("2026-11-24", "2026-11") == (got.day, got.month)
    assert paris(2026, 11, 24) == got.day_starts_at
    assert paris(2026, 11, 25) == got.day_ends_at
    assert paris(2026, 11, 1) == got.month_starts_at
    assert paris(2026, 12, 1) == got.month_ends_at


def test_periods_across_daylight_saving_changes() -> None:
    """The spring-forward day lasts 23 hours and the fall-back day 25."""
    spring = periods(paris(2026, 3, 29, 12), PARIS)
    autumn = periods(paris(2026, 10, 25, 12), PARIS)
    assert 23 * 3600 == spring.day_ends_at - spring.day_starts_at
    assert 25 * 3600 == autumn.day_ends_at - autumn.day_starts_at


def test_periods_at_month_and_year_ends() -> None:
    """February of a leap year ends on the 29th; December rolls into the next year."""
    february = periods(paris(2028, 2, 29, 23, 59, 59), PARIS)
    december = periods(paris(2026, 12, 31, 23), PARIS)
    assert ("2028-02-29", paris(2028, 3, 1)) == (february.day, february.month_ends_at)
    assert ("2026-12", paris(2027, 1, 1)) == (december.month, december.month_ends_at)


def test_the_day_changes_exactly_at_local_midnight() -> None:
    """One millisecond before midnight is the old day; midnight is the new one."""
    midnight = paris(2026, 11, 25)
    calendar = Calendar("Europe/Paris")
    assert "2026-11-24" == calendar.at(midnight - 0.001).day
    assert "2026-11-25" == calendar.at(midnight).day
    assert "2026-11-24" == calendar.at(midnight - 3600).day


@given(st.integers(min_value=0, max_value=4_000_000_000_000).map(lambda ms: ms / 1000))
def test_periods_always_contain_their_instant(now: float) -> None:
    """The day contains the instant, lies within its month, and is 23 to 25 hours long."""
    got = periods(now, PARIS)
    assert got.day_starts_at <= now < got.day_ends_at
    assert got.month_starts_at <= got.day_starts_at < got.day_ends_at <= got.month_ends_at
    assert 23 * 3600 <= got.day_ends_at - got.day_starts_at <= 25 * 3600
    assert got.day.startswith(got.month)


# --- GCRA: properties -------------------------------------------------------------------------

requests = st.lists(
    st.tuples(st.integers(min_value=0, max_value=20_000), st.integers(min_value=0, max_value=40)),
    max_size=80,
)


def window_excess(events: list[tuple[int, int]], limit: int, credit: list[tuple[int, int]]) -> int:
    """The largest ``cost*period - (limit*period + elapsed*limit + credit*period)`` over windows."""
    worst = -(10**18)
    for i, (t1, _) in enumerate(events):
        total = 0
        for t2, cost in events[i:]:
            total += cost
            refunded = sum(amount for t, amount in credit if t1 <= t <= t2)
            bound = limit * PERIOD_MS + (t2 - t1) * limit + refunded * PERIOD_MS
            worst = max(worst, total * PERIOD_MS - bound)
    return worst


@settings(max_examples=300)
@given(st.integers(min_value=1, max_value=50), requests)
def test_gcra_never_admits_more_than_the_limit_plus_the_refill(
    limit: int, arrivals: list[tuple[int, int]]
) -> None:
    """In any interval [t1, t2] the admitted cost is at most limit + (t2 - t1) / T."""
    now, tat, admitted = NOW_MS, None, []
    for gap, cost in arrivals:
        now += gap
        allowed, tat, _ = admit_at(tat, limit, cost, now)
        if allowed:
            admitted.append((now, cost))
    assert window_excess(admitted, limit, []) <= 0


@settings(max_examples=300)
@given(
    st.integers(min_value=1, max_value=50),
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=20_000),
            st.integers(min_value=0, max_value=40),
            st.floats(min_value=0, max_value=1),
            st.integers(min_value=0, max_value=3),
        ),
        max_size=60,
    ),
)
def test_with_refunds_admissions_stay_within_the_limit_plus_the_refunds(
    limit: int, steps: list[tuple[int, int, float, int]]
) -> None:
    """Refunds only return what they refund: admitted reservations over any interval are at most
    limit + elapsed / T + the tokens refunded within it, and the level never goes negative."""
    now, tat = NOW_MS, None
    admitted: list[tuple[int, int]] = []
    pending: list[tuple[int, int]] = []  # (reserved, actual)
    refunds: list[tuple[int, int]] = []
    for gap, cost, used, settle_count in steps:
        now += gap
        allowed, tat, _ = admit_at(tat, limit, cost, now)
        if allowed:
            admitted.append((now, cost))
            pending.append((cost, int(cost * used)))
        for reserved, actual in pending[:settle_count]:
            level = gcra_level(tat, limit, now)
            settled = gcra_settle(level, limit, reserved, actual)
            assert 0 <= settled <= level
            tat = gcra_tat(settled, limit, now)
            assert tat is None or tat.ms >= now
            refunds.append((now, reserved - actual))
        del pending[:settle_count]
    assert window_excess(admitted, limit, refunds) <= 0


@given(
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=0, max_value=3 * 1000 * PERIOD_MS),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**7),
)
def test_settle_never_leaves_a_negative_or_unbounded_level(
    limit: int, level: int, reserved: int, actual: int, now_ms: int
) -> None:
    """A settled level is never negative, never above the debt cap, and its TAT never before now."""
    settled = gcra_settle(level, limit, reserved, actual)
    assert 0 <= settled <= max(level if actual <= reserved else 0, 2 * limit * PERIOD_MS)
    tat = gcra_tat(settled, limit, now_ms)
    assert tat is None or (tat.ms >= now_ms and 0 <= tat.frac < limit)
    assert settled == gcra_level(tat, limit, now_ms)


# --- reconciliation sequences on the memory limiter -----------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(min_value=0, max_value=400)),
        st.tuples(st.just("settle"), st.integers(min_value=0, max_value=600)),
        st.tuples(st.just("wait"), st.integers(min_value=0, max_value=30_000)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(operations)
def test_reconciliation_never_leaves_negative_or_leaked_reservations(
    ops: list[tuple[str, int]],
) -> None:
    """Counters are never negative, each equals the settled actuals plus the pending
    reservations, and once everything is settled no lease or token reservation remains."""
    limits = Limits(
        tokens_per_minute=1000,
        concurrent_requests=4,
        tokens_per_day=5000,
        tokens_per_month=20_000,
        cost_per_month_micros=50_000,
    )

    async def scenario() -> None:
        limiter = MemoryLimiter("Europe/Paris", lease_ttl=3600)
        now = paris(2026, 11, 24, 12)
        pending: list[Reservation] = []
        charged = 0
        for n, (op, amount) in enumerate(ops):
            if op == "admit":
                got = await limiter.admit(
                    "p", limits, lease_id=f"l{n}", tokens=amount, cost_micros=amount, now=now
                )
                if got.reservation is not None:
                    pending.append(got.reservation)
            elif op == "settle" and pending:
                reservation = pending.pop(0)
                await limiter.reconcile(
                    reservation, limits, tokens=amount, cost_micros=amount, now=now
                )
                charged += amount
            else:
                now += amount / 1000
            held = sum(r.tokens for r in pending)
            figures = {u.name: u for u in (await limiter.usage("p", limits, now)).limits}
            assert all(u.used >= 0 and u.remaining >= 0 for u in figures.values())
            assert charged + held == figures["tokens_per_day"].used
            assert charged + held == figures["tokens_per_month"].used
            assert charged + sum(r.cost_micros for r in pending) == figures["cost_per_month"].used
            assert len(pending) == figures["concurrent_requests"].used
        for reservation in pending:
            await limiter.reconcile(reservation, limits, tokens=0, cost_micros=0, now=now)
        later = {u.name: u for u in (await limiter.usage("p", limits, now + 180)).limits}
        assert 0 == later["concurrent_requests"].used
        assert 0 == later["tokens_per_minute"].used
        assert charged == later["tokens_per_day"].used

    asyncio.run(scenario())


def test_to_ms_rounds_to_the_nearest_millisecond() -> None:
    """Times are whole milliseconds."""
    assert 1_800_000_000_001 == to_ms(1_800_000_000.0006)
