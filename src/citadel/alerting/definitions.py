"""Alert definitions: the ``alerting:`` section of citadel.yaml, validated into frozen objects.

    alerting:
      defaults: true                # the default rules (or false, or a list of their names)
      interval_seconds: 30          # how often every rule is evaluated
      resend_seconds: 60            # a firing alert is re-sent to Alertmanager this often
      reselect_seconds: 3600        # auto rules re-backtest every candidate this often (0: always)
      refit_seconds: 300            # the chosen model is refitted this often, or when it drifts
      fit_processes: 1              # worker processes for the fits (0: a thread of the service)
      generator_url: https://...    # optional; default: this service's /v1/alerts
      rules:
        - name: GatewayLatencyRising
          kind: forecast            # forecast (a threshold crossing) or anomaly
          query: histogram_quantile(0.99, sum by (le) (rate(...[5m])))
          threshold: 2.0
          direction: above          # above or below
          horizon_seconds: 1800     # fire when the forecast crosses within this
          lookback_seconds: 3600    # history fed to the model
          step_seconds: 15          # resolution of that history
          min_points: 10            # fewer points: "insufficient history", no alert
          model: auto               # auto (picked by backtest), linear, arima, ets or lstm
          severity: warning         # critical, warning or info
          labels: {team: platform}
          summary: p99 latency will pass 2 s within 30 minutes
        - name: TeamBudget
          kind: forecast
          ledger: {metric: team_spend, team: TEAM_ID}   # month-to-date spend, USD
          threshold: 500
          horizon_seconds: month_end                     # until the end of the month
        - name: TrafficAnomaly
          kind: anomaly
          query: sum(rate(citadel_gateway_requests_total[1m]))
          score_threshold: 0.95      # anomaly score in [0, 1] at which it fires
        - name: ChatErrors             # the ledger without Prometheus (citadel.alerting.ledger):
          kind: anomaly                # model_request_rate, model_error_ratio, model_latency_p95,
          ledger: {metric: model_error_ratio, model: chat}   # model_ttft_p95, team_budget_use

Unless ``defaults: false``, the service's default rules (``defaults.py``: anomalies and latency
forecasts on the gateway's own metrics) come first; ``defaults: [ModelTtftForecast]`` keeps only
the named ones, and a rule below with a default's name replaces it.

Each rule watches either a PromQL ``query`` or a ``ledger`` query, never both. Every bad value
raises ``ConfigError`` naming its key (``alerting.rules[2].horizon_seconds``), and unknown keys
are errors too, as everywhere in citadel.yaml. PromQL is checked here only for being non-empty;
its syntax is checked against Prometheus itself (``prometheus.PrometheusClient.validate``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from citadel.errors import ConfigError

__all__ = [
    "DIRECTIONS",
    "KINDS",
    "LEDGER_METRICS",
    "MODELS",
    "MONTH_END",
    "SEVERITIES",
    "AlertingSettings",
    "LedgerQuery",
    "Rule",
    "parse_alerting",
]

Kind = Literal["forecast", "anomaly"]
Direction = Literal["above", "below"]
Severity = Literal["critical", "warning", "info"]
LedgerMetric = Literal[
    "team_spend",
    "team_budget_use",
    "model_request_rate",
    "model_error_ratio",
    "model_latency_p95",
    "model_ttft_p95",
]

KINDS: tuple[Kind, ...] = ("forecast", "anomaly")
DIRECTIONS: tuple[Direction, ...] = ("above", "below")
SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "info")
LEDGER_METRICS: tuple[LedgerMetric, ...] = (
    "team_spend",
    "team_budget_use",
    "model_request_rate",
    "model_error_ratio",
    "model_latency_p95",
    "model_ttft_p95",
)
CUMULATIVE_METRICS = frozenset({"team_spend", "team_budget_use"})  # month to date: only grow
MODEL_METRICS = frozenset(m for m in LEDGER_METRICS if m.startswith("model_"))
MODELS = ("auto", "linear", "arima", "ets", "lstm")
MONTH_END = "month_end"  # horizon_seconds: until the end of the current calendar month

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
# Labels the service sets itself; a rule may not override them.
_RESERVED_LABELS = frozenset({"alertname", "severity", "rule"})


@dataclass(frozen=True, kw_only=True, slots=True)
class LedgerQuery:
    """A series read from the usage ledger rather than Prometheus."""

    # team_spend: one team's month-to-date spend in USD, hour by hour. The others are read from
    # the ledger's events at the rule's step (``citadel.alerting.ledger``): team_budget_use, each
    # team's month-to-date spend over its monthly budget (1.0: all of it); model_request_rate
    # (requests/s), model_error_ratio (5xx/requests), model_latency_p95 and model_ttft_p95
    # (seconds), one series per model.
    metric: LedgerMetric
    team: str | None = None  # the team's id: required by team_spend; narrows team_budget_use
    model: str | None = None  # model_* metrics: only this model (default: one series per model)


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    """One alert definition."""

    name: str  # also the alert's alertname
    kind: Kind
    query: str | None = None  # PromQL; exactly one of query and ledger is set
    ledger: LedgerQuery | None = None
    threshold: float | None = None  # required for a forecast rule
    direction: Direction = "above"
    horizon_seconds: float | None = 1800.0  # None: until the end of the month (MONTH_END)
    lookback_seconds: float = 3600.0
    step_seconds: float = 15.0
    min_points: int = 10
    model: str = "auto"  # one of MODELS: the forecaster, or "auto" to pick one by backtest
    score_threshold: float = 0.95  # anomaly rules: the score at which an alert fires
    severity: Severity = "warning"
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    summary: str = ""
    default: bool = False  # one of the service's default rules (``defaults.py``)

    @property
    def cumulative(self) -> bool:
        """Whether the series only grows within a month (month-to-date spend and budget use),
        so that it is forecast by its increments (``citadel.alerting.cumulative``)."""
        return self.ledger is not None and self.ledger.metric in CUMULATIVE_METRICS

    @property
    def source(self) -> str:
        """What the rule reads, for people: the PromQL, or ``ledger:team_spend(team)``."""
        if self.ledger is not None:
            return f"ledger:{self.ledger.metric}({self.ledger.team or self.ledger.model or ''})"
        return self.query or ""


@dataclass(frozen=True, kw_only=True, slots=True)
class AlertingSettings:
    interval_seconds: float = 30.0
    resend_seconds: float = 60.0
    # auto-model rules keep their backtested choice this long (refitting only it each round),
    # unless it drifts; 0: backtest every candidate at every evaluation
    reselect_seconds: float = 3600.0
    # a forecast rule's chosen model is refitted this often (or sooner when its forecast drifts
    # off the new samples); between refits its last fit forecasts from the new "now"
    refit_seconds: float = 300.0
    fit_processes: int = 1  # worker processes for model fits (0: a thread of the service)
    generator_url: str | None = None
    rules: tuple[Rule, ...] = ()

    def rule(self, name: str) -> Rule | None:
        return next((r for r in self.rules if r.name == name), None)


# -- parsing ----------------------------------------------------------------------------------

Parser = Callable[[object, str], Any]


def _mapping(value: object, key: str, known: tuple[str, ...]) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, value, "a mapping")
    for name, item in value.items():
        if name not in known:
            raise ConfigError(f"{key}.{name}", item, f"one of the known keys: {', '.join(known)}")
    return dict(value)


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, value, "a non-empty string")
    return value.strip()


def _any_text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, value, "a string")
    return value


def _choice(choices: tuple[str, ...]) -> Parser:
    def parse(value: object, key: str) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ConfigError(key, value, f"one of {', '.join(choices)}")
        return value.strip().lower()

    return parse


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(key, value, "a number")
    return float(value)


def _positive(value: object, key: str) -> float:
    number = _number(value, key) if not isinstance(value, bool) else math.nan
    if not number > 0:
        raise ConfigError(key, value, "a number > 0")
    return number


def _fraction(value: object, key: str) -> float:
    number = _number(value, key)
    if not 0 < number <= 1:
        raise ConfigError(key, value, "a number above 0 and at most 1")
    return number


def _min_points(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 3:
        raise ConfigError(key, value, "an integer >= 3")
    return value


def _horizon(value: object, key: str) -> float | None:
    if value == MONTH_END:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(key, value, f"a number of seconds > 0, or {MONTH_END}")
    return float(value)


def _labels(value: object, key: str) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(key, value, "a mapping of label names to strings")
    labels: dict[str, str] = {}
    for name, item in value.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ConfigError(where, item, "a label name matching [a-zA-Z_][a-zA-Z0-9_]*")
        if name in _RESERVED_LABELS:
            raise ConfigError(
                where, item, f"a label other than {', '.join(sorted(_RESERVED_LABELS))}"
            )
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise ConfigError(where, item, "a string")
        labels[name] = str(item)
    return MappingProxyType(labels)


def _ledger(value: object, key: str) -> LedgerQuery:
    doc = _mapping(value, key, ("metric", "team", "model"))
    if doc.get("metric") is None:
        raise ConfigError(f"{key}.metric", None, "a value (it is required)")
    metric = _choice(LEDGER_METRICS)(doc["metric"], f"{key}.metric")
    if metric == "team_spend" and doc.get("team") is None:
        raise ConfigError(f"{key}.team", None, "a value (it is required)")
    if metric in MODEL_METRICS and doc.get("team") is not None:
        raise ConfigError(f"{key}.team", doc["team"], f"no team ({metric} is per model)")
    if metric not in MODEL_METRICS and doc.get("model") is not None:
        raise ConfigError(f"{key}.model", doc["model"], f"no model ({metric} is per team)")
    team = _text(doc["team"], f"{key}.team") if doc.get("team") is not None else None
    model = _text(doc["model"], f"{key}.model") if doc.get("model") is not None else None
    return LedgerQuery(metric=metric, team=team, model=model)


_RULE: dict[str, Parser] = {
    "name": _text,
    "kind": _choice(KINDS),
    "query": _text,
    "ledger": _ledger,
    "threshold": _number,
    "direction": _choice(DIRECTIONS),
    "horizon_seconds": _horizon,
    "lookback_seconds": _positive,
    "step_seconds": _positive,
    "min_points": _min_points,
    "model": _choice(MODELS),
    "score_threshold": _fraction,
    "severity": _choice(SEVERITIES),
    "labels": _labels,
    "summary": _any_text,
}


def _non_negative(value: object, key: str) -> float:
    number = _number(value, key)
    if number < 0:
        raise ConfigError(key, value, "a number >= 0")
    return number


def _processes(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise ConfigError(key, value, "an integer from 0 (fit in a thread) to 64")
    return value


_TOP: dict[str, Parser] = {
    "interval_seconds": _positive,
    "resend_seconds": _positive,
    "reselect_seconds": _non_negative,
    "refit_seconds": _non_negative,
    "fit_processes": _processes,
    "generator_url": _text,
}


def _rule(value: object, key: str) -> Rule:
    doc = _mapping(value, key, tuple(_RULE))
    if not isinstance(value, Mapping):
        raise ConfigError(key, value, "a mapping")
    for name in ("name", "kind"):
        if doc.get(name) is None:
            raise ConfigError(f"{key}.{name}", None, "a value (it is required)")
    fields = {
        name: parse(item, f"{key}.{name}")
        for name, parse in _RULE.items()
        if (item := doc.get(name)) is not None
    }
    has_query, has_ledger = "query" in fields, "ledger" in fields
    if has_query == has_ledger:
        what = "both" if has_query else "neither"
        raise ConfigError(
            f"{key}.query", doc.get("query"), f"exactly one of query and ledger ({what} given)"
        )
    if fields["kind"] == "forecast" and "threshold" not in fields:
        raise ConfigError(f"{key}.threshold", None, "a number (a forecast rule needs a threshold)")
    if "horizon_seconds" in fields and fields["horizon_seconds"] is None and not has_ledger:
        raise ConfigError(
            f"{key}.horizon_seconds",
            MONTH_END,
            "a number of seconds (month_end needs a ledger query)",
        )
    if has_ledger and "step_seconds" not in fields:
        fields["step_seconds"] = 3600.0  # the ledger's rollups are hourly
    if has_ledger and "lookback_seconds" not in fields:
        fields["lookback_seconds"] = 31 * 86400.0  # the whole month so far
    step, lookback = fields.get("step_seconds", 15.0), fields.get("lookback_seconds", 3600.0)
    if step > lookback:
        raise ConfigError(f"{key}.step_seconds", step, f"at most lookback_seconds ({lookback:g})")
    return Rule(**fields)


def _defaults(value: object, defaults: Sequence[Rule]) -> list[Rule]:
    """The default rules ``alerting.defaults`` keeps: all (true, the default), none (false), or
    those named in a list (``ModelTtftForecast`` keeps its per-model rules too)."""
    if value is None or value is True:
        return list(defaults)
    if value is False:
        return []
    if not isinstance(value, list):
        raise ConfigError("alerting.defaults", value, "true, false or a list of default rule names")
    names = {rule.name.partition(":")[0] for rule in defaults}
    for i, name in enumerate(value):
        if name not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ConfigError(f"alerting.defaults[{i}]", name, f"one of the defaults: {known}")
    return [rule for rule in defaults if rule.name.partition(":")[0] in value]


def parse_alerting(raw: Mapping[str, Any], defaults: Sequence[Rule] = ()) -> AlertingSettings:
    """The ``alerting:`` section as typed settings, after the ``defaults`` it keeps (a rule of
    ``alerting.rules`` with a default's name replaces it); ConfigError names the first bad key."""
    doc = _mapping(raw, "alerting", (*_TOP, "rules", "defaults"))
    fields: dict[str, Any] = {
        name: parse(item, f"alerting.{name}")
        for name, parse in _TOP.items()
        if (item := doc.get(name)) is not None
    }
    raw_rules = doc.get("rules")
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        raise ConfigError("alerting.rules", raw_rules, "a list of rules")
    rules: list[Rule] = []
    for i, item in enumerate(raw_rules):
        rule = _rule(item, f"alerting.rules[{i}]")
        if any(r.name == rule.name for r in rules):
            raise ConfigError(
                f"alerting.rules[{i}].name", rule.name, "a rule name not already in use"
            )
        rules.append(rule)
    given = {rule.name for rule in rules}
    kept = [d for d in _defaults(doc.get("defaults"), defaults) if d.name not in given]
    settings = AlertingSettings(**fields, rules=(*kept, *rules))
    if settings.resend_seconds < settings.interval_seconds:
        raise ConfigError(
            "alerting.resend_seconds",
            settings.resend_seconds,
            f"at least interval_seconds ({settings.interval_seconds:g})",
        )
    return settings
