"""Forecasting: the forecaster interface, the forecast it returns, the series maths and the models.

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

The forecasters (below the series maths):

- ``LinearForecaster``: Theil-Sen line (the median of pairwise slopes, breakdown point 29 %) over
  a recent window; the interval is the ordinary regression interval with a robust residual scale
  (1.4826 x MAD), so one spike neither tilts the line nor inflates the band much.
- ``ArimaForecaster`` / ``EtsForecaster`` (statsmodels): the daily season is used only when
  ``detect_season`` finds one; otherwise the models are non-seasonal. The profile is removed, a
  small non-seasonal model is fitted to what is left (the last 4 seasons, at least 576 points),
  and the profile is added back to the forecast. This is the "STL + ARIMA/ETS" recipe: far
  cheaper than a seasonal state of size 288 and as good for short horizons. Automatic selection
  is a small grid scored by AIC, with an iteration cap and a time budget.
- ``SeasonalNaiveForecaster``: yesterday's value at the same time; the baseline, and a candidate.

The LSTM lives in ``lstm`` (it needs torch); ``selector`` backtests them all and picks one per
series.

statsmodels multiplies tiny matrices; with OpenBLAS threads on a busy machine a fit is up to ten
times slower, so the process that runs forecasts should set ``OPENBLAS_NUM_THREADS=1`` before
numpy loads (the bench does).

Errors::

    CitadelError
    └── ForecastError     too little history, bad input, or a model that failed to fit

Pure: no I/O and no wall clock except the fit-time budget (an injectable ``clock``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Literal, Protocol

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


class _Fitted:
    """Shared state for the statistical forecasters: the last fit's times and what it computed."""

    name: str

    def __init__(self) -> None:
        self._t: Array | None = None

    def _times(self) -> Array:
        if self._t is None:
            raise ForecastError(f"{self.name}: forecast() before a successful fit()")
        return self._t


# -- robust linear ------------------------------------------------------------------------------


class LinearForecaster(_Fitted):
    """Theil-Sen line over the last ``window`` points, with a robust regression interval."""

    name = "linear"
    min_points = 3

    def __init__(self, *, window: int = 48, level: float = DEFAULT_LEVEL) -> None:
        super().__init__()
        self.window = window
        self.level = level
        self._coef = (0.0, 0.0, 0.0, 0.0, 0.0, 0)  # slope, intercept, sigma, xbar, sxx, n

    def fit(self, times: Numbers, values: Numbers) -> None:
        t, y = as_series(times, values, model=self.name)
        require(t.size, self.min_points, model=self.name)
        y = y[-self.window :]
        n = y.size
        x = np.arange(n, dtype=np.float64)
        i, j = np.triu_indices(n, k=1)
        slope = float(np.median((y[j] - y[i]) / (x[j] - x[i])))
        intercept = float(np.median(y - slope * x))
        resid = y - (intercept + slope * x)
        sigma = 1.4826 * float(np.median(np.abs(resid - np.median(resid))))
        if sigma == 0.0:  # more than half the points on the line: fall back to the RMS
            sigma = float(np.sqrt(np.mean(resid**2)))
        xbar = float(x.mean())
        self._coef = (slope, intercept, sigma, xbar, float(((x - xbar) ** 2).sum()), n)
        self._t = t

    def forecast(self, horizon: int) -> Forecast:
        t = self._times()
        slope, intercept, sigma, xbar, sxx, n = self._coef
        x = np.arange(n, n + horizon, dtype=np.float64)
        mean = intercept + slope * x
        spread = np.sqrt(1 + 1 / n + (x - xbar) ** 2 / sxx)
        return make_forecast(
            t, mean, z_score(self.level) * sigma * spread, model=self.name, level=self.level
        )


# -- ARIMA and ETS on the seasonally adjusted window --------------------------------------------


