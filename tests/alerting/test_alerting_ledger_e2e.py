"""Alerts out of the box without Prometheus: the simulator, a gateway writing the embedded SQLite
ledger, a real Alertmanager, and ``citadel serve predictive-alerting`` with the default rules only
(no ``alerting.rules``), as processes on real sockets, at a 1 s interval (so 1 s steps). Traffic
from a team's key gives per-model anomaly scores and forecasts at /v1/anomalies and
/v1/forecasts; a burst of upstream 500s (the simulator's fault header, forwarded by the gateway)
fires ModelErrorRatioAnomaly, and the team's spend ramp fires TeamBudgetForecast; both reach
Alertmanager. Skipped without the Debian package prometheus-alertmanager (as the other
real-Alertmanager tests)."""

from __future__ import annotations

import asyncio
import http.client
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from citadel.accounts.sql import open_store
from citadel.metering.migrate import LEDGER

from promstack import ADMIN_KEY, ALERTMANAGER, get, needs_prometheus, start_ready, stop
from support import free_port, process_output, start_process, stop_process, wait_for

pytestmark = needs_prometheus


class TeamLoad:
    """Chat requests with one key from a thread; ``faulty`` makes every other one fail upstream."""

    def __init__(self, port: int, secret: str) -> None:
        self.port, self.secret = port, secret
        self.faulty = False
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        body = orjson.dumps({"model": "sim-chat", "max_tokens": 4,
                             "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = 0
        while not self._stop.is_set():
            headers = {"authorization": f"Bearer {self.secret}", "content-type": "application/json"}
            if self.faulty and sent % 2:
                headers["x-sim-fault"] = "status=500"
            try:
                conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                self.statuses.append(response.status)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            sent += 1
            time.sleep(0.03)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _alerts(port: int, name: str) -> list[dict[str, Any]]:
    status, alerts = get(port, "/api/v2/alerts")
    assert 200 == status, alerts
    return [a for a in alerts if a["labels"].get("alertname") == name]


async def _team_key(uri: str) -> tuple[str, str]:
    await LEDGER.upgrade(uri)
    store = await open_store(uri, migrate=True)
    try:
        team = await store.create_team("Rampers")
        await store.set_team_budget(team.id, 100_000_000)  # $100 a month
        user = await store.create_user(
            name="Ramp", email="ramp@example.com", tier="enterprise", team_id=team.id
        )
        _, secret = await store.create_key(user.id, name="load")
        return team.id, secret
    finally:
        await store.aclose()


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for proc, kind in reversed(started):
        if kind == "am":
            stop(proc)
        else:
            output = process_output(proc)
            stop_process(proc)
            if kind == "alerting":
                print(output[-3000:])


@pytest.mark.timeout(480)  # the detector's 150-row warm-up is 150 s of traffic at a 1 s step
def test_default_rules_over_the_ledger_score_forecast_and_alert(
    tmp_path: Path, procs: list[Any]
) -> None:
    am_port, sim_port, gw_port, port = free_port(), free_port(), free_port(), free_port()
    uri = f"sqlite+aiosqlite:///{tmp_path / 'citadel.db'}"
    team, secret = asyncio.run(_team_key(uri))
    (tmp_path / "alertmanager.yml").write_text(
        "route: {receiver: blackhole, group_wait: 1s}\nreceivers: [{name: blackhole}]\n"
    )
    config = tmp_path / "citadel.yaml"
    config.write_text(
        f"""
accounts: {{database: "{uri}"}}
metering: {{journal_path: "{tmp_path / "usage.journal"}", spool_path: "{tmp_path / "spool"}"}}
endpoints: {{alertmanager: "http://127.0.0.1:{am_port}"}}
models:
  - name: sim-chat
    price: {{input_per_1k: 1.0, output_per_1k: 1.0}}
    deployments:
      - {{name: sim-a, url: "http://127.0.0.1:{sim_port}", model: sim-chat}}
alerting: {{interval_seconds: 1, resend_seconds: 2}}
"""
    )
    am = start_ready(
        [ALERTMANAGER, f"--config.file={tmp_path / 'alertmanager.yml'}",
         f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{am_port}",
         "--cluster.listen-address="],
        am_port, tmp_path / "alertmanager.log",
    )  # fmt: skip
    procs.append((am, "am"))
    sim = start_process([sys.executable, "-m", "citadel", "sim", "--port", str(sim_port)], sim_port)
    procs.append((sim, "sim"))
    env = {"CITADEL_ADMIN_KEY": ADMIN_KEY}
    base = [sys.executable, "-m", "citadel", "--config", str(config), "serve"]
    gateway = start_process([*base, "gateway", "--port", str(gw_port)], gw_port, env=env)
    procs.append((gateway, "gateway"))
    alerting = start_process(
        [*base, "predictive-alerting", "--port", str(port)], port, env=env, timeout=30
    )
    procs.append((alerting, "alerting"))

    status, rules = get(port, "/v1/rules", auth=True)
    assert 200 == status
    names = [r["name"] for r in rules["data"]]
    assert ["ModelRequestRateAnomaly", "ModelErrorRatioAnomaly", "ModelTtftForecast",
            "TeamBudgetForecast"] == names  # fmt: skip

    load = TeamLoad(gw_port, secret)
    try:

        def scored() -> list[dict[str, Any]]:
            status, doc = get(port, "/v1/anomalies", auth=True)
            assert 200 == status
            return [f for e in doc["data"] if e["rule"] == "ModelErrorRatioAnomaly"
                    for f in e["findings"] if f.get("score") is not None]  # fmt: skip

        [finding] = wait_for("an error-ratio anomaly score", scored, 90)
        assert "sim-chat" == finding["series"]["model"]
        assert "ok" == finding["outcome"], finding  # no errors yet: no anomaly

        # The team's spend climbs at ~$0.1/s: its month-end forecast passes the $100 budget.
        [budget] = wait_for("the budget-forecast alert in Alertmanager",
                            lambda: _alerts(am_port, "TeamBudgetForecast"), 90)  # fmt: skip
        assert team == budget["labels"]["team"]
        assert "100" == budget["labels"]["budget_usd"]
        assert "above 1" == budget["annotations"]["threshold"]
        assert budget["annotations"]["forecast"].startswith("linear: ")
        status, forecasts = get(port, "/v1/forecasts", auth=True)
        by_rule = {e["rule"]: e for e in forecasts["data"]}
        [use] = by_rule["TeamBudgetForecast"]["findings"]
        assert "firing" == use["outcome"]
        assert 0 < use["value"] < 1  # not spent yet: forecast to be

        # The detector learns for its first 150 rows (seconds here, at the 1 s interval).
        wait_for("the detector's warm-up", lambda: scored()[0]["points"] >= 160, 240)
        assert "ok" == scored()[0]["outcome"]
        assert not _alerts(am_port, "ModelErrorRatioAnomaly")
        load.faulty = True  # half the requests fail upstream (the gateway answers 5xx)
        [fired] = wait_for("the error-ratio anomaly in Alertmanager",
                           lambda: _alerts(am_port, "ModelErrorRatioAnomaly"), 60)  # fmt: skip
        assert "sim-chat" == fired["labels"]["model"]
        assert "warning" == fired["labels"]["severity"]
        assert float(fired["annotations"]["anomaly_score"]) >= 0.5122
        assert any(s >= 500 for s in load.statuses)
    finally:
        load.stop()
    status, health = get(port, "/health")
    assert 200 == status
    assert health["rounds"]["completed"] > 0
