"""The forecaster interface, the forecast it returns, and the series maths every forecaster shares.

Theory of operation
-------------------
A series is ``times`` (unix seconds, increasing) and ``values``. It is treated as regularly sampled
at its median step; forecast times are ``last + k * step``. Every forecaster fits on the most recent
part of the history only (old data costs time and rarely helps a short horizon) and returns a
``Forecast``: the mean path and a two-sided prediction interval at ``level`` (default **95 %**).

The daily season ``m = 86400 / step`` counts only when the window holds at least three seasons
*and* the seasonal profile explains clearly more than noise would (an F-like ratio,
``detect_season``). The profile comes from a classical decomposition (centred moving average,
median per phase); the seasonal forecasters remove it, model what is left, and add it back.

The forecasters themselves live in ``forecasters`` (linear, ARIMA, ETS, seasonal naive) and
``lstm``; ``selector`` backtests them and picks one per series.

Errors::

    CitadelError
    └── ForecastError     too little history, bad input, or a model that failed to fit

Pure: no I/O and no wall clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

from citadel.errors import CitadelError

Array = npt.NDArray[np.float64]
Numbers = Sequence[float] | Array  # plain sequences, or numpy arrays without a copy
DAY = 86400.0
DEFAULT_LEVEL = 0.95


class ForecastError(CitadelError):
    """A forecaster could not fit or forecast; the message says what it needed and what it got."""


@dataclass(frozen=True, slots=True)
class Forecast:
    """Future timestamps, the mean path and a prediction interval at ``level`` (default 95 %)."""

    times: tuple[float, ...]
    mean: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    model: str
    level: float = DEFAULT_LEVEL


class Forecaster(Protocol):
    """Fit on a series, then forecast a horizon; ``fit`` raises ``ForecastError`` when it cannot."""

    name: str

    def fit(self, times: Numbers, values: Numbers) -> None: ...

    def forecast(self, horizon: int) -> Forecast: ...


def crossing_time(
    forecast: Forecast,
    threshold: float,
    *,
    direction: Literal["above", "below"],
    bound: Literal["mean", "interval"] = "mean",
) -> float | None:
    """The first forecast time at which the path is at or beyond ``threshold``, or None.

    ``bound="mean"`` (default) tests the mean path: the expected crossing. ``bound="interval"``
    tests the upper bound for ``"above"`` and the lower bound for ``"below"``: the earliest
    plausible crossing, for alerts that would rather fire early.
    """
    if direction == "above":
        path = forecast.mean if bound == "mean" else forecast.upper
        hits = (t for t, v in zip(forecast.times, path, strict=True) if v >= threshold)
    elif direction == "below":
        path = forecast.mean if bound == "mean" else forecast.lower
        hits = (t for t, v in zip(forecast.times, path, strict=True) if v <= threshold)
    else:
        raise ValueError(f"direction={direction!r}: expected 'above' or 'below'")
    return next(hits, None)


# -- series helpers ---------------------------------------------------------------------------


def as_series(times: Numbers, values: Numbers, *, model: str) -> tuple[Array, Array]:
    """Validated float arrays; raises ``ForecastError`` naming the problem."""
    t = np.asarray(times, dtype=np.float64)
    y = np.asarray(values, dtype=np.float64)
    if t.ndim != 1 or t.shape != y.shape:
        raise ForecastError(f"{model}: times and values must be 1-D of equal length")
    if not (np.isfinite(t).all() and np.isfinite(y).all()):
        raise ForecastError(f"{model}: times and values must be finite numbers")
    if t.size > 1 and not (np.diff(t) > 0).all():
        raise ForecastError(f"{model}: times must be strictly increasing")
    return t, y


def require(n: int, needed: int, *, model: str, why: str = "") -> None:
    """Raise the standard short-history error."""
    if n < needed:
        extra = f" ({why})" if why else ""
        raise ForecastError(f"{model}: needs at least {needed} points{extra}, got {n}")


def series_step(t: Array) -> float:
    """The median spacing of the timestamps (1.0 for a single point)."""
    return float(np.median(np.diff(t))) if t.size > 1 else 1.0


def season_length(step: float, *, period: float = DAY) -> int | None:
    """Points per ``period`` when the step divides it (to 1 %), else None."""
    if step <= 0 or step > period / 2:
        return None
    m = round(period / step)
    return m if abs(m * step - period) <= 0.01 * period else None


def future_times(t: Array, horizon: int) -> Array:
    if horizon < 1:
        raise ForecastError(f"horizon={horizon}: expected a positive number of steps")
    steps = np.arange(1, horizon + 1, dtype=np.float64)
    return np.asarray(t[-1] + series_step(t) * steps, dtype=np.float64)


def z_score(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def make_forecast(t: Array, mean: Array, half: Array, *, model: str, level: float) -> Forecast:
    times = future_times(t, mean.size)
    return Forecast(
        times=tuple(times.tolist()),
        mean=tuple(mean.tolist()),
        lower=tuple((mean - half).tolist()),
        upper=tuple((mean + half).tolist()),
        model=model,
        level=level,
    )


@dataclass(frozen=True, slots=True)
class Season:
    """An additive seasonal profile of length ``m``; phase 0 is the first point of the window."""

    m: int
    profile: Array
    n: int  # points in the window it was estimated on

    def past(self) -> Array:
        return self.profile[np.arange(self.n) % self.m]

    def future(self, horizon: int) -> Array:
        return self.profile[np.arange(self.n, self.n + horizon) % self.m]


def detect_season(y: Array, m: int | None, *, min_ratio: float = 4.0) -> Season | None:
    """The profile when ``y`` holds three seasons and the profile stands out from noise, else None.

    The centred moving average eats half a season at each end, leaving ``k = n / m - 1`` seasons of
    detrended points. Without seasonality a profile averaged over ``k`` points per phase has
    variance about ``var(remainder) / (k - 1)``; we demand ``min_ratio`` times that, which white
    noise passes less than 1 % of the time and a random walk rarely. The profile itself is the
    median per phase, so that one day with a spike does not repeat the spike every day.
    """
    if m is None or m < 2 or y.size < 3 * m:
        return None
    kernel = np.r_[0.5, np.ones(m - 1), 0.5] / m if m % 2 == 0 else np.ones(m) / m
    trend = np.convolve(y, kernel, mode="valid")
    offset = (kernel.size - 1) // 2
    idx = np.arange(offset, offset + trend.size)
    k = trend.size / m
    detrended = y[idx] - trend
    phase = idx % m
    # Median per phase (one spiky day must not become part of the season): lay the detrended
    # points out as rows of one season each, padded with NaN, and take each column's median.
    grid = np.full(m * math.ceil((offset % m + detrended.size) / m), np.nan)
    grid[offset % m : offset % m + detrended.size] = detrended
    profile = np.nanmedian(grid.reshape(-1, m), axis=0)
    profile -= profile.mean()
    remainder = detrended - profile[phase]
    noise = float(remainder.var())
    signal = float(profile.var())
    if signal <= 0 or signal * (k - 1) < min_ratio * noise:
        return None
    return Season(m=m, profile=profile, n=y.size)