class _Seasonal(_Fitted):
    """Fit a small non-seasonal model to the recent window with the daily profile removed."""

    min_points = 24

    def __init__(
        self,
        *,
        seasons: int = 4,
        window: int = 576,
        period: float = DAY,
        level: float = DEFAULT_LEVEL,
        budget: float = 2.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__()
        self.seasons = seasons
        self.window = window
        self.period = period
        self.level = level
        self.budget = budget
        self.clock = clock
        self.season: Season | None = None
        self.spec = ""
        self._mean: Callable[[int], tuple[Array, Array]] | None = None

    def fit(self, times: Numbers, values: Numbers) -> None:
        t, y = as_series(times, values, model=self.name)
        require(t.size, self.min_points, model=self.name)
        m = season_length(series_step(t), period=self.period)
        keep = self.window if m is None else max(self.window, self.seasons * m)
        y = y[-keep:]
        season = detect_season(y, m)
        adjusted = y - season.past() if season else y
        scale = float(np.std(adjusted))
        centre = float(np.mean(adjusted))
        predict: Callable[[int], tuple[Array, Array]]
        if scale == 0.0:  # a constant (after the season): nothing to fit, the future is the same
            scale = 1.0
            predict, spec = _flat, "constant"
        else:
            predict, spec = self._fit_guarded((adjusted - centre) / scale)

        def mean_and_half(horizon: int) -> tuple[Array, Array]:
            mean, half = predict(horizon)
            mean = mean * scale + centre
            if season is not None:
                mean = mean + season.future(horizon)
            return mean, half * scale

        self.season, self.spec, self._mean, self._t = season, spec, mean_and_half, t

    def _fit_guarded(self, z: Array) -> tuple[Callable[[int], tuple[Array, Array]], str]:
        """``_fit_adjusted`` on the standardised window, quiet, with foreign errors translated."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return self._fit_adjusted(z, deadline=self.clock() + self.budget)
            except ForecastError:
                raise
            except Exception as exc:
                raise ForecastError(f"{self.name}: fit failed: {exc}") from exc

    def _fit_adjusted(
        self, z: Array, *, deadline: float
    ) -> tuple[Callable[[int], tuple[Array, Array]], str]:
        raise NotImplementedError

    def forecast(self, horizon: int) -> Forecast:
        t = self._times()
        assert self._mean is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                mean, half = self._mean(horizon)
            except Exception as exc:
                raise ForecastError(f"{self.name}: forecast failed: {exc}") from exc
        if not (np.isfinite(mean).all() and np.isfinite(half).all()):
            raise ForecastError(f"{self.name}: the fitted model forecast non-finite values")
        return make_forecast(t, mean, half, model=self.name, level=self.level)


def _flat(horizon: int) -> tuple[Array, Array]:
    return np.zeros(horizon), np.zeros(horizon)


class ArimaForecaster(_Seasonal):
    """ARIMA on the seasonally adjusted window; the order is picked by AIC from a small grid."""

    name = "arima"
    ORDERS: tuple[tuple[int, int, int], ...] = (
        (1, 0, 0),
        (2, 0, 0),
        (1, 0, 1),
        (0, 1, 1),
        (1, 1, 1),
    )

    def _fit_adjusted(
        self, z: Array, *, deadline: float
    ) -> tuple[Callable[[int], tuple[Array, Array]], str]:
        from statsmodels.tsa.arima.model import ARIMA

        best: Any = None
        best_order = (0, 0, 0)
        for order in self.ORDERS:
            if best is not None and self.clock() > deadline:
                break
            trend = "c" if order[1] == 0 else "n"
            try:
                res = ARIMA(z, order=order, trend=trend).fit(method_kwargs={"maxiter": 50})
            except Exception:  # one order failing is fine: the grid moves on
                continue
            if np.isfinite(res.aic) and (best is None or res.aic < best.aic):
                best, best_order = res, order
        if best is None:
            raise ForecastError(f"{self.name}: no order in {self.ORDERS} could be fitted")
        alpha = 1 - self.level

        def predict(horizon: int) -> tuple[Array, Array]:
            pred = best.get_forecast(horizon)
            mean = np.asarray(pred.predicted_mean, dtype=np.float64)
            ci = np.asarray(pred.conf_int(alpha=alpha), dtype=np.float64)
            return mean, (ci[:, 1] - ci[:, 0]) / 2

        return predict, f"ARIMA{best_order}"


class EtsForecaster(_Seasonal):
    """ETS with additive errors on the adjusted window: level, trend or damped trend, by AIC."""

    name = "ets"
    TRENDS: tuple[tuple[str | None, bool], ...] = ((None, False), ("add", True), ("add", False))

    def _fit_adjusted(
        self, z: Array, *, deadline: float
    ) -> tuple[Callable[[int], tuple[Array, Array]], str]:
        import pandas as pd
        from statsmodels.tsa.exponential_smoothing.ets import ETSModel

        series = pd.Series(z)  # ETS prediction intervals need an indexed series
        best: Any = None
        best_spec = ""
        for trend, damped in self.TRENDS:
            if best is not None and self.clock() > deadline:
                break
            try:
                model = ETSModel(series, error="add", trend=trend, damped_trend=damped)
                res = model.fit(disp=False, maxiter=200)
            except Exception:  # one variant failing is fine: the grid moves on
                continue
            if np.isfinite(res.aic) and (best is None or res.aic < best.aic):
                best = res
                best_spec = f"ETS(A,{'Ad' if damped else 'A' if trend else 'N'},N)"
        if best is None:
            raise ForecastError(f"{self.name}: no ETS variant could be fitted")
        n = z.size
        alpha = 1 - self.level

        def predict(horizon: int) -> tuple[Array, Array]:
            frame = best.get_prediction(n, n + horizon - 1).summary_frame(alpha=alpha)
            mean = frame["mean"].to_numpy(dtype=np.float64)
            half = (frame["pi_upper"] - frame["pi_lower"]).to_numpy(dtype=np.float64) / 2
            return mean, half

        return predict, best_spec


class SeasonalNaiveForecaster(_Fitted):
    """Tomorrow repeats today: the value one daily season earlier, with an empirical interval.

    The baseline the others are scored against, and a candidate in its own right: on a clean,
    stable daily pattern nothing beats it by much. The interval is the ``level`` quantile of the
    absolute seasonal differences over the last ``seasons`` seasons.
    """

    name = "snaive"

    def __init__(
        self, *, seasons: int = 3, period: float = DAY, level: float = DEFAULT_LEVEL
    ) -> None:
        super().__init__()
        self.seasons = seasons
        self.period = period
        self.level = level
        self._y: Array = np.empty(0)
        self._half = 0.0
        self._m = 1

    def fit(self, times: Numbers, values: Numbers) -> None:
        t, y = as_series(times, values, model=self.name)
        m = season_length(series_step(t), period=self.period)
        if m is None:
            step = series_step(t)
            raise ForecastError(f"{self.name}: step {step:g} s does not divide {self.period:g} s")
        require(t.size, m + 1, model=self.name, why="one season and a point")
        y = y[-(self.seasons + 1) * m :]
        self._half = float(np.quantile(np.abs(y[m:] - y[:-m]), self.level))
        self._y, self._m, self._t = y, m, t

    def forecast(self, horizon: int) -> Forecast:
        t = self._times()
        n, m = self._y.size, self._m
        steps = np.arange(n, n + horizon)
        mean = self._y[steps - m * (1 + (steps - n) // m)]
        half = self._half * np.sqrt(1 + np.arange(horizon) // m)
        return make_forecast(t, mean, half, model=self.name, level=self.level)
