"""The alerting service against a real Prometheus and a real Alertmanager, as processes.

Prometheus scrapes a gateway (in front of the simulator) every second while a thread loads it;
the rule forecasts the gateway's request counter to pass a threshold within its horizon, so the
alert fires and reaches Alertmanager; when the load stops the forecast flattens and the alert is
resolved. Skipped when the Debian packages prometheus and prometheus-alertmanager are missing.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from citadel.alerting.prometheus import InvalidQuery, PrometheusClient
from citadel.http.client import HttpClient

from promstack import (
    KEY,
    Load,
    Stack,
    alerting_config,
    am_alerts,
    get,
    needs_prometheus,
    serve_alerting,
    served,
    wait_for,
)
from support import free_port, process_output, stop_process

pytestmark = needs_prometheus


def test_a_forecast_crossing_fires_into_alertmanager_and_resolves(stack: Stack) -> None:
    """Under load the request counter's forecast crosses the threshold: the alert reaches
    Alertmanager with its labels and annotations; without load it resolves."""
    load = Load(stack.gateway)
    alerting: subprocess.Popen[bytes] | None = None
    try:
        wait_for("Prometheus to scrape the load", lambda: served(stack) > 0, 15)
        time.sleep(2)
        first, t0 = served(stack), time.monotonic()
        time.sleep(2)
        rate = (served(stack) - first) / (time.monotonic() - t0)
        assert rate > 1, f"load too slow: {rate} req/s, errors {load.errors[:3]}"
        # Expected to be crossed ~80 s from now at this rate: within the 120 s horizon, and
        # far enough away that the load stops before the counter itself gets there.
        threshold = served(stack) + rate * 80
        rules = f"""
  rules:
    - name: GatewayRequestsForecast
      kind: forecast
      query: sum(citadel_gateway_requests_total)
      threshold: {threshold:.0f}
      horizon_seconds: 120
      lookback_seconds: 10
      step_seconds: 1
      min_points: 5
      model: linear
      severity: critical
      labels: {{team: platform}}
      summary: gateway requests will pass {threshold:.0f} within 2 minutes
    - name: NeedsHistory
      kind: forecast
      query: sum(citadel_gateway_requests_total)
      threshold: 1
      lookback_seconds: 30
      step_seconds: 1
      min_points: 500
"""
        port = free_port()
        alerting = serve_alerting(alerting_config(stack, "alerting.yaml", rules), port)

        # Generous: the service imports numpy and statsmodels first, slow on a loaded machine.
        fired = wait_for("the alert in Alertmanager",
                         lambda: am_alerts(stack, "GatewayRequestsForecast"), 45)  # fmt: skip
        [alert] = fired
        assert {
            "alertname": "GatewayRequestsForecast",
            "severity": "critical",
            "team": "platform",
        } == alert["labels"]
        notes = alert["annotations"]
        assert f"gateway requests will pass {threshold:.0f} within 2 minutes" == notes["summary"]
        assert notes["forecast"].startswith("linear: ")
        assert notes["expected_crossing"].endswith("Z")
        assert f"above {float(f'{threshold:.0f}'):.6g}" == notes["threshold"]
        assert alert["generatorURL"].endswith("/v1/alerts")
        assert "active" == alert["status"]["state"]

        status, forecasts = get(port, "/v1/forecasts", auth=True)
        assert 200 == status
        by_rule = {e["rule"]: e for e in forecasts["data"]}
        assert "firing" == by_rule["GatewayRequestsForecast"]["outcome"]
        needs = by_rule["NeedsHistory"]
        assert "insufficient_history" == needs["outcome"]
        assert "insufficient history" in needs["findings"][0]["detail"]
        status, health = get(port, "/health")
        assert 200 == status
        [models] = next(r for r in health["rules"] if r["rule"] == "GatewayRequestsForecast")[
            "models"
        ].values()
        assert models[0]["points_seen"] >= 5
        assert models[0]["trained_at"] is not None
        status, mine = get(port, "/v1/alerts", auth=True)
        assert ["GatewayRequestsForecast"] == [a["labels"]["alertname"] for a in mine["data"]]

        load.stop()
        assert served(stack) < threshold
        wait_for("the alert to resolve in Alertmanager",
                 lambda: not [a for a in am_alerts(stack, "GatewayRequestsForecast")
                              if a["status"]["state"] == "active"], 60)  # fmt: skip
        status, metrics = get(port, "/metrics")
        assert 'citadel_alerting_alerts_sent_total{state="resolved"}' in metrics
        assert (
            'citadel_alerting_evaluations_total{rule="NeedsHistory",outcome="insufficient_history"}'
            in metrics
        )
    finally:
        load.stop()
        if alerting is not None:
            output = process_output(alerting)
            stop_process(alerting)
            print(output[-3000:])


def test_invalid_promql_is_refused_by_prometheus_with_a_clear_error(stack: Stack) -> None:
    """Prometheus's own parser checks a rule's PromQL; the service will not start with it."""

    async def validate() -> InvalidQuery:
        http = HttpClient()
        try:
            client = PrometheusClient(f"http://127.0.0.1:{stack.prometheus}", http)
            await client.validate("Good", "sum(rate(citadel_gateway_requests_total[1m]))")
            with pytest.raises(InvalidQuery) as caught:
                await client.validate("Bad", "sum(rate(citadel_gateway_requests_total[1m])")
            return caught.value
        finally:
            await http.aclose()

    error = asyncio.run(validate())
    assert "Bad" == error.rule
    assert "parse error" in error.detail

    rules = """
  rules:
    - {name: Bad, kind: forecast, query: "sum(rate(x[1m])", threshold: 1}
"""
    config = alerting_config(stack, "bad.yaml", rules)
    done = subprocess.run(
        [sys.executable, "-m", "citadel", "--config", str(config), "serve", "predictive-alerting",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=30, env={**os.environ, "CITADEL_ADMIN_KEY": KEY},
    )  # fmt: skip
    assert 2 == done.returncode, done.stderr
    assert "alerting.rules[0].query" in done.stderr
    assert "PromQL that Prometheus accepts" in done.stderr
    assert "parse error" in done.stderr


def test_an_unknown_field_stops_the_service_naming_it(stack: Stack) -> None:
    """A misspelt rule field is a ConfigError at start, naming alerting.rules[i].field."""
    rules = """
  rules:
    - {name: Typo, kind: forecast, query: up, threshold: 1, horizon: 60}
"""
    config = alerting_config(stack, "typo.yaml", rules)
    done = subprocess.run(
        [sys.executable, "-m", "citadel", "--config", str(config), "serve", "predictive-alerting",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=30, env={**os.environ, "CITADEL_ADMIN_KEY": KEY},
    )  # fmt: skip
    assert 2 == done.returncode
    assert "alerting.rules[0].horizon" in done.stderr
