"""Peak-EWMA and plain EWMA estimates over irregular samples, with time passed in."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from citadel.routing.latency import Ewma, PeakEwma

TAU = 10.0

samples = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=100.0),  # seconds
        st.floats(min_value=0.0, max_value=30.0),  # time since the previous sample
    ),
    min_size=1,
    max_size=50,
)


def test_no_data_reads_as_initial() -> None:
    """Before the first sample the value is ``initial``, None unless given."""
    assert PeakEwma().value(0.0) is None
    assert 0.5 == PeakEwma(initial=0.5).value(0.0)
    assert Ewma().value(0.0) is None


def test_first_sample_is_taken_whole() -> None:
    """The first sample sets the estimate, whatever ``initial`` was."""
    ewma = PeakEwma(initial=5.0)
    ewma.observe(0.2, now=100.0)
    assert 0.2 == ewma.value(100.0)


def test_peak_jumps_up_at_once_when_two_samples_agree() -> None:
    """Two samples above the estimate lift it to the smaller of them, however little time passed."""
    ewma = PeakEwma(tau_seconds=TAU)
    ewma.observe(0.1, now=0.0)
    ewma.observe(2.0, now=0.001)
    ewma.observe(3.0, now=0.002)
    assert 2.0 == ewma.value(0.002)
    ewma.observe(2.5, now=0.003)
    assert 2.5 == ewma.value(0.003)


def test_a_lone_peak_only_pulls_like_the_plain_average() -> None:
    """One late response among fast ones moves the estimate by its time weight, no more."""
    peak, plain = PeakEwma(tau_seconds=TAU), Ewma(tau_seconds=TAU)
    for ewma in (peak, plain):
        ewma.observe(0.01, now=0.0)
        ewma.observe(0.01, now=0.001)
        ewma.observe(0.5, now=0.002)
    assert plain.value(0.002) == pytest.approx(peak.value(0.002))
    assert peak.value(0.002) == pytest.approx(0.01, abs=1e-4)
    peak.observe(0.01, now=0.003)  # the next one is fast again: the outlier is forgotten
    assert peak.value(0.003) == pytest.approx(0.01, abs=1e-4)


def test_peak_decays_towards_a_lower_sample_with_tau() -> None:
    """A lower sample ``dt`` later pulls the estimate with weight ``1 - exp(-dt / tau)``."""
    ewma = PeakEwma(tau_seconds=TAU)
    ewma.observe(1.0, now=0.0)
    ewma.observe(0.1, now=TAU)
    w = math.exp(-1.0)
    assert 1.0 * w + 0.1 * (1 - w) == pytest.approx(ewma.value(TAU))


def test_peak_decay_is_slow_for_close_samples_and_fast_for_far_ones() -> None:
    """The weight of the past depends on elapsed time, not on the number of samples."""
    close, far = PeakEwma(tau_seconds=TAU), PeakEwma(tau_seconds=TAU)
    close.observe(1.0, now=0.0)
    far.observe(1.0, now=0.0)
    close.observe(0.1, now=0.1)
    far.observe(0.1, now=30.0)
    assert close.value(0.1) == pytest.approx(0.991, abs=0.001)
    assert far.value(30.0) == pytest.approx(0.145, abs=0.001)


def test_many_fast_samples_bring_the_peak_down() -> None:
    """After a spike, a run of fast responses over a few tau brings the estimate back."""
    ewma = PeakEwma(tau_seconds=TAU)
    ewma.observe(5.0, now=0.0)
    for i in range(1, 51):
        ewma.observe(0.1, now=i * 1.0)  # one per second for five tau
    value = ewma.value(50.0)
    assert value is not None
    assert 0.1 < value < 0.2


def test_a_lower_sample_at_the_same_instant_has_no_weight() -> None:
    """Two samples at one instant: the second, lower one does not move the estimate (Finagle)."""
    ewma = PeakEwma()
    ewma.observe(1.0, now=5.0)
    ewma.observe(0.1, now=5.0)
    assert 1.0 == ewma.value(5.0)


def test_a_clock_read_out_of_order_counts_as_no_elapsed_time() -> None:
    """A sample stamped before the previous one neither raises nor drags the estimate down."""
    ewma = Ewma(tau_seconds=TAU)
    ewma.observe(1.0, now=10.0)
    ewma.observe(0.0, now=5.0)
    assert 1.0 == ewma.value(10.0)


def test_stale_estimate_reads_as_initial() -> None:
    """With no sample for ``stale_after_seconds`` (5 tau by default) the value is ``initial``."""
    ewma = PeakEwma(tau_seconds=TAU)
    ewma.observe(3.0, now=0.0)
    assert 3.0 == ewma.value(5 * TAU)
    assert ewma.value(5 * TAU + 0.001) is None
    explicit = PeakEwma(tau_seconds=TAU, initial=0.25, stale_after_seconds=1.0)
    explicit.observe(3.0, now=0.0)
    assert 0.25 == explicit.value(1.5)
    explicit.observe(0.5, now=100.0)  # the first sample after staleness starts afresh
    assert 0.5 == explicit.value(100.0)


def test_plain_ewma_averages_higher_samples_too() -> None:
    """The plain average has no peak rule: a higher sample is blended in like a lower one."""
    rate = Ewma(tau_seconds=TAU)
    rate.observe(0.0, now=0.0)
    rate.observe(1.0, now=TAU)
    assert 1 - math.exp(-1.0) == pytest.approx(rate.value(TAU))


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan])
def test_tau_must_be_positive_and_finite(tau: float) -> None:
    """A bad tau is refused with its name and value."""
    with pytest.raises(ValueError, match="tau_seconds"):
        PeakEwma(tau_seconds=tau)


@given(samples)
def test_estimates_stay_within_the_samples(history: list[tuple[float, float]]) -> None:
    """Both estimates are weighted means: never below the least nor above the largest sample."""
    peak, plain = PeakEwma(tau_seconds=TAU), Ewma(tau_seconds=TAU)
    now = 0.0
    for sample, gap in history:
        now += gap
        peak.observe(sample, now)
        plain.observe(sample, now)
        for ewma in (peak, plain):
            value = ewma.value(now)
            assert value is not None
            lowest = min(s for s, _ in history)
            highest = max(s for s, _ in history)
            assert lowest - 1e-9 <= value <= highest + 1e-9


@given(samples)
def test_peak_is_at_least_the_plain_average(history: list[tuple[float, float]]) -> None:
    """Fed the same samples, the peak-sensitive estimate never reads below the plain one."""
    peak, plain = PeakEwma(tau_seconds=TAU), Ewma(tau_seconds=TAU)
    now = 0.0
    for sample, gap in history:
        now += gap
        peak.observe(sample, now)
        plain.observe(sample, now)
        peak_value, plain_value = peak.value(now), plain.value(now)
        assert peak_value is not None
        assert plain_value is not None
        assert peak_value >= plain_value - 1e-9
