"""Forecast accuracy: rolling-origin backtest on the NAB series, MASE against seasonal naive.

For every series in ``--data`` (NAB layout ``<category>/<series>.csv``, ``timestamp,value``) and
each of ``--origins`` forecast origins spread evenly over the last ``--tail`` of the series, every
model is refitted on the history before the origin and forecasts ``--horizon`` (12) steps. The
reference is seasonal naive with a daily season (``m = 86400 / median step``: 288 at 5 minutes, 24
hourly), forecast on the same windows. Series are treated as regularly sampled at their median step
(the realTraffic series have gaps; their "day" is ``m`` points).

Per series: ratio = MAE(model) / MAE(seasonal naive), both averaged over the same origins. Series
whose seasonal-naive MAE is 0 (exactly periodic or flat) are skipped and counted. The headline
aggregate is the **arithmetic mean** of the per-series ratios; the geometric mean and the median
are printed too, but the geometric mean is not a fair headline here: a few NAB series are flat for
hours, a model that forecasts the flat line exactly scores a ratio near 0, and one such series
drags the geometric mean of the whole corpus down. A model that raises at an origin is scored with
the naive (last value) forecast there and the failure is counted.

Models: ``linear``, ``arima``, ``ets``, ``lstm`` (when torch imports), ``auto`` (the default
``Selector``: ARIMA, ETS, linear, seasonal naive) and ``auto+lstm`` (the selector with the LSTM
too; only when named in ``--models``: it trains the LSTM four times per origin). Runtime is the
fit+forecast time per model summed over all series and origins (in the worker processes), and the
total wall time.

    .venv/bin/python bench/forecast.py [--data bench/data/nab/data] [--origins 8] [--models ...]
        [--horizon 12] [--tail 0.3] [--jobs N] [--json PATH]

Target: ``auto`` at most 0.85 (AutoARIMA reached 0.82 on Datadog's observability benchmark).

``--lead-time`` measures the forecast *alerts* instead (``bench/lead_time.py``): on seeded synthetic
ramps, how many minutes before the threshold is crossed the service's rule fires, and how many
false alerts it raises on the NAB subset's segments outside the anomaly windows per week of data::

    .venv/bin/python bench/forecast.py --lead-time [--models linear] [--seeds 3] [--every 6]
"""

from __future__ import annotations

import os

# One BLAS thread per process: statsmodels multiplies tiny matrices, where OpenBLAS threads only
# contend (ten times slower on a loaded machine). Must be set before numpy loads OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import csv
import gzip
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from citadel.alerting.forecast import (
    ArimaForecaster,
    EtsForecaster,
    Forecaster,
    LinearForecaster,
    season_length,
    series_step,
)
from citadel.alerting.lstm import LstmForecaster, torch_unavailable
from citadel.alerting.selector import Selector, default_candidates

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "nab" / "data"  # vendored, gzipped
TARGET = 0.85


def factories() -> dict[str, Callable[[], Forecaster]]:
    return {
        "linear": LinearForecaster,
        "arima": ArimaForecaster,
        "ets": EtsForecaster,
        "lstm": LstmForecaster,
        "auto": Selector,
        "auto+lstm": lambda: Selector(default_candidates(lstm=True)),
    }


