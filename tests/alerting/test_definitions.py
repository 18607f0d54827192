"""Tests for the alerting: section's schema: typed rules, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from citadel.alerting.definitions import LedgerQuery, parse_alerting
from citadel.errors import ConfigError
from citadel.settings import load_settings


def rule(**fields: Any) -> dict[str, Any]:
    return {"name": "r", "kind": "forecast", "query": "up", "threshold": 1, **fields}


def error_key(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_alerting(raw)
    return caught.value.key


def test_a_full_definition_becomes_frozen_typed_rules() -> None:
    """Every documented field is read into the Rule, with the section's own settings."""
    settings = parse_alerting(
        {
            "interval_seconds": 10,
            "resend_seconds": 20,
            "rules": [
                rule(
                    name="Latency",
                    query="histogram_quantile(0.99, rate(x_bucket[5m]))",
                    threshold=2,
                    direction="ABOVE",
                    horizon_seconds=1800,
                    lookback_seconds=7200,
                    step_seconds=30,
                    min_points=20,
                    model="linear",
                    severity="critical",
                    labels={"team": "platform", "tier": 1},
                    summary="p99 latency will pass 2 s",
                ),
                {
                    "name": "Budget",
                    "kind": "forecast",
                    "threshold": 500,
                    "ledger": {"metric": "team_spend", "team": "t1"},
                    "horizon_seconds": "month_end",
                },
                {"name": "Odd", "kind": "anomaly", "query": "up", "score_threshold": 0.9},
            ],
        }
    )
    assert 10.0 == settings.interval_seconds
    assert 20.0 == settings.resend_seconds
    latency, budget, odd = settings.rules
    assert ("above", 2.0, 1800.0, 7200.0, 30.0, 20) == (
        latency.direction, latency.threshold, latency.horizon_seconds,
        latency.lookback_seconds, latency.step_seconds, latency.min_points,
    )  # fmt: skip
    assert {"team": "platform", "tier": "1"} == dict(latency.labels)
    assert ("critical", "linear") == (latency.severity, latency.model)
    assert LedgerQuery(metric="team_spend", team="t1") == budget.ledger
    assert budget.horizon_seconds is None  # month end
    assert 3600.0 == budget.step_seconds  # hourly rollups
    assert ("anomaly", 0.9, None) == (odd.kind, odd.score_threshold, odd.threshold)
    with pytest.raises(AttributeError):
        latency.threshold = 3  # type: ignore[misc]


def test_an_empty_section_has_no_rules() -> None:
    """No alerting: section means defaults and no rules."""
    assert () == parse_alerting({}).rules


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"rules": [rule(treshold=3)]}, "alerting.rules[0].treshold"),
        ({"rules": [rule(), rule(name="b", labls={})]}, "alerting.rules[1].labls"),
        ({"intervall": 3}, "alerting.intervall"),
        (
            {"rules": [rule(ledger={"metric": "team_spend", "team": "t", "x": 1})]},
            "alerting.rules[0].ledger.x",
        ),
    ],
)
def test_unknown_fields_are_errors_naming_the_key(raw: dict[str, Any], key: str) -> None:
    """A misspelt key is refused with its full path, not ignored."""
    assert key == error_key(raw)


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"kind": "prophecy"}, "alerting.rules[0].kind"),
        ({"threshold": None}, "alerting.rules[0].threshold"),
        ({"threshold": True}, "alerting.rules[0].threshold"),
        ({"direction": "sideways"}, "alerting.rules[0].direction"),
        ({"horizon_seconds": 0}, "alerting.rules[0].horizon_seconds"),
        ({"horizon_seconds": "month_end"}, "alerting.rules[0].horizon_seconds"),
        ({"step_seconds": 7200}, "alerting.rules[0].step_seconds"),
        ({"min_points": 2}, "alerting.rules[0].min_points"),
        ({"severity": "page"}, "alerting.rules[0].severity"),
        ({"labels": {"alertname": "x"}}, "alerting.rules[0].labels.alertname"),
        ({"labels": {"bad-name": "x"}}, "alerting.rules[0].labels.bad-name"),
        ({"query": "   "}, "alerting.rules[0].query"),
        ({"query": None}, "alerting.rules[0].query"),
        ({"ledger": {"metric": "team_spend", "team": "t"}}, "alerting.rules[0].query"),
        ({"ledger": {"metric": "spend"}}, "alerting.rules[0].ledger.metric"),
        ({"model": "prophet"}, "alerting.rules[0].model"),
        ({"name": None}, "alerting.rules[0].name"),
    ],
)
def test_bad_values_name_the_key(fields: dict[str, Any], key: str) -> None:
    """Each bad value raises ConfigError naming alerting.rules[i].field."""
    assert key == error_key({"rules": [rule(**fields)]})


def test_rule_names_are_unique_and_resend_follows_the_interval() -> None:
    """A repeated rule name and a resend interval shorter than the evaluation one are refused."""
    assert "alerting.rules[1].name" == error_key({"rules": [rule(), rule()]})
    assert "alerting.resend_seconds" == error_key({"interval_seconds": 60, "resend_seconds": 30})
    assert "alerting.rules" == error_key({"rules": {"name": "r"}})


def test_the_message_says_what_was_expected() -> None:
    """The error names the key, the value and the expectation."""
    with pytest.raises(ConfigError, match=r"alerting\.rules\[0\]\.direction='up'.*above, below"):
        parse_alerting({"rules": [rule(direction="up")]})


def test_the_shipped_example_has_valid_rules() -> None:
    """citadel.example.yaml's alerting section parses into its two rules, one of each kind."""
    example = Path(__file__).resolve().parents[2] / "citadel.example.yaml"
    rules = parse_alerting(load_settings(str(example), {}).alerting).rules
    assert [("GatewayLatencyRising", "forecast"), ("TrafficAnomaly", "anomaly")] == [
        (r.name, r.kind) for r in rules
    ]
