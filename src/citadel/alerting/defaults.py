"""The rules the predictive-alerting service evaluates out of the box, beside those citadel.yaml
adds: anomalies and latency forecasts on the gateway's own metrics, per model. Pure: no I/O.

- ``ModelRequestRateAnomaly``: each model's request rate, scored by the default detector.
- ``ModelErrorRatioAnomaly``: each model's 5xx ratio (models with no traffic in the window have
  no point, rather than a 0/0).
- ``ModelTtftForecast``: each model's p95 time to first token, forecast 30 minutes ahead against
  the TTFT objective of the SLOs (1 s unless ``slos:`` says otherwise); one rule per model when
  the objectives differ.

Without Prometheus (no ``endpoints.prometheus``) the same rules read the usage ledger instead
(``ledger.py``: requests per second, the 5xx ratio and the p95 time to first token per model, at
the evaluation interval, at most 15 s), and one more is added: ``TeamBudgetForecast``, each team's
month-to-date spend over its budget, forecast to the month's end against 1.0. With Prometheus the
team budget forecast is a Prometheus rule (``observability/rules.py``), one owner for each alert.
In citadel.yaml, ``alerting.defaults: false`` drops these rules, a list
of their names keeps only those, and a rule in ``alerting.rules`` with the same name replaces one.

The anomaly rules fire at the detector's alarm score (``ALARM_SCORE``: a deviation that beats its
record by the alarm ratio), the score at which ``RecordDetector`` itself starts its refractory
period, rather than at a threshold picked for these metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from types import MappingProxyType

from citadel import metrics as m
from citadel.alerting.anomaly import Params
from citadel.alerting.definitions import LedgerMetric, LedgerQuery, Rule, Severity
from citadel.observability.names import Slo

__all__ = ["ALARM_SCORE", "DEFAULT_NAMES", "LEDGER_ONLY", "default_rules"]

_ALARM = Params().refractory_ratio
ALARM_SCORE = round(_ALARM / (1.0 + _ALARM), 4)  # 0.5122: the detector's ratio -> score map
DEFAULT_NAMES = ("ModelRequestRateAnomaly", "ModelErrorRatioAnomaly", "ModelTtftForecast")
LEDGER_ONLY = ("TeamBudgetForecast",)  # defaults only without Prometheus

_REQUESTS = m.GATEWAY_REQUESTS.name
_TTFT = m.GATEWAY_TTFT.name
_RATE = f"sum by (model) (rate({_REQUESTS}[1m]))"
_LABELS = MappingProxyType({"source": "citadel-defaults"})


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _ttft(threshold: float, model: str | None) -> Rule:
    matcher = "" if model is None else f"{{model={_quoted(model)}}}"
    name = "ModelTtftForecast" if model is None else f"ModelTtftForecast:{model}"
    return Rule(
        name=name,
        kind="forecast",
        # >= 0 drops the NaN of a window without requests
        query=f"histogram_quantile(0.95, sum by (model, le) (rate({_TTFT}_bucket{matcher}[5m]))) "
        ">= 0",
        threshold=threshold,
        horizon_seconds=1800.0,
        lookback_seconds=3600.0,
        step_seconds=30.0,
        min_points=10,
        model="linear",
        severity="warning",
        labels=_LABELS,
        summary=f"p95 time to first token is forecast to pass {threshold:g} s (its SLO) "
        "within 30 minutes",
        default=True,
    )


def _anomaly(name: str, query: str, severity: Severity, what: str) -> Rule:
    return Rule(
        name=name,
        kind="anomaly",
        query=query,
        lookback_seconds=3600.0,
        step_seconds=15.0,
        min_points=20,
        score_threshold=ALARM_SCORE,
        severity=severity,
        labels=_LABELS,
        summary=f"A model's {what} is unlike its recent past",
        default=True,
    )


def _from_ledger(rule: Rule, metric: LedgerMetric, step: float) -> Rule:
    """The same rule over the usage ledger, at ``step``."""
    model = None
    if ":" in rule.name:
        model = rule.name.partition(":")[2]
    return replace(
        rule,
        query=None,
        ledger=LedgerQuery(metric=metric, model=model),
        step_seconds=step,
        lookback_seconds=max(rule.lookback_seconds, step * max(rule.min_points * 4, 60)),
    )


def _budget(step: float) -> Rule:
    return Rule(
        name="TeamBudgetForecast",
        kind="forecast",
        ledger=LedgerQuery(metric="team_budget_use"),
        threshold=1.0,
        horizon_seconds=None,  # until the end of the month
        lookback_seconds=max(6 * 3600.0, step * 60),
        step_seconds=step,
        min_points=6,
        model="linear",
        severity="warning",
        labels=_LABELS,
        summary="A team's spend is forecast to pass its monthly budget before the month ends",
        default=True,
    )


def default_rules(
    slos: Sequence[Slo], *, ledger: bool = False, interval_seconds: float = 30.0
) -> tuple[Rule, ...]:
    """The default rule set for these SLOs (``observability.names.default_slos`` without
    ``slos:``): PromQL, or without Prometheus (``ledger``) the usage ledger sampled at the
    evaluation interval (at most 15 s; the budget forecast at 5 intervals, at most 5 min)."""
    rules = [
        _anomaly("ModelRequestRateAnomaly", _RATE, "info", "request rate"),
        _anomaly(
            "ModelErrorRatioAnomaly",
            # a model with no 5xx has no numerator series: `or ... * 0` makes its ratio 0
            f'(sum by (model) (rate({_REQUESTS}{{status=~"5.."}}[1m])) or {_RATE} * 0) '
            f"/ ({_RATE} > 0)",
            "warning",
            "5xx ratio",
        ),
    ]
    thresholds = {slo.model: slo.threshold_seconds for slo in slos if slo.kind == "ttft"}
    if len(set(thresholds.values())) == 1:
        rules.append(_ttft(next(iter(thresholds.values())), None))
    else:
        rules.extend(_ttft(threshold, model) for model, threshold in sorted(thresholds.items()))
    if not ledger:
        return tuple(rules)
    step = min(15.0, interval_seconds)
    metrics: dict[str, LedgerMetric] = {
        "ModelRequestRateAnomaly": "model_request_rate",
        "ModelErrorRatioAnomaly": "model_error_ratio",
        "ModelTtftForecast": "model_ttft_p95",
    }
    found = [
        _from_ledger(
            rule,
            metrics[rule.name.partition(":")[0]],
            step if rule.kind == "anomaly" else min(30.0, interval_seconds),
        )
        for rule in rules
    ]
    return (*found, _budget(min(300.0, 5 * interval_seconds)))
