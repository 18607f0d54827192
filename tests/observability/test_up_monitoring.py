"""``citadel up`` runs Prometheus and Alertmanager itself when they are installed and no
PROMETHEUS_ENDPOINT is set: the generated rules load, every service is scraped, alerts go to its
Alertmanager, and SIGTERM stops them with the rest. Without the binaries it says in one line how
to get them and everything else still starts."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from citadel.cli import SERVICES

from support import free_port, process_output, start_process, stop_process, wait_for

ENVIRONMENT = ("CITADEL_", "SERVER_", "REDIS_", "SQL_DATABASE_", "PROMETHEUS_", "ALERTMANAGER_")
pytestmark = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("prometheus-alertmanager")),
    reason="needs the Debian packages prometheus and prometheus-alertmanager",
)


def get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body.decode()
    finally:
        conn.close()


def answers(port: int, path: str) -> Any:
    try:
        status, body = get(port, path)
    except (OSError, http.client.HTTPException):
        return None
    return body if status == 200 else None


def refuses(port: int) -> bool:
    try:
        get(port, "/")
    except OSError:
        return True
    return False


def environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    monkeypatch.chdir(tmp_path)  # no citadel.yaml: the embedded defaults, the data dir here
    for name in [k for k in os.environ if k.startswith(ENVIRONMENT)]:
        monkeypatch.delenv(name)
    names = [*SERVICES, "simulator", "prometheus", "alertmanager"]
    ports = {name: free_port() for name in names}
    for name, port in ports.items():
        var = "API_GATEWAY_PORT" if name == "gateway" else f"{name.upper().replace('-', '_')}_PORT"
        monkeypatch.setenv(var, str(port))
    monkeypatch.setenv("CITADEL_ENV", "test")
    return ports


def test_up_starts_prometheus_and_alertmanager_with_the_generated_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = environment(monkeypatch, tmp_path)
    prom, am = ports["prometheus"], ports["alertmanager"]
    proc = start_process([sys.executable, "-m", "citadel", "up"], ports["gateway"], timeout=90)
    try:
        wait_for("Prometheus", lambda: answers(prom, "/-/ready"), 60)
        wait_for("Alertmanager", lambda: answers(am, "/-/ready"), 60)

        def groups() -> list[str]:
            body = answers(prom, "/api/v1/rules")
            return [g["name"] for g in body["data"]["groups"]] if body else []

        loaded = wait_for("the generated rules", groups, 30)
        assert {
            "citadel-recording",
            "citadel-platform",
            "citadel-slo-sim-chat-availability",
            "citadel-slo-sim-chat-ttft",
            "citadel-slo-sim-embed-availability",
        } <= set(loaded)
        assert "citadel-slo-sim-embed-ttft" not in loaded  # embeddings stream no tokens

        def targets() -> dict[str, str]:
            body = answers(prom, "/api/v1/targets")
            active = body["data"]["activeTargets"] if body else []
            return {t["labels"]["job"]: t["health"] for t in active}

        # The default scrape interval is 15 s: wait for the first scrape of every job.
        wait_for("every service scraped and up",
                 lambda: set(targets().values()) == {"up"} and len(targets()) == len(SERVICES) + 1,
                 60)  # fmt: skip
        assert {f"citadel-{s}" for s in SERVICES} | {"citadel-model-servers"} == set(targets())
        managers = answers(prom, "/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
        assert [m["url"] for m in managers] == [f"http://127.0.0.1:{am}/api/v2/alerts"]
        data = tmp_path / "citadel-data"
        assert (data / "rules" / "citadel.rules.yml").is_file()
        assert (data / "prometheus").is_dir()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        output = process_output(proc)
    finally:
        stop_process(proc)
    assert re.search(rf"prometheus +http://[^\s:]+:{prom}\n", output), output
    assert re.search(rf"alertmanager +http://[^\s:]+:{am}\n", output), output
    assert "Traceback" not in output
    assert (0, True, True, True) == (code, refuses(prom), refuses(am), refuses(ports["gateway"]))


def test_without_the_binaries_up_says_how_to_get_them_and_starts_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = environment(monkeypatch, tmp_path)
    bin_dir = tmp_path / "bin"  # a PATH with Python's tools but neither Prometheus binary
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    proc = start_process([sys.executable, "-m", "citadel", "up"], ports["gateway"], timeout=90)
    try:
        assert answers(ports["gateway"], "/health")
        output = process_output(proc)
    finally:
        stop_process(proc)
    lines = [line for line in output.splitlines() if "Prometheus" in line]
    assert lines == [
        "citadel: Prometheus and Alertmanager not started: install them (Debian: apt-get install "
        "prometheus prometheus-alertmanager) or set PROMETHEUS_ENDPOINT"
    ], output
    assert not (tmp_path / "citadel-data").exists()
    assert refuses(ports["prometheus"])
