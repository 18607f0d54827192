"""``bench/forecast.py --lead-time``'s measurement (``bench/lead_time.py``): the ramps are what
they say, and the lead time and false-alert counts come from the service's own evaluator."""

from __future__ import annotations

import lead_time
import pytest
from lead_time import FLAT_STEPS, HORIZON_STEPS, STEP, Ramp, flat_rows, ramp, run_ramp


@pytest.mark.parametrize("kind", ["latency", "queue", "spend"])
def test_each_ramp_is_flat_then_meets_its_threshold_when_it_says(kind: str) -> None:
    series = ramp(kind, 60, 0.0, seed=1)
    values = series.values
    crossing = next(i for i, v in enumerate(values) if v >= series.threshold)
    assert FLAT_STEPS + 60 * 60 / STEP == pytest.approx(crossing, abs=1)  # 60 minutes later
    assert max(values[:FLAT_STEPS]) < series.threshold
    assert ramp(kind, 60, 0.05, seed=1) == ramp(kind, 60, 0.05, seed=1)  # seeded
    assert ramp(kind, 60, 0.05, seed=1) != ramp(kind, 60, 0.05, seed=2)


def test_a_clean_linear_rise_warns_about_a_horizon_ahead_and_never_falsely() -> None:
    """A noise-free linear rise: the linear forecast reaches the threshold within the horizon as
    soon as enough of the rise is in its lookback, so it warns well ahead; the flat part never."""
    result = run_ramp((ramp("latency", 120, 0.0, seed=0), "linear"))
    assert 0 == result["false_alerts"]
    assert HORIZON_STEPS * STEP / 60 / 2 <= result["lead_minutes"] <= HORIZON_STEPS * STEP / 60


def test_a_step_that_jumps_past_the_threshold_has_no_lead_time() -> None:
    values = (0.35,) * FLAT_STEPS + (2.0,) * 20
    jump = Ramp(kind="latency", minutes=0, noise=0.0, seed=0, values=values, threshold=1.0,
                ramp_start=FLAT_STEPS)  # fmt: skip
    result = run_ramp((jump, "linear"))
    assert (0.0, 0) == (result["lead_minutes"], result["false_alerts"])


def test_flat_rows_skip_the_windows_and_the_horizon_before_each() -> None:
    n = lead_time.LOOKBACK_STEPS + 400
    window = (lead_time.LOOKBACK_STEPS + 200, lead_time.LOOKBACK_STEPS + 220)
    runs = list(flat_rows(n, [window], every=1))
    assert 2 == len(runs)
    assert runs[0][0] == lead_time.LOOKBACK_STEPS
    assert runs[0][-1] == window[0] - HORIZON_STEPS - 1
    assert runs[1][0] == window[1] + 1
    assert 1 == lead_time._episodes([False, True, True, False])
    assert 2 == lead_time._episodes([True, False, True])