def load(path: Path) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The series in time order; of rows sharing a timestamp (six NAB files have some), the last."""
    by_time: dict[float, float] = {}
    with (
        gzip.open(path, "rt", newline="") if path.suffix == ".gz" else path.open(newline="")
    ) as handle:
        for row in csv.DictReader(handle):
            stamp = datetime.fromisoformat(row["timestamp"]).replace(tzinfo=UTC)
            by_time[stamp.timestamp()] = float(row["value"])
    times = sorted(by_time)
    return np.asarray(times), np.asarray([by_time[t] for t in times])


def origins_for(n: int, m: int, horizon: int, count: int, tail: float) -> list[int]:
    last = n - horizon
    first = max(int(n * (1 - tail)), min(3 * m, last))
    if count == 1 or first >= last:
        return [last]
    return sorted({round(first + (last - first) * i / (count - 1)) for i in range(count)})


def run_series(job: tuple[str, list[str], int, int, float]) -> dict[str, Any]:
    path, models, horizon, count, tail = job
    try:  # one core per worker: the pool is the parallelism
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    t, y = load(Path(path))
    m = season_length(series_step(t)) or 1
    made = factories()
    origins = origins_for(t.size, m, horizon, count, tail)
    snaive_err: list[float] = []
    errors: dict[str, list[float]] = {name: [] for name in models}
    seconds = dict.fromkeys(models, 0.0)
    failures = dict.fromkeys(models, 0)
    chosen: dict[str, dict[str, int]] = {name: {} for name in models}
    for o in origins:
        actual = y[o : o + horizon]
        steps = np.arange(o, o + horizon)
        snaive = y[steps - m * (1 + (steps - o) // m)]
        snaive_err.append(float(np.mean(np.abs(actual - snaive))))
        for name in models:
            model = made[name]()
            start = time.perf_counter()
            try:
                model.fit(t[:o], y[:o])
                predicted = np.asarray(model.forecast(horizon).mean)
            except Exception as exc:
                failures[name] += 1
                print(f"  {Path(path).stem} @{o} {name}: {exc}", file=sys.stderr)
                predicted = np.full(horizon, y[o - 1])
            seconds[name] += time.perf_counter() - start
            errors[name].append(float(np.mean(np.abs(actual - predicted))))
            if isinstance(model, Selector) and model.chosen:
                picks = chosen[name]
                picks[model.chosen] = picks.get(model.chosen, 0) + 1
    return {
        "series": f"{Path(path).parent.name}/{Path(path).stem}",
        "points": int(t.size),
        "season": m,
        "origins": origins,
        "snaive_mae": statistics.fmean(snaive_err),
        "mae": {name: statistics.fmean(errs) for name, errs in errors.items()},
        "seconds": seconds,
        "failures": failures,
        "chosen": chosen,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--origins", type=int, default=8)
    parser.add_argument("--horizon", type=int, default=12)
    parser.add_argument("--tail", type=float, default=0.3, help="origins lie in this last fraction")
    parser.add_argument("--models", default=None, help="default: linear,arima,ets,lstm,auto")
    parser.add_argument("--lead-time", action="store_true", help="lead time of forecast alerts")
    parser.add_argument("--seeds", type=int, default=3, help="--lead-time: seeds per ramp")
    parser.add_argument("--every", type=int, default=6, help="--lead-time: NAB rows per evaluation")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write per-series results and the summary here")
    args = parser.parse_args()

    if args.lead_time:
        import lead_time

        data = args.data if args.data != DEFAULT_DATA else DEFAULT_DATA
        names = [m.strip() for m in (args.models or "linear").split(",") if m.strip()]
        windows = data.parent / "labels" / "combined_windows.json"
        return lead_time.main(
            data, windows, models=names, seeds=args.seeds, every=args.every, jobs=args.jobs
        )
    models = [m.strip() for m in (args.models or "linear,arima,ets,lstm,auto").split(",") if m]
    unknown = set(models) - set(factories())
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; expected some of {sorted(factories())}")
    if (reason := torch_unavailable()) and any("lstm" in name for name in models):
        print(f"skipping lstm models: {reason}")
        models = [name for name in models if "lstm" not in name]
    paths = sorted(str(p) for p in [*args.data.glob("*/*.csv"), *args.data.glob("*/*.csv.gz")])
    if not paths:
        parser.error(f"--data {args.data}: no <category>/<series>.csv (or .csv.gz) files")

    jobs = [(p, models, args.horizon, args.origins, args.tail) for p in paths]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_series, jobs))
    wall = time.perf_counter() - start

    scored = [r for r in results if r["snaive_mae"] > 0]
    skipped = [r["series"] for r in results if r["snaive_mae"] == 0]
    print(
        f"{len(results)} series, {len(scored)} scored ({len(skipped)} skipped: seasonal-naive "
        f"MAE 0: {', '.join(skipped) or '-'}), horizon {args.horizon}, "
        f"{args.origins} origins per series in the last {args.tail:.0%}, {args.jobs} processes"
    )
    print(f"{'model':<10} {'MASE mean':>9} {'geo':>7} {'median':>7} {'fails':>6} {'fit s':>9}")
    summary: dict[str, Any] = {}
    for name in models:
        ratios = [r["mae"][name] / r["snaive_mae"] for r in scored]
        geo = math.exp(statistics.fmean(math.log(max(x, 1e-12)) for x in ratios))
        summary[name] = {
            "mase_geometric": geo,
            "mase_arithmetic": statistics.fmean(ratios),
            "mase_median": statistics.median(ratios),
            "failures": sum(r["failures"][name] for r in results),
            "seconds": sum(r["seconds"][name] for r in results),
        }
        s = summary[name]
        print(
            f"{name:<10} {s['mase_arithmetic']:>9.3f} {geo:>7.3f} {s['mase_median']:>7.3f} "
            f"{s['failures']:>6} {s['seconds']:>9.1f}"
        )
    print(f"wall time {wall:.1f} s")
    for name in models:
        if name.startswith("auto"):
            picks: dict[str, int] = {}
            for r in results:
                for model, count in r["chosen"][name].items():
                    picks[model] = picks.get(model, 0) + count
            print(f"{name} picked: {dict(sorted(picks.items()))}")
    if "auto" in summary:
        verdict = "meets" if summary["auto"]["mase_arithmetic"] <= TARGET else "misses"
        print(f"default (auto) {verdict} the target: mean MASE <= {TARGET}")
    if args.json:
        payload = {"summary": summary, "skipped": skipped, "wall_seconds": wall, "series": results}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
