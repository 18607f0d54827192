"""Tests for rule evaluation: forecast crossings, anomalies, short history, and the scheduler."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

from citadel.alerting.alertmanager import AlertBook
from citadel.alerting.definitions import Rule, parse_alerting
from citadel.alerting.engine import (
    Evaluation,
    Evaluator,
    Finding,
    LedgerSource,
    Scheduler,
    alerts_of,
    month_end,
)
from citadel.alerting.prometheus import Series
from citadel.metrics import Registry

NOW = 1_700_000_000.0


def forecast_rule(**fields: Any) -> Rule:
    raw = {"name": "Requests", "kind": "forecast", "query": "sum(x)", "threshold": 100,
           "horizon_seconds": 60, "step_seconds": 1, "lookback_seconds": 30, "min_points": 5,
           "model": "linear", "labels": {"team": "platform"}, **fields}  # fmt: skip
    return parse_alerting({"rules": [raw]}).rules[0]


def line(slope: float, start: float = 0.0, points: int = 30) -> Series:
    times = tuple(NOW - points + 1 + i for i in range(points))
    return Series(
        labels={"job": "gw"}, times=times, values=tuple(start + slope * i for i in range(points))
    )


def test_a_forecast_crossing_within_the_horizon_fires_with_its_explanation() -> None:
    """A rising line that will pass the threshold inside the horizon fires, saying when."""
    evaluation = Evaluator().evaluate(forecast_rule(), [line(2.0)], now=NOW)
    [finding] = evaluation.findings
    assert "firing" == finding.outcome == evaluation.outcome
    assert finding.crossing_at is not None
    # 58 now, +2 per second: 100 is reached 21 s later.
    assert abs(finding.crossing_at - (NOW + 21)) <= 1.5
    assert "linear" == finding.model
    assert "crosses above 100" in finding.detail
    [(labels, notes)] = alerts_of(evaluation)
    assert {
        "alertname": "Requests",
        "severity": "warning",
        "team": "platform",
        "job": "gw",
    } == dict(labels)
    assert {"summary", "description", "forecast", "expected_crossing", "threshold"} <= set(notes)


def test_a_crossing_beyond_the_horizon_or_a_flat_series_does_not_fire() -> None:
    """No crossing inside the horizon is ok; so is a flat series below the threshold."""
    slow = Evaluator().evaluate(forecast_rule(horizon_seconds=10), [line(2.0)], now=NOW)
    flat = Evaluator().evaluate(forecast_rule(), [line(0.0, start=50)], now=NOW)
    assert ["ok", "ok"] == [slow.findings[0].outcome, flat.findings[0].outcome]
    assert "no crossing above 100 within 10 s" in slow.findings[0].detail
    assert [] == alerts_of(flat)


def test_a_series_already_past_the_threshold_fires_now_and_below_works_too() -> None:
    """Already beyond the threshold is a crossing now; direction below watches falls."""
    past = Evaluator().evaluate(forecast_rule(threshold=10), [line(0.0, start=50)], now=NOW)
    falling = Evaluator().evaluate(
        forecast_rule(threshold=20, direction="below"), [line(-1.0, start=50)], now=NOW
    )
    assert NOW == past.findings[0].crossing_at
    assert "firing" == falling.findings[0].outcome


def test_too_little_history_is_a_state_not_a_crash() -> None:
    """Fewer points than min_points is insufficient_history, with what was missing."""
    evaluation = Evaluator().evaluate(forecast_rule(min_points=10), [line(1.0, points=4)], now=NOW)
    [finding] = evaluation.findings
    assert "insufficient_history" == finding.outcome == evaluation.outcome
    assert "insufficient history: 4 points, at least 10 needed" in finding.detail
    assert "insufficient_history" == Evaluator().evaluate(forecast_rule(), [], now=NOW).outcome


def test_model_state_is_kept_per_series() -> None:
    """After an evaluation the rule's model reports when it trained and on how many points."""
    evaluator = Evaluator()
    evaluator.evaluate(forecast_rule(), [line(2.0)], now=NOW)
    [[state]] = [list(states) for states in evaluator.models()["Requests"].values()]
    assert ("linear", NOW, 30, True) == (
        state.name,
        state.trained_at,
        state.points_seen,
        state.selected,
    )


