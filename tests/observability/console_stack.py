"""A whole observable installation on loopback ports, for the console's browser test and for
``docs/screenshots.py``: the simulator, the gateway, custom-metrics (the ledger's API), the
dashboards service (:9093's console) and a real Prometheus (Debian's, 1 s scrape, the generated
rules loaded), with users in two teams sending traffic through the gateway.

    with console_stack(tmp_path) as stack:
        ...  # stack.console, stack.admin_key, stack.readonly_key; traffic runs until the end

Every process is started here and stopped, by its pid, when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from citadel.accounts.sql import open_store
from citadel.observability.names import default_slos
from citadel.observability.rules import rules_yaml
from citadel.observability.scrape import prometheus_config
from citadel.settings import load_settings

from support import free_port, start_process, stop_process

ADMIN_KEY = "sk-console-admin"
READONLY_KEY = "sk-console-reader"
PROMETHEUS = "/usr/bin/prometheus"
MODELS = ("sim-chat", "sim-code")


@dataclass
class Stack:
    console: str  # the dashboards service, e.g. http://127.0.0.1:PORT
    gateway: str
    metrics: str
    prometheus: str
    config: Path
    admin_key: str = ADMIN_KEY
    readonly_key: str = READONLY_KEY
    sent: list[int] = field(default_factory=list)  # statuses of the traffic's requests


def _names(deployments: int) -> list[str]:
    """The deployments of each model: a and b by default, numbered when there are more."""
    if deployments <= 2:
        return ["a", "b"][:deployments]
    return [f"{i:02d}" for i in range(deployments)]


def _config(path: Path, ports: dict[str, int], deployments: int = 2) -> Path:
    sim = f"http://127.0.0.1:{ports['sim']}"
    database = f"sqlite+aiosqlite:///{path.parent / 'citadel.db'}"
    doc = {
        "env": "test",
        "host": "127.0.0.1",
        "hostname": "127.0.0.1",
        "ports": {
            "gateway": ports["gateway"],
            "custom_metrics": ports["metrics"],
            "grafana_dashboards": ports["console"],
            "simulator": ports["sim"],
        },
        "accounts": {"database": database, "key_cache_ttl_seconds": 1},
        "models": [
            {
                "name": name,
                "price": {"input_per_1k": 0.5 * (i + 1), "output_per_1k": 1.5 * (i + 1)},
                "reference_price": {"input_per_1k": 2.5, "output_per_1k": 10.0},
                "deployments": [
                    {
                        "name": f"{name}-{x}",
                        "url": sim,
                        "model": name,
                        "gpu_hour_usd": 2.5,
                        "gpus": 1,
                    }
                    for x in _names(deployments)
                ],
            }
            for i, name in enumerate(MODELS)
        ],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def _users(database: str) -> list[str]:
    """Four users in two teams, on the standard tier but one free (its refusals show)."""

    async def make() -> list[str]:
        store = await open_store(database, migrate=True)
        try:
            teams = {n: (await store.create_team(n)).id for n in ("research", "product")}
            keys = []
            for name, team, tier in (
                ("ann", "research", "standard"),
                ("bob", "research", "free"),
                ("cat", "product", "standard"),
                ("dan", "product", "standard"),
            ):
                user = await store.create_user(
                    name=name, email=f"{name}@example.com", tier=tier, team_id=teams[team]
                )
                keys.append((await store.create_key(user.id, name="console"))[1])
            return keys
        finally:
            await store.aclose()

    return asyncio.run(make())


def _traffic(gateway: str, keys: list[str], stop: threading.Event, sent: list[int]) -> None:
    """Chat requests, some streamed, from every user, until ``stop``: about 10 a second."""
    port = int(gateway.rsplit(":", 1)[1])
    rng = random.Random(7)
    while not stop.is_set():
        key = rng.choice(keys)
        body = {
            "model": rng.choice(MODELS),
            "messages": [{"role": "user", "content": "hello " * rng.randint(1, 40)}],
            "max_tokens": rng.randint(4, 40),
            "stream": rng.random() < 0.3,
        }
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                body=json.dumps(body),
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            )
            response = conn.getresponse()
            response.read()
            sent.append(response.status)
        except OSError:
            sent.append(0)
        finally:
            conn.close()
        stop.wait(0.1)


def _prometheus(tmp: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    settings = load_settings(str(config), {"CITADEL_ADMIN_KEY": ADMIN_KEY})
    (tmp / "rules").mkdir()
    (tmp / "rules" / "citadel.yml").write_text(rules_yaml(default_slos(list(MODELS))))
    scrape = prometheus_config(
        settings,
        rule_files=(str(tmp / "rules" / "*.yml"),),
        interval="1s",
        services=("gateway", "custom-metrics", "grafana-dashboards"),
    )
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(scrape))
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((tmp / "prometheus.log").read_text()[-2000:])
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                conn.request("GET", "/-/ready")
                if conn.getresponse().status == 200:
                    return proc
            finally:
                conn.close()
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise RuntimeError("Prometheus did not become ready in 30 s")


@contextlib.contextmanager
def console_stack(tmp: Path, *, prometheus: bool = True, deployments: int = 2) -> Iterator[Stack]:
    """The stack above, traffic running; ``prometheus=False`` leaves Prometheus out (the
    console's ledger panels must still draw); ``deployments`` per model (all on the one
    simulator: the panels' series grow with them, which is what the page-load bench varies)."""
    ports = {name: free_port() for name in ("sim", "gateway", "metrics", "console", "prom")}
    config = _config(tmp / "citadel.yaml", ports, deployments)
    keys = _users(f"sqlite+aiosqlite:///{tmp / 'citadel.db'}")
    env = {"CITADEL_ADMIN_KEY": ADMIN_KEY, "CITADEL_READONLY_KEY": READONLY_KEY}
    base = [sys.executable, "-m", "citadel", "--config", str(config)]
    started: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    thread: threading.Thread | None = None
    prom_url = f"http://127.0.0.1:{ports['prom']}"
    try:
        started.append(start_process([*base, "sim"], ports["sim"]))
        started.append(start_process([*base, "serve", "gateway"], ports["gateway"], env=env))
        started.append(start_process([*base, "serve", "custom-metrics"], ports["metrics"], env=env))
        console_env = env | ({"PROMETHEUS_ENDPOINT": prom_url} if prometheus else {})
        started.append(
            start_process([*base, "serve", "grafana-dashboards"], ports["console"], env=console_env)
        )
        if prometheus:
            started.append(_prometheus(tmp, config, ports["prom"]))
        stack = Stack(
            console=f"http://127.0.0.1:{ports['console']}",
            gateway=f"http://127.0.0.1:{ports['gateway']}",
            metrics=f"http://127.0.0.1:{ports['metrics']}",
            prometheus=prom_url,
            config=config,
        )
        thread = threading.Thread(
            target=_traffic, args=(stack.gateway, keys, stop, stack.sent), daemon=True
        )
        thread.start()
        yield stack
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=15)
        for proc in reversed(started):
            stop_process(proc)
