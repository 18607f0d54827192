"""The alerting service against a real Prometheus and a real Alertmanager, as processes.

Prometheus scrapes a gateway (in front of the simulator) every second while a thread loads it;
the rule forecasts the gateway's request counter to pass a threshold within its horizon, so the
alert fires and reaches Alertmanager; when the load stops the forecast flattens and the alert is
resolved. Skipped when the Debian packages prometheus and prometheus-alertmanager are missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from citadel.alerting.prometheus import InvalidQuery, PrometheusClient
from citadel.http.client import HttpClient

from support import free_port, process_output, start_process, stop_process, wait_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
ADMIN_KEY = KEY = "sk-alerting-test"

pytestmark = pytest.mark.skipif(
    not (os.access(PROMETHEUS, os.X_OK) and os.access(ALERTMANAGER, os.X_OK)),
    reason="needs the Debian packages prometheus and prometheus-alertmanager",
)


def get(port: int, path: str, *, auth: bool = False, method: str = "GET") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"authorization": f"Bearer {ADMIN_KEY}"} if auth else {}
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read()
        try:
            return response.status, orjson.loads(body)
        except orjson.JSONDecodeError:
            return response.status, body.decode()
    finally:
        conn.close()


def start_ready(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start a Prometheus-style binary and wait for its /-/ready."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{args[0]} exited {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            return get(port, "/-/ready")[0] == 200
        return False

    wait_for(f"{args[0]} on port {port}", ready, 20)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Stack:
    tmp: Path
    prometheus: int
    alertmanager: int
    gateway: int


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("alerting")
    prom_port, am_port, gw_port, sim_port = free_port(), free_port(), free_port(), free_port()
    (tmp / "prometheus.yml").write_text(
        f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
scrape_configs:
  - job_name: gateway
    static_configs: [{{targets: ["127.0.0.1:{gw_port}"]}}]
"""
    )
    (tmp / "alertmanager.yml").write_text(
        "route: {receiver: blackhole, group_wait: 1s}\nreceivers: [{name: blackhole}]\n"
    )
    (tmp / "gateway.yaml").write_text(
        f"""
accounts: {{database: "sqlite+aiosqlite:///{tmp / "accounts.db"}"}}
models:
  - name: sim-chat
    deployments:
      - {{name: sim-a, url: "http://127.0.0.1:{sim_port}", model: sim-chat}}
"""
    )
    procs: list[Callable[[], None]] = []
    try:
        am = start_ready(
            [ALERTMANAGER, f"--config.file={tmp / 'alertmanager.yml'}",
             f"--storage.path={tmp / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
             "--cluster.listen-address="],
            am_port, tmp / "alertmanager.log",
        )  # fmt: skip
        procs.append(lambda: stop(am))
        prom = start_ready(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
            prom_port, tmp / "prometheus.log",
        )  # fmt: skip
        procs.append(lambda: stop(prom))
        sim = start_process(
            [sys.executable, "-m", "citadel", "sim", "--port", str(sim_port)], sim_port
        )
        procs.append(lambda: stop_process(sim))
        gateway = start_process(
            [sys.executable, "-m", "citadel", "--config", str(tmp / "gateway.yaml"), "serve",
             "gateway", "--port", str(gw_port)],
            gw_port, env={"CITADEL_ADMIN_KEY": ADMIN_KEY},
        )  # fmt: skip
        procs.append(lambda: stop_process(gateway))
        yield Stack(tmp, prom_port, am_port, gw_port)
    finally:
        for close in reversed(procs):
            close()


class Load:
    """Requests to the gateway from a background thread, one connection, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = orjson.dumps({"model": "sim-chat", "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    self.errors.append(str(response.status))
                self.sent += 1
                time.sleep(0.002)
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def served(stack: Stack) -> float:
    """The gateway's request counter as Prometheus last scraped it."""
    status, doc = get(stack.prometheus, "/api/v1/query?query=sum(citadel_gateway_requests_total)")
    assert 200 == status, doc
    result = doc["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def alerting_config(stack: Stack, name: str, rules: str, **endpoints: int) -> Path:
    path = stack.tmp / name
    path.write_text(
        f"""
endpoints:
  prometheus: "http://127.0.0.1:{endpoints.get("prometheus", stack.prometheus)}"
  alertmanager: "http://127.0.0.1:{stack.alertmanager}"
alerting:
  interval_seconds: 1
  resend_seconds: 2
{rules}
"""
    )
    return path


def serve_alerting(config: Path, port: int) -> subprocess.Popen[bytes]:
    return start_process(
        [sys.executable, "-m", "citadel", "--config", str(config), "serve",
         "predictive-alerting", "--port", str(port)],
        port, env={"CITADEL_ADMIN_KEY": ADMIN_KEY}, timeout=20,
    )  # fmt: skip


def am_alerts(stack: Stack, name: str) -> list[dict[str, Any]]:
    status, alerts = get(stack.alertmanager, "/api/v2/alerts")
    assert 200 == status, alerts
    return [a for a in alerts if a["labels"].get("alertname") == name]


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
