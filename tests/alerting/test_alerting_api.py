"""The predictive-alerting API (:9092, on ``citadel.web``) as a real process over a real
Prometheus and Alertmanager: every reply checked against the OpenAPI document the service serves,
the admin key and the error bodies, and schemathesis over the whole document."""

from __future__ import annotations

import contextlib
import http.client
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from citadel.alerting.defaults import ALARM_SCORE, DEFAULT_NAMES

from conformance import Conformance, fuzz
from promstack import (
    ADMIN_KEY,
    Load,
    Stack,
    alerting_config,
    am_alerts,
    needs_prometheus,
    serve_alerting,
    served,
    wait_for,
)
from support import free_port, process_output, stop_process

pytestmark = needs_prometheus

RULES = """
  rules:
    - name: RequestsPastZero
      kind: forecast
      query: sum(citadel_gateway_requests_total)
      threshold: 0
      horizon_seconds: 60
      lookback_seconds: 20
      step_seconds: 1
      min_points: 3
      model: linear
      severity: info
      labels: {team: platform}
    - name: RequestRate
      kind: anomaly
      query: sum(rate(citadel_gateway_requests_total[5s]))
      lookback_seconds: 20
      step_seconds: 1
      min_points: 3
    - name: NeedsHistory
      kind: forecast
      query: sum(citadel_gateway_requests_total)
      threshold: 1
      lookback_seconds: 30
      step_seconds: 1
      min_points: 500
"""
OPERATIONS = {
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/v1/rules"),
    ("GET", "/v1/forecasts"),
    ("GET", "/v1/anomalies"),
    ("GET", "/v1/alerts"),
    ("POST", "/v1/evaluate"),
}


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Service:
    port: int
    document: Conformance
    called: set[tuple[str, str]] = field(default_factory=set)

    def call(self, method: str, path: str, *, key: str | None = ADMIN_KEY) -> Reply:
        headers = {} if key is None else {"authorization": f"Bearer {key}"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            reply = Reply(response.status, response.getheader("content-type", ""), response.read())
        finally:
            conn.close()
        self.document.check(method, path, reply.status, reply.body, reply.content_type)
        self.called.add((method, path))
        return reply


@contextlib.contextmanager
def running(
    stack: Stack, config: Path, *, stream: bool = False, scraped: str | None = None
) -> Iterator[Service]:
    """The service on ``config`` under load, once Prometheus has scraped some (``scraped``: a
    query that must be above 0 first); stopped cleanly, with no traceback, on leaving."""
    load = Load(stack.gateway, stream=stream)
    proc: subprocess.Popen[bytes] | None = None
    try:
        if scraped is None:
            wait_for("Prometheus to scrape the load", lambda: served(stack) > 0, 15)
        else:
            wait_for(f"Prometheus to have {scraped}", lambda: served(stack, scraped) > 0, 15)
        port = free_port()
        proc = serve_alerting(config, port)
        yield Service(port, Conformance.fetch("127.0.0.1", port))

    finally:
        load.stop()
        if proc is not None:
            output = process_output(proc)
            assert 0 == stop_process(proc), output[-3000:]
            assert "Traceback" not in output, output[-3000:]


@pytest.fixture(scope="module")
def service(stack: Stack) -> Iterator[Service]:
    """The service over the gateway's request counter, after a few seconds of load."""
    with running(stack, alerting_config(stack, "api.yaml", RULES)) as found:
        yield found


def test_every_operation_answers_what_its_document_says(service: Service, stack: Stack) -> None:
    """Each operation's reply, checked against the served document, with what it must say."""
    wait_for(
        "the forecast rule to fire",
        lambda: (
            service.call("GET", "/v1/forecasts").json()["data"]
            and service.call("GET", "/v1/forecasts").json()["data"][0]["outcome"] == "firing"
        ),
        30,
    )
    forecasts = {e["rule"]: e for e in service.call("GET", "/v1/forecasts").json()["data"]}
    assert {"RequestsPastZero", "NeedsHistory"} == set(forecasts)
    [finding] = forecasts["RequestsPastZero"]["findings"]
    assert "linear" == finding["model"]
    assert finding["crossing_at"].endswith("Z")
    assert finding["forecast"]["mean"] >= finding["value"] > 0
    assert "insufficient_history" == forecasts["NeedsHistory"]["outcome"]

    anomalies = service.call("GET", "/v1/anomalies").json()["data"]
    assert ["RequestRate"] == [e["rule"] for e in anomalies]
    score = anomalies[0]["findings"][0]["score"]
    assert score is None or 0.0 <= score <= 1.0

    rules = service.call("GET", "/v1/rules").json()
    assert "list" == rules["object"]
    first = rules["data"][0]
    assert ("RequestsPastZero", "forecast", 0.0, 60.0) == (
        first["name"],
        first["kind"],
        first["threshold"],
        first["horizon_seconds"],
    )
    assert {"team": "platform"} == first["labels"]

    wait_for("the alert in Alertmanager", lambda: am_alerts(stack, "RequestsPastZero"), 20)
    alerts = service.call("GET", "/v1/alerts").json()
    assert ["RequestsPastZero"] == [a["labels"]["alertname"] for a in alerts["data"]]
    assert "firing" == alerts["data"][0]["status"]
    assert f"http://127.0.0.1:{stack.alertmanager}" == alerts["delivery"]["alertmanager"]

    evaluated = service.call("POST", "/v1/evaluate").json()["data"]
    assert ["RequestsPastZero", "RequestRate", "NeedsHistory"] == [e["rule"] for e in evaluated]

    health = service.call("GET", "/health").json()
    assert "ok" == health["status"]
    assert {"prometheus", "alertmanager"} == set(health["dependencies"])
    assert health["last_evaluation"].endswith("Z")
    assert health["rounds"]["completed"] >= 1
    assert health["rounds"]["first_in_progress"] is False
    states = {r["rule"]: r for r in health["rules"]}
    [models] = states["RequestsPastZero"]["models"].values()
    assert models[0]["points_seen"] >= 3
    metrics = service.call("GET", "/metrics")
    assert b'citadel_alerting_evaluations_total{rule="RequestsPastZero",outcome="firing"}' in (
        metrics.body
    )
    assert service.call("GET", "/docs").body.startswith(b"<!doctype html>")
    assert (
        "Citadel predictive alerting"
        == service.call("GET", "/openapi.json").json()["info"]["title"]
    )
    assert service.called >= OPERATIONS


def test_errors_keep_their_status_and_openai_body(service: Service) -> None:
    """No key or a wrong one is a 401; an unknown path 404; a wrong method 405; an unknown query
    parameter a 400 naming it: each with the OpenAI-style error body."""
    for method, path in sorted(o for o in OPERATIONS if o[1].startswith("/v1/")):
        for key in (None, "sk-wrong"):
            reply = service.call(method, path, key=key)
            assert 401 == reply.status, (method, path, key)
            assert {"message", "type", "param", "code"} <= set(reply.json()["error"])
    assert 404 == service.call("GET", "/v1/nothing").status
    reply = service.call("DELETE", "/v1/rules")
    assert 405 == reply.status
    assert "DELETE" in reply.json()["error"]["message"]
    reply = service.call("GET", "/v1/forecasts?rule=x")
    assert 400 == reply.status
    assert "rule" == reply.json()["error"]["param"]


def test_schemathesis_finds_no_5xx_and_no_schema_mismatch(service: Service) -> None:
    """Every operation of the served document, the stateful phase included: all checks pass."""
    fuzz(service.port, ADMIN_KEY)


def test_a_fresh_start_has_the_default_rules_and_they_evaluate_on_prometheus(
    stack: Stack,
) -> None:
    """With no `alerting:` section the service has its default rules (request-rate and 5xx-ratio
    anomalies, the p95 TTFT forecast against the SLO); Prometheus accepted their PromQL at start,
    and each evaluates to one series per model of the gateway's own metrics."""
    config = stack.tmp / "fresh.yaml"
    config.write_text(
        f'endpoints: {{prometheus: "http://127.0.0.1:{stack.prometheus}"}}\n', encoding="utf-8"
    )
    ttft = "sum(gen_ai_server_time_to_first_token_seconds_count)"
    with running(stack, config, stream=True, scraped=ttft) as service:
        rules = service.call("GET", "/v1/rules").json()["data"]
        assert list(DEFAULT_NAMES) == [r["name"] for r in rules]
        assert all(r["default"] for r in rules)
        assert [ALARM_SCORE, ALARM_SCORE] == [r["score_threshold"] for r in rules[:2]]
        assert 1.0 == rules[2]["threshold"]  # the default TTFT objective: 95 % under 1 s

        def evaluated() -> dict[str, Any] | None:
            found = {e["rule"]: e for e in service.call("POST", "/v1/evaluate").json()["data"]}
            each = all(e["findings"] for e in found.values())
            return found if each else None

        found = wait_for("a series for every default rule", evaluated, 30, interval=1)
        for name, evaluation in found.items():
            assert evaluation["error"] is None, evaluation
            assert [{"model": "sim-chat"}] == [f["series"] for f in evaluation["findings"]], name
            assert evaluation["outcome"] in ("ok", "firing", "insufficient_history"), evaluation
        [errors] = found["ModelErrorRatioAnomaly"]["findings"]
        assert 0.0 == errors["value"]  # no 5xx: a ratio of 0, not a missing series
        [latency] = found["ModelTtftForecast"]["findings"]
        assert 0.0 < latency["value"] < 1.0
        forecasts = service.call("GET", "/v1/forecasts").json()["data"]
        assert ["ModelTtftForecast"] == [e["rule"] for e in forecasts]
        anomalies = service.call("GET", "/v1/anomalies").json()["data"]
        assert ["ModelRequestRateAnomaly", "ModelErrorRatioAnomaly"] == [
            e["rule"] for e in anomalies
        ]


def test_a_default_rule_is_replaced_by_name_and_scores_the_gateways_traffic(stack: Stack) -> None:
    """A rule of citadel.yaml named as a default replaces it (here: the request-rate anomaly at a
    step of 1 s, so it has history within seconds): the default detector scores the gateway's
    request rate per model."""
    rules = """
  rules:
    - name: ModelRequestRateAnomaly
      kind: anomaly
      query: sum by (model) (rate(citadel_gateway_requests_total[5s]))
      lookback_seconds: 30
      step_seconds: 1
      min_points: 5
"""
    with running(stack, alerting_config(stack, "over.yaml", rules, defaults=True)) as service:
        listed = {r["name"]: r for r in service.call("GET", "/v1/rules").json()["data"]}
        assert set(DEFAULT_NAMES) == set(listed)
        assert (False, 1.0) == (
            listed["ModelRequestRateAnomaly"]["default"],
            listed["ModelRequestRateAnomaly"]["step_seconds"],
        )

        def scored() -> list[dict[str, Any]]:
            anomalies = service.call("GET", "/v1/anomalies").json()["data"]
            rate = next((e for e in anomalies if e["rule"] == "ModelRequestRateAnomaly"), None)
            return [f for f in rate["findings"] if f["score"] is not None] if rate else []

        [finding] = wait_for("a score of the request rate", scored, 30, interval=1)
        assert {"model": "sim-chat"} == finding["series"]
        assert 0.0 <= finding["score"] <= 1.0
        assert finding["points"] >= 5
