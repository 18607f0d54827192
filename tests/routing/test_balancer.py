"""Balancers: each one's choices on fixed candidates, with a seeded random source."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citadel.routing.balancer import (
    BALANCERS,
    Balancer,
    Candidate,
    CostOptimised,
    LeastOutstanding,
    PeakEwmaBalancer,
    PowerOfTwoChoices,
    RoundRobin,
    WeightedRandom,
    WeightedRoundRobin,
    blended_per_1k,
    create_balancer,
    explain,
)
from citadel.settings import Deployment, Price

PICKS = 10_000


def counts(balancer: Balancer, candidates: Sequence[Candidate], picks: int = PICKS) -> Counter[str]:
    """How many times each candidate is chosen in ``picks`` picks."""
    return Counter(balancer.pick(candidates).name for _ in range(picks))


def shares(balancer: Balancer, candidates: Sequence[Candidate]) -> dict[str, float]:
    """The fraction of ``PICKS`` picks that went to each candidate (0 for one never chosen)."""
    got = counts(balancer, candidates)
    return {c.name: got[c.name] / PICKS for c in candidates}


def every_balancer(seed: int = 7) -> list[Balancer]:
    return [create_balancer(name, random.Random(seed)) for name in BALANCERS]


# --- round_robin --------------------------------------------------------------------------------


def test_round_robin_weights_3_to_1_interleave() -> None:
    """Weights 3:1 give a, a, b, a, over and over: exact shares, never bursty."""
    balancer = RoundRobin()
    candidates = [Candidate("a", weight=3), Candidate("b", weight=1)]
    assert ["a", "a", "b", "a"] * 3 == [balancer.pick(candidates).name for _ in range(12)]


def test_round_robin_matches_nginx_sequence() -> None:
    """Weights 5:1:1 give nginx's documented smooth sequence a a b a c a a."""
    balancer = RoundRobin()
    candidates = [Candidate("a", weight=5), Candidate("b"), Candidate("c")]
    assert list("aabacaa") * 2 == [balancer.pick(candidates).name for _ in range(14)]


def test_round_robin_keeps_credit_by_name_when_the_set_changes() -> None:
    """A candidate missing from some picks and one that joins late still get their share."""
    balancer = RoundRobin()
    a, b, c = Candidate("a"), Candidate("b"), Candidate("c")
    for i in range(10):
        balancer.pick([a, b] if i % 3 else [a])  # b is sometimes excluded
    got = counts(balancer, [c, a, b], picks=300)  # order changed, c new
    assert all(abs(100 - got[name]) <= 2 for name in "abc"), got


def test_round_robin_single_candidate() -> None:
    """One candidate is always the choice."""
    assert "only" == RoundRobin().pick([Candidate("only", weight=0.0)]).name


# --- weighted_random ----------------------------------------------------------------------------


def test_weighted_random_follows_weights() -> None:
    """Over 10k picks each candidate's share is its weight's share, within 2 points."""
    candidates = [Candidate("a", weight=1), Candidate("b", weight=2), Candidate("c", weight=7)]
    got = shares(WeightedRandom(random.Random(1)), candidates)
    assert {"a": 0.1, "b": 0.2, "c": 0.7} == pytest.approx(got, abs=0.02)


def test_weighted_random_zero_weight_is_a_last_resort() -> None:
    """A weight of zero is (almost) never drawn while another candidate has weight."""
    candidates = [Candidate("zero", weight=0.0), Candidate("one")]
    assert 0 == counts(WeightedRandom(random.Random(2)), candidates)["zero"]


# --- least_outstanding --------------------------------------------------------------------------


def test_least_outstanding_picks_the_idle_one() -> None:
    """The candidate with nothing in flight wins every time."""
    candidates = [Candidate("a", in_flight=3), Candidate("idle"), Candidate("c", in_flight=5)]
    assert {"idle": 1000} == counts(LeastOutstanding(random.Random(3)), candidates, 1000)


def test_least_outstanding_counts_load_per_weight() -> None:
    """Twice the weight carries twice the requests: 3 in flight at weight 2 beats 2 at weight 1."""
    candidates = [Candidate("heavy", weight=2, in_flight=3), Candidate("light", in_flight=2)]
    assert "heavy" == LeastOutstanding(random.Random(4)).pick(candidates).name


def test_least_outstanding_breaks_ties_at_random() -> None:
    """Equal loads split evenly."""
    candidates = [Candidate("a", in_flight=1), Candidate("b", in_flight=1)]
    assert {"a": 0.5, "b": 0.5} == pytest.approx(
        shares(LeastOutstanding(random.Random(5)), candidates), abs=0.02
    )


