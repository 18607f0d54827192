"""An LSTM forecaster (PyTorch on the CPU), the optional extra ``citadel-llm[lstm]``.

Theory of operation: like ARIMA/ETS, the daily profile is removed from the recent window first
(``forecast.detect_season``), so the network only learns the short-term dynamics of what is left.
The window is standardised; each training sample is the last ``lookback`` points and the target
is the next ``horizon`` points *relative to the last one* (a direct multi-step forecast that
defaults to "no change"). A one-layer LSTM with a linear head is trained with a Huber loss on the
first 80 % of the samples, within an epoch cap and a time budget, with a fixed seed. The last 20 %
calibrate the interval: per step ahead, the ``level`` quantile of the absolute held-out error
(split conformal). Longer horizons are forecast recursively, chunk by chunk, with the interval
widened as sqrt(steps).

torch is imported lazily: without it ``unavailable`` names the reason, ``fit`` raises
``ForecastError``, and the ``Selector`` skips the model.
"""

from __future__ import annotations

import functools
import math
import time
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
    as_series,
    detect_season,
    make_forecast,
    require,
    season_length,
    series_step,
)


@functools.cache
def torch_unavailable() -> str | None:
    """Why the LSTM cannot run here, or None when torch imports."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"torch is not installed ({exc}); install the extra: pip install 'citadel-llm[lstm]'"
    return None


class LstmForecaster:
    """Direct multi-step LSTM on the seasonally adjusted, standardised recent window."""

    name = "lstm"

    def __init__(
        self,
        *,
        lookback: int = 24,
        horizon: int = 12,
        hidden: int = 16,
        window: int = 1152,
        seasons: int = 4,
        epochs: int = 20,
        batch: int = 64,
        min_samples: int = 200,
        period: float = DAY,
        level: float = DEFAULT_LEVEL,
        seed: int = 0,
        budget: float = 5.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.lookback = lookback
        self.horizon = horizon
        self.hidden = hidden
        self.window = window
        self.seasons = seasons
        self.epochs = epochs
        self.batch = batch
        self.min_samples = min_samples
        self.period = period
        self.level = level
        self.seed = seed
        self.budget = budget
        self.clock = clock
        self.min_points = lookback + horizon + min_samples
        self._t: Array | None = None
        self._predict: Callable[[int], tuple[Array, Array]] | None = None

    @property
    def unavailable(self) -> str | None:
        """Why this model cannot run (torch missing), or None."""
        return torch_unavailable()

    def fit(self, times: Numbers, values: Numbers) -> None:
        if (reason := self.unavailable) is not None:
            raise ForecastError(f"{self.name}: unavailable: {reason}")
        t, y = as_series(times, values, model=self.name)
        require(t.size, self.min_points, model=self.name, why="lookback + horizon + samples")
        m = season_length(series_step(t), period=self.period)
        keep = self.window if m is None else max(self.window, self.seasons * m)
        y = y[-keep:]
        season = detect_season(y, m)
        adjusted = y - season.past() if season else y
        centre = float(np.mean(adjusted))
        scale = float(np.std(adjusted)) or 1.0
        z = (adjusted - centre) / scale
        try:
            step_ahead = self._train(z)
        except ForecastError:
            raise
        except Exception as exc:
            raise ForecastError(f"{self.name}: training failed: {exc}") from exc

        def predict(horizon: int) -> tuple[Array, Array]:
            mean, half = step_ahead(horizon)
            mean = mean * scale + centre
            if season is not None:
                mean = mean + season.future(horizon)
            return mean, half * scale

        self._t, self._predict = t, predict

    def forecast(self, horizon: int) -> Forecast:
        if self._t is None or self._predict is None:
            raise ForecastError(f"{self.name}: forecast() before a successful fit()")
        mean, half = self._predict(horizon)
        if not (np.isfinite(mean).all() and np.isfinite(half).all()):
            raise ForecastError(f"{self.name}: the network forecast non-finite values")
        return make_forecast(self._t, mean, half, model=self.name, level=self.level)

    def _train(self, z: Array) -> Callable[[int], tuple[Array, Array]]:
        import torch
        from torch import nn

        lookback, out = self.lookback, self.horizon
        count = z.size - lookback - out + 1
        idx = np.arange(count)[:, None]
        inputs = z[idx + np.arange(lookback)]
        targets = z[idx + lookback + np.arange(out)] - inputs[:, -1:]
        split = max(int(count * 0.8), 1)

        class Net(nn.Module):
            def __init__(self, hidden: int) -> None:
                super().__init__()
                self.lstm = nn.LSTM(1, hidden, batch_first=True)
                self.head = nn.Linear(hidden, out)

            def forward(self, x: Any) -> Any:
                seq, _ = self.lstm(x.unsqueeze(-1))
                return self.head(seq[:, -1, :])

        deadline = self.clock() + self.budget
        with torch.random.fork_rng(devices=[]):  # a fixed seed without touching the global RNG
            torch.manual_seed(self.seed)
            net = Net(self.hidden)
            optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
            loss_fn = nn.HuberLoss()
            x_train = torch.tensor(inputs[:split], dtype=torch.float32)
            y_train = torch.tensor(targets[:split], dtype=torch.float32)
            for _ in range(self.epochs):
                order = torch.randperm(split)
                for start in range(0, split, self.batch):
                    rows = order[start : start + self.batch]
                    optimiser.zero_grad()
                    loss = loss_fn(net(x_train[rows]), y_train[rows])
                    loss.backward()
                    optimiser.step()
                if self.clock() > deadline:
                    break
        net.eval()

        def run(window: Array) -> Array:
            with torch.no_grad():
                x = torch.tensor(window, dtype=torch.float32)
                result: Array = net(x).numpy().astype(np.float64)
            return result

        held_in, held_out = inputs[split:], targets[split:]
        if held_in.shape[0] >= 10:
            errors = np.abs(run(held_in) - held_out)
            q = min(1.0, math.ceil((errors.shape[0] + 1) * self.level) / errors.shape[0])
            half_step = np.quantile(errors, q, axis=0)
        else:  # too few held-out samples: the in-sample error, which understates the spread
            half_step = np.quantile(np.abs(run(inputs) - targets), self.level, axis=0)

        def step_ahead(horizon: int) -> tuple[Array, Array]:
            path = list(z[-lookback:])
            while len(path) < lookback + horizon:
                window = np.asarray(path[-lookback:], dtype=np.float64)[None, :]
                path.extend((run(window)[0] + window[0, -1]).tolist())
            mean = np.asarray(path[lookback : lookback + horizon], dtype=np.float64)
            steps = np.arange(horizon)
            chunks = steps // out + 1
            half = half_step[steps % out] * np.sqrt(chunks)
            return mean, half

        return step_ahead
