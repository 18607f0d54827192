"""Forecasters and the selector on synthetic series whose right answers are known."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from citadel.alerting.forecast import (
    ArimaForecaster,
    EtsForecaster,
    Forecast,
    Forecaster,
    ForecastError,
    LinearForecaster,
    SeasonalNaiveForecaster,
    crossing_time,
    detect_season,
    season_length,
)
from citadel.alerting.selector import Selector

HOUR = 3600.0
T0 = 1_700_000_000.0


def hourly(values: Sequence[float] | np.ndarray) -> tuple[list[float], list[float]]:
    """Timestamps one hour apart (a daily season of 24 points) for ``values``."""
    return [T0 + HOUR * i for i in range(len(values))], [float(v) for v in values]


def seasonal(n: int, *, seed: int = 0, noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    return 10 + 3 * np.sin(2 * np.pi * i / 24) + rng.normal(0, noise, n)


def mae(forecast: Forecast, actual: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(forecast.mean) - actual)))


def covered(forecast: Forecast, actual: np.ndarray) -> int:
    """How many actual points fall inside the prediction interval."""
    lower, upper = np.asarray(forecast.lower), np.asarray(forecast.upper)
    return int(np.sum((lower <= actual) & (actual <= upper)))


def test_linear_trend_forecast_follows_the_true_line() -> None:
    """On a noisy straight line the linear forecast stays close to the true continuation."""
    rng = np.random.default_rng(1)
    i = np.arange(100)
    times, values = hourly(2 + 0.5 * i + rng.normal(0, 0.2, i.size))
    model = LinearForecaster()
    model.fit(times, values)
    forecast = model.forecast(12)
    truth = 2 + 0.5 * np.arange(100, 112)
    assert np.max(np.abs(np.asarray(forecast.mean) - truth)) < 0.5
    assert tuple(T0 + HOUR * k for k in range(100, 112)) == forecast.times
    assert "linear" == forecast.model
    assert 0.95 == forecast.level


@pytest.mark.parametrize("factory", [ArimaForecaster, EtsForecaster])
def test_seasonal_models_beat_the_line_and_cover_the_future(factory: type[Forecaster]) -> None:
    """On a daily sine plus noise, ARIMA/ETS beat the line and the 95 % band covers most points."""
    series = seasonal(24 * 8 + 24)
    times, values = hourly(series[:-24])
    future = series[-24:]
    model = factory()
    model.fit(times, values)
    forecast = model.forecast(24)
    line = LinearForecaster()
    line.fit(times, values)
    assert mae(forecast, future) < 0.5 * mae(line.forecast(24), future)
    assert mae(forecast, future) < 0.5
    inside = sum(
        lo <= v <= hi for lo, v, hi in zip(forecast.lower, future, forecast.upper, strict=True)
    )
    assert inside >= 0.8 * future.size


def test_season_is_detected_only_when_the_data_supports_it() -> None:
    """A daily sine yields a 24-point profile; white noise at the same step yields none."""
    assert 24 == season_length(HOUR)
    assert 288 == season_length(300.0)
    assert season_length(7 * HOUR) is None  # 86400 / 25200 is not a whole number
    found = detect_season(seasonal(24 * 4), 24)
    assert found is not None
    assert 24 == found.m
    noise = np.random.default_rng(2).normal(0, 1, 24 * 4)
    assert detect_season(noise, 24) is None
    assert detect_season(seasonal(30), 24) is None  # shorter than two seasons


@pytest.mark.parametrize("factory", [LinearForecaster, ArimaForecaster, EtsForecaster])
def test_forecast_follows_a_level_shift_after_enough_points(factory: type[Forecaster]) -> None:
    """After a step from 10 to 20 and a window's worth of points, the forecast sits near 20."""
    rng = np.random.default_rng(3)
    series = np.r_[np.full(150, 10.0), np.full(60, 20.0)] + rng.normal(0, 0.2, 210)
    model = factory()
    model.fit(*hourly(series))
    mean = np.asarray(model.forecast(12).mean)
    assert np.max(np.abs(mean - 20)) < 1.0


