"""A real Prometheus and a real Alertmanager (Debian's packages) on loopback ports, scraping a
gateway in front of the simulator every second, for the alerting service's tests: ``start_stack``
(the ``stack`` fixture of this folder's conftest), ``Load`` (requests from a thread),
``serve_alerting`` (``citadel serve predictive-alerting`` as a process) and small readers."""

from __future__ import annotations

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
from urllib.parse import quote

import orjson
import pytest

from support import free_port, start_process, stop_process

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
ADMIN_KEY = KEY = "sk-alerting-test"

needs_prometheus = pytest.mark.skipif(
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


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


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


@contextlib.contextmanager
def start_stack(tmp: Path) -> Iterator[Stack]:
    """Alertmanager, Prometheus, the simulator and a gateway, stopped on leaving."""
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
    """Requests to the gateway from a background thread, one connection, until stopped; every
    other one streamed when ``stream`` (so that the time to first token is measured too)."""

    def __init__(self, port: int, *, stream: bool = False) -> None:
        self.port = port
        self.stream = stream
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        request = {"model": "sim-chat", "max_tokens": 4,
                   "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        bodies = [orjson.dumps(request)]
        if self.stream:
            bodies.append(orjson.dumps({**request, "stream": True}))
        headers = {"authorization": f"Bearer {ADMIN_KEY}", "content-type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                body = bodies[self.sent % len(bodies)]
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


def served(stack: Stack, query: str = "sum(citadel_gateway_requests_total)") -> float:
    """The gateway's request counter (or ``query``) as Prometheus last scraped it."""
    status, doc = get(stack.prometheus, f"/api/v1/query?query={quote(query)}")
    assert 200 == status, doc
    result = doc["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def alerting_config(
    stack: Stack, name: str, rules: str, *, defaults: bool = False, **endpoints: int
) -> Path:
    """A citadel.yaml of the service over the stack: ``rules`` only, or the default rules too."""
    path = stack.tmp / name
    path.write_text(
        f"""
endpoints:
  prometheus: "http://127.0.0.1:{endpoints.get("prometheus", stack.prometheus)}"
  alertmanager: "http://127.0.0.1:{stack.alertmanager}"
alerting:
  defaults: {"true" if defaults else "false"}
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
