"""The rules the predictive-alerting service evaluates out of the box, beside those citadel.yaml
adds: anomalies and latency forecasts on the gateway's own metrics, per model. Pure: no I/O.

- ``ModelRequestRateAnomaly``: each model's request rate, scored by the default detector.
- ``ModelErrorRatioAnomaly``: each model's 5xx ratio (models with no traffic in the window have
  no point, rather than a 0/0).
- ``ModelTtftForecast``: each model's p95 time to first token, forecast 30 minutes ahead against
  the TTFT objective of the SLOs (1 s unless ``slos:`` says otherwise); one rule per model when
  the objectives differ.

The team budget-forecast alert is not here: it is a Prometheus rule (``observability/rules.py``),
one owner for each alert. In citadel.yaml, ``alerting.defaults: false`` drops these rules, a list
of their names keeps only those, and a rule in ``alerting.rules`` with the same name replaces one.

The anomaly rules fire at the detector's alarm score (``ALARM_SCORE``: a deviation that beats its
record by the alarm ratio), the score at which ``RecordDetector`` itself starts its refractory
period, rather than at a threshold picked for these metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

from citadel import metrics as m
from citadel.alerting.anomaly import Params
from citadel.alerting.definitions import Rule, Severity
from citadel.observability.names import Slo

__all__ = ["ALARM_SCORE", "DEFAULT_NAMES", "default_rules"]

_ALARM = Params().refractory_ratio
ALARM_SCORE = round(_ALARM / (1.0 + _ALARM), 4)  # 0.5122: the detector's ratio -> score map
DEFAULT_NAMES = ("ModelRequestRateAnomaly", "ModelErrorRatioAnomaly", "ModelTtftForecast")

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


def default_rules(slos: Sequence[Slo]) -> tuple[Rule, ...]:
    """The default rule set for these SLOs (``observability.names.default_slos`` without
    ``slos:``)."""
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
    return tuple(rules)