def test_a_single_spike_does_not_wreck_the_linear_forecast() -> None:
    """A spike 100 times the noise, two points before the end, leaves the line where it was."""
    rng = np.random.default_rng(4)
    i = np.arange(80)
    series = 5 + 0.1 * i + rng.normal(0, 0.1, i.size)
    series[-2] += 50
    model = LinearForecaster()
    model.fit(*hourly(series))
    forecast = model.forecast(12)
    truth = 5 + 0.1 * np.arange(80, 92)
    assert np.max(np.abs(np.asarray(forecast.mean) - truth)) < 0.3
    assert max(h - lo for lo, h in zip(forecast.lower, forecast.upper, strict=True)) < 2.0


@pytest.mark.parametrize(
    ("factory", "points", "needed"),
    [(LinearForecaster, 2, 3), (ArimaForecaster, 10, 24), (EtsForecaster, 23, 24)],
)
def test_short_history_raises_a_clear_error(
    factory: type[Forecaster], points: int, needed: int
) -> None:
    """Too little history raises ForecastError naming the model, what it needs and what it got."""
    model = factory()
    with pytest.raises(ForecastError) as caught:
        model.fit(*hourly(np.arange(points)))
    assert f"{model.name}: needs at least {needed} points" in str(caught.value)
    assert f"got {points}" in str(caught.value)