class Spike:
    """A stand-in detector: score 1 for a value far from the running mean, else 0."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def update(self, timestamp: float, value: float) -> float:
        mean = sum(self.values) / len(self.values) if self.values else value
        self.values.append(value)
        return 1.0 if abs(value - mean) > 10 else 0.0


def test_anomaly_rules_feed_only_new_samples_and_fire_on_the_score() -> None:
    """Each sample reaches the detector once; a score at the threshold fires."""
    rule = parse_alerting(
        {"rules": [{"name": "Odd", "kind": "anomaly", "query": "x", "min_points": 3}]}
    ).rules[0]
    evaluator = Evaluator(detector_factory=Spike)
    calm = Series(labels={}, times=(1.0, 2.0, 3.0), values=(5.0, 5.0, 5.0))
    assert "ok" == evaluator.evaluate(rule, [calm], now=3.0).findings[0].outcome
    spiked = Series(labels={}, times=(2.0, 3.0, 4.0), values=(5.0, 5.0, 50.0))
    [finding] = evaluator.evaluate(rule, [spiked], now=4.0).findings
    assert ("firing", 1.0, 4) == (finding.outcome, finding.score, finding.points)
    assert "anomaly_score" in alerts_of(evaluator.evaluate(rule, [spiked], now=5.0))[0][1]


def test_an_anomaly_finding_says_the_detector_is_warming_up() -> None:
    """The default detector's findings are marked warming up (and say with what) for its first
    150 rows, then not."""
    from citadel.alerting.anomaly import default_detector

    rule = parse_alerting(
        {"rules": [{"name": "Odd", "kind": "anomaly", "query": "x", "min_points": 20}]}
    ).rules[0]
    evaluator = Evaluator(detector_factory=default_detector)
    values = tuple(10.0 + (i % 7) * 0.1 for i in range(200))

    def at(n: int) -> Finding:
        series = Series(labels={}, times=tuple(float(t) for t in range(n)), values=values[:n])
        [finding] = evaluator.evaluate(rule, [series], now=float(n)).findings
        return finding

    early = at(30)
    assert ("ok", True) == (early.outcome, early.warming_up)
    assert "warming up (30 of 150 rows; learning, the early score starts after 60)" in early.detail
    scored = at(100)
    assert scored.warming_up
    assert "early median/MAD score" in scored.detail
    full = at(200)
    assert not full.warming_up
    assert "warming up" not in full.detail


def test_month_end_is_the_next_calendar_month() -> None:
    """month_end is the first instant of the next month in the given zone."""
    mid = datetime(2024, 12, 15, 12, tzinfo=UTC).timestamp()
    assert datetime(2025, 1, 1, tzinfo=UTC).timestamp() == month_end(mid)


class Fixed:
    def __init__(self, series: list[Series] | Exception) -> None:
        self.series = series

    async def fetch(self, rule: Rule, *, now: float) -> list[Series]:
        if isinstance(self.series, Exception):
            raise self.series
        return self.series


def test_the_scheduler_fires_resolves_and_keeps_alerts_through_source_errors() -> None:
    """Firing sends the alert; a failed read leaves it; a clear condition resolves it."""
    from citadel.alerting.prometheus import PrometheusError

    async def test() -> None:
        settings = parse_alerting({"rules": [{"name": "Requests", "kind": "forecast",
            "query": "sum(x)", "threshold": 100, "horizon_seconds": 60, "step_seconds": 1,
            "min_points": 5, "model": "linear"}]})  # fmt: skip
        source = Fixed([line(2.0)])
        registry = Registry()
        book = AlertBook(resend_seconds=60, valid_seconds=240)
        scheduler = Scheduler(
            settings=settings,
            evaluator=Evaluator(),
            sources={"prometheus": source},
            book=book,
            notifier=None,
            registry=registry,
            clock=lambda: NOW,
        )
        [fired] = await scheduler.evaluate_all()
        assert "firing" == fired.outcome
        assert 1 == len(book.firing())
        source.series = PrometheusError("down")
        [failed] = await scheduler.evaluate_all()
        assert ("error", "down", 1) == (failed.outcome, failed.error, len(book.firing()))
        source.series = [line(0.0, start=10)]
        [cleared] = await scheduler.evaluate_all()
        assert ("ok", 0) == (cleared.outcome, len(book.firing()))
        text = registry.render().decode()
        for outcome in ("firing", "error", "ok"):
            assert (
                f'citadel_alerting_evaluations_total{{rule="Requests",outcome="{outcome}"}} 1.0'
                in text
            )
        assert "citadel_alerting_evaluation_duration_seconds_count" in text
        assert 'citadel_alerting_model_backtest_error{rule="Requests",model="linear"}' in text

    asyncio.run(test())


def test_ledger_rules_without_a_ledger_say_it_is_not_available() -> None:
    """A ledger rule with no usage ledger configured is an error naming why, not a crash."""

    async def test() -> Evaluation:
        settings = parse_alerting({"rules": [{"name": "Budget", "kind": "forecast",
            "ledger": {"metric": "team_spend", "team": "t1"}, "threshold": 5}]})  # fmt: skip
        scheduler = Scheduler(settings=settings, evaluator=Evaluator(),
            sources={"ledger": LedgerSource(None)},
            book=AlertBook(resend_seconds=60, valid_seconds=240), notifier=None)  # fmt: skip
        [evaluation] = await scheduler.evaluate_all()
        return evaluation

    evaluation = asyncio.run(test())
    assert "error" == evaluation.outcome
    assert "ledger queries are not available" in (evaluation.error or "")


class Hours:
    async def hourly_team_spend(self, team: str, *, now: float) -> list[tuple[float, int]]:
        return [(0.0, 1_000_000), (3600.0, 0), (7200.0, 2_500_000)]


def test_team_spend_is_cumulative_usd_at_each_hours_end() -> None:
    """The ledger source turns hourly micro-USD into month-to-date USD."""
    rule = parse_alerting({"rules": [{"name": "Budget", "kind": "forecast",
        "ledger": {"metric": "team_spend", "team": "t1"}, "threshold": 5}]}).rules[0]  # fmt: skip
    [series] = asyncio.run(LedgerSource(Hours()).fetch(rule, now=9000.0))
    assert (3600.0, 7200.0, 9000.0) == series.times
    assert (1.0, 1.0, 3.5) == series.values
    assert {"team": "t1", "metric": "team_spend"} == dict(series.labels)


class Slow:
    """A source that takes ``seconds`` to answer (a Prometheus under load)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    async def fetch(self, rule: Rule, *, now: float) -> list[Series]:
        self.calls += 1
        await asyncio.sleep(self.seconds)
        return [line(1.0)]


