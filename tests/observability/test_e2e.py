"""The generated rules and dashboards against a real Prometheus and a real Alertmanager.

Every Citadel service runs as a process (started by this test on loopback ports) in front of three
simulators: one healthy, one answering every request with a 500 (until the last test restarts it
healthy), and a small "batch" server (vLLM's scheduler limits: a few sequences and a small KV
cache) that the test saturates; Prometheus scrapes them
every second with the generated ``prometheus.yml`` and evaluates the generated rules on a clock
sped up 60 times (``observability.speedup``: the 1 h window is 60 s, ``for: 1m`` is 1 s), and
sends its alerts to Alertmanager with the generated configuration. Traffic covers what the panels
show: streamed and plain chats, a model whose only deployment fails (an SLO burn), a deployment
that fails beside a healthy one (retries, breaker), refusals of a free-tier user, bad keys, a
client that hangs up mid-stream, a live-event subscriber, a forecast rule of the predictive
alerting service, and a pause of the limiter's Redis (the limiter fails open).

Then: every target is up, every recording rule yields series, the page-level burn-rate alert and
the upstream-error alert reach Alertmanager (the ticket of the same SLO is inhibited by the
page), the team's budget forecast fires from its rising spend, a ramp of long streams makes the
batch server's KV-cache and queue forecasts (vLLM metrics, ``predict_linear``) fire, and every
query of every panel of every generated dashboard returns data — the issue's
proof that no panel is blank in production. A query that cannot have data here is listed in
``NO_DATA_HERE`` with the reason; the test fails if such a query has data after all (the list
would be stale) or if any other query has none. Last, the failing simulator is restarted
healthy, and the page resolves: Alertmanager's webhook delivers it as resolved and its API no
longer lists it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
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
TEAM_BUDGET_USD = 1000
# The batch server: 40 streams of 100 tokens (plus the 8-token prompt) fill its KV cache.
BATCH_TOKENS = 100
BATCH_FLAGS = ["--max-num-seqs", "64", "--kv-cache-tokens", str(40 * (BATCH_TOKENS + 8))]
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


class Webhook:
    """Alertmanager's webhook receiver: every notification it posts, kept in order."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        received = self.notifications

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def alerts(self, status: str, name: str, **labels: str) -> list[dict[str, Any]]:
        return [
            a
            for n in list(self.notifications)
            for a in n["alerts"]
            if a["status"] == status
            and a["labels"].get("alertname") == name
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


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
    team_id: str = ""
    sims: tuple[int, int, int] = (0, 0, 0)
    webhook: Webhook | None = None

    def start(self, name: str, args: list[str], port: int | None, ready: str = "/health") -> Proc:
        log = (self.tmp / f"{name}.log").open("w+b")
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        item = Proc(name, proc, log, port)
        self.procs.append(item)
        item.ready = ready  # type: ignore[attr-defined]
        return item

    def restart(self, name: str, args: list[str]) -> None:
        """Stop the process ``name`` and start ``args`` in its place, on its port."""
        [old] = [p for p in self.procs if p.name == name]
        old.stop()
        self.procs.remove(old)
        self.start(name, args, old.port)
        self.wait_ready()

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


async def seed_accounts(uri: str) -> tuple[str, str, str]:
    """The ledger and accounts tables, a team with a monthly budget of USD 1,000, and a premium
    and a free user in it with a key each (what ``citadel migrate``, ``teams create``,
    ``users create`` and ``keys create`` do); the two secrets and the team's id."""
    await LEDGER.upgrade(uri)
    store = await open_store(uri, migrate=True)
    try:
        team = await store.create_team("research")
        await store.set_team_budget(team.id, TEAM_BUDGET_USD * 1_000_000)
        secrets = []
        for tier in ("premium", "free"):
            user = await store.create_user(
                name=tier, email=f"{tier}@example.com", tier=tier, team_id=team.id
            )
            secrets.append((await store.create_key(user.id, name="e2e"))[1])
    finally:
        await store.aclose()
    return secrets[0], secrets[1], team.id


def write_config(tmp: Path, ports: dict[str, int], sims: tuple[int, int, int], redis: int) -> Path:
    good, bad, batch = (f"http://127.0.0.1:{p}" for p in sims)
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
        # A breaker stays open 20 s, so "open for 5 minutes" holds at 60x speed, and no longer,
        # so the failing deployments are probed again soon after the fault is removed.
        "routing": {
            "health": {"interval_seconds": 1},
            "breaker": {"open_seconds": 20, "max_open_seconds": 20},
        },
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
            {  # scraped as a model server; the test saturates it directly
                "name": "sim-batch",
                "deployments": [{"name": "batch-a", "url": batch, "model": "sim-chat"}],
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


GRAPHQL_MODELS = "query Models { models { name deployments { name state } } }"
# over the 30 aliases the API allows: refused before it runs (the refusals panel)
GRAPHQL_TOO_MANY_ALIASES = (
    "query Aliases { " + " ".join(f"m{i}: models {{ name }}" for i in range(40)) + " }"
)


class Traffic:
    """Requests in a background thread until stopped, bounded by ``limit`` seconds."""

    def __init__(self, stack: Stack, limit: float = 420) -> None:
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
        graphql = self.stack.ports["graphql-api"]
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
            if i % 3 == 0:  # the GraphQL panels: operations, their cost, and a refusal
                for query in (GRAPHQL_MODELS, GRAPHQL_TOO_MANY_ALIASES):
                    try:
                        status, _ = request(graphql, "/graphql", {"query": query})
                        self._count(f"graphql {status}")
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
    sims = (free_port(), free_port(), free_port())
    redis_port = free_port()
    config = write_config(tmp, ports, sims, redis_port)
    settings = load_settings(str(config), {})
    rules_file = tmp / "rules" / "citadel.rules.yml"
    rules_file.parent.mkdir()
    rules_file.write_text(dump({"groups": rule_groups(slos_for(settings), speedup=SPEEDUP)}))
    (tmp / "prometheus.yml").write_text(
        dump(prometheus_config(settings, rule_files=(str(rules_file),), interval="1s"))
    )
    webhook = Webhook()
    am_config = alertmanager_config(webhook.url)
    # Notifications (and so resolutions) within seconds instead of Alertmanager's minute.
    am_config["route"] |= {"group_wait": "1s", "group_interval": "2s"}
    (tmp / "alertmanager.yml").write_text(dump(am_config))

    redis_log = (tmp / "redis.log").open("w+b")
    redis_proc = subprocess.Popen(
        [REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no"],
        stdin=subprocess.DEVNULL, stdout=redis_log, stderr=redis_log,
    )  # fmt: skip
    redis = Proc("redis", redis_proc, redis_log, None)
    s = Stack(tmp, ports, ports["prom"], ports["am"], redis, settings, sims=sims, webhook=webhook)
    base = [sys.executable, "-m", "citadel", "--config", str(config)]
    s.base = base  # type: ignore[attr-defined]
    try:
        s.premium_key, s.free_key, s.team_id = asyncio.run(
            seed_accounts(settings.accounts.database)
        )
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
        s.start("sim-batch", [*base, "sim", "--port", str(sims[2]), *BATCH_FLAGS], sims[2])
        for name in SERVICES:
            s.start(name, [*base, "serve", name], ports[name])
        s.wait_ready()
        yield s
    finally:
        for item in reversed(s.procs):
            item.stop()
        redis.stop()
        webhook.close()


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
    assert len([n for n in targets() if n.startswith("citadel-model-servers")]) == 3


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


def test_a_teams_rising_spend_fires_its_budget_forecast(loaded: Stack) -> None:
    """The premium user's traffic raises team research's spend: far below its USD 1,000, but
    at that rate past it before the month ends (predict_linear over the 6 h window, sped up)."""
    team = {"id": loaded.team_id}

    def fired() -> bool:
        return bool(_active(loaded.am_alerts(), "CitadelTeamBudgetForecast", **team))

    try:
        wait_for("the team's budget forecast in Alertmanager", fired, 90)
    except AssertionError as exc:
        util = loaded.query('citadel_business_budget_utilisation_ratio{scope="team"}')
        raise AssertionError(f"{exc}; utilisation {util}") from None
    [alert] = _active(loaded.am_alerts(), "CitadelTeamBudgetForecast", **team)
    assert alert["labels"]["severity"] == "ticket"
    assert alert["labels"]["scope"] == "team"
    [now] = loaded.query(f'citadel_business_budget_utilisation_ratio{{id="{loaded.team_id}"}}')
    assert 0 < float(now["value"][1]) < 1  # not spent yet: forecast, not exhaustion
    assert not _active(loaded.am_alerts(), "CitadelBudgetExhausted", id=loaded.team_id)


def _open_stream(port: int) -> socket.socket:
    """A long stream sent straight to a model server and not read: it holds a slot and
    its KV cache (or waits for them) until the socket closes."""
    body = json.dumps(chat("sim-chat", BATCH_TOKENS, stream=True)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nx-sim-tbt-ms: 500\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head + body)
    return sock


def test_a_saturating_model_server_fires_the_vllm_forecasts(loaded: Stack) -> None:
    """Four new 50-second streams a second on the batch server: its KV cache fills in about
    ten seconds, then requests queue; both predict_linear alerts reach Alertmanager."""
    port = loaded.sims[2]
    instance = {"instance": f"127.0.0.1:{port}", "model_name": "sim-chat"}
    socks: list[socket.socket] = []
    stop = threading.Event()

    def ramp() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline and len(socks) < 240:
            socks.append(_open_stream(port))
            time.sleep(0.25)

    thread = threading.Thread(target=ramp, daemon=True)
    thread.start()

    def fired() -> bool:
        alerts = loaded.am_alerts()
        return bool(
            _active(alerts, "CitadelKVCacheSaturating", **instance)
            and _active(alerts, "CitadelModelServerQueueGrowing", **instance)
        )

    try:
        wait_for("the KV-cache and queue forecasts in Alertmanager", fired, 60)
        alerts = loaded.am_alerts()
        [kv] = _active(alerts, "CitadelKVCacheSaturating", **instance)
        assert kv["labels"]["service"] == "model-servers"
        assert kv["annotations"]["runbook_url"].endswith("#citadelkvcachesaturating")
        where = f'instance="{instance["instance"]}",model_name="sim-chat"'
        [usage] = loaded.query(f"vllm:kv_cache_usage_perc{{{where}}}")
        assert float(usage["value"][1]) > 0.5
        [waiting] = loaded.query(f"vllm:num_requests_waiting{{{where}}}")
        assert float(waiting["value"][1]) > 5
        # The healthy chat server never saturates under this test's traffic.
        good = {"instance": f"127.0.0.1:{loaded.sims[0]}"}
        assert not _active(alerts, "CitadelKVCacheSaturating", **good)
    except AssertionError as exc:
        rules = loaded.query('ALERTS{alertname=~"CitadelKVCache.*|CitadelModelServerQueue.*"}')
        raise AssertionError(f"{exc}; Prometheus: {rules}") from None
    finally:
        stop.set()
        thread.join(5)
        for sock in socks:
            sock.close()


def test_the_page_resolves_once_the_fault_is_removed(loaded: Stack) -> None:
    """The failing simulator restarted healthy: the breakers close on their next probe, the
    short burn windows drain, and Alertmanager delivers the page as resolved (runs last: the
    panel queries above read the failures)."""
    assert loaded.webhook is not None
    page, flaky = "CitadelSLOBurnRatePage", {"slo": "sim-flaky-availability"}
    assert _active(loaded.am_alerts(), page, **flaky), "the page must fire before it resolves"
    assert loaded.webhook.alerts("firing", page, **flaky)  # the webhook got it too
    port = loaded.sims[1]
    loaded.restart("sim-bad", [*loaded.base, "sim", "--port", str(port)])  # type: ignore[attr-defined]
    removed = time.monotonic()

    def resolved() -> bool:
        return bool(loaded.webhook and loaded.webhook.alerts("resolved", page, **flaky))

    try:
        wait_for("the page resolved in Alertmanager", resolved, 90, 1)
    except AssertionError as exc:
        seen = [(a["labels"]["alertname"], a["status"]["state"]) for a in loaded.am_alerts()]
        ratio = loaded.query('slo:sli_error:ratio_rate5m{slo="sim-flaky-availability"}')
        raise AssertionError(f"{exc}; Alertmanager has {seen}; 5m ratio {ratio}") from None
    print(f"the page resolved {time.monotonic() - removed:.0f} s after the fault was removed")
    [note] = loaded.webhook.alerts("resolved", page, **flaky)[-1:]
    assert note["endsAt"] > note["startsAt"]
    wait_for("the page gone from Alertmanager's API", lambda: not _active(
        loaded.am_alerts(), page, **flaky), 30)  # fmt: skip
    assert not loaded.query(
        'ALERTS{alertname="CitadelSLOBurnRatePage",slo="sim-flaky-availability"}'
    )
