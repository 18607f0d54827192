"""The default rule set: what a fresh start evaluates, and how citadel.yaml keeps, drops or
replaces it (its PromQL against a real Prometheus: test_alerting_api.py)."""

from __future__ import annotations

import pytest

from citadel.alerting.app import alerting_settings
from citadel.alerting.defaults import ALARM_SCORE, DEFAULT_NAMES, default_rules
from citadel.alerting.definitions import parse_alerting
from citadel.cli import embedded_models
from citadel.errors import ConfigError
from citadel.observability.names import Slo, default_slos
from citadel.settings import load_settings

SLOS = default_slos(["chat", "code"])


def test_with_prometheus_anomalies_and_a_latency_forecast_in_promql_and_no_budget_rule() -> None:
    settings = load_settings(None, {"PROMETHEUS_ENDPOINT": "http://127.0.0.1:9090"})
    settings = settings.with_models(embedded_models(settings))
    rules = alerting_settings(settings).rules
    assert list(DEFAULT_NAMES) == [r.name for r in rules]
    assert ["anomaly", "anomaly", "forecast"] == [r.kind for r in rules]
    assert all(r.default and r.query and r.ledger is None for r in rules)  # no ledger/budget rule
    assert all("sum by (model" in (r.query or "") for r in rules)  # one series per model
    assert 0.5122 == ALARM_SCORE == rules[0].score_threshold == rules[1].score_threshold
    assert 1.0 == rules[2].threshold


def test_defaults_false_drops_them_and_a_list_keeps_those_named() -> None:
    assert () == parse_alerting({"defaults": False}, default_rules(SLOS)).rules
    kept = parse_alerting({"defaults": ["ModelTtftForecast"]}, default_rules(SLOS)).rules
    assert ["ModelTtftForecast"] == [r.name for r in kept]


def test_a_rule_with_a_defaults_name_replaces_it() -> None:
    mine = {"name": "ModelTtftForecast", "kind": "forecast", "query": "up", "threshold": 2}
    rules = parse_alerting({"rules": [mine]}, default_rules(SLOS)).rules
    [ttft] = [r for r in rules if r.name == "ModelTtftForecast"]
    assert ("up", 2.0, False) == (ttft.query, ttft.threshold, ttft.default)
    assert sorted(DEFAULT_NAMES) == sorted(r.name for r in rules)


def test_an_unknown_default_name_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"alerting\.defaults\[1\].*ModelRequestRateAnomaly"):
        parse_alerting({"defaults": ["ModelTtftForecast", "Budget"]}, default_rules(SLOS))
    with pytest.raises(ConfigError, match=r"alerting\.defaults"):
        parse_alerting({"defaults": "yes"}, default_rules(SLOS))


def test_different_latency_objectives_give_one_forecast_rule_per_model() -> None:
    slos = (
        Slo(model="fast", kind="ttft", objective=95.0, threshold_seconds=0.5),
        Slo(model='we"ird', kind="ttft", objective=95.0, threshold_seconds=1.0),
    )
    forecasts = [r for r in default_rules(slos) if r.kind == "forecast"]
    assert ["ModelTtftForecast:fast", 'ModelTtftForecast:we"ird'] == [r.name for r in forecasts]
    assert [0.5, 1.0] == [r.threshold for r in forecasts]
    assert '{model="we\\"ird"}' in (forecasts[1].query or "")
    kept = parse_alerting({"defaults": ["ModelTtftForecast"]}, default_rules(slos)).rules
    assert [r.name for r in forecasts] == [r.name for r in kept]  # the name keeps each model's