# --- power_of_two -------------------------------------------------------------------------------


def test_power_of_two_frequencies() -> None:
    """Of three loads, the least wins 2/3 of picks, the middle 1/3, the most loaded none."""
    candidates = [
        Candidate("idle"),
        Candidate("busy", in_flight=5),
        Candidate("swamped", in_flight=50),
    ]
    got = shares(PowerOfTwoChoices(random.Random(6)), candidates)
    assert {"idle": 2 / 3, "busy": 1 / 3, "swamped": 0.0} == pytest.approx(got, abs=0.02)


def test_power_of_two_spreads_equal_loads_evenly() -> None:
    """With equal loads every candidate gets its fair share of draws."""
    candidates = [Candidate(name) for name in "abcd"]
    got = shares(PowerOfTwoChoices(random.Random(7)), candidates)
    assert dict.fromkeys("abcd", 0.25) == pytest.approx(got, abs=0.02)


# --- peak_ewma ----------------------------------------------------------------------------------


def test_peak_ewma_avoids_a_five_times_slower_candidate() -> None:
    """At equal load the slow candidate loses every draw it is in; the fast ones split."""
    candidates = [
        Candidate("fast1", latency=0.1),
        Candidate("slow", latency=0.5),
        Candidate("fast2", latency=0.1),
    ]
    got = shares(PeakEwmaBalancer(random.Random(8)), candidates)
    assert {"fast1": 0.5, "slow": 0.0, "fast2": 0.5} == pytest.approx(got, abs=0.02)


def test_peak_ewma_sends_load_to_the_slow_one_when_the_fast_one_is_busy() -> None:
    """Latency times the square root of load: a 5x faster deployment keeps the traffic with 9
    requests in flight, and loses it to an idle slow one with 30."""
    moderate = [Candidate("fast", latency=0.1, in_flight=9), Candidate("slow", latency=0.5)]
    assert {"fast": 100} == counts(PeakEwmaBalancer(random.Random(9)), moderate, 100)
    busy = [Candidate("fast", latency=0.1, in_flight=30), Candidate("slow", latency=0.5)]
    assert {"slow": 100} == counts(PeakEwmaBalancer(random.Random(9)), busy, 100)


def test_peak_ewma_tries_a_candidate_with_no_data() -> None:
    """No latency counts as the lowest known: it ties with the fastest and beats the slow one."""
    candidates = [
        Candidate("new"),
        Candidate("fast", latency=0.1),
        Candidate("slow", latency=0.5),
    ]
    got = shares(PeakEwmaBalancer(random.Random(10)), candidates)
    assert {"new": 0.5, "fast": 0.5, "slow": 0.0} == pytest.approx(got, abs=0.02)


def test_peak_ewma_load_counts_even_at_zero_latency() -> None:
    """A latency read as 0 is floored, so the busier of two such deployments still loses."""
    candidates = [Candidate("busy", latency=0.0, in_flight=4), Candidate("idle", latency=0.0)]
    assert {"idle": 100} == counts(PeakEwmaBalancer(random.Random(11)), candidates, 100)


# --- cost_optimised -----------------------------------------------------------------------------

CHEAP = Candidate("cheap", latency=0.8, cost_per_1k=0.1)
MIDDLE = Candidate("middle", latency=0.5, cost_per_1k=0.5)
DEAR = Candidate("dear", latency=0.1, cost_per_1k=2.0)


def test_cost_optimised_picks_the_cheapest_within_target() -> None:
    """The cheapest candidate wins as long as its latency meets the target."""
    balancer = CostOptimised(random.Random(12), latency_target=1.0, fallback=RoundRobin())
    assert {"cheap": 100} == counts(balancer, [DEAR, MIDDLE, CHEAP], 100)


def test_cost_optimised_skips_the_cheap_one_when_it_is_slow() -> None:
    """A cheap candidate over the target gives way to the next cheapest within it."""
    slow_cheap = Candidate("cheap", latency=3.0, cost_per_1k=0.1)
    balancer = CostOptimised(random.Random(13), latency_target=1.0, fallback=RoundRobin())
    assert {"middle": 100} == counts(balancer, [DEAR, MIDDLE, slow_cheap], 100)


