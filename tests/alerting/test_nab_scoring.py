"""NAB v1.1 scoring: probation, windows, scaled sigmoid, profiles, threshold and normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nab_scoring import (
    DATA,
    PROFILES,
    Profile,
    Series,
    load_corpus,
    load_profiles,
    load_scores,
    probation_length,
    scaled_sigmoid,
    score_corpus,
    window_starts,
)

NAB = DATA  # the NAB subset vendored in bench/data/nab
STANDARD = PROFILES[0]


def series(rows: int, windows: tuple[tuple[int, int], ...], name: str = "s.csv") -> Series:
    return Series(
        name=name,
        timestamps=np.arange(rows, dtype=np.float64) * 300.0,
        values=np.zeros(rows),
        windows=windows,
    )


def fire_at(rows: int, *at: int) -> np.ndarray:
    out = np.zeros(rows)
    out[list(at)] = 1.0
    return out


@pytest.fixture(scope="module")
def corpus() -> tuple[Series, ...]:
    return load_corpus(NAB / "data", NAB / "labels" / "combined_windows.json")


def test_probation_length() -> None:
    """Probation is 15 % of the rows, at most 750."""
    assert (604, 750, 15) == (
        probation_length(4032),
        probation_length(15902),
        probation_length(100),
    )


def test_scaled_sigmoid() -> None:
    """The curve is 0 at a window's end, about 1 well before it and -1 well after it."""
    assert 0.0 == scaled_sigmoid(0.0)
    assert math.isclose(2.0 / (1.0 + math.exp(-5.0)) - 1.0, scaled_sigmoid(-1.0))
    assert -1.0 == scaled_sigmoid(3.5)


def test_null_detector_scores_zero(corpus: tuple[Series, ...]) -> None:
    """A detector that never fires scores 0 under every profile."""
    results = score_corpus(corpus, {s.name: np.zeros(len(s)) for s in corpus})
    assert [0.0, 0.0, 0.0] == [r.score for r in results]


def test_perfect_detector_scores_hundred(corpus: tuple[Series, ...]) -> None:
    """Firing exactly at each window's first row scores 100 under every profile."""
    results = score_corpus(corpus, {s.name: window_starts(s) for s in corpus})
    assert [100.0, 100.0, 100.0] == [pytest.approx(r.score) for r in results]


def test_cad_ose_reference_scores(corpus: tuple[Series, ...]) -> None:
    """NAB's stored CAD OSE output scores 75.4 / 72.7 / 78.5 on this subset."""
    scores = load_scores(NAB / "reference" / "contextOSE", corpus)
    profiles = load_profiles(NAB / "profiles.json")
    results = score_corpus(corpus, scores, profiles)
    assert [75.4, 72.7, 78.5] == [pytest.approx(r.score, abs=0.1) for r in results]


def test_profiles_file_matches_builtin() -> None:
    """NAB's profiles.json holds the three built-in profiles."""
    assert PROFILES == load_profiles(NAB / "profiles.json")


def test_probation_rows_are_ignored() -> None:
    """A detection inside the probation period neither earns nor costs anything."""
    s = series(100, ((10, 19), (50, 59)))
    (result,) = score_corpus([s], {s.name: fire_at(100, 5, 12)}, [STANDARD])
    # The window in probation still counts from its first scorable row (15), as in NAB.
    assert (0.0, 0) == (result.score, result.true_positives)


def test_one_detection_per_window() -> None:
    """Only a window's earliest detection counts; later ones add nothing."""
    s = series(100, ((50, 59),))
    once = score_corpus([s], {s.name: fire_at(100, 50)}, [STANDARD])[0]
    every = score_corpus([s], {s.name: fire_at(100, *range(50, 60))}, [STANDARD])[0]
    assert (100.0, 1) == (pytest.approx(once.score), once.true_positives)
    assert once.raw == pytest.approx(every.raw)


def test_late_detection_earns_less() -> None:
    """The reward follows the sigmoid of the detection's position in the window."""
    s = series(100, ((50, 59),))
    result = score_corpus([s], {s.name: fire_at(100, 55)}, [STANDARD])[0]
    expected = scaled_sigmoid(-(59 - 55 + 1) / 10.0) / scaled_sigmoid(-1.0)
    assert expected == pytest.approx(result.raw)


def test_false_positive_weighting() -> None:
    """An FP before the first window costs A_FP; one after a window costs less the nearer it is."""
    s = series(200, ((50, 59),))
    before = score_corpus([s], {s.name: fire_at(200, 50, 30)}, PROFILES)
    assert [1.0 - 0.11, 1.0 - 0.22, 1.0 - 0.11] == [pytest.approx(r.raw) for r in before]
    after = score_corpus([s], {s.name: fire_at(200, 50, 62)}, [STANDARD])[0]
    assert 1.0 + 0.11 * scaled_sigmoid(3 / 9) == pytest.approx(after.raw)
    far = score_corpus([s], {s.name: fire_at(200, 50, 150)}, [STANDARD])[0]
    assert 1.0 - 0.11 == pytest.approx(far.raw)


def test_threshold_maximises_the_total() -> None:
    """The threshold stops above a score whose extra detections would lower the total."""
    s = series(200, ((50, 59),))
    scores = np.zeros(200)
    scores[50] = 0.9
    scores[100:110] = 0.5  # ten far FPs would cost 1.1, more than nothing
    (result,) = score_corpus([s], {s.name: scores}, [STANDARD])
    assert (0.9, 0) == (result.threshold, result.false_positives)


def test_fn_weight_of_low_fn_profile() -> None:
    """Under reward_low_FN_rate a missed window costs 2 and the null baseline is -2 per window."""
    s = series(100, ((50, 59), (70, 79)))
    profile = Profile(name="low_fn", tp_weight=1.0, fp_weight=0.11, fn_weight=2.0)
    (result,) = score_corpus([s], {s.name: fire_at(100, 50)}, [profile])
    assert (-4.0, 2.0, -1.0) == (result.null, result.perfect, pytest.approx(result.raw))