def test_bad_input_and_early_forecast_are_errors() -> None:
    """Unordered times, mismatched lengths, NaN and forecasting before fitting are refused."""
    model = LinearForecaster()
    with pytest.raises(ForecastError, match="strictly increasing"):
        model.fit([3.0, 2.0, 1.0], [1.0, 2.0, 3.0])
    with pytest.raises(ForecastError, match="equal length"):
        model.fit([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ForecastError, match="finite"):
        model.fit([1.0, 2.0, 3.0], [1.0, math.nan, 3.0])
    with pytest.raises(ForecastError, match="before a successful fit"):
        ArimaForecaster().forecast(3)


def test_crossing_time_on_a_rising_trend() -> None:
    """On y = t / hour the mean first reaches 105 six steps after the last point at 99."""
    times, values = hourly(np.arange(100))
    model = LinearForecaster()
    model.fit(times, values)
    forecast = model.forecast(12)
    assert T0 + HOUR * 105 == pytest.approx(crossing_time(forecast, 105, direction="above"))
    assert crossing_time(forecast, 50, direction="below") is None
    assert crossing_time(forecast, 200, direction="above") is None
    early = crossing_time(forecast, 105, direction="above", bound="interval")
    assert early is not None
    assert early <= T0 + HOUR * 105


def test_crossing_time_uses_the_bound_when_asked() -> None:
    """With ``bound="interval"`` the upper bound (above) or lower bound (below) decides."""
    forecast = Forecast(
        times=(1.0, 2.0, 3.0),
        mean=(5.0, 6.0, 7.0),
        lower=(4.0, 3.5, 4.0),
        upper=(7.0, 8.5, 10.0),
        model="test",
    )
    assert 3.0 == crossing_time(forecast, 7.0, direction="above")
    assert 1.0 == crossing_time(forecast, 7.0, direction="above", bound="interval")
    assert crossing_time(forecast, 3.5, direction="below") is None
    assert 2.0 == crossing_time(forecast, 3.5, direction="below", bound="interval")


def test_selector_picks_a_seasonal_model_and_reports_state() -> None:
    """On a seasonal series the selector backtests all four, picks ARIMA or ETS, and says so."""
    times, values = hourly(seasonal(24 * 8))
    selector = Selector()
    selector.fit(times, values, now=T0 + 1e6)
    assert selector.chosen in {"arima", "ets"}
    states = {s.name: s for s in selector.states()}
    assert ["arima", "ets", "linear", "snaive"] == [s.name for s in selector.states()]
    chosen = states[str(selector.chosen)]
    assert chosen.selected
    assert T0 + 1e6 == chosen.trained_at
    assert 24 * 8 == chosen.points_seen
    errors = {name: s.backtest_error for name, s in states.items()}
    assert all(e is not None for e in errors.values())
    assert errors[str(selector.chosen)] == min(e for e in errors.values() if e is not None)
    assert errors["linear"] is not None
    assert errors["linear"] > 1.0  # the line loses to seasonal naive on a clean season
    assert selector.chosen == selector.forecast(12).model


def test_seasonal_naive_repeats_the_last_day() -> None:
    """Seasonal naive forecasts the value one day earlier, and needs a day and a point."""
    series = seasonal(24 * 5)
    model = SeasonalNaiveForecaster()
    model.fit(*hourly(series))
    forecast = model.forecast(30)
    assert np.allclose(np.r_[series[-24:], series[-24:-18]], forecast.mean)
    assert forecast.upper[0] > forecast.mean[0] > forecast.lower[0]
    with pytest.raises(ForecastError, match="snaive: needs at least 25 points"):
        model.fit(*hourly(series[:24]))
    with pytest.raises(ForecastError, match="does not divide"):
        model.fit([0.0, 7 * HOUR], [1.0, 2.0])


def test_selector_falls_back_to_the_line_on_short_history() -> None:
    """With 20 points ARIMA and ETS cannot backtest; the line forecasts and failures are kept."""
    times, values = hourly(np.arange(20) * 2.0)
    selector = Selector()
    selector.fit(times, values)
    assert "linear" == selector.chosen
    states = {s.name: s for s in selector.states()}
    assert "needs at least 24 points" in str(states["arima"].last_failure)
    assert not states["arima"].selected
    assert states["linear"].trained_at == times[-1]
    assert 40.0 == pytest.approx(selector.forecast(1).mean[0])


class Broken:
    """A candidate whose fit always fails, to exercise the fallback."""

    name = "broken"

    def fit(self, times: Sequence[float], values: Sequence[float]) -> None:
        raise RuntimeError("boom")

    def forecast(self, horizon: int) -> Forecast:
        raise AssertionError("never fitted")


class Unavailable(Broken):
    """A candidate that says it cannot run here (as the LSTM does without torch)."""

    name = "unavailable"
    unavailable = "torch is not installed"


class BreaksOnForecast(LinearForecaster):
    """Fits and backtests well, then fails when asked for the real forecast."""

    name = "flaky"
    calls = 0

    def forecast(self, horizon: int) -> Forecast:
        BreaksOnForecast.calls += 1
        if BreaksOnForecast.calls > 3:  # the three backtest origins pass
            raise RuntimeError("numerical trouble")
        return super().forecast(horizon)


def test_selector_skips_broken_and_unavailable_candidates() -> None:
    """Failing and unavailable candidates are recorded and skipped; the next one forecasts."""
    selector = Selector([Unavailable, Broken, LinearForecaster])
    selector.fit(*hourly(np.arange(50)))
    states = {s.name: s for s in selector.states()}
    assert not states["unavailable"].available
    assert "torch is not installed" == states["unavailable"].last_failure
    assert "backtest: RuntimeError: boom" == states["broken"].last_failure
    assert "linear" == selector.chosen


def test_selector_falls_back_when_the_chosen_model_fails_to_forecast() -> None:
    """If the chosen model raises at forecast time, the next ranked candidate is fitted and used."""
    BreaksOnForecast.calls = 0
    selector = Selector([BreaksOnForecast, LinearForecaster])
    selector.fit(*hourly(np.arange(50)))
    assert "flaky" == selector.chosen
    forecast = selector.forecast(12)
    assert "linear" == forecast.model
    states = {s.name: s for s in selector.states()}
    assert "forecast: RuntimeError: numerical trouble" == states["flaky"].last_failure
    assert not states["flaky"].selected
    assert states["linear"].selected


def test_selector_with_nothing_that_fits_raises() -> None:
    """When every candidate fails, the error lists each one's failure."""
    selector = Selector([Broken])
    with pytest.raises(ForecastError, match=r"no candidate could fit 10 points .*broken"):
        selector.fit(*hourly(np.arange(10)))
    with pytest.raises(ForecastError, match="no fitted model"):
        selector.forecast(3)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=3, max_size=80),
    st.integers(min_value=1, max_value=30),
)
def test_linear_interval_always_brackets_the_mean(values: list[float], horizon: int) -> None:
    """For any series, lower <= mean <= upper at every step, and times step by the series' step."""
    model = LinearForecaster()
    model.fit(*hourly(values))
    forecast = model.forecast(horizon)
    assert horizon == len(forecast.times)
    assert all(
        lo <= m <= hi
        for lo, m, hi in zip(forecast.lower, forecast.mean, forecast.upper, strict=True)
    )
    assert np.allclose(np.diff(forecast.times), HOUR)


