"""The generated rules and dashboards against a real Prometheus and a real Alertmanager.

Every Citadel service runs as a process (started by this test on loopback ports) in front of two
simulators, one healthy and one answering every request with a 500; Prometheus scrapes them
every second with the generated ``prometheus.yml`` and evaluates the generated rules on a clock
sped up 60 times (``observability.speedup``: the 1 h window is 60 s, ``for: 1m`` is 1 s), and
sends its alerts to Alertmanager with the generated configuration. Traffic covers what the panels
show: streamed and plain chats, a model whose only deployment fails (an SLO burn), a deployment
that fails beside a healthy one (retries, breaker), refusals of a free-tier user, bad keys, a
client that hangs up mid-stream, a live-event subscriber, a forecast rule of the predictive
alerting service, and a pause of the limiter's Redis (the limiter fails open).

Then: every target is up, every recording rule yields series, the page-level burn-rate alert and
the upstream-error alert reach Alertmanager (the ticket of the same SLO is inhibited by the
page), and every query of every panel of every generated dashboard returns data — the issue's
proof that no panel is blank in production. A query that cannot have data here is listed in
``NO_DATA_HERE`` with the reason; the test fails if such a query has data after all (the list
would be stale) or if any other query has none.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from citadel.accounts.sql import open_store
from citadel.metering.migrate import LEDGER
from citadel.observability.dashboards import DASHBOARDS, grafana_json
from citadel.observability.rules import dump, rule_groups
from citadel.observability.scrape import alertmanager_config, prometheus_config
from citadel.observability.services import slos_for
from citadel.settings import Settings, load_settings

from support import free_port, wait_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
ADMIN = "sk-obs-e2e-admin"
SPEEDUP = 60
SERVICES = (
    "gateway",
    "custom-metrics",
    "predictive-alerting",
    "streaming-api",
    "graphql-api",
    "routing-api",
    "rate-limiting-api",
    "grafana-dashboards",
    "prometheus-rules",
)
SLOS = [
    {"model": "sim-chat", "objective": 99.5},
    {"model": "sim-chat", "kind": "ttft", "objective": 95, "threshold_seconds": 1.0},
    {"model": "sim-flaky", "objective": 99.0},
]
# Panel queries that cannot have data in this test, each with why; anything else must.
NO_DATA_HERE: dict[str, str] = {
    "citadel_streaming_lagged_events_total": (
        "counts live events dropped for a subscriber more than 1,000 events behind: this test's "
        "subscriber keeps up (tests/streaming drives a slow reader)"
    ),
}

pytestmark = pytest.mark.skipif(
    not all(os.access(p, os.X_OK) for p in (PROMETHEUS, ALERTMANAGER, REDIS)),
    reason="needs the Debian packages prometheus, prometheus-alertmanager and redis-server",
)


def request(
    port: int,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    key: str | None = ADMIN,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    sent = {"content-type": "application/json", **(headers or {})}
    if key:
        sent["authorization"] = f"Bearer {key}"
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request("POST" if body is not None else "GET", path, body=data, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode("utf-8", "replace")
    finally:
        conn.close()


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    port: int | None

    def output(self) -> str:
        fd = self.log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)  # a paused Redis must see SIGTERM
                self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


@dataclass
class Stack:
    tmp: Path
    ports: dict[str, int]
    prometheus: int
    alertmanager: int
    redis: Proc
    settings: Settings
    procs: list[Proc] = field(default_factory=list)
    premium_key: str = ""
    free_key: str = ""

    def start(self, name: str, args: list[str], port: int | None, ready: str = "/health") -> Proc:
        log = (self.tmp / f"{name}.log").open("w+b")
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        item = Proc(name, proc, log, port)
        self.procs.append(item)
        item.ready = ready  # type: ignore[attr-defined]
        return item

    def wait_ready(self, timeout: float = 60) -> None:
        def ready(item: Proc) -> bool:
            if item.process.poll() is not None:
                raise RuntimeError(f"{item.name} exited:\n{item.output()[-3000:]}")
            if item.port is None:
                return True
            with contextlib.suppress(OSError, http.client.HTTPException):
                return request(item.port, item.ready, key=None)[0] == 200  # type: ignore[attr-defined]
            return False

        wait_for("every process to answer", lambda: all(ready(p) for p in self.procs), timeout)

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, doc = request(
            self.prometheus, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), key=None
        )
        assert status == 200, (expr, doc)
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def am_alerts(self) -> list[dict[str, Any]]:
        status, alerts = request(self.alertmanager, "/api/v2/alerts", key=None)
        assert status == 200, alerts
        return list(alerts)


async def seed_accounts(uri: str) -> tuple[str, str]:
    """The ledger and accounts tables, a team, and a premium and a free user in it with a key
    each (what ``citadel migrate``, ``teams create``, ``users create`` and ``keys create`` do)."""
    await LEDGER.upgrade(uri)
    store = await open_store(uri, migrate=True)
    try:
        team = await store.create_team("research")
        secrets = []
        for tier in ("premium", "free"):
            user = await store.create_user(
                name=tier, email=f"{tier}@example.com", tier=tier, team_id=team.id
            )
            secrets.append((await store.create_key(user.id, name="e2e"))[1])
    finally:
        await store.aclose()
    return secrets[0], secrets[1]


def write_config(tmp: Path, ports: dict[str, int], sims: tuple[int, int], redis: int) -> Path:
    good, bad = (f"http://127.0.0.1:{p}" for p in sims)
    doc = {
        "env": "test",
        "gateway": {"admin_key": ADMIN},
        "ports": {k.replace("-", "_"): v for k, v in ports.items() if k in SERVICES},
        "endpoints": {
            "redis": f"redis://127.0.0.1:{redis}/0",
            "prometheus": f"http://127.0.0.1:{ports['prom']}",
            "alertmanager": f"http://127.0.0.1:{ports['am']}",
        },
        "accounts": {"database": f"sqlite+aiosqlite:///{tmp / 'citadel.db'}"},
        "metering": {"spool_path": str(tmp / "spool"), "journal_path": str(tmp / "journal")},
        # A breaker stays open 20 s (then longer), so "open for 5 minutes" holds at 60x speed.
        "routing": {"health": {"interval_seconds": 1}, "breaker": {"open_seconds": 20}},
        "models": [
            {
                "name": "sim-chat",
                "price": {"input_per_1k": 0.5, "output_per_1k": 1.5},
                "reference_price": {"input_per_1k": 5, "output_per_1k": 15},
                "deployments": [
                    {"name": "chat-a", "url": good, "gpu_hour_usd": 2.0},
                    {"name": "chat-b", "url": bad, "model": "sim-chat", "gpu_hour_usd": 4.0},
                ],
            },
            {
                "name": "sim-flaky",
                "deployments": [{"name": "flaky-a", "url": bad, "model": "sim-chat"}],
            },
        ],
        "slos": SLOS,
        "observability": {"speedup": SPEEDUP, "scrape_interval_seconds": 1},
        "alerting": {
            "interval_seconds": 1,
            "resend_seconds": 2,
            "rules": [
                {
                    "name": "GatewayTrafficForecast",
                    "kind": "forecast",
                    "query": "sum(citadel_gateway_requests_total)",
                    "threshold": 1,
                    "horizon_seconds": 60,
                    "lookback_seconds": 30,  # enough points to backtest the model
                    "step_seconds": 1,
                    "min_points": 5,
                    "model": "linear",
                    "severity": "warning",
                    "summary": "gateway traffic",
                }
            ],
        },
    }
    path = tmp / "citadel.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def chat(model: str, max_tokens: int = 4, stream: bool = False) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "observe me"}],
    }


class Traffic:
    """Requests in a background thread until stopped, bounded by ``limit`` seconds."""

    def __init__(self, stack: Stack, limit: float = 170) -> None:
        self.stack = stack
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _run(self) -> None:
        gw = self.stack.ports["gateway"]
        i = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            i += 1
            calls = [
                (chat("sim-chat"), ADMIN),
                (chat("sim-chat", 8, stream=True), ADMIN),
                (chat("sim-flaky"), ADMIN),
                (chat("sim-chat", 6, stream=True), self.stack.premium_key),
            ]
            if i % 5 == 0:
                calls.append((chat("sim-chat"), self.stack.free_key))
            for body, key in calls:
                try:
                    status, _ = request(gw, "/v1/chat/completions", body, key=key)
                    self._count(str(status))
                except (OSError, http.client.HTTPException) as exc:
                    self._count(type(exc).__name__)
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def hang_up_mid_stream(port: int) -> None:
    """A streamed chat whose client closes the socket after the first bytes of the reply."""
    body = json.dumps(chat("sim-chat", 200, stream=True)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {ADMIN}"
        f"\r\ncontent-type: application/json\r\nx-sim-tbt-ms: 50\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)


class Subscriber:
    """A live-event (SSE) subscriber to the streaming service, reading until stopped."""

    def __init__(self, port: int) -> None:
        self.received = 0
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=1)
        self._sock.sendall(
            f"GET /v1/events?topics=usage HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"authorization: Bearer {ADMIN}\r\naccept: text/event-stream\r\n\r\n".encode()
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self.received += len(data)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expression as Grafana sends it with every variable at All)."""
    out = []
    for board in DASHBOARDS:
        data = grafana_json(board)
        for panel in data["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for name in ("model", "deployment", "team"):
                    expr = expr.replace(f"${name}", ".*")
                out.append((data["uid"], panel["title"], expr.replace("$__rate_interval", "30s")))
    return out


def _exempt(expr: str) -> str | None:
    return next((why for name, why in NO_DATA_HERE.items() if name in expr), None)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("obs-e2e")
    ports = {name: free_port() for name in (*SERVICES, "prom", "am")}
    sims = (free_port(), free_port())
    redis_port = free_port()
    config = write_config(tmp, ports, sims, redis_port)
    settings = load_settings(str(config), {})
    rules_file = tmp / "rules" / "citadel.rules.yml"
    rules_file.parent.mkdir()
    rules_file.write_text(dump({"groups": rule_groups(slos_for(settings), speedup=SPEEDUP)}))
    (tmp / "prometheus.yml").write_text(
        dump(prometheus_config(settings, rule_files=(str(rules_file),), interval="1s"))
    )
    (tmp / "alertmanager.yml").write_text(dump(alertmanager_config()))

    redis_log = (tmp / "redis.log").open("w+b")
    redis_proc = subprocess.Popen(
        [REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no"],
        stdin=subprocess.DEVNULL, stdout=redis_log, stderr=redis_log,
    )  # fmt: skip
    redis = Proc("redis", redis_proc, redis_log, None)
    s = Stack(tmp, ports, ports["prom"], ports["am"], redis, settings)
    base = [sys.executable, "-m", "citadel", "--config", str(config)]
    try:
        s.premium_key, s.free_key = asyncio.run(seed_accounts(settings.accounts.database))
        s.start("alertmanager", [
            ALERTMANAGER, f"--config.file={tmp / 'alertmanager.yml'}",
            f"--storage.path={tmp / 'am'}", f"--web.listen-address=127.0.0.1:{ports['am']}",
            "--cluster.listen-address=",
        ], ports["am"], "/-/ready")  # fmt: skip
        s.start("prometheus", [
            PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{ports['prom']}",
        ], ports["prom"], "/-/ready")  # fmt: skip
        s.start("sim-good", [*base, "sim", "--port", str(sims[0])], sims[0])
        s.start("sim-bad", [*base, "sim", "--port", str(sims[1]), "--error-rate", "1",
                            "--error-codes", "500"], sims[1])  # fmt: skip
        for name in SERVICES:
            s.start(name, [*base, "serve", name], ports[name])
        s.wait_ready()
        yield s
    finally:
        for item in reversed(s.procs):
            item.stop()
        redis.stop()


@pytest.fixture(scope="module")
def loaded(stack: Stack) -> Iterator[Stack]:
    """The stack with traffic running; by the time it yields, the limiter's Redis has been
    paused once (so the limiter failed open) and a client has hung up mid-stream."""
    gw = stack.ports["gateway"]
    subscriber = Subscriber(stack.ports["streaming-api"])
    traffic = Traffic(stack)
    try:
        for key in ("sk-not-a-key", "sk-citadel-0000"):
            status, _ = request(gw, "/v1/chat/completions", chat("sim-chat"), key=key)
            assert status == 401
        for _ in range(25):  # the free tier allows 20 requests a minute
            request(gw, "/v1/chat/completions", chat("sim-chat"), key=stack.free_key)
        hang_up_mid_stream(gw)
        time.sleep(3)
        os.kill(stack.redis.process.pid, signal.SIGSTOP)
        try:
            for _ in range(4):
                status, _ = request(gw, "/v1/chat/completions", chat("sim-chat"),
                                    key=stack.premium_key)  # fmt: skip
                assert status == 200  # the limiter fails open
        finally:
            os.kill(stack.redis.process.pid, signal.SIGCONT)
        yield stack
    finally:
        traffic.stop()
        subscriber.stop()
        print("traffic:", traffic.counts, "subscriber bytes:", subscriber.received)


def test_prometheus_scrapes_every_service_and_model_server(loaded: Stack) -> None:
    def targets() -> dict[str, str]:
        status, doc = request(loaded.prometheus, "/api/v1/targets", key=None)
        assert status == 200
        return {
            f"{t['labels']['job']} {t['labels']['instance']}": t["health"]
            for t in doc["data"]["activeTargets"]
        }

    wait_for("every target up", lambda: set(targets().values()) == {"up"}, 30)
    jobs = {name.split()[0] for name in targets()}
    assert {f"citadel-{s}" for s in SERVICES} | {"citadel-model-servers"} == jobs
    assert len([n for n in targets() if n.startswith("citadel-model-servers")]) == 2


def test_every_recording_rule_yields_series(loaded: Stack) -> None:
    wanted = []
    for group in rule_groups(slos_for(loaded.settings), speedup=SPEEDUP):
        for rule in group["rules"]:
            if "record" in rule:
                labels = rule.get("labels", {})
                sel = ",".join(f'{k}="{v}"' for k, v in labels.items() if k == "slo")
                wanted.append(f"{rule['record']}{{{sel}}}" if sel else rule["record"])

    def missing() -> list[str]:
        return [expr for expr in wanted if not loaded.query(expr)]

    with contextlib.suppress(AssertionError):
        wait_for("every recording rule to yield series", lambda: not missing(), 60)
    gone = missing()
    assert gone == [], "\n".join(gone)
    assert len(wanted) >= 30


def _active(alerts: list[dict[str, Any]], name: str, **labels: str) -> list[dict[str, Any]]:
    return [
        a
        for a in alerts
        if a["labels"].get("alertname") == name
        and all(a["labels"].get(k) == v for k, v in labels.items())
    ]


def test_the_burn_rate_page_and_the_breaker_alert_reach_alertmanager(loaded: Stack) -> None:
    flaky = {"slo": "sim-flaky-availability"}

    def fired() -> bool:
        alerts = loaded.am_alerts()
        return bool(
            _active(alerts, "CitadelSLOBurnRatePage", **flaky)
            and _active(alerts, "CitadelSLOBurnRateTicket", **flaky)
            and _active(alerts, "CitadelBreakerOpen")
        )

    try:
        wait_for("the page, the ticket and the breaker alert in Alertmanager", fired, 60)
    except AssertionError as exc:
        seen = [(a["labels"]["alertname"], a["labels"].get("slo", a["labels"].get("deployment")),
                 a["status"]["state"]) for a in loaded.am_alerts()]  # fmt: skip
        rules = loaded.query('ALERTS{alertstate="firing"}')
        raise AssertionError(f"{exc}; Alertmanager has {seen}; Prometheus fires {rules}") from None
    alerts = loaded.am_alerts()
    [page] = _active(alerts, "CitadelSLOBurnRatePage", **flaky)
    assert page["status"]["state"] == "active"
    assert page["labels"]["severity"] == "page"
    assert page["labels"]["model"] == "sim-flaky"
    assert page["annotations"]["runbook_url"].endswith("#citadelsloburnratepage")
    assert "sim-flaky" in page["annotations"]["summary"]
    # The healthy model's availability does not page: its failures are retried on chat-a.
    assert not _active(alerts, "CitadelSLOBurnRatePage", slo="sim-chat-availability")
    # Alertmanager inhibits the ticket of the same SLO while its page fires.
    [ticket] = _active(alerts, "CitadelSLOBurnRateTicket", **flaky)
    assert ticket["status"]["state"] == "suppressed"
    assert ticket["status"]["inhibitedBy"] == [page["fingerprint"]]
    breakers = {a["labels"]["deployment"] for a in _active(alerts, "CitadelBreakerOpen")}
    assert breakers <= {"flaky-a", "chat-b"}  # only the deployments behind the failing server


def test_every_panel_query_of_every_dashboard_returns_data(loaded: Stack) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 60

    def empty() -> list[str]:
        return [
            f"{uid} / {title}: {expr}"
            for uid, title, expr in queries
            if not _exempt(expr) and not loaded.query(expr)
        ]

    with contextlib.suppress(AssertionError):
        wait_for("every panel query to return data", lambda: not empty(), 90, 2)
    blank = empty()
    assert blank == [], "\n".join(blank)
    exempt = [(expr, _exempt(expr)) for _, _, expr in queries if _exempt(expr)]
    assert len(exempt) == len(NO_DATA_HERE)  # each exemption is one query, named on purpose
    for expr, why in exempt:
        assert loaded.query(expr) == [], f"{expr} has data: drop it from NO_DATA_HERE ({why})"
