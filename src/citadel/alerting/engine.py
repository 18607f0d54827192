"""Rule evaluation: from a rule and its series to firing or not, with the reason why.

Theory of operation. ``Evaluator`` is the pure core (time passed in, no I/O). It keeps one model
per (rule, series): a forecast ``Selector`` refitted on each evaluation's history (so /health can
show what each model has seen and how well it backtested), or a streaming anomaly detector fed
only the samples newer than those it has seen. For each series it returns a ``Finding``:

- ``insufficient_history``: fewer than ``min_points`` samples (or a model that says so); never an
  alert, because a forecast from three points is a guess.
- ``firing``: a forecast rule whose mean path crosses the threshold within the horizon (a series
  already past the threshold crosses now), or an anomaly rule whose score reaches
  ``score_threshold``.
- ``ok``: neither; ``error``: the model failed.

A rule whose query fails leaves its alerts as they were (an outage of Prometheus is not a
resolution); a series that stops firing resolves its alert.

``Scheduler`` is the adapter: every ``interval_seconds`` it reads each rule's series from its
``Source`` (Prometheus range queries, or the usage ledger), evaluates them, hands the alerts to
``AlertBook`` for deduplication and the result to the Alertmanager client, and records metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo

from citadel.alerting.alertmanager import Alert, AlertBook, AlertmanagerClient
from citadel.alerting.anomaly import Detector
from citadel.alerting.cumulative import increments, integrate
from citadel.alerting.definitions import AlertingSettings, LedgerQuery, Rule
from citadel.alerting.forecast import (
    ArimaForecaster,
    EtsForecaster,
    Forecast,
    Forecaster,
    ForecastError,
    LinearForecaster,
    crossing_time,
)
from citadel.alerting.prometheus import PrometheusClient, Series
from citadel.alerting.selector import ModelState, Selector, default_candidates, fit_job
from citadel.duration import for_people
from citadel.errors import CitadelError
from citadel.metrics import (
    ALERTING_ALERTS_FIRING,
    ALERTING_EVALUATION_DURATION,
    ALERTING_EVALUATIONS,
    ALERTING_MODEL_ERROR,
    ALERTING_ROUNDS_SKIPPED,
    Registry,
)

__all__ = [
    "Detector",
    "Evaluation",
    "Evaluator",
    "Finding",
    "Fitter",
    "LedgerSource",
    "Outcome",
    "PoolFitter",
    "PrometheusSource",
    "Scheduler",
    "SeriesReader",
    "Source",
    "SourceUnavailable",
    "month_end",
]

_log = logging.getLogger("citadel.alerting")

Outcome = Literal["ok", "firing", "insufficient_history", "error"]
_BACKTEST_STEPS = 12  # the longest horizon the selector backtests over
_MAX_HORIZON_STEPS = 5000  # a forecast longer than this is coarsened by the step


# A rule's state for /health from its evaluation and its models per series (``Scheduler.describe``).
Describe = Callable[["Evaluation", Mapping[str, tuple[ModelState, ...]]], object]


class SourceUnavailable(CitadelError):
    """A rule's data could not be read (Prometheus down, the ledger not configured, ...)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    """The decision for one series of one rule, and why."""

    series: Mapping[str, str]  # the series' labels
    outcome: Outcome
    detail: str  # for people: the forecast, the crossing, or what was missing
    points: int = 0
    value: float | None = None  # the last sample
    model: str | None = None
    crossing_at: float | None = None  # Unix seconds: when the forecast reaches the threshold
    forecast_at: float | None = None  # the end of the horizon
    forecast_mean: float | None = None  # the forecast there, and its interval
    forecast_lower: float | None = None
    forecast_upper: float | None = None
    score: float | None = None  # anomaly rules
    warming_up: bool = False  # anomaly rules: the detector's warm-up (its early score)