def test_lstm_learns_a_seasonal_series() -> None:
    """With torch installed, the LSTM forecasts a daily sine well and bands most future points."""
    pytest.importorskip("torch")
    from citadel.alerting.lstm import LstmForecaster

    series = seasonal(24 * 20 + 24, seed=5)
    times, values = hourly(series[:-24])
    model = LstmForecaster(epochs=10)
    assert model.unavailable is None
    model.fit(times, values)
    forecast = model.forecast(24)  # twice its direct horizon: the second half is recursive
    assert "lstm" == forecast.model
    assert mae(forecast, series[-24:]) < 0.6
    inside = sum(
        lo <= v <= hi
        for lo, v, hi in zip(forecast.lower, series[-24:], forecast.upper, strict=True)
    )
    assert inside >= 0.75 * 24
    with pytest.raises(ForecastError, match="lstm: needs at least 236 points"):
        LstmForecaster().fit(times[:100], values[:100])


def _ramp(start: int, end: int, slope: float) -> tuple[list[float], list[float]]:
    times = [60.0 * i for i in range(start, end)]
    return times, [slope * i + (i % 3) * 0.1 for i in range(start, end)]


def test_a_kept_choice_is_refitted_without_backtesting_until_its_time_or_its_drift() -> None:
    """With reselect_seconds the ranking is kept: later fits refit the chosen model on the new
    history only; after reselect_seconds, or when the forecast misses the new samples by far more
    than its backtest error, every candidate is backtested again."""
    selector = Selector(
        [LinearForecaster, SeasonalNaiveForecaster], horizon=6, reselect_seconds=600.0
    )
    times, values = _ramp(0, 120, 1.0)
    selector.fit(times, values)
    assert (1, "linear") == (selector.backtests, selector.chosen)
    selector.forecast(6)
    for shift in (1, 2, 3):  # the same line, one minute on each time: kept
        times, values = _ramp(shift, 120 + shift, 1.0)
        selector.fit(times, values)
        selector.forecast(6)
    assert (1, "linear") == (selector.backtests, selector.chosen)
    assert 122 * 60.0 == selector.states()[0].trained_at  # refitted on the new history
    times, values = _ramp(14, 134, 1.0)  # 14 minutes after the ranking: time for a new one
    selector.fit(times, values)
    assert 2 == selector.backtests
    selector.forecast(6)
    times, values = _ramp(15, 135, 1.0)
    values[-1] += 500.0  # one sample far off the forecast: noise, not yet drift
    selector.fit(times, values)
    assert 2 == selector.backtests
    selector.forecast(6)
    times, values = _ramp(16, 138, 1.0)
    for i in (-3, -2, -1):  # three new samples far off the forecast: drift
        values[i] += 500.0
    selector.fit(times, values)
    assert 3 == selector.backtests


def test_without_reselect_seconds_every_fit_backtests() -> None:
    selector = Selector([LinearForecaster, SeasonalNaiveForecaster], horizon=6)
    for shift in range(3):
        selector.fit(*_ramp(shift, 120 + shift, 1.0))
        selector.forecast(6)
    assert 3 == selector.backtests
