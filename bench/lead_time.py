"""Lead time of the forecast alerts: how long before a threshold is crossed the alert fires, and
how many false alerts it raises where nothing is crossed (``bench/forecast.py --lead-time``).

Every evaluation goes through the service's own ``Evaluator`` (``citadel.alerting.engine``) with
a forecast rule shaped like the default ``ModelTtftForecast``: a lookback of 120 steps, a horizon
of 60 steps (3600 s and 1800 s at its 30 s step), ``min_points`` 10, the model of ``--models``.

**Ramps** (synthetic, seeded; a 30 s step): two hours flat, then a rise that reaches the
threshold ``T`` minutes after it starts (``T`` in 30, 60, 120: three slopes), then 30 minutes more,
each at three noise levels and ``--seeds`` seeds:

- ``latency``: a p95 latency of 0.35 s rising linearly to the 1 s threshold; Gaussian noise of
  2, 5 or 10 % of the base;
- ``queue``: a queue of 10 rising linearly to 200; Gaussian noise of sd 1, 3 or 6;
- ``spend``: month-to-date spend at 1 $/min whose rate then grows linearly, so the spend meets a
  budget that the flat rate would meet only 3 hours later; each step's spend is noisy by 10, 30 or
  60 %.

The rule is evaluated at every step. The crossing is the first sample at or above the threshold;
the lead time is the crossing minus the first evaluation that fired in the ramp and kept firing
up to the crossing (0 when the alert fired only once the value was past it). An alert that fires
on the flat two hours is a false alert.

**NAB's flat segments** (the vendored subset, ``bench/data/nab``, which the forecaster was never
tuned on for this): on each series the threshold is set 10 % of the series' range above its
maximum outside the labelled anomaly windows, so no sample outside the windows reaches it, and the
rule (horizon 60 rows, lookback 120 rows) is evaluated every ``--every`` rows outside the windows
and outside the horizon before each window (where an alert would be a correct early warning).
Each run of consecutive firing evaluations is one false alert (what Alertmanager would page once);
they are counted per series per week of data evaluated.

Target (issue 19): median lead time at least half the horizon (15 minutes), at most one false
alert per series per week.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from citadel.alerting.definitions import Rule
from citadel.alerting.engine import Evaluator
from citadel.alerting.prometheus import Series

STEP = 30.0
LOOKBACK_STEPS = 120
HORIZON_STEPS = 60
FLAT_STEPS = 240  # two hours at 30 s
AFTER_STEPS = 60
RAMP_MINUTES = (30, 60, 120)
NOISE = {"latency": (0.02, 0.05, 0.10), "queue": (1.0, 3.0, 6.0), "spend": (0.1, 0.3, 0.6)}


@dataclass(frozen=True, kw_only=True)
class Ramp:
    kind: str
    minutes: int
    noise: float
    seed: int
    values: tuple[float, ...]
    threshold: float
    ramp_start: int  # the first row of the rise


def ramp(kind: str, minutes: int, noise: float, seed: int) -> Ramp:
    """One synthetic series: flat, then a rise that meets the threshold ``minutes`` later."""
    rng = np.random.default_rng([seed, minutes, int(noise * 1000), len(kind)])
    rise = int(minutes * 60 / STEP)
    n = FLAT_STEPS + rise + AFTER_STEPS
    i = np.arange(n, dtype=np.float64)
    tau = np.clip(i - FLAT_STEPS, 0.0, None)  # steps since the rise began
    if kind == "latency":
        base, threshold = 0.35, 1.0
        y = base + (threshold - base) * tau / rise + rng.normal(0.0, noise * base, n)
    elif kind == "queue":
        base, threshold = 10.0, 200.0
        y = base + (threshold - base) * tau / rise + rng.normal(0.0, noise, n)
    elif kind == "spend":
        per_step = STEP / 60.0  # 1 $/min
        flat_total = per_step * FLAT_STEPS
        threshold = flat_total + per_step * 360.0  # the flat rate would take 3 h to meet it
        # rate(tau) = per_step + k tau, with spend(rise) = threshold
        k = 2.0 * (threshold - flat_total - per_step * rise) / rise**2
        rate = per_step + k * tau
        y = np.cumsum(np.clip(rate * (1.0 + rng.normal(0.0, noise, n)), 0.0, None))
    else:
        raise ValueError(kind)
    return Ramp(
        kind=kind,
        minutes=minutes,
        noise=noise,
        seed=seed,
        values=tuple(float(v) for v in y),
        threshold=threshold,
        ramp_start=FLAT_STEPS,
    )


def ramps(seeds: int) -> list[Ramp]:
    return [
        ramp(kind, minutes, noise, seed)
        for kind, levels in NOISE.items()
        for minutes in RAMP_MINUTES
        for noise in levels
        for seed in range(seeds)
    ]


def rule(model: str, threshold: float, step: float) -> Rule:
    return Rule(
        name="LeadTime",
        kind="forecast",
        query="x",
        threshold=threshold,
        horizon_seconds=HORIZON_STEPS * step,
        lookback_seconds=LOOKBACK_STEPS * step,
        step_seconds=step,
        min_points=10,
        model=model,
    )


def firing(
    evaluator: Evaluator, r: Rule, times: Sequence[float], values: Sequence[float], at: int
) -> bool:
    """Whether the rule fires at row ``at`` (its lookback ending there)."""
    start = max(0, at - LOOKBACK_STEPS + 1)
    series = Series(times=tuple(times[start : at + 1]), values=tuple(values[start : at + 1]))
    [finding] = evaluator.evaluate(r, [series], now=times[at]).findings
    return finding.outcome == "firing"


def run_ramp(job: tuple[Ramp, str]) -> dict[str, Any]:
    series, model = job
    r = rule(model, series.threshold, STEP)
    times = [i * STEP for i in range(len(series.values))]
    evaluator = Evaluator()
    crossing = next(i for i, v in enumerate(series.values) if v >= series.threshold)
    fired = [firing(evaluator, r, times, series.values, i) for i in range(crossing + 1)]
    false_alerts = _episodes(fired[: series.ramp_start])
    # the first row of the run of firing evaluations that reaches the crossing
    first = crossing
    while first > series.ramp_start and fired[first - 1]:
        first -= 1
    lead = (crossing - first) * STEP / 60.0  # fired[crossing]: a value past it fires at once
    return {
        "kind": series.kind,
        "minutes": series.minutes,
        "noise": series.noise,
        "seed": series.seed,
        "crossing_minutes": (crossing - series.ramp_start) * STEP / 60.0,
        "lead_minutes": lead,
        "false_alerts": false_alerts,
    }


def _episodes(fired: Sequence[bool]) -> int:
    return sum(1 for i, f in enumerate(fired) if f and (i == 0 or not fired[i - 1]))


def flat_rows(n: int, windows: Sequence[tuple[int, int]], every: int) -> Iterator[list[int]]:
    """The rows to evaluate, as runs between windows: outside every window and outside the
    horizon before each, from the first row with a full lookback."""
    blocked = np.zeros(n, dtype=bool)
    for start, end in windows:
        blocked[max(0, start - HORIZON_STEPS) : end + 1] = True
    run: list[int] = []
    for i in range(LOOKBACK_STEPS, n, every):
        if blocked[i]:
            if run:
                yield run
            run = []
        else:
            run.append(i)
    if run:
        yield run


def run_nab(
    job: tuple[str, list[float], list[float], list[tuple[int, int]], str, int],
) -> dict[str, Any]:
    name, times, values, windows, model, every = job
    y = np.asarray(values)
    outside = np.ones(len(y), dtype=bool)
    for start, end in windows:
        outside[start : end + 1] = False
    top, bottom = float(y[outside].max()), float(y[outside].min())
    threshold = top + 0.1 * max(top - bottom, abs(top) * 1e-3, 1e-9)
    step = float(np.median(np.diff(times)))
    r = rule(model, threshold, step)
    evaluator = Evaluator()
    alerts, evaluated = 0, 0
    for run in flat_rows(len(y), windows, every):
        fired = [firing(evaluator, r, times, values, i) for i in run]
        alerts += _episodes(fired)
        evaluated += len(run)
    days = evaluated * every * step / 86400.0
    return {"series": name, "false_alerts": alerts, "days": days, "step": step}


def main(
    data: Path, windows: Path, *, models: Sequence[str], seeds: int, every: int, jobs: int
) -> int:
    from nab_scoring import load_corpus

    corpus = load_corpus(data, windows)
    horizon_minutes = HORIZON_STEPS * STEP / 60.0
    for model in models:
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            ramp_results = list(pool.map(run_ramp, [(s, model) for s in ramps(seeds)]))
            nab_jobs = [
                (s.name, s.timestamps.tolist(), s.values.tolist(), list(s.windows), model, every)
                for s in corpus
            ]
            nab_results = list(pool.map(run_nab, nab_jobs))
        wall = time.perf_counter() - started
        print(
            f"\nmodel {model}: horizon {horizon_minutes:.0f} min, lookback "
            f"{LOOKBACK_STEPS * STEP / 60:.0f} min at a {STEP:.0f} s step; {seeds} seeds; "
            f"wall {wall:.0f} s"
        )
        print(
            f"{'ramp':<8} {'to cross':>8} {'median lead':>11} {'min':>5} {'max':>5} "
            f"{'missed':>6} {'false':>5}"
        )
        leads_all: list[float] = []
        for kind in NOISE:
            for minutes in RAMP_MINUTES:
                rows = [x for x in ramp_results if x["kind"] == kind and x["minutes"] == minutes]
                leads = [x["lead_minutes"] for x in rows]
                leads_all += leads
                missed = sum(1 for x in leads if x == 0.0)
                false = sum(x["false_alerts"] for x in rows)
                print(
                    f"{kind:<8} {minutes:>6} m {statistics.median(leads):>9.1f} m "
                    f"{min(leads):>5.1f} {max(leads):>5.1f} {missed:>3}/{len(rows):<2} {false:>5}"
                )
            by_noise = []
            for noise in NOISE[kind]:
                leads = [
                    x["lead_minutes"]
                    for x in ramp_results
                    if x["kind"] == kind and x["noise"] == noise
                ]
                by_noise.append(f"noise {noise:g}: {statistics.median(leads):.1f} m")
            print(f"{'':<8} by noise (all slopes): {'; '.join(by_noise)}")
        median = statistics.median(leads_all)
        flat_hours = len(ramp_results) * FLAT_STEPS * STEP / 3600
        flat_false = sum(x["false_alerts"] for x in ramp_results)
        print(
            f"all ramps: median lead {median:.1f} min ({median / horizon_minutes:.0%} of the "
            f"horizon), {sum(1 for x in leads_all if x == 0.0)} of {len(leads_all)} without "
            f"warning; {flat_false} false alerts on their {flat_hours:.0f} flat hours"
        )
        weeks = [(x["false_alerts"], x["days"] / 7.0) for x in nab_results if x["days"] > 0]
        total_alerts = sum(a for a, _ in weeks)
        total_weeks = sum(w for _, w in weeks)
        per_series = [a / w for a, w in weeks]
        over = [
            x["series"]
            for x in nab_results
            if x["days"] > 0 and x["false_alerts"] / (x["days"] / 7.0) > 1.0
        ]
        print(
            f"NAB flat segments: {len(weeks)} series, {total_weeks:.1f} series-weeks evaluated "
            f"(every {every} rows): {total_alerts} false alerts, {total_alerts / total_weeks:.2f} "
            f"per series-week (median series {statistics.median(per_series):.2f}); "
            f"{len(over)} series above 1 per week"
        )
        ok_lead = median >= horizon_minutes / 2
        ok_false = total_alerts / total_weeks <= 1.0
        print(
            f"target: median lead >= {horizon_minutes / 2:.0f} min: "
            f"{'met' if ok_lead else 'missed'}; "
            f"<= 1 false alert per series-week: {'met' if ok_false else 'missed'}"
        )
        if over:
            more = " ..." if len(over) > 12 else ""
            print(f"series above 1 false alert per week: {', '.join(sorted(over)[:12])}{more}")
    return 0


if __name__ == "__main__":  # pragma: no cover - run through bench/forecast.py --lead-time
    raise SystemExit("run: bench/forecast.py --lead-time")
