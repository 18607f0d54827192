"""The predictive-alerting API (:9092, on ``citadel.web``) as a real process over a real
Prometheus and Alertmanager: every reply checked against the OpenAPI document the service serves,
the admin key and the error bodies, and schemathesis over the whole document."""

from __future__ import annotations

import http.client
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

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


@pytest.fixture(scope="module")
def service(stack: Stack) -> Iterator[Service]:
    """The service over the gateway's request counter, after a few seconds of load."""
    load = Load(stack.gateway)
    proc: subprocess.Popen[bytes] | None = None
    try:
        wait_for("Prometheus to scrape the load", lambda: served(stack) > 0, 15)
        port = free_port()
        proc = serve_alerting(alerting_config(stack, "api.yaml", RULES), port)
        yield Service(port, Conformance.fetch("127.0.0.1", port))
    finally:
        load.stop()
        if proc is not None:
            output = process_output(proc)
            assert 0 == stop_process(proc), output[-3000:]
            assert "Traceback" not in output, output[-3000:]


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