@dataclass(frozen=True, kw_only=True, slots=True)
class Evaluation:
    """One evaluation of one rule: a finding per series, or the error that prevented it."""

    rule: Rule
    at: float
    findings: tuple[Finding, ...] = ()
    error: str | None = None
    duration: float = 0.0

    @property
    def outcome(self) -> Outcome:
        """The rule's outcome: error, else firing if any series fires, else the most hopeful."""
        if self.error is not None:
            return "error"
        outcomes = {f.outcome for f in self.findings}
        for outcome in ("firing", "ok", "insufficient_history", "error"):
            if outcome in outcomes:
                return outcome
        return "insufficient_history"  # no series at all: nothing to judge yet


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def month_end(now: float, timezone: str = "UTC") -> float:
    """The start of the next calendar month in ``timezone``, in Unix seconds."""
    local = datetime.fromtimestamp(now, ZoneInfo(timezone))
    first = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    following = (first + timedelta(days=32)).replace(day=1)
    return following.timestamp()


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def selector_for(rule: Rule, horizon_steps: int, reselect_seconds: float = 0.0) -> Selector:
    """The forecaster of ``rule.model``: every candidate ("auto") or one, behind a Selector so
    that its state reads the same either way. "auto" keeps its choice ``reselect_seconds``."""
    horizon = max(1, min(horizon_steps, _BACKTEST_STEPS))
    one: dict[str, Callable[[], Forecaster]] = {
        "linear": LinearForecaster,
        "arima": ArimaForecaster,
        "ets": EtsForecaster,
    }
    if rule.model == "auto":
        return Selector(
            default_candidates(), horizon=horizon, reselect_seconds=reselect_seconds or None
        )
    if rule.model == "lstm":
        return Selector(default_candidates(lstm=True)[2:3], horizon=horizon)
    return Selector([one[rule.model]], horizon=horizon)


# Fits a selector on (times, values) at ``now``, elsewhere (a worker process): the fitted selector
# and the error if no candidate could fit (``selector.fit_job``'s signature).
Fitter = Callable[[Selector, Sequence[float], Sequence[float], float], tuple[Selector, str | None]]


