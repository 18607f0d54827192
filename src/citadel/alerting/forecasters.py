"""The statistical forecasters: a robust line, ARIMA, ETS and seasonal naive.

Theory of operation
-------------------
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

statsmodels multiplies tiny matrices; with OpenBLAS threads on a busy machine a fit is up to ten
times slower, so the process that runs forecasts should set ``OPENBLAS_NUM_THREADS=1`` before
numpy loads (the bench does).

Pure: no I/O and no wall clock except the fit-time budget (an injectable ``clock``).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from citadel.alerting.forecast import (
    DAY,
    DEFAULT_LEVEL,
    Array,
    Forecast,
    ForecastError,
    Numbers,
    Season,
    as_series,
    detect_season,
    make_forecast,
    require,
    season_length,
    series_step,
    z_score,
)


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
