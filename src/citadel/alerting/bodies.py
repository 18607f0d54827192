"""The predictive-alerting API's replies, as ``msgspec.Struct``s: one definition gives the
OpenAPI schema and the encoding. Times are RFC 3339 UTC strings to the second
(``2026-12-02T08:00:00Z``); a number that is not finite (a 0/0 ratio from Prometheus) is null."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from citadel.alerting.alertmanager import Alert, AlertmanagerClient
from citadel.alerting.definitions import Direction, Kind, Rule, Severity
from citadel.alerting.engine import Evaluation, Finding, Outcome
from citadel.alerting.selector import ModelState

__all__ = [
    "AlertReply",
    "AlertsListing",
    "DeliveryReply",
    "EvaluationReply",
    "RoundsReply",
    "RuleReply",
    "RuleStateReply",
    "iso",
]

Time = Annotated[str, Meta(description="RFC 3339, UTC")]
Number = Annotated[float | None, Meta(description="null when not finite")]


def iso(when: float | None) -> str | None:
    """``2026-12-02T08:00:00Z``, or None."""
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class LedgerReply(msgspec.Struct):
    metric: str
    team: str | None


class RuleReply(msgspec.Struct):
    name: str
    kind: Kind
    query: Annotated[str | None, Meta(description="PromQL; null for a ledger rule")]
    ledger: LedgerReply | None
    threshold: float | None
    direction: Direction
    horizon_seconds: Annotated[float | None, Meta(description="null: until the month's end")]
    lookback_seconds: float
    step_seconds: float
    min_points: int
    model: str
    score_threshold: float
    severity: Severity
    labels: dict[str, str]
    summary: str
    default: Annotated[bool, Meta(description="one of the service's default rules")]

    @classmethod
    def of(cls, rule: Rule) -> RuleReply:
        ledger = rule.ledger
        return cls(
            name=rule.name,
            kind=rule.kind,
            query=rule.query,
            ledger=None if ledger is None else LedgerReply(ledger.metric, ledger.team),
            threshold=rule.threshold,
            direction=rule.direction,
            horizon_seconds=rule.horizon_seconds,
            lookback_seconds=rule.lookback_seconds,
            step_seconds=rule.step_seconds,
            min_points=rule.min_points,
            model=rule.model,
            score_threshold=rule.score_threshold,
            severity=rule.severity,
            labels=dict(rule.labels),
            summary=rule.summary,
            default=rule.default,
        )


class ForecastReply(msgspec.Struct):
    """The forecast at the end of the horizon, and its interval."""

    at: Time | None
    mean: Number
    lower: Number
    upper: Number


class FindingReply(msgspec.Struct):
    """The decision for one series, and why."""

    series: Annotated[dict[str, str], Meta(description="the series' labels")]
    outcome: Annotated[Outcome, Meta(description="ok, firing, insufficient_history or error")]
    detail: str
    points: int
    value: Annotated[float | None, Meta(description="the last sample")]
    model: Annotated[str | None, Meta(description="the forecasting model used")]
    crossing_at: Annotated[Time | None, Meta(description="when the forecast crosses")]
    forecast: ForecastReply | None
    score: Annotated[float | None, Meta(description="anomaly rules: the score in [0, 1]")]
    warming_up: Annotated[
        bool,
        Meta(
            description="anomaly rules: the detector is still warming up (its first 150 rows): "
            "the score is the early median/MAD score, not the full model's"
        ),
    ]

    @classmethod
    def of(cls, finding: Finding) -> FindingReply:
        forecast = None
        if finding.forecast_at is not None:
            forecast = ForecastReply(
                at=iso(finding.forecast_at),
                mean=_finite(finding.forecast_mean),
                lower=_finite(finding.forecast_lower),
                upper=_finite(finding.forecast_upper),
            )
        return cls(
            series=dict(finding.series),
            outcome=finding.outcome,
            detail=finding.detail,
            points=finding.points,
            value=_finite(finding.value),
            model=finding.model,
            crossing_at=iso(finding.crossing_at),
            forecast=forecast,
            score=_finite(finding.score),
            warming_up=finding.warming_up,
        )


class EvaluationReply(msgspec.Struct):
    """One evaluation of one rule: a finding per series, or the error that prevented it."""

    rule: str
    kind: Annotated[Kind, Meta(description="forecast or anomaly")]
    source: Annotated[str, Meta(description="the PromQL, or ledger:METRIC(...)")]
    threshold: float | None
    direction: Direction
    severity: Severity
    at: Time | None
    outcome: Annotated[
        Outcome,
        Meta(
            description="the rule's outcome: error, else firing if any series fires, else the "
            "most hopeful (ok, insufficient_history)"
        ),
    ]
    error: str | None
    duration_seconds: float
    findings: list[FindingReply]

    @classmethod
    def of(cls, evaluation: Evaluation) -> EvaluationReply:
        rule = evaluation.rule
        return cls(
            rule=rule.name,
            kind=rule.kind,
            source=rule.source,
            threshold=rule.threshold,
            direction=rule.direction,
            severity=rule.severity,
            at=iso(evaluation.at),
            outcome=evaluation.outcome,
            error=evaluation.error,
            duration_seconds=evaluation.duration,
            findings=[FindingReply.of(f) for f in evaluation.findings],
        )


class AlertReply(msgspec.Struct):
    """A firing alert as it was sent to Alertmanager (API v2 field names)."""

    labels: dict[str, str]
    annotations: dict[str, str]
    startsAt: Time  # noqa: N815 - Alertmanager's name
    endsAt: Time  # noqa: N815 - Alertmanager's name
    generatorURL: str | msgspec.UnsetType = msgspec.UNSET  # noqa: N815 - Alertmanager's name
    status: Literal["firing"] = "firing"

    @classmethod
    def of(cls, alert: Alert) -> AlertReply:
        wire = alert.to_json()
        return cls(
            labels=wire["labels"],
            annotations=wire["annotations"],
            startsAt=wire["startsAt"],
            endsAt=wire["endsAt"],
            generatorURL=wire.get("generatorURL", msgspec.UNSET),
        )


class DeliveryReply(msgspec.Struct):
    """The queue of alerts to Alertmanager."""

    alertmanager: str
    queued: int
    dropped: int
    failures: int
    retry_in_seconds: float
    last_error: str | None
    last_success: Time | None

    @classmethod
    def of(cls, notifier: AlertmanagerClient) -> DeliveryReply:
        return cls(
            alertmanager=notifier.url,
            queued=notifier.queued,
            dropped=notifier.dropped,
            failures=notifier.failures,
            retry_in_seconds=notifier.backoff,
            last_error=notifier.last_error,
            last_success=iso(notifier.last_success),
        )


class AlertsListing(msgspec.Struct):
    data: list[AlertReply]
    delivery: Annotated[DeliveryReply | None, Meta(description="null: no ALERTMANAGER_ENDPOINT")]
    object: Literal["list"] = "list"


class ModelReply(msgspec.Struct):
    """One forecasting model of one series; ``backtest_error`` is MASE against seasonal naive."""

    model: str
    available: bool
    selected: bool
    trained_at: Time | None
    points_seen: int
    backtest_error: float | None
    last_failure: str | None

    @classmethod
    def of(cls, state: ModelState) -> ModelReply:
        return cls(
            model=state.name,
            available=state.available,
            selected=state.selected,
            trained_at=iso(state.trained_at),
            points_seen=state.points_seen,
            backtest_error=_finite(state.backtest_error),
            last_failure=state.last_failure,
        )


class RuleStateReply(msgspec.Struct):
    """A rule as /health shows it: its last outcome and its models, by series."""

    rule: str
    kind: Kind
    outcome: Outcome | Literal["pending"]
    error: str | None
    models: dict[str, list[ModelReply]]


class RoundsReply(msgspec.Struct):
    """The evaluation loop as /health shows it."""

    completed: int
    skipped: Annotated[int, Meta(description="interval ticks passed over by rounds that overran")]
    last_seconds: Annotated[float | None, Meta(description="the last round's duration")]
    in_progress: Annotated[bool, Meta(description="a round is running")]
    first_in_progress: Annotated[
        bool, Meta(description="the first round (which fits every model) is still running")
    ]