class PoolFitter:
    """A ``Fitter`` over a process pool of ``processes`` workers (spawned, so they share nothing
    with the service's threads), started on first use and shut down by ``close``."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __call__(
        self, selector: Selector, times: Sequence[float], values: Sequence[float], now: float
    ) -> tuple[Selector, str | None]:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
            pool = self._pool
        return pool.submit(fit_job, selector, times, values, now).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Evaluator:
    """Decides rules on their series; holds each series' model between evaluations."""

    def __init__(
        self,
        *,
        detector_factory: Callable[[], Detector] | None = None,
        selector_factory: Callable[[Rule, int, float], Selector] = selector_for,
        timezone: str = "UTC",
        reselect_seconds: float = 0.0,
        refit_seconds: float = 0.0,
        fitter: Fitter | None = None,
    ) -> None:
        self._reselect = reselect_seconds
        self._refit = refit_seconds
        self._fitter = fitter
        self.fits = 0  # model fits started (each a backtest or a refit)
        self._detector_factory = detector_factory
        self._selector_factory = selector_factory
        self._timezone = timezone
        # rule name -> series key -> its selector (by rule, so one rule's models are read
        # without walking every rule's: a round reads each rule's once)
        self._selectors: dict[str, dict[str, Selector]] = {}
        self._detectors: dict[tuple[str, str], tuple[Detector, float, int, float]] = {}

    def models(self) -> dict[str, dict[str, tuple[ModelState, ...]]]:
        """Each rule's forecast models per series, as /health reports them."""
        return {rule: self.models_of(rule) for rule in list(self._selectors)}

    def models_of(self, rule: str) -> dict[str, tuple[ModelState, ...]]:
        """One rule's forecast models per series."""
        selectors = self._selectors.get(rule, {})
        return {key: selector.states() for key, selector in list(selectors.items())}

    def forget(self, rule: str) -> None:
        """Drop every model of ``rule``."""
        self._selectors.pop(rule, None)
        for key in [k for k in self._detectors if k[0] == rule]:
            del self._detectors[key]

    def evaluate(self, rule: Rule, series: Sequence[Series], *, now: float) -> Evaluation:
        started = time.perf_counter()
        findings = tuple(
            self._forecast(rule, s, now) if rule.kind == "forecast" else self._anomaly(rule, s)
            for s in series
        )
        return Evaluation(
            rule=rule, at=now, findings=findings, duration=time.perf_counter() - started
        )

    # -- forecast -------------------------------------------------------------------------------

    def _horizon(self, rule: Rule, now: float) -> float:
        if rule.horizon_seconds is None:
            return max(rule.step_seconds, month_end(now, self._timezone) - now)
        return rule.horizon_seconds

    def _forecast(self, rule: Rule, series: Series, now: float) -> Finding:
        points, labels = len(series.values), series.labels
        value = series.values[-1] if points else None
        if points < rule.min_points:
            return _short(rule, series)
        assert rule.threshold is not None
        assert value is not None
        horizon = self._horizon(rule, now)
        step = _step(series.times, rule.step_seconds)
        steps = max(1, min(_MAX_HORIZON_STEPS, math.ceil(horizon / step)))
        kept = self._selectors.setdefault(rule.name, {})
        selector = kept.get(series.key)
        if selector is None:
            selector = kept[series.key] = self._selector_factory(rule, steps, self._reselect)
        # A cumulative series (month-to-date spend) is forecast by what each step adds to it,
        # summed onto its current value (``cumulative``): it never falls.
        fitted = series
        if rule.cumulative:
            times, added = increments(series.times, series.values, step, min_points=rule.min_points)
            fitted = Series(labels=series.labels, times=times, values=added)
        try:
            if selector.due(fitted.times, fitted.values, now=now, refit_seconds=self._refit):
                selector = self._fit(kept, selector, fitted, now)
            if rule.cumulative:
                behind = max(0, math.ceil((now - series.times[-1]) / step))
                whole = integrate(
                    selector.forecast_from(series.times[-1], steps + behind), start=value
                )
                forecast = _after(whole, now)
            else:
                forecast = selector.forecast_from(now, steps)
        except ForecastError as exc:
            outcome: Outcome = "insufficient_history" if "at least" in str(exc) else "error"
            detail = f"{'insufficient history' if outcome != 'error' else 'no forecast'}: {exc}"
            return Finding(
                series=labels, outcome=outcome, detail=detail, points=points, value=value
            )
        threshold, direction = rule.threshold, rule.direction
        past = value >= threshold if direction == "above" else value <= threshold
        crossing = now if past else crossing_time(forecast, threshold, direction=direction)
        if crossing is not None and crossing > now + horizon:
            crossing = None
        return _forecast_finding(rule, series, forecast, crossing, now=now, horizon=horizon)

    def _fit(
        self, kept: dict[str, Selector], selector: Selector, series: Series, now: float
    ) -> Selector:
        """Fit here, or in the fitter's worker process (the selector travels there and back)."""
        self.fits += 1
        if self._fitter is None:
            selector.fit(series.times, series.values, now=now)
            return selector
        fitted, error = self._fitter(selector, series.times, series.values, now)
        kept[series.key] = fitted
        if error is not None:
            raise ForecastError(error)
        return fitted

    # -- anomaly --------------------------------------------------------------------------------

    def _anomaly(self, rule: Rule, series: Series) -> Finding:
        labels, points = series.labels, len(series.values)
        if self._detector_factory is None:
            return Finding(
                series=labels,
                outcome="error",
                detail="no anomaly detector is available",
                points=points,
            )
        key = (rule.name, series.key)
        detector, last_time, seen, score = self._detectors.get(
            key, (self._detector_factory(), -math.inf, 0, 0.0)
        )
        for t, v in zip(series.times, series.values, strict=True):
            if t > last_time:
                score, last_time, seen = float(detector.update(t, v)), t, seen + 1
        self._detectors[key] = (detector, last_time, seen, score)
        value = series.values[-1] if points else None
        if seen < rule.min_points or value is None:
            return _short(rule, series, seen=seen)
        firing = score >= rule.score_threshold
        warming = bool(getattr(detector, "warming_up", False))
        detail = (
            f"anomaly score {score:.3f} at value {_fmt(value)} "
            f"({'at or above' if firing else 'below'} {rule.score_threshold:g})"
        )
        if warming:
            detail = f"warming up ({_warmup(detector, seen)}): {detail}"
        return Finding(
            series=labels,
            outcome="firing" if firing else "ok",
            detail=detail,
            points=seen,
            value=value,
            score=score,
            warming_up=warming,
        )


