"""ShapeMemory (fuzzy ART over window shapes): vigilance, novelty, scale-freedom, causality."""

from __future__ import annotations

import math

import numpy as np
import pytest

from citadel.alerting.anomaly_art import ShapeMemory

AT = 2000
PERIOD = 48


def sine(rows: int = 3000, seed: int = 3) -> np.ndarray:
    """A noisy sine wave of period ``PERIOD`` rows around 10."""
    t = np.arange(rows)
    rng = np.random.default_rng(seed)
    return 10.0 + 5.0 * np.sin(2.0 * np.pi * t / PERIOD) + rng.normal(0.0, 0.2, rows)


def novelty(values: np.ndarray | list[float], memory: ShapeMemory | None = None) -> np.ndarray:
    memory = memory or ShapeMemory()
    return np.array([memory.update(float(v)) for v in values])


def test_learning_period_scores_zero_and_tunes_vigilance() -> None:
    """The first ``learn`` rows only learn; then they form at most ``categories`` categories."""
    memory = ShapeMemory(learn=100, categories=10)
    values = sine()
    out = novelty(values[:100], memory)
    assert 0.0 == out.max()
    assert 0.0 < memory.cap <= 1.0
    assert 1 <= memory.categories <= 10


def test_seen_shape_is_not_novel() -> None:
    """A periodic series settles: its later windows fall inside learnt categories."""
    out = novelty(sine())
    assert out[1000:AT].max() < 0.02
    assert np.mean(out[1000:AT] == 0.0) > 0.9


def test_new_shape_inside_the_range_is_novel() -> None:
    """A flat stretch in the middle of a sine wave (inside its range) is a shape never seen."""
    values = sine()
    values[AT : AT + 100] = 10.0 + np.random.default_rng(4).normal(0.0, 0.2, 100)
    out = novelty(values)
    assert out[AT : AT + 30].max() > 3.0 * out[300:AT].max()


def test_scale_free() -> None:
    """An affine change of units (positive scale) leaves the novelty unchanged."""
    values = sine()
    values[AT : AT + 100] = 10.0
    assert novelty(values) == pytest.approx(novelty(1000.0 * values - 7.0), abs=1e-9)


def test_causal() -> None:
    """The novelty of row i does not change when later rows change."""
    values = sine()
    changed = values.copy()
    changed[AT + 1 :] = np.random.default_rng(8).normal(0.0, 30.0, len(values) - AT - 1)
    assert novelty(values)[: AT + 1].tolist() == novelty(changed)[: AT + 1].tolist()


def test_flat_and_non_finite_input() -> None:
    """A flat series is never novel; non-finite values are skipped and score 0."""
    assert 0.0 == novelty([5.0] * 500).max()
    values = [*sine(400).tolist(), math.nan, math.inf, -math.inf, 10.0]
    out = novelty(values)
    assert bool(np.all(np.isfinite(out) & (out >= 0.0)))
    assert out[400:403].tolist() == [0.0, 0.0, 0.0]


def test_category_cap() -> None:
    """No more than ``max_categories`` categories, whatever the input."""
    memory = ShapeMemory(categories=3, max_categories=5)
    novelty(np.random.default_rng(1).normal(0.0, 1.0, 2000), memory)
    assert memory.categories <= 5


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="multiple"):
        ShapeMemory(rows=10, features=4)
    with pytest.raises(ValueError, match="categories"):
        ShapeMemory(categories=20, max_categories=10)
