"""Scale of evaluation: a forecast rule keeps its fitted model and refits it on a schedule or when
its forecast drifts (not every round); fits run in worker processes; a round that outlasts its
interval skips ticks (counted in /metrics); rounds never overlap. Time is passed in (``now``, the
scheduler's injected round timer and sleep), so these are deterministic."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

import pytest

from citadel.alerting.alertmanager import AlertBook
from citadel.alerting.definitions import Rule, parse_alerting
from citadel.alerting.engine import Evaluator, PoolFitter, Scheduler, next_tick
from citadel.alerting.forecast import Forecast, LinearForecaster
from citadel.alerting.prometheus import Series
from citadel.alerting.selector import Selector
from citadel.errors import ConfigError
from citadel.metrics import Registry

NOW = 1_700_000_000.0


def rule(**fields: Any) -> Rule:
    raw = {"name": "Rising", "kind": "forecast", "query": "x", "threshold": 1000,
           "horizon_seconds": 60, "step_seconds": 1, "lookback_seconds": 60, "min_points": 5,
           "model": "linear", **fields}  # fmt: skip
    return parse_alerting({"rules": [raw]}).rules[0]


def ramp(
    now: float, slope: float = 1.0, points: int = 60, jump_after: float | None = None
) -> Series:
    times = tuple(now - points + 1 + i for i in range(points))
    values = tuple(
        (t - NOW) + (500.0 if jump_after is not None and t > jump_after else 0.0) for t in times
    )
    return Series(labels={"job": "gw"}, times=times, values=values)


def test_the_model_is_refitted_on_its_schedule_not_every_round() -> None:
    evaluator = Evaluator(refit_seconds=300.0)
    target = rule()
    crossings = []
    for k in range(10):  # every 30 s for 270 s: one fit, then forecasts from it
        now = NOW + 30 * k
        [finding] = evaluator.evaluate(target, [ramp(now)], now=now).findings
        crossings.append(finding.crossing_at)
    assert 1 == evaluator.fits
    assert all(c is None for c in crossings)  # 1000 is reached at NOW + 1000: beyond 60 s
    evaluator.evaluate(target, [ramp(NOW + 300)], now=NOW + 300)
    assert 2 == evaluator.fits  # the schedule: 300 s after the first fit
    evaluator.evaluate(target, [ramp(NOW + 330)], now=NOW + 330)
    assert 2 == evaluator.fits


def test_the_kept_fit_forecasts_from_now_and_crosses_where_a_refit_would() -> None:
    kept = Evaluator(refit_seconds=300.0)
    fresh = Evaluator(refit_seconds=0.0)  # every round refits, as before
    target = rule(horizon_seconds=1000)
    kept.evaluate(target, [ramp(NOW)], now=NOW)
    now = NOW + 120
    [a] = kept.evaluate(target, [ramp(now)], now=now).findings
    [b] = fresh.evaluate(target, [ramp(now)], now=now).findings
    assert (1, 1) == (kept.fits, fresh.fits)
    assert a.crossing_at is not None
    assert b.crossing_at is not None
    assert abs(a.crossing_at - (NOW + 1000)) <= 2
    assert abs(a.crossing_at - b.crossing_at) <= 2
    assert a.forecast_at is not None
    assert now < a.forecast_at <= now + 1000 + 1


def test_a_forecast_that_drifts_off_the_new_samples_is_refitted_early() -> None:
    evaluator = Evaluator(refit_seconds=300.0)
    target = rule()
    evaluator.evaluate(target, [ramp(NOW)], now=NOW)
    evaluator.evaluate(target, [ramp(NOW + 30)], now=NOW + 30)
    assert 1 == evaluator.fits  # on the line: kept
    jumped = ramp(NOW + 60, jump_after=NOW + 40)  # +500 from 40 s on: far off the forecast
    [finding] = evaluator.evaluate(target, [jumped], now=NOW + 60).findings
    assert 2 == evaluator.fits
    assert "ok" == finding.outcome
    [states] = evaluator.models()["Rising"].values()
    assert NOW + 60 == states[0].trained_at  # refitted at this round, 60 s after the first


class PidLinear(LinearForecaster):
    """The robust line, remembering the process that fitted it."""

    def fit(self, times: Any, values: Any) -> None:
        super().fit(times, values)
        self.pid = os.getpid()


class Broken(LinearForecaster):
    name = "broken"

    def fit(self, times: Any, values: Any) -> None:
        raise ValueError("cannot fit here")


def selectors(candidate: type[LinearForecaster]) -> Any:
    return lambda rule, steps, reselect: Selector([candidate], horizon=min(steps, 12))


def test_fits_run_in_a_worker_process_and_a_failure_comes_back_as_the_rules_error() -> None:
    fitter = PoolFitter(1)
    try:
        evaluator = Evaluator(
            refit_seconds=300.0, fitter=fitter, selector_factory=selectors(PidLinear)
        )
        [finding] = evaluator.evaluate(rule(), [ramp(NOW)], now=NOW).findings
        assert "ok" == finding.outcome, finding.detail
        [selector] = evaluator._selectors["Rising"].values()
        model = selector._model
        assert isinstance(model, PidLinear)
        assert model.pid != os.getpid()  # fitted in the worker, sent back
        [states] = evaluator.models()["Rising"].values()
        assert states[0].trained_at == NOW
        assert 60 == states[0].points_seen
        broken = Evaluator(fitter=fitter, selector_factory=selectors(Broken))
        [failed] = broken.evaluate(rule(), [ramp(NOW)], now=NOW).findings
        assert "error" == failed.outcome
        assert "cannot fit here" in failed.detail
        [states] = broken.models()["Rising"].values()
        assert "cannot fit here" in (states[0].last_failure or "")  # kept from the worker
    finally:
        fitter.close()


def test_fit_processes_and_refit_seconds_are_settings_with_clear_errors() -> None:
    parsed = parse_alerting({"fit_processes": 3, "refit_seconds": 60})
    assert (3, 60.0) == (parsed.fit_processes, parsed.refit_seconds)
    assert (1, 300.0) == (parse_alerting({}).fit_processes, parse_alerting({}).refit_seconds)
    for bad in (-1, 1.5, True, 65):
        with pytest.raises(ConfigError, match=r"alerting\.fit_processes"):
            parse_alerting({"fit_processes": bad})
    with pytest.raises(ConfigError, match=r"alerting\.refit_seconds"):
        parse_alerting({"refit_seconds": -5})


def test_next_tick_skips_the_ticks_a_round_overran() -> None:
    assert (0, 20.0) == next_tick(10.0, 30.0)
    assert (2, 15.0) == next_tick(75.0, 30.0)
    assert (1, 30.0) == next_tick(30.0, 30.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if len(self.slept) >= 2:
            raise asyncio.CancelledError
        self.now += seconds


class Advancing:
    """A source whose every fetch takes ``seconds`` of the injected clock."""

    def __init__(self, clock: Clock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    async def fetch(self, rule: Rule, *, now: float) -> list[Series]:
        self.clock.now += self.seconds
        return [ramp(NOW)]


def test_a_slow_round_skips_ticks_and_counts_them_in_the_metric() -> None:
    clock = Clock()
    registry = Registry()
    slow = {"name": "Slow", "kind": "forecast", "query": "x", "threshold": 1e9, "min_points": 5}
    scheduler = Scheduler(
        settings=parse_alerting({"interval_seconds": 30, "rules": [slow]}),
        evaluator=Evaluator(),
        sources={"prometheus": Advancing(clock, 75.0)},
        book=AlertBook(resend_seconds=60, valid_seconds=240),
        notifier=None,
        registry=registry,
        clock=lambda: NOW,
        monotonic=lambda: clock.now,
        sleep=clock.sleep,
    )
    assert "citadel_alerting_rounds_skipped_total 0" in registry.render().decode()
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(scheduler.run())
    assert [15.0, 15.0] == clock.slept  # to the next tick after each 75 s round
    assert (2, 4) == (scheduler.rounds, scheduler.rounds_skipped)
    assert "citadel_alerting_rounds_skipped_total 4" in registry.render().decode()


class Gate:
    """A source that holds every fetch until released, counting fetches in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.inflight = 0
        self.most = 0

    async def fetch(self, rule: Rule, *, now: float) -> list[Series]:
        self.inflight += 1
        self.most = max(self.most, self.inflight)
        await self.release.wait()
        self.inflight -= 1
        return [ramp(NOW)]


