"""Cumulative series (month-to-date spend, budget use): forecast what is added, then sum it.

A month-to-date total only grows until the month ends. Fitted directly, a model may bend it back
down (ARIMA's mean reversion, a line through a flat night) and forecast less spend at the month's
end than has been spent already. So a cumulative series is forecast as cumulative:

1. ``increments``: what a step adds, as the mean over the trailing day (``(v[i] - v[j]) * step /
   (t[i] - t[j])``, ``t[j]`` a day earlier; never below 0: a total that fell was reset or
   re-based, not refunded). A day's mean, because spend comes in office hours and a robust model
   of each hour's own increment (zero all night) forecasts no more spend at all;
2. the usual selector forecasts that rate;
3. ``integrate``: the current total plus the running sum of the forecast increments (each clipped
   at 0), so the path never falls and never starts below the current value. The interval sums
   the increments' half-widths as independent errors (``sqrt`` of the summed squares), and its
   lower bound is never below the current value either.

Pure: plain data in, plain data out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from citadel.alerting.forecast import DAY, Forecast

__all__ = ["increments", "integrate"]


def increments(
    times: Sequence[float],
    values: Sequence[float],
    step: float,
    *,
    window: float = DAY,
    min_points: int = 10,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """What a step adds to a cumulative series, at each of its times but the first: the total
    added over the trailing ``window`` (a day, or all the series when shorter) per ``step``;
    only the points with a whole window behind them when there are ``min_points`` of those.

    The trailing mean, not each step's own increment: spend comes in office hours, and a robust
    model of raw increments (mostly zeros at night) would forecast that nothing more is spent."""
    out_times: list[float] = []
    out_values: list[float] = []
    whole = 0  # the points whose trailing window is a whole one
    first = 0
    for i in range(1, len(values)):
        while first < i - 1 and times[i] - times[first + 1] >= window:
            first += 1
        gap = times[i] - times[first]
        added = max(0.0, values[i] - values[first])
        out_times.append(times[i])
        out_values.append(added * step / gap if gap > 0 else 0.0)
        whole += gap >= window
    if whole >= min_points:  # enough of them: drop the warm-up, whose mean is of a part-day
        return tuple(out_times[-whole:]), tuple(out_values[-whole:])
    return tuple(out_times), tuple(out_values)


def integrate(forecast: Forecast, *, start: float) -> Forecast:
    """The cumulative path of a forecast of increments, from the total ``start`` at the last
    sample (the forecast's first step is the one after it)."""
    total, variance = start, 0.0
    mean: list[float] = []
    lower: list[float] = []
    upper: list[float] = []
    for m, low, high in zip(forecast.mean, forecast.lower, forecast.upper, strict=True):
        total += max(0.0, m)
        variance += (max(0.0, high - low) / 2) ** 2
        half = math.sqrt(variance)
        mean.append(total)
        lower.append(max(start, total - half))
        upper.append(total + half)
    return Forecast(
        times=forecast.times,
        mean=tuple(mean),
        lower=tuple(lower),
        upper=tuple(upper),
        model=forecast.model,
        level=forecast.level,
    )