def test_a_round_longer_than_the_interval_skips_ticks_instead_of_piling_up() -> None:
    """Rounds of 0.25 s at a 0.1 s interval: each skips the ticks it overran, and /health's
    state says the first round is running until it ends."""

    async def test() -> None:
        settings = parse_alerting({"interval_seconds": 0.1, "rules": [{"name": "Slow",
            "kind": "forecast", "query": "x", "threshold": 1e9, "min_points": 5,
            "model": "linear"}]})  # fmt: skip
        source = Slow(0.25)
        scheduler = Scheduler(
            settings=settings,
            evaluator=Evaluator(),
            sources={"prometheus": source},
            book=AlertBook(resend_seconds=60, valid_seconds=240),
            notifier=None,
        )
        task = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.1)
        assert scheduler.round_state()["first_in_progress"] is True
        assert scheduler.round_state()["in_progress"] is True
        await asyncio.sleep(0.85)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        state = scheduler.round_state()
        assert state["first_in_progress"] is False
        assert state["in_progress"] is False
        assert 2 <= state["completed"] <= 3  # type: ignore[operator]
        assert source.calls <= 4  # not one round per 0.1 s tick
        assert 2 * state["completed"] <= state["skipped"]  # type: ignore[operator]
        assert 0.25 <= state["last_seconds"]  # type: ignore[operator]

    asyncio.run(test())


def office_hours_spend(hours: int) -> Series:
    """Month-to-date USD of a team that spends $2 an hour from 08:00 to 18:00, from 1 Nov."""
    start = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    times, values, total = [], [], 0.0
    for h in range(hours):
        total += 2.0 if 8 <= h % 24 < 18 else 0.0
        times.append(start + (h + 1) * 3600.0)
        values.append(total)
    return Series(labels={"team": "t1"}, times=tuple(times), values=tuple(values))


def test_month_to_date_spend_is_forecast_as_cumulative_never_below_what_is_spent() -> None:
    """Twenty days of office-hours spend ($400) forecast to the month's end by every model:
    about $600 (ten more days at $20), its interval never below the $400 already spent, and
    the horizon said in days, not as 2.56712e+06 s."""
    series = office_hours_spend(20 * 24)
    now = series.times[-1] + 60.0
    for model in ("linear", "arima", "ets", "auto"):
        rule = parse_alerting({"rules": [{"name": "Budget", "kind": "forecast", "model": model,
            "ledger": {"metric": "team_spend", "team": "t1"}, "threshold": 1000,
            "horizon_seconds": "month_end"}]}).rules[0]  # fmt: skip
        [finding] = Evaluator().evaluate(rule, [series], now=now).findings
        assert "ok" == finding.outcome, (model, finding.detail)
        assert finding.forecast_mean is not None
        assert finding.forecast_lower is not None
        assert 570 <= finding.forecast_mean <= 630, (model, finding.detail)
        assert 400.0 <= finding.forecast_lower, (model, finding.detail)
        assert finding.detail.endswith("within 10 days"), finding.detail


def test_a_cumulative_forecast_that_crosses_says_when_for_people() -> None:
    """Spend heading past its threshold fires; the annotations keep the seconds for machines
    and say the wait for people."""
    series = office_hours_spend(20 * 24)
    now = series.times[-1] + 60.0
    rule = parse_alerting({"rules": [{"name": "Budget", "kind": "forecast", "model": "linear",
        "ledger": {"metric": "team_spend", "team": "t1"}, "threshold": 500,
        "horizon_seconds": "month_end"}]}).rules[0]  # fmt: skip
    evaluation = Evaluator().evaluate(rule, [series], now=now)
    [finding] = evaluation.findings
    assert "firing" == finding.outcome, finding.detail
    [(_, notes)] = alerts_of(evaluation)
    seconds = float(notes["crossing_in_seconds"])
    assert 4 * 86400 < seconds < 6 * 86400, notes
    assert notes["crossing_in"].startswith(("4 days", "5 days")), notes
    assert "(in 4 days" in finding.detail or "(in 5 days" in finding.detail, finding.detail
