"""The selector: backtest every candidate forecaster on a series and forecast with the best.

Theory of operation
-------------------
A rolling-origin backtest on the last ``origins x horizon`` points of the history, scored as MASE
against seasonal naive (naive when the history is shorter than a season); the candidates are
ranked by that error and the first that fits the whole history wins. A candidate that is
unavailable, fails, or lacks history is skipped, and its failure is kept for ``/health``. When
the chosen model fails to forecast, the next candidate in the ranking is fitted on demand.

Pure: no I/O and no wall clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from citadel.alerting.forecast import (
    DAY,
    ArimaForecaster,
    Array,
    EtsForecaster,
    Forecast,
    Forecaster,
    ForecastError,
    LinearForecaster,
    Numbers,
    SeasonalNaiveForecaster,
    as_series,
    require,
    season_length,
    series_step,
)

_DRIFT_SAMPLES = 3  # new samples needed before a forecast is judged to have drifted
_MAX_BEHIND = 5000  # steps forecast past the end of the fitted history to reach "now", at most


@dataclass(frozen=True, slots=True)
class ModelState:
    """One candidate as ``/health`` shows it. ``backtest_error`` is MASE vs seasonal naive."""

    name: str
    available: bool
    selected: bool
    trained_at: float | None
    points_seen: int
    backtest_error: float | None
    last_failure: str | None


def naive_scale(y: Array, origin: int, horizon: int, m: int | None) -> float:
    """Mean absolute error of seasonal naive (naive without a full season) on one window."""
    actual = y[origin : origin + horizon]
    steps = np.arange(origin, origin + actual.size)
    if m is not None and origin >= m:
        lag = steps - m * (1 + (steps - origin) // m)
        return float(np.mean(np.abs(actual - y[lag])))
    return float(np.mean(np.abs(actual - y[origin - 1])))


def default_candidates(*, lstm: bool = False) -> list[Callable[[], Forecaster]]:
    """ARIMA, ETS, the robust line and seasonal naive; the LSTM when asked (seconds per fit)."""
    found: list[Callable[[], Forecaster]] = [
        ArimaForecaster,
        EtsForecaster,
        LinearForecaster,
        SeasonalNaiveForecaster,
    ]
    if lstm:
        from citadel.alerting.lstm import LstmForecaster

        found.insert(2, LstmForecaster)
    return found


class Selector:
    """Backtest every candidate on the end of the history and forecast with the best that fits.

    Candidates are factories (a class works) so every fit starts from a fresh model. The order
    given is the fallback order when the history is too short to backtest. A candidate whose
    backtest fails is not used for this series until the next ``fit``.

    With ``reselect_seconds`` the ranking is kept between fits: a ``fit`` within that many
    seconds of the last backtest only refits the chosen model on the new history (one fit instead
    of a backtest of every candidate), unless the chosen model has *drifted*: its last forecast
    missed the samples that arrived since by more than ``drift`` times its backtest error. Without
    it (the default), every ``fit`` backtests every candidate.
    """

    name = "auto"

    def __init__(
        self,
        candidates: Sequence[Callable[[], Forecaster]] | None = None,
        *,
        horizon: int = 12,
        origins: int = 3,
        period: float = DAY,
        reselect_seconds: float | None = None,
        drift: float = 2.0,
    ) -> None:
        self.factories = list(candidates) if candidates is not None else default_candidates()
        self.horizon = horizon
        self.origins = origins
        self.period = period
        self.names = [factory().name for factory in self.factories]
        self._states = {name: _blank(name) for name in self.names}
        self._order: list[int] = []  # candidate indices, best first
        self._pos = 0
        self._model: Forecaster | None = None
        self._history: tuple[Array, Array] = (np.empty(0), np.empty(0))
        self._now: float | None = None
        self.reselect_seconds = reselect_seconds
        self.drift = drift
        self.backtests = 0  # how many times fit() ranked every candidate
        self._ranked_at: float | None = None
        self._chosen_error: float | None = None  # the chosen model's backtest MAE per window
        self._last: Forecast | None = None  # the last forecast, to measure drift against
        self._fitted_end = -math.inf  # the last timestamp of the last fit's history
        self._fit_at: float | None = None  # ``now`` of the last fit
        self.fits = 0  # fit() calls (a backtest, or a refit of the kept choice)

    @property
    def chosen(self) -> str | None:
        """The name of the model that forecasts, if any."""
        return None if self._model is None else self._model.name

    def states(self) -> tuple[ModelState, ...]:
        """Per-candidate state for ``/health``, in the candidates' order."""
        return tuple(self._states[name] for name in self.names)

    def fit(self, times: Numbers, values: Numbers, *, now: float | None = None) -> None:
        """Backtest, rank and fit (or, with ``reselect_seconds``, refit the kept choice); ``now``
        stamps ``trained_at`` (default: the last timestamp)."""
        t, y = as_series(times, values, model=self.name)
        require(t.size, 1, model=self.name)
        self._now = float(t[-1]) if now is None else now
        self._history = (t, y)
        self._fit_at = self._now
        self.fits += 1
        keep = self._keep(t, y)
        self._fitted_end = float(t[-1])
        if keep and self._fit_from(self._pos):
            return
        self._model = None
        self._last = None
        self.backtests += 1
        self._ranked_at = self._now
        m = season_length(series_step(t), period=self.period)
        origins = [t.size - k * self.horizon for k in range(self.origins, 0, -1)]
        origins = [o for o in origins if o >= LinearForecaster.min_points + 1]
        scale = sum(naive_scale(y, o, self.horizon, m) for o in origins)
        scored: list[tuple[float, int]] = []
        for index, factory in enumerate(self.factories):
            name = self.names[index]
            reason = getattr(factory(), "unavailable", None)
            if reason:
                self._states[name] = _blank(name, available=False, failure=str(reason))
                continue
            try:
                mae = sum(self._backtest(factory, t, y, o) for o in origins) if origins else None
            except Exception as exc:  # a failing candidate is recorded and skipped, never fatal
                self._states[name] = _blank(name, failure=f"backtest: {_describe(exc)}")
                continue
            mase = None if mae is None or scale == 0 else mae / scale
            self._states[name] = _blank(name, error=mase)
            scored.append((math.inf if mae is None else mae, index))
        # Ties (and no backtest at all) keep the given order: sorting is stable.
        ranked = sorted(scored, key=lambda pair: pair[0])
        self._order = [index for _, index in ranked]
        best = ranked[0][0] if ranked else math.inf
        self._chosen_error = best / len(origins) if origins and math.isfinite(best) else None
        if not self._fit_from(0):
            failures = "; ".join(
                f"{s.name}: {s.last_failure}" for s in self.states() if s.last_failure
            )
            raise ForecastError(f"{self.name}: no candidate could fit {t.size} points ({failures})")

    def _keep(self, t: Array, y: Array) -> bool:
        """Whether the ranking of the last backtest still stands for this history."""
        if self.reselect_seconds is None or self._ranked_at is None or not self._order:
            return False
        assert self._now is not None
        if self._now - self._ranked_at >= self.reselect_seconds:
            return False
        return not self.drifted(t, y)

    def drifted(self, times: Numbers, values: Numbers) -> bool:
        """Whether the samples that arrived since the last fit are off what its forecast said of
        them by more than ``drift`` times the chosen model's backtest error (per window)."""
        last, error = self._last, self._chosen_error
        if last is None or error is None:
            return False
        t = np.asarray(times, dtype=np.float64)
        y = np.asarray(values, dtype=np.float64)
        # Interpolated: an evaluation's grid need not fall on the forecast's times.
        said_times = np.asarray(last.times, dtype=np.float64)
        new = (t > self._fitted_end) & (t <= said_times[-1])
        if int(new.sum()) < min(_DRIFT_SAMPLES, self.horizon):
            return False  # one noisy sample is no drift: judge a few
        said = np.interp(t[new], said_times, np.asarray(last.mean, dtype=np.float64))
        return float(np.mean(np.abs(said - y[new]))) > self.drift * max(error, 1e-12)

    def due(self, times: Numbers, values: Numbers, *, now: float, refit_seconds: float) -> bool:
        """Whether this history needs a ``fit``: no model yet, no backtest error (a history too
        short to backtest), the last fit ``refit_seconds`` or more ago, or its forecast drifted
        off the samples since. Otherwise ``forecast_from``
        forecasts from the kept fit."""
        if self._model is None or self._fit_at is None or refit_seconds <= 0:
            return True
        if self._chosen_error is None:
            return True  # too short a history to backtest: no error to judge drift by, so refit
        if now - self._fit_at >= refit_seconds or now < self._fit_at:
            return True
        return self.drifted(times, values)

    def forecast_from(self, now: float, horizon: int) -> Forecast:
        """The kept fit's forecast of the ``horizon`` steps after ``now`` (it forecasts from the
        end of the history it was fitted on, so the steps since are forecast first, then cut)."""
        t = self._history[0]
        step = series_step(t) if t.size > 1 else 1.0
        behind = max(0, math.ceil((now - self._fitted_end) / step)) if step > 0 else 0
        behind = min(behind, _MAX_BEHIND)  # a history that stopped long ago: its last steps
        whole = self.forecast(horizon + behind)
        keep = [i for i, when in enumerate(whole.times) if when > now] or [len(whole.times) - 1]
        first = keep[0]
        return replace(
            whole,
            times=whole.times[first:],
            mean=whole.mean[first:],
            lower=whole.lower[first:],
            upper=whole.upper[first:],
        )

    def forecast(self, horizon: int) -> Forecast:
        """The chosen model's forecast; if it fails, the next candidate's."""
        while self._model is not None:
            try:
                self._last = self._model.forecast(horizon)
                return self._last
            except Exception as exc:  # fall back to the next candidate, fitted on demand
                self._fail(self._model.name, f"forecast: {_describe(exc)}")
                self._model = None
                self._fit_from(self._pos + 1)
        raise ForecastError(f"{self.name}: no fitted model; call fit() with enough history first")

    def _backtest(self, factory: Callable[[], Forecaster], t: Array, y: Array, o: int) -> float:
        model = factory()
        model.fit(t[:o], y[:o])
        predicted = np.asarray(model.forecast(self.horizon).mean, dtype=np.float64)
        actual = y[o : o + self.horizon]
        error = float(np.mean(np.abs(predicted[: actual.size] - actual)))
        if not math.isfinite(error):
            raise ForecastError(f"{model.name}: non-finite backtest forecast")
        return error

    def _fit_from(self, start: int) -> bool:
        t, y = self._history
        for pos in range(start, len(self._order)):
            index = self._order[pos]
            name = self.names[index]
            model = self.factories[index]()
            try:
                model.fit(t, y)  # a kept choice refits here, on the new history
            except Exception as exc:  # try the next candidate
                self._fail(name, f"fit: {_describe(exc)}")
                continue
            self._states[name] = replace(
                self._states[name], selected=True, trained_at=self._now, points_seen=int(t.size)
            )
            self._model, self._pos = model, pos
            return True
        return False

    def _fail(self, name: str, message: str) -> None:
        self._states[name] = replace(self._states[name], selected=False, last_failure=message)


def _blank(
    name: str, *, available: bool = True, failure: str | None = None, error: float | None = None
) -> ModelState:
    return ModelState(
        name=name,
        available=available,
        selected=False,
        trained_at=None,
        points_seen=0,
        backtest_error=error,
        last_failure=failure,
    )


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, ForecastError) else f"{type(exc).__name__}: {exc}"


def fit_job(
    selector: Selector, times: Numbers, values: Numbers, now: float
) -> tuple[Selector, str | None]:
    """``selector.fit`` as a job for a worker process: the selector comes back fitted (or with
    its candidates' failures recorded) and the error, if no candidate could fit, as text."""
    try:
        selector.fit(times, values, now=now)
    except ForecastError as exc:
        return selector, str(exc)
    return selector, None