def test_rounds_never_overlap_and_rules_run_concurrently_within_one() -> None:
    async def test() -> None:
        gate = Gate()
        rules = [{"name": f"R{i}", "kind": "forecast", "query": "x", "threshold": 1e9,
                  "min_points": 5, "model": "linear"} for i in range(3)]  # fmt: skip
        scheduler = Scheduler(
            settings=parse_alerting({"rules": rules}),
            evaluator=Evaluator(),
            sources={"prometheus": gate},
            book=AlertBook(resend_seconds=60, valid_seconds=240),
            notifier=None,
            clock=lambda: NOW,
            concurrency=2,
        )
        first = asyncio.create_task(scheduler.evaluate_all())
        second = asyncio.create_task(scheduler.evaluate_all())  # POST /v1/evaluate meanwhile
        await asyncio.sleep(0.05)
        assert 2 == gate.inflight  # two rules of the first round at once; none of the second
        gate.release.set()
        done = await asyncio.gather(first, second)
        assert [3, 3] == [len(d) for d in done]
        assert 2 == gate.most

    asyncio.run(test())


def test_forecast_from_cuts_the_steps_already_past() -> None:
    selector = Selector([LinearForecaster], horizon=5)
    series = ramp(NOW)
    selector.fit(series.times, series.values, now=NOW)
    later: Forecast = selector.forecast_from(NOW + 10.5, 5)
    assert NOW + 11 == later.times[0]
    assert NOW + 10.5 + 5 <= later.times[-1] <= NOW + 10.5 + 6  # the horizon from now, covered
    assert abs(later.mean[0] - 11.0) < 0.5


def test_a_history_too_short_to_backtest_is_refitted_every_round() -> None:
    """With no backtest error there is no drift to judge a kept fit by: it is refitted."""
    evaluator = Evaluator(refit_seconds=300.0)
    for k in range(3):
        now = NOW + 30 * k
        evaluator.evaluate(rule(), [ramp(now, points=10)], now=now)
    assert 3 == evaluator.fits
