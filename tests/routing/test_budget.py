"""The retry budget: deposits, the reserve, expiry, and the long-run bound on retries."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, target
from hypothesis import strategies as st

from citadel.errors import ConfigError
from citadel.routing.budget import BudgetSnapshot, RetryBudget


def retries_granted(budget: RetryBudget, now: float, attempts: int) -> int:
    return sum(budget.try_retry(now) for _ in range(attempts))


def test_reserve_allows_a_few_retries_without_traffic() -> None:
    """With no requests at all, the reserve of min_per_second * window retries is available."""
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window_seconds=10.0)
    assert 10 == retries_granted(budget, 0.0, 50)


def test_each_request_deposits_ratio() -> None:
    """Five requests at a ratio of 0.2 pay for exactly one retry; four do not."""
    budget = RetryBudget(ratio=0.2, min_per_second=0.0)
    for _ in range(4):
        budget.record_request(0.0)
    assert not budget.try_retry(0.0)
    budget.record_request(0.0)
    assert budget.try_retry(0.0)
    assert not budget.try_retry(0.0)


def test_deposits_stay_exact() -> None:
    """A thousand deposits of 0.1 make exactly a hundred tokens, with no rounding drift."""
    budget = RetryBudget(ratio=0.1, min_per_second=0.0)
    for _ in range(1000):
        budget.record_request(0.0)
    assert 100.0 == budget.snapshot(0.0).available
    assert 100 == retries_granted(budget, 0.0, 200)


def test_a_refused_retry_withdraws_nothing() -> None:
    """A refusal leaves the balance as it was."""
    budget = RetryBudget(ratio=0.5, min_per_second=0.0)
    budget.record_request(0.0)
    assert not budget.try_retry(0.0)
    assert BudgetSnapshot(requests=1, retries=0, available=0.5) == budget.snapshot(0.0)


def test_deposits_expire_after_the_window() -> None:
    """A deposit lasts at least window_seconds, and at most one second more (its bucket)."""
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window_seconds=10.0)
    budget.record_request(0.5)
    assert 1.0 == budget.snapshot(10.5).available
    assert 1.0 == budget.snapshot(10.999).available
    assert BudgetSnapshot(requests=0, retries=0, available=0.0) == budget.snapshot(11.0)
    assert not budget.try_retry(11.0)


def test_the_reserve_refills_as_its_retries_expire() -> None:
    """Retries paid by the reserve expire with the window, and the reserve is whole again."""
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window_seconds=10.0)
    assert 10 == retries_granted(budget, 0.5, 20)
    assert 0 == retries_granted(budget, 10.9, 1)
    assert 10 == retries_granted(budget, 11.0, 20)


def test_snapshot_counts_the_window() -> None:
    """The snapshot reports the window's requests and retries and the tokens left."""
    budget = RetryBudget(ratio=0.2, min_per_second=0.5, window_seconds=4.0)
    for second in range(3):
        for _ in range(10):
            budget.record_request(float(second))
    assert budget.try_retry(2.5)
    assert BudgetSnapshot(requests=30, retries=1, available=7.0) == budget.snapshot(2.5)
    assert BudgetSnapshot(requests=10, retries=1, available=3.0) == budget.snapshot(6.0)


def test_a_clock_step_back_lands_in_the_newest_bucket() -> None:
    """A slightly earlier ``now`` (another caller's clock read) is counted, not lost."""
    budget = RetryBudget(ratio=1.0, min_per_second=0.0)
    budget.record_request(5.0)
    budget.record_request(4.0)
    assert BudgetSnapshot(requests=2, retries=0, available=2.0) == budget.snapshot(5.0)


def test_fractional_window() -> None:
    """A window of 2.5 s keeps entries for at least 2.5 s."""
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window_seconds=2.5)
    budget.record_request(0.9)
    assert 1.0 == budget.snapshot(3.4).available
    assert 0.0 == budget.snapshot(4.0).available


def test_steady_outage_is_held_to_the_ratio() -> None:
    """When every request wants a retry, retries settle at the ratio plus the reserve's rate."""
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window_seconds=10.0)
    granted = 0
    for step in range(10_000):  # 100 requests a second for 100 seconds
        now = step / 100
        budget.record_request(now)
        granted += budget.try_retry(now)
    ceiling = 0.2 * 10_000 + 1.0 * (100 + 10)
    assert 0.2 * 10_000 + 0.8 * 100 <= granted <= ceiling


def test_retries_at_bucket_edges_do_not_refill_the_reserve_early() -> None:
    """Retrying just before and just after each second's edge gains nothing: entries live at
    least a full window, so the reserve still refills once per window at most."""
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window_seconds=1.0)
    granted = 0
    for second in range(100):
        granted += retries_granted(budget, second + 0.999, 5)
        granted += retries_granted(budget, second + 1.0, 5)
    assert granted <= 1.0 * (100 + 1)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": math.inf}, "ratio"),
        ({"min_per_second": -1.0}, "min_per_second"),
        ({"window_seconds": 0.0}, "window_seconds"),
        ({"window_seconds": math.nan}, "window_seconds"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, float], key: str) -> None:
    """A bad parameter is refused with its name in the message."""
    with pytest.raises(ConfigError, match=key):
        RetryBudget(**kwargs)


# A run: phases, each a short pattern of steps repeated (a cadence, like retries on both sides
# of every second's edge); a step advances the clock, then makes requests and retry attempts.
STEP = st.tuples(
    st.one_of(st.sampled_from([0.0, 0.001, 0.5, 0.999, 1.0, 10.0, 11.0]), st.floats(0.0, 30.0)),
    st.integers(0, 20),
    st.integers(0, 20),
)
PHASES = st.lists(
    st.tuples(st.lists(STEP, min_size=1, max_size=3), st.integers(1, 50)), min_size=1, max_size=20
)


@settings(max_examples=300, deadline=None)
@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    min_per_second=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    window_seconds=st.sampled_from([0.5, 1.0, 2.5, 10.0]),
    start=st.floats(0.0, 2e9),
    phases=PHASES,
)
def test_long_run_bound(
    ratio: float,
    min_per_second: float,
    window_seconds: float,
    start: float,
    phases: list[tuple[list[tuple[float, int, int]], int]],
) -> None:
    """At every point of any run, retries <= ratio * requests + min_per_second * (elapsed +
    window): the reserve refills no faster than min_per_second."""
    budget = RetryBudget(ratio=ratio, min_per_second=min_per_second, window_seconds=window_seconds)
    now = start
    requests = retries = 0
    closest = -math.inf
    steps = [step for pattern, repeat in phases for _ in range(repeat) for step in pattern]
    for dt, new_requests, attempts in steps:
        now += dt
        for _ in range(new_requests):
            budget.record_request(now)
        requests += new_requests
        retries += retries_granted(budget, now, attempts)
        bound = ratio * requests + min_per_second * (now - start + window_seconds)
        assert retries <= bound + 1e-6
        closest = max(closest, retries - bound)
        assert budget.snapshot(now).available >= 0.0
    target(closest)  # steer the search toward runs that press on the bound
