"""Pricing: infrastructure cost from GPU-hours, real cost per 1000 tokens, savings and ROI."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citadel.metering.pricing import (
    Savings,
    Totals,
    deployment_cost,
    infra_micros,
    per_1k_micros,
    reference_micros,
    savings,
    sum_savings,
    usd,
)
from citadel.settings import Deployment, Price

GPU = Deployment(name="llama-a", url="http://x", upstream_model="llama", gpu_hour_usd=2.5, gpus=4)


def test_infrastructure_cost_is_gpu_hour_price_times_gpus_times_hours() -> None:
    """Four GPUs at $2.50 an hour for a day cost $240, exactly."""
    assert 240_000_000 == infra_micros(2.5, 4, 86_400)


def test_infrastructure_cost_rounds_to_the_nearest_micro_dollar() -> None:
    """One second of a $1/h GPU is 277.78 micro-dollars: 278."""
    assert 278 == infra_micros(1.0, 1, 1)
    assert 0 == infra_micros(0.0, 8, 3600)


def test_infrastructure_cost_uses_the_decimal_the_settings_spelt() -> None:
    """$0.1 an hour for 10 hours is $1, not the binary float's 0.9999..."""
    assert 1_000_000 == infra_micros(0.1, 1, 36_000)


@given(
    gpu_hour=st.decimals(min_value=0, max_value=100, places=4),
    gpus=st.integers(min_value=0, max_value=16),
    seconds=st.integers(min_value=0, max_value=400 * 86_400),
)
def test_infrastructure_cost_equals_exact_arithmetic(
    gpu_hour: object, gpus: int, seconds: int
) -> None:
    """The cost is the exact rational price x gpus x hours, rounded half up to a micro-dollar."""
    exact = Fraction(str(gpu_hour)) * gpus * seconds / 3600 * 1_000_000
    expected = int(exact + Fraction(1, 2))  # floor(x + 1/2): half up, x >= 0
    assert expected == infra_micros(float(str(gpu_hour)), gpus, seconds)


def test_negative_inputs_are_refused() -> None:
    """A negative price, GPU count or duration is a ValueError naming the values."""
    with pytest.raises(ValueError, match="gpus=-1"):
        infra_micros(1.0, -1, 10)


def test_per_1k_is_the_amount_over_thousands_of_tokens() -> None:
    """$1 over 2 million tokens is 500 micro-dollars per 1000; no tokens, no ratio."""
    assert 500.0 == per_1k_micros(1_000_000, 2_000_000)
    assert per_1k_micros(1_000_000, 0) is None


def test_reference_cost_prices_tokens_at_the_commercial_price_rounded_up() -> None:
    """1500 prompt + 500 completion tokens at $0.01/$0.03 per 1k cost $0.03; 1 token rounds up."""
    price = Price(input_per_1k=0.01, output_per_1k=0.03)
    assert 30_000 == reference_micros(price, 1500, 500)
    assert 1 == reference_micros(Price(input_per_1k=0.0001), 1, 0)
    assert reference_micros(None, 1500, 500) is None


def test_real_cost_per_1k_falls_as_utilisation_rises() -> None:
    """The same GPUs over the same day cost the same; more tokens make each 1000 cheaper."""
    quiet = deployment_cost(
        name="llama-a",
        model="llama",
        deployment=GPU,
        totals=Totals(requests=10, prompt_tokens=600_000, completion_tokens=400_000),
        seconds=86_400,
        reference=None,
    )
    busy = deployment_cost(
        name="llama-a",
        model="llama",
        deployment=GPU,
        totals=Totals(requests=10, prompt_tokens=60_000_000, completion_tokens=40_000_000),
        seconds=86_400,
        reference=None,
    )
    assert 240_000_000 == quiet.infra_micros == busy.infra_micros
    assert 240_000.0 == quiet.infra_per_1k_micros  # $0.24 per 1000 tokens at 1M tokens a day
    assert 2_400.0 == busy.infra_per_1k_micros  # $0.0024 at 100M
    assert 24.0 == quiet.hours
    assert 1_000_000 / 24 == quiet.tokens_per_hour


def test_deployment_cost_reports_charged_margin_and_reference() -> None:
    """Charged per 1k, margin (charged less infra) and the reference cost of the same tokens."""
    cost = deployment_cost(
        name="llama-a",
        model="llama",
        deployment=GPU,
        totals=Totals(requests=3, prompt_tokens=2000, completion_tokens=1000, cost_micros=5000),
        seconds=3600,
        reference=Price(input_per_1k=0.01, output_per_1k=0.03),
    )
    assert 10_000_000 == cost.infra_micros
    assert 5000 * 1000 / 3000 == cost.charged_per_1k_micros
    assert 5000 - 10_000_000 == cost.margin_micros
    assert 50_000 == cost.reference_micros
    assert cost.configured


def test_an_unconfigured_deployment_has_no_infrastructure_cost() -> None:
    """A deployment seen in the ledger but gone from the settings costs nothing known."""
    cost = deployment_cost(
        name="gone",
        model="llama",
        deployment=None,
        totals=Totals(requests=1, prompt_tokens=10),
        seconds=3600,
        reference=None,
    )
    assert (False, 0, 0) == (cost.configured, cost.gpus, cost.infra_micros)


def test_savings_and_roi_against_the_reference() -> None:
    """Reference $300, infrastructure $100: $200 saved, ROI 2, two thirds cheaper."""
    item = Savings(
        model="llama",
        totals=Totals(requests=1, cost_micros=150_000_000),
        infra_micros=100_000_000,
        reference_micros=300_000_000,
    )
    assert 200_000_000 == item.savings_micros
    assert 150_000_000 == item.savings_vs_charged_micros
    assert 2.0 == item.roi
    assert Fraction(2, 3) == Fraction(item.savings_ratio or 0).limit_denominator(1000)


def test_savings_are_unknown_without_a_reference_or_an_investment() -> None:
    """No reference price: no savings; no infrastructure cost: savings but no ROI."""
    none = savings(model="m", totals=Totals(prompt_tokens=1000), infra_micros=5, reference=None)
    assert (None, None, None) == (none.savings_micros, none.roi, none.savings_ratio)
    free = savings(
        model="m",
        totals=Totals(prompt_tokens=1000),
        infra_micros=0,
        reference=Price(input_per_1k=0.01),
    )
    assert (10_000, None) == (free.savings_micros, free.roi)


def test_sum_of_savings_leaves_out_models_without_a_reference() -> None:
    """Totals add over the models with a reference price; with none, the reference is None."""
    a = Savings(model="a", totals=Totals(prompt_tokens=5), infra_micros=10, reference_micros=100)
    b = Savings(model="b", totals=Totals(prompt_tokens=7), infra_micros=20, reference_micros=50)
    c = Savings(model="c", totals=Totals(prompt_tokens=9), infra_micros=40, reference_micros=None)
    total = sum_savings([a, b, c])
    assert (12, 30, 150, 120) == (
        total.totals.prompt_tokens,
        total.infra_micros,
        total.reference_micros,
        total.savings_micros,
    )
    assert sum_savings([c]).reference_micros is None


def test_usd_presents_micros_as_dollars() -> None:
    """Micro-USD to dollars; None stays None."""
    assert 1.5 == usd(1_500_000)
    assert usd(None) is None