def test_cost_optimised_counts_unknown_latency_as_within_target() -> None:
    """A cheap deployment with no latency data yet is tried."""
    new_cheap = Candidate("cheap", cost_per_1k=0.1)
    balancer = CostOptimised(random.Random(14), latency_target=1.0, fallback=RoundRobin())
    assert "cheap" == balancer.pick([DEAR, new_cheap]).name


def test_cost_optimised_falls_back_among_all_when_none_meets_target() -> None:
    """When every candidate is slower than the target, the fallback chooses among all of them."""
    candidates = [
        Candidate("cheap", latency=5.0, cost_per_1k=0.1),
        Candidate("dear", latency=2.0, cost_per_1k=2.0),
    ]
    balancer = CostOptimised(random.Random(15), latency_target=1.0)  # peak_ewma by default
    assert {"dear": 100} == counts(balancer, candidates, 100)


def test_cost_optimised_lets_the_fallback_split_equal_prices() -> None:
    """Equally cheap candidates within the target are shared out by the fallback."""
    twin_a = Candidate("a", latency=0.2, cost_per_1k=0.1)
    twin_b = Candidate("b", latency=0.3, cost_per_1k=0.1)
    balancer = CostOptimised(random.Random(16), latency_target=1.0, fallback=RoundRobin())
    assert ["a", "b", "a", "b"] == [balancer.pick([DEAR, twin_a, twin_b]).name for _ in range(4)]


def test_cost_optimised_needs_a_positive_target() -> None:
    """A target of zero is refused, naming the setting."""
    with pytest.raises(ValueError, match="latency_target"):
        CostOptimised(random.Random(), latency_target=0.0)


def test_blended_price_is_the_mean_of_input_and_output() -> None:
    """The one price a balancer compares is the mean of the two per-1k prices."""
    assert 0.002 == pytest.approx(blended_per_1k(Price(input_per_1k=0.001, output_per_1k=0.003)))


# --- every balancer -----------------------------------------------------------------------------


@pytest.mark.parametrize("balancer", every_balancer(), ids=BALANCERS)
def test_full_deployments_are_avoided(balancer: Balancer) -> None:
    """A candidate at its concurrency cap is not chosen while another has room."""
    candidates = [
        Candidate("full", in_flight=4, max_concurrency=4, latency=0.01, weight=100.0),
        Candidate("open1", in_flight=9, max_concurrency=10, latency=1.0),
        Candidate("open2", in_flight=20, latency=1.0),
    ]
    assert 0 == counts(balancer, candidates, 1000)["full"]


@pytest.mark.parametrize("balancer", every_balancer(), ids=BALANCERS)
def test_all_full_still_chooses(balancer: Balancer) -> None:
    """When every candidate is full one is chosen anyway: the upstream queue is the backpressure."""
    candidates = [Candidate(name, in_flight=2, max_concurrency=2) for name in "ab"]
    assert balancer.pick(candidates) in candidates


@pytest.mark.parametrize("balancer", every_balancer(), ids=BALANCERS)
def test_no_candidates_is_an_error(balancer: Balancer) -> None:
    """An empty candidate list raises ValueError instead of choosing nothing."""
    with pytest.raises(ValueError, match="at least one candidate"):
        balancer.pick([])


@pytest.mark.parametrize("name", BALANCERS)
def test_create_balancer_by_name(name: str) -> None:
    """Every listed name builds a balancer that reports that name."""
    assert name == create_balancer(name, random.Random()).name


def test_create_balancer_unknown_name() -> None:
    """An unknown name is refused, naming it and the choices."""
    with pytest.raises(ValueError, match=r"'fastest'.*round_robin.*cost_optimised"):
        create_balancer("fastest", random.Random())


def test_create_balancer_passes_the_latency_target() -> None:
    """cost_optimised gets the configured target."""
    balancer = create_balancer("cost_optimised", random.Random(), latency_target=0.75)
    assert isinstance(balancer, CostOptimised)
    assert 0.75 == balancer.latency_target


# --- explain ------------------------------------------------------------------------------------

THREE = [
    Candidate("a", latency=0.042, in_flight=0, cost_per_1k=0.1),
    Candidate("b", latency=0.2, in_flight=1, cost_per_1k=0.5),
    Candidate("c", latency=0.5, in_flight=2, cost_per_1k=1.0),
]


@pytest.mark.parametrize("balancer", every_balancer(), ids=BALANCERS)
def test_explain_names_the_balancer_the_choice_and_the_field(balancer: Balancer) -> None:
    """Every explanation is one line starting with the balancer's name and the chosen deployment."""
    chosen = balancer.pick(THREE)
    text = explain(balancer, THREE, chosen)
    assert text.startswith(f"{balancer.name}: {chosen.name}, ")
    assert text.endswith(" among 3")
    assert "\n" not in text