def _warmup(detector: Detector, seen: int) -> str:
    """What a warming-up detector scores with: the early score, or nothing yet."""
    params = getattr(detector, "params", None)
    if params is None:
        return f"{seen} rows seen"
    full, early = params.warmup, params.early_rows
    if early <= 0:
        return f"{seen} of {full} rows; learning"
    if seen <= early:
        return f"{seen} of {full} rows; learning, the early score starts after {early}"
    return f"{seen} of {full} rows; early median/MAD score until the full model has {full}"


def _step(times: Sequence[float], default: float) -> float:
    if len(times) < 2:
        return default
    gaps = sorted(b - a for a, b in itertools.pairwise(times))
    return gaps[len(gaps) // 2] or default


def _after(forecast: Forecast, now: float) -> Forecast:
    """The part of a forecast after ``now`` (its last point if none is)."""
    first = next((i for i, t in enumerate(forecast.times) if t > now), len(forecast.times) - 1)
    return replace(
        forecast,
        times=forecast.times[first:],
        mean=forecast.mean[first:],
        lower=forecast.lower[first:],
        upper=forecast.upper[first:],
    )


def _short(rule: Rule, series: Series, *, seen: int | None = None) -> Finding:
    points = len(series.values) if seen is None else seen
    return Finding(
        series=series.labels,
        outcome="insufficient_history",
        detail=(
            f"insufficient history: {points} points, at least {rule.min_points} needed "
            f"(lookback {for_people(rule.lookback_seconds)} at a step of "
            f"{for_people(rule.step_seconds)})"
        ),
        points=points,
        value=series.values[-1] if series.values else None,
    )


def _forecast_finding(
    rule: Rule,
    series: Series,
    forecast: Forecast,
    crossing: float | None,
    *,
    now: float,
    horizon: float,
) -> Finding:
    assert rule.threshold is not None
    end = now + horizon
    # The forecast point nearest the end of the horizon.
    index = max(0, min(len(forecast.times) - 1, _last_at_or_before(forecast.times, end)))
    mean, lower, upper = forecast.mean[index], forecast.lower[index], forecast.upper[index]
    at = forecast.times[index]
    predicted = (
        f"{forecast.model} forecasts {_fmt(mean)} "
        f"({_fmt(lower)} to {_fmt(upper)}, {forecast.level:.0%}) at {_iso(at)}"
    )
    side = f"{rule.direction} {_fmt(rule.threshold)}"
    if crossing is None:
        detail = f"{predicted}; no crossing {side} within {for_people(horizon)}"
    else:
        detail = (
            f"{predicted}; crosses {side} at {_iso(crossing)} "
            f"(in {for_people(max(0.0, crossing - now))})"
        )
    return Finding(
        series=series.labels,
        outcome="firing" if crossing is not None else "ok",
        detail=detail,
        points=len(series.values),
        value=series.values[-1],
        model=forecast.model,
        crossing_at=crossing,
        forecast_at=at,
        forecast_mean=mean,
        forecast_lower=lower,
        forecast_upper=upper,
    )


def _last_at_or_before(times: Sequence[float], when: float) -> int:
    found = 0
    for i, t in enumerate(times):
        if t > when:
            break
        found = i
    return found


def alerts_of(evaluation: Evaluation) -> list[tuple[Mapping[str, str], Mapping[str, str]]]:
    """The (labels, annotations) of every firing series of an evaluation."""
    rule = evaluation.rule
    found: list[tuple[Mapping[str, str], Mapping[str, str]]] = []
    for finding in evaluation.findings:
        if finding.outcome != "firing":
            continue
        labels = {k: v for k, v in finding.series.items() if k != "__name__"}
        labels |= dict(rule.labels)
        labels |= {"alertname": rule.name, "severity": rule.severity}
        notes = {"summary": rule.summary or _summary(rule, finding), "description": finding.detail}
        if finding.value is not None:
            notes["value"] = _fmt(finding.value)
        if finding.forecast_at is not None and finding.forecast_mean is not None:
            notes["forecast"] = (
                f"{finding.model}: {_fmt(finding.forecast_mean)} at {_iso(finding.forecast_at)} "
                f"({_fmt(finding.forecast_lower or 0.0)} to {_fmt(finding.forecast_upper or 0.0)})"
            )
        if finding.crossing_at is not None:
            notes["expected_crossing"] = _iso(finding.crossing_at) or ""
            crossing_in = max(0.0, finding.crossing_at - evaluation.at)
            notes["crossing_in_seconds"] = f"{crossing_in:.0f}"  # for machines; "in" for people
            notes["crossing_in"] = for_people(crossing_in)
        if rule.threshold is not None:
            notes["threshold"] = f"{rule.direction} {_fmt(rule.threshold)}"
        if finding.score is not None:
            notes["anomaly_score"] = f"{finding.score:.3f}"
        if finding.warming_up:  # the early median/MAD score: more false alarms than the model's
            notes["warming_up"] = "true"
        found.append((MappingProxyType(labels), MappingProxyType(notes)))
    return found


def _summary(rule: Rule, finding: Finding) -> str:
    if rule.kind == "anomaly":
        return f"{rule.source} is anomalous (score {finding.score or 0.0:.2f})"
    assert rule.threshold is not None
    when = _iso(finding.crossing_at) if finding.crossing_at is not None else "soon"
    return f"{rule.source} is forecast to go {rule.direction} {_fmt(rule.threshold)} by {when}"


# -- adapters ---------------------------------------------------------------------------------


class Source(Protocol):
    """Where a rule's series come from."""

    async def fetch(self, rule: Rule, *, now: float) -> list[Series]: ...


class PrometheusSource:
    """A rule's PromQL over its lookback, as a range query."""

    def __init__(self, client: PrometheusClient) -> None:
        self.client = client

    async def fetch(self, rule: Rule, *, now: float) -> list[Series]:
        if rule.query is None:
            raise SourceUnavailable(f"rule {rule.name!r} has no PromQL query")
        start = now - rule.lookback_seconds
        return await self.client.query_range(
            rule.query, start=start, end=now, step=rule.step_seconds
        )


class SpendReader(Protocol):
    """What the ledger source needs: a team's spend in micro-USD per hour of this month."""

    async def hourly_team_spend(self, team: str, *, now: float) -> list[tuple[float, int]]: ...


class SeriesReader(Protocol):
    """What the ledger source needs for the other ledger metrics (``citadel.alerting.ledger``)."""

    async def series(
        self, query: LedgerQuery, *, step: float, lookback: float, now: float
    ) -> list[Series]: ...


class LedgerSource:
    """Ledger queries: ``team_spend`` is the team's month-to-date spend in USD, hour by hour
    (each point at the end of its hour, the current hour included so far); the other metrics
    (per model, and each team's budget use) come from ``metrics``."""

    def __init__(self, reader: SpendReader | None, metrics: SeriesReader | None = None) -> None:
        self.reader = reader
        self.metrics = metrics

    async def fetch(self, rule: Rule, *, now: float) -> list[Series]:
        if rule.ledger is None:
            raise SourceUnavailable(f"rule {rule.name!r} has no ledger query")
        if rule.ledger.metric != "team_spend":
            if self.metrics is None:
                raise SourceUnavailable(
                    f"ledger metric {rule.ledger.metric} is not available: no usage ledger "
                    "database is configured (metering.database or accounts.database)"
                )
            return await self.metrics.series(
                rule.ledger, step=rule.step_seconds, lookback=rule.lookback_seconds, now=now
            )
        assert rule.ledger.team is not None
        if self.reader is None:
            raise SourceUnavailable(
                "ledger queries are not available: no usage ledger database is configured "
                "(metering.database or accounts.database)"
            )
        hours = await self.reader.hourly_team_spend(rule.ledger.team, now=now)
        times: list[float] = []
        values: list[float] = []
        total = 0
        for hour, micros in hours:
            total += micros
            times.append(min(hour + 3600.0, now))
            values.append(total / 1e6)
        labels = MappingProxyType({"team": rule.ledger.team, "metric": rule.ledger.metric})
        return [Series(labels=labels, times=tuple(times), values=tuple(values))]


def alert_event(rule: Rule, alert: Alert) -> dict[str, Any]:
    """An alert that started firing or resolved, as the event feed shows it."""
    return {
        "kind": "alert",
        "state": alert.state,
        "rule": rule.name,
        "severity": rule.severity,
        "labels": dict(alert.labels),
        "annotations": dict(alert.annotations),
        "starts_at": alert.starts_at,
        "ends_at": alert.ends_at if alert.state == "resolved" else None,
        "fingerprint": alert.fingerprint,
    }


def next_tick(elapsed: float, interval: float) -> tuple[int, int | float]:
    """After a round of ``elapsed`` seconds: the interval ticks it overran (skipped, not run
    late) and how long to wait for the next tick."""
    return int(elapsed // interval), interval - elapsed % interval


@dataclass(kw_only=True)
class Scheduler:
    """Evaluates every rule on an interval and delivers the alerts (the I/O around Evaluator)."""

    settings: AlertingSettings
    evaluator: Evaluator
    sources: Mapping[str, Source]  # "prometheus" and "ledger"
    book: AlertBook
    notifier: AlertmanagerClient | None
    registry: Registry = field(default_factory=Registry)
    clock: Callable[[], float] = time.time
    generator_url: str = ""
    latest: dict[str, Evaluation] = field(default_factory=dict)
    last_run: float | None = None
    rounds: int = 0  # evaluation rounds of ``run`` completed
    rounds_skipped: int = 0  # interval ticks passed over because a round outlasted them
    last_round_seconds: float | None = None
    in_round: bool = False
    # Each alert that starts firing or resolves, as a JSON object (the event feed's ``alerts``
    # topic); re-sends of an alert still firing are not events.
    events: Callable[[dict[str, Any]], None] | None = None
    concurrency: int = 1  # rules evaluated at once (the app: the fit processes, at least 2)
    monotonic: Callable[[], float] = time.monotonic  # the round timer (a test injects one)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    # A rule's state as /health shows it, made once per evaluation (in the evaluation's thread,
    # not on the event loop) from the evaluation and the rule's models; kept in ``described``.
    describe: Describe | None = None
    described: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._round = asyncio.Lock()
        self._skipped = self.registry.counter(ALERTING_ROUNDS_SKIPPED)
        self._skipped.inc((), 0.0)  # shown at 0 from the start
        self._evaluations = self.registry.counter(ALERTING_EVALUATIONS)
        self._duration = self.registry.histogram(ALERTING_EVALUATION_DURATION)
        self._model_error = self.registry.gauge(ALERTING_MODEL_ERROR)
        self._firing = self.registry.gauge(ALERTING_ALERTS_FIRING)

    def _decide(
        self, rule: Rule, series: Sequence[Series] | None, error: str | None, now: float
    ) -> tuple[Evaluation, dict[str, tuple[ModelState, ...]]]:
        """The evaluation of ``series`` (or the read's ``error``), the rule's models after it,
        and its /health description: everything a rule costs besides its read and its alerts,
        so that it runs off the event loop."""
        if series is None:
            evaluation = Evaluation(rule=rule, at=now, error=error)
        else:
            try:
                evaluation = self.evaluator.evaluate(rule, series, now=now)
            except (CitadelError, OSError) as exc:
                evaluation = Evaluation(rule=rule, at=now, error=str(exc))
            except Exception as exc:  # a model bug must not stop the other rules
                _log.exception("rule evaluation failed", extra={"rule": rule.name})
                evaluation = Evaluation(rule=rule, at=now, error=f"{type(exc).__name__}: {exc}")
        models = self.evaluator.models_of(rule.name)
        if self.describe is not None:
            self.described[rule.name] = self.describe(evaluation, models)
        return evaluation, models

    async def evaluate(self, rule: Rule, *, now: float) -> Evaluation:
        """Read, decide and deliver one rule; never raises for a failed source or model."""
        started = time.perf_counter()
        source = self.sources.get("ledger" if rule.ledger is not None else "prometheus")
        series: list[Series] | None = None
        error: str | None = None
        try:
            if source is None:
                raise SourceUnavailable(f"no source for rule {rule.name!r}")
            series = await source.fetch(rule, now=now)
        except (CitadelError, OSError) as exc:
            error = str(exc)
        except Exception as exc:  # a source bug must not stop the other rules
            _log.exception("rule read failed", extra={"rule": rule.name})
            error = f"{type(exc).__name__}: {exc}"
        evaluation, models = await asyncio.to_thread(self._decide, rule, series, error, now)
        duration = time.perf_counter() - started
        evaluation = Evaluation(
            rule=rule,
            at=now,
            findings=evaluation.findings,
            error=evaluation.error,
            duration=duration,
        )
        self.latest[rule.name] = evaluation
        self._evaluations.inc((rule.name, evaluation.outcome))
        self._duration.observe((rule.name,), duration)
        if evaluation.error is None:  # a failed read is not a resolution
            fired = alerts_of(evaluation)
            self._firing.set((rule.name, rule.severity), float(len(fired)))
            sends = self.book.update(rule.name, fired, now=now, generator_url=self.generator_url)
            if sends and self.notifier is not None:
                self.notifier.submit(sends)
            if sends and self.events is not None:
                for alert in sends:
                    if alert.state == "resolved" or alert.starts_at == now:
                        self.events(alert_event(rule, alert))
        for states in models.values():
            for state in states:
                if state.backtest_error is not None and state.selected:
                    self._model_error.set((rule.name, state.name), state.backtest_error)
        return evaluation

    async def evaluate_all(self) -> list[Evaluation]:
        """One round: every rule at one ``now``, ``concurrency`` rules at a time (each in a
        thread, its fits in the fit processes). Rounds never overlap: a round asked for while
        one runs (``POST /v1/evaluate``) waits for it."""
        async with self._round:
            now = self.clock()
            self.last_run = now
            gate = asyncio.Semaphore(max(1, self.concurrency))

            async def one(rule: Rule) -> Evaluation:
                async with gate:
                    return await self.evaluate(rule, now=now)

            return list(await asyncio.gather(*(one(rule) for rule in self.settings.rules)))

    async def run(self) -> None:
        """Evaluate every rule each interval until cancelled. A round that outlasts the interval
        skips the ticks it overran (counted in ``rounds_skipped`` and the skipped-rounds metric)
        and the next round starts at the next tick, so slow rounds never pile up nor run back to
        back."""
        interval = self.settings.interval_seconds
        while True:
            started = self.monotonic()
            self.in_round = True
            try:
                await self.evaluate_all()
            finally:
                self.in_round = False
            elapsed = self.monotonic() - started
            self.rounds += 1
            self.last_round_seconds = elapsed
            skipped, wait = next_tick(elapsed, interval)
            self.rounds_skipped += skipped
            if skipped:
                self._skipped.inc((), skipped)
            await self.sleep(wait)

    def round_state(self) -> dict[str, object]:
        """For /health: rounds completed and skipped, the last one's duration, and whether the
        first round is still running (it fits every model, so it may take longest)."""
        return {
            "completed": self.rounds,
            "skipped": self.rounds_skipped,
            "last_seconds": self.last_round_seconds,
            "first_in_progress": self.in_round and self.rounds == 0,
            "in_progress": self.in_round,
        }