def test_explain_peak_ewma_gives_the_score() -> None:
    """The peak-EWMA reason carries the latency-times-load score."""
    balancer = PeakEwmaBalancer(random.Random())
    text = explain(balancer, THREE, THREE[0])
    assert (
        "peak_ewma: a, lower latency×load score of two drawn, 0.042 (0.042 s, 0 in flight)" in text
    )


def test_explain_cost_optimised_says_when_none_meets_target() -> None:
    """Over the target, the explanation says so and gives the fallback's reason."""
    balancer = CostOptimised(random.Random(), latency_target=0.01)
    text = explain(balancer, THREE, THREE[0])
    assert text.startswith("cost_optimised: a, none within the 0.01 s latency target, so peak_ewma")


def test_explain_cost_optimised_gives_the_price() -> None:
    """Within the target, the explanation gives the price and the fallback's reason."""
    balancer = CostOptimised(random.Random(), latency_target=1.0, fallback=RoundRobin())
    text = explain(balancer, THREE, balancer.pick(THREE))
    assert text == (
        "cost_optimised: a, cheapest within the 1 s latency target at 0.1/1k tokens "
        "(1 as cheap; round_robin: next in smooth weighted round-robin, weight 1 of 1) among 3"
    )


def test_explain_counts_full_candidates() -> None:
    """Full candidates set aside are mentioned."""
    candidates = [Candidate("a"), Candidate("b", in_flight=1, max_concurrency=1)]
    text = explain(RoundRobin(), candidates, candidates[0])
    assert text.endswith("among 1 not full of 2")


# --- the gateway's original interface -----------------------------------------------------------


def deployment(name: str, weight: float = 1.0) -> Deployment:
    return Deployment(name=name, url="http://127.0.0.1:1", upstream_model="m", weight=weight)


def test_weighted_round_robin_keeps_its_sequence_and_exclusions() -> None:
    """The deployment-level wrapper interleaves by weight, skips excluded names, None if all are."""
    balancer = WeightedRoundRobin([deployment("a", 3), deployment("b", 1)])
    assert ["a", "a", "b", "a"] == [d.name for d in (balancer.pick() for _ in range(4)) if d]
    assert "b" == getattr(balancer.pick(frozenset({"a"})), "name", None)
    assert balancer.pick(frozenset({"a", "b"})) is None
    with pytest.raises(ValueError, match="at least one deployment"):
        WeightedRoundRobin([])


def test_weighted_round_robin_returns_the_deployment_objects() -> None:
    """The wrapper hands back the configured Deployment, not a copy."""
    only = deployment("only")
    assert only is WeightedRoundRobin([only]).pick()


# --- invariants ---------------------------------------------------------------------------------

candidate_lists = st.lists(
    st.builds(
        Candidate,
        name=st.text(alphabet="abcdefgh", min_size=1, max_size=3),
        weight=st.floats(min_value=0.0, max_value=100.0),
        in_flight=st.integers(min_value=0, max_value=50),
        max_concurrency=st.integers(min_value=0, max_value=50),
        latency=st.none() | st.floats(min_value=0.0, max_value=60.0),
        cost_per_1k=st.floats(min_value=0.0, max_value=10.0),
    ),
    min_size=1,
    max_size=8,
    unique_by=lambda c: c.name,
)


@given(
    candidate_lists,
    st.sampled_from(BALANCERS),
    st.integers(min_value=0, max_value=2**32),
)
def test_pick_returns_a_candidate_with_room_if_any(
    candidates: list[Candidate], name: str, seed: int
) -> None:
    """Whatever the candidates, a pick is one of them, and not a full one unless all are full."""
    balancer = create_balancer(name, random.Random(seed))
    any_open = any(not c.full for c in candidates)
    for _ in range(5):
        chosen = balancer.pick(candidates)
        assert chosen in candidates
        assert not (any_open and chosen.full)


@given(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=6))
def test_round_robin_shares_are_exact_over_a_cycle(weights: list[int]) -> None:
    """From a fresh start, sum(weights) picks give each candidate exactly its weight."""
    candidates = [Candidate(f"d{i}", weight=w) for i, w in enumerate(weights)]
    balancer = RoundRobin()
    got = counts(balancer, candidates, picks=sum(weights))
    assert {c.name: int(c.weight) for c in candidates} == dict(got)
